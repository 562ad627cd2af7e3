"""The `farcast` command: output, exit codes, one-line errors without tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from flows.cli import main

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
        [sys.executable, "-m", "flows.cli", "ingest", str(tmp_path / "empty"), "--store", str(tmp_path / "s")],
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
    from flows.cli import _steps_text

    assert _steps_text([0, 3, 6]) == "[0, 3, 6]"
    assert _steps_text(list(range(0, 181, 3))) == "[0, 3, 6, ..., 174, 177, 180]"
