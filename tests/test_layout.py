"""The one-way import rule of docs/style.md: flows -> pipelines -> {storage, farcast_core}."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("farcast_core", "storage", "pipelines", "flows")
# what each package may import, of the project's packages and the I/O or orchestration libraries
ALLOWED = {
    "farcast_core": {"farcast_core"},
    "storage": {"storage", "farcast_core", "zarr", "safetensors"},
    "pipelines": {"pipelines", "storage", "farcast_core", "zarr", "safetensors"},
    "flows": {"flows", "pipelines", "storage", "farcast_core", "zarr", "safetensors", "prefect", "prefect_dask"},
}
WATCHED = set(PACKAGES) | {"zarr", "safetensors", "prefect", "prefect_dask"}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_imports_run_one_way():
    bad = []
    for pkg in PACKAGES:
        files = sorted((REPO / pkg).rglob("*.py"))
        assert files, f"{pkg}/ is missing"
        for f in files:
            for mod in imports(f) & WATCHED:
                if mod not in ALLOWED[pkg]:
                    bad.append(f"{f.relative_to(REPO)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_core_opens_no_files():
    for f in (REPO / "farcast_core").rglob("*.py"):
        tree = ast.parse(f.read_text())
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "open" not in calls, f"{f} opens a file"


def test_the_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import zarr\nfrom storage.store import RunStore\n")
    assert imports(bad) == {"zarr", "storage"}
