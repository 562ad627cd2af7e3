"""The one-way import rule of docs/style.md: flows -> pipelines -> {storage, farcast_core}, and the
package ``farcast`` (its folder: the public API, the framework adapters, the example runs) on top.

The folders pipelines/, storage/ and flows/ install as farcast.pipelines, farcast.storage and
farcast.flows; the rule speaks of the folders."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("farcast_core", "storage", "pipelines", "flows", "farcast")
MAPPED = ("pipelines", "storage", "flows")  # farcast.<these> are folders of their own
# what each package may import, of the project's packages and the I/O or orchestration libraries
ALLOWED = {
    "farcast_core": {"farcast_core"},
    "storage": {"storage", "farcast_core", "zarr", "safetensors"},
    "pipelines": {"pipelines", "storage", "farcast_core", "zarr", "safetensors"},
    "flows": {"flows", "pipelines", "storage", "farcast_core", "zarr", "safetensors", "prefect", "prefect_dask", "farcast"},
    "farcast": {"farcast", "flows", "pipelines", "storage", "farcast_core"},
}
WATCHED = set(PACKAGES) | {"zarr", "safetensors", "prefect", "prefect_dask"}


def _folder(module: str) -> str:
    """The folder (or library) an imported module comes from: farcast.pipelines.fit -> pipelines."""
    parts = module.split(".")
    if parts[0] == "farcast" and len(parts) > 1 and parts[1] in MAPPED:
        return parts[1]
    return parts[0]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {_folder(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(_folder(node.module))
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


# what touches files: builtins, pathlib methods, modules and functions. Pipelines reach files only through storage.
FILE_CALLS = {"open"}
FILE_METHODS = {"read_text", "write_text", "read_bytes", "write_bytes", "exists", "is_file", "is_dir", "iterdir",
                "mkdir", "unlink", "rmdir", "rename", "touch", "glob", "rglob", "stat", "listdir", "walk", "remove",
                "makedirs", "rmtree", "copy", "copy2", "copytree", "mkdtemp", "NamedTemporaryFile", "fsync", "load", "save"}
FILE_MODULES = {"shutil", "tempfile", "fsspec", "pickle"}


def file_io(path: Path) -> list[str]:
    """Calls in ``path`` that touch files (``json.load``/``torch.load``/``p.exists()``...), and I/O modules imported."""
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in FILE_CALLS:
                found.append(f"line {node.lineno}: {f.id}()")
            elif isinstance(f, ast.Attribute) and f.attr in FILE_METHODS:
                found.append(f"line {node.lineno}: .{f.attr}()")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: imports {n}" for n in names if n.split(".")[0] in FILE_MODULES]
    return found


def test_pipelines_touch_files_only_through_storage():
    bad = [f"{f.relative_to(REPO)} {what}" for f in sorted((REPO / "pipelines").rglob("*.py")) for what in file_io(f)]
    assert not bad, "file access belongs in storage/:\n" + "\n".join(bad)


def test_the_file_io_checker_catches_file_access(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import shutil\nimport json\nfrom pathlib import Path\n"
                   "def f(p):\n    Path(p).exists()\n    json.load(open(p))\n    return p.split('.')\n")
    assert file_io(bad) == ["line 1: imports shutil", "line 5: .exists()", "line 6: .load()", "line 6: open()"]


def test_the_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("import zarr\nfrom farcast.storage.store import RunStore\nimport farcast.adapters\n")
    assert imports(bad) == {"zarr", "storage", "farcast"}


def test_installed_names_do_not_collide(tmp_path):
    """A user's project with its own pipelines/, storage/ and flows/ imports its own; farcast's are
    farcast.pipelines, farcast.storage and farcast.flows."""
    import subprocess
    import sys

    for name in MAPPED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"MINE = {name!r}\n")
    code = ("import pipelines, storage, flows, farcast, farcast.pipelines.fit, farcast.storage.store, farcast.flows.cli\n"
            "print(pipelines.MINE, storage.MINE, flows.MINE, farcast.fit.__module__, farcast.__version__ != '')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["pipelines", "storage", "flows", "farcast.pipelines.fit", "True"]
