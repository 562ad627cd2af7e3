"""The `farcast` command: output, exit codes, one-line errors without tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from farcast.flows.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_ingest_prints_what_it_added_then_nothing_new(safetensors_run, tmp_path):
    store = str(tmp_path / "store")
    r = CliRunner().invoke(main, ["ingest", str(safetensors_run), "--store", store])
    assert r.exit_code == 0, r.output
    assert "added 5 step(s) [0, 3, 6, 9, 12] x 9 tensors" in r.output  # short lists in full (long: first, ..., last)
    r = CliRunner().invoke(main, ["ingest", str(safetensors_run), "--store", store])
    assert r.exit_code == 0 and "nothing new" in r.output


def test_ingest_json(safetensors_run, tmp_path):
    r = CliRunner().invoke(main, ["ingest", str(safetensors_run), "--store", str(tmp_path / "s"), "--json"])
    out = json.loads(r.stdout)
    assert out["added"] == [0, 3, 6, 9, 12] and out["bytes_written"] > 0


def test_skipped_checkpoints_are_reported(hf_run, tmp_path):
    import shutil

    run = tmp_path / "out"
    shutil.copytree(hf_run, run)
    (run / "checkpoint-8" / "trainer_state.json").unlink()
    r = CliRunner().invoke(main, ["ingest", str(run), "--store", str(tmp_path / "s")])
    assert r.exit_code == 0
    assert "skipped" in r.output and "checkpoint-8" in r.output and "trainer_state.json" in r.output


def test_bad_input_is_one_line_and_nonzero_in_a_real_process(tmp_path):
    (tmp_path / "empty").mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "farcast.flows.cli", "ingest", str(tmp_path / "empty"), "--store", str(tmp_path / "s")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "no checkpoints found" in p.stderr


def test_truncated_file_names_file_and_tensor(safetensors_run, tmp_path):
    f = safetensors_run / "step_000012.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    r = CliRunner().invoke(main, ["ingest", str(safetensors_run), "--store", str(tmp_path / "s")])
    assert r.exit_code == 2
    assert "step_000012.safetensors: truncated: tensor" in r.stderr


def test_long_step_lists_are_shortened():
    from farcast.pipelines.ingest import steps_text as _steps_text

    assert _steps_text([0, 3, 6]) == "[0, 3, 6]"
    assert _steps_text(list(range(0, 181, 3))) == "[0, 3, 6, ..., 174, 177, 180]"


def test_commands_given_the_run_directory_reuse_the_store_ingest_made(tmp_path, monkeypatch):
    """fit, backtest and emit take the checkpoint directory and use the store of the earlier 'ingest --store':
    no second copy of the run under FARCAST_HOME; steps saved since are ingested into it first."""
    from farcast.examples import write_digits_run

    monkeypatch.setenv("FARCAST_HOME", str(tmp_path / "home"))
    run = write_digits_run(tmp_path / "run", steps=30, every=5)
    store = tmp_path / "mystore"
    assert CliRunner().invoke(main, ["ingest", str(run), "--store", str(store)]).exit_code == 0
    r = CliRunner().invoke(main, ["fit", str(run), "--ratio", "1.5", "--json"])
    assert r.exit_code == 0, r.output
    fitted = json.loads(r.stdout)
    assert fitted["store"] == str(store) and fitted["target_step"] == 45 and Path(fitted["forecasters"]).is_file()
    r = CliRunner().invoke(main, ["backtest", str(run), "--ratio", "1.5", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["target_step"] == 45
    r = CliRunner().invoke(main, ["emit", str(run), "--out", str(tmp_path / "out"), "--ratio", "1.5", "--allow-worse",
                                  "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["emitted"] == str(tmp_path / "out" / "step_000045.safetensors")
    assert not (tmp_path / "home" / "stores").exists()  # no default store was built
    r = CliRunner().invoke(main, ["emit", str(run), "--store", str(store), "--out", str(tmp_path / "o2"), "--ratio", "1.5"])
    assert r.exit_code == 0 or "worse" in r.stderr  # --store with a run directory is accepted
    r = CliRunner().invoke(main, ["fit", str(store), "--store", str(store), "--ratio", "1.5"])
    assert r.exit_code == 2 and "--store goes with a checkpoint directory" in r.stderr


def test_progress_bars_only_on_a_terminal(tmp_path, monkeypatch):
    """Each stage's bar reaches its total on a terminal; no bar when stderr is not one, or with --quiet."""
    import io

    from farcast.flows.cli import Bars
    from farcast.examples import write_digits_run
    from farcast.pipelines.emit import EmitConfig, emit
    from farcast.pipelines.ingest import ingest

    run = write_digits_run(tmp_path / "run", steps=30, every=5)
    ingest(run, tmp_path / "s")
    seen: dict[str, tuple[int, int]] = {}
    emit(tmp_path / "s", tmp_path / "o", ratio=1.5, config=EmitConfig(allow_worse=True),
         progress=lambda stage, done, total: seen.__setitem__(stage, (done, total)))
    assert set(seen) == {"backtest fit", "backtest", "fit", "write"}
    assert all(done == total > 0 for done, total in seen.values()), seen

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for tty, quiet, shown in ((True, False, True), (True, True, False), (False, False, False)):
        err = Tty() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        bars = Bars(quiet)
        for i in range(1, 4):
            bars("write", i, 3)
        assert ("write: 100%" in err.getvalue()) == shown and not bars.bars


def test_the_commands_defaults_are_the_configs_defaults():
    """Options take their defaults from the config dataclasses: a command given no settings runs with
    exactly the settings the Python API uses by default."""
    from farcast.flows.cli import _fit_config, main
    from farcast_core.config import EmitConfig, FitConfig, IngestConfig

    fit = main.commands["fit"].make_context("fit", ["run"]).params
    assert _fit_config(fit["lam"], fit["features"], fit["cuts"], fit["sample"], fit["seed"], fit["axis"],
                       shrink=fit["shrink"]) == FitConfig()
    stated = main.commands["fit"].make_context("fit", ["run", "--shrink", "0.5"]).params
    assert _fit_config(**{k: stated[k] for k in ("lam", "features", "cuts", "sample", "seed", "axis", "shrink")}).shrink == 0.5
    ingest = main.commands["ingest"].make_context("ingest", ["run", "--store", "s"]).params
    assert IngestConfig(memory_budget_mb=ingest["memory_budget_mb"], workers=ingest["workers"]) == IngestConfig()
    emit = main.commands["emit"].make_context("emit", ["run", "--out", "o", "--ratio", "2"]).params
    assert EmitConfig(optimizer=emit["optimizer"], nonfinite=emit["nonfinite"]) == EmitConfig()
    run = main.commands["run"].make_context("run", ["run", "--out", "o", "--ratio", "2"]).params
    assert (run["optimizer"], run["nonfinite"], run["features"]) == ("keep", "refuse", (0.5, 0.8))
