"""Faults a real user meets, reproduced with real processes: concurrent writers, kill -9, a full disk,
permission denied, bad option values, and the seven reproductions of the reliability issue.

Every case checks the two promises: nothing is lost or half-written where a trainer would pick
it up, and the command says what happened in one line and exits 2.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from farcast.examples import write_digits_run
from farcast.pipelines.ingest import ingest
from farcast.storage.checkpoints import discover
from farcast.storage.store import TMP_DIR, RunStore
from tests.conftest import store_equals_sources

ENV = {**os.environ, "FARCAST_LOCK_WAIT": "1", "PYTHONWARNINGS": "ignore"}


def farcast(*args, cwd: Path | None = None, env: dict | None = None, prefix: list[str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command in a fresh process."""
    cmd = [*(prefix or []), sys.executable, "-m", "farcast.flows.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**ENV, **(env or {})}, timeout=timeout)


def cli(*args, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command run in this process (faster; for cases that need no process of their own)."""
    from click.testing import CliRunner

    from farcast.flows.cli import main

    old = Path.cwd()
    try:
        if cwd:
            os.chdir(cwd)
        r = CliRunner().invoke(main, list(map(str, args)), env={"FARCAST_LOCK_WAIT": "1", **(env or {})})
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    """The failure is one 'error:' line (naming ``words``), exit status 2, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def leftovers(*dirs: Path) -> list[Path]:
    """Temporary files of farcast writers in ``dirs`` (recursively)."""
    out = []
    for d in dirs:
        if d.exists():
            out += [p for p in d.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".farcast-tmp")
                    or p.name.startswith(".farcast-old") or ".tmp-" in p.name or p.name == TMP_DIR]
    return out


@pytest.fixture
def run(tmp_path) -> Path:
    """A digits MLP trained for real with Adam, a safetensors file every 5 steps (0..60)."""
    return write_digits_run(tmp_path / "run", steps=60, every=5, optimizer="adam", lr=1e-3)


@pytest.fixture(scope="module")
def big_states():
    """A wide digits MLP (1.2M parameters, 5 MB a step): ingest and emit take long enough to be killed midway."""
    from farcast.examples import train_digits

    return train_digits(steps=45, every=5, optimizer="adam", lr=1e-3, hidden=16384)


def write_run(d: Path, states) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for step, sd in states:
        save_file(sd, d / f"step_{step:06d}.safetensors")
    return d


# ------------------------------------------------------------------ one writer per store

PAUSE_AFTER_FIRST_COMMIT = """
import os, signal, sys
from farcast.storage.store import RunStore
real = RunStore.commit
def commit(self, row, record, schedule=None):
    real(self, row, record, schedule)
    if row == 0:
        open({marker!r}, "w").close()
        os.kill(os.getpid(), signal.SIGSTOP)  # stopped holding the store, as a user's SIGSTOP would
RunStore.commit = commit
from farcast.flows.cli import main
main(["ingest", {run!r}, "--store", {store!r}, "--workers", "1"])
"""


def test_concurrent_ingest_waits_then_refuses_naming_the_holder(run, tmp_path):
    """The reproduction: ingest A stopped after its first commit, a checkpoint rotated away, ingest B run."""
    store, marker = tmp_path / "store", tmp_path / "marker"
    a = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_FIRST_COMMIT.format(
        marker=str(marker), run=str(run), store=str(store))], env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert a.poll() is None, a.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        (run / "step_000005.safetensors").unlink()  # save_total_limit rotation
        b = farcast("ingest", run, "--store", store)
        one_line_error(b, "another farcast is writing this store", f"PID {a.pid}")
        assert "waiting up to 1 s" in b.stderr
    finally:
        os.kill(a.pid, signal.SIGCONT)
    # A resumes: the step it had planned is gone; it stops cleanly with what it committed
    assert a.wait(120) == 2 and "step_000005.safetensors: vanished" in a.stderr.read()
    s = RunStore.open(store)
    assert s.steps == [0] and s.array("0.weight").shape[0] >= 1
    again = farcast("ingest", run, "--store", store)
    assert again.returncode == 0 and "added 11 step(s)" in again.stdout, again.stderr
    store_equals_sources(RunStore.open(store), discover(run).checkpoints)  # 0, 10, 15, ..., 60: each row its file


def test_a_lock_left_by_a_killed_process_is_taken_over(run, tmp_path):
    store = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from farcast.storage.lock import StoreLock\n"
        f"with StoreLock({str(store)!r}):\n    print('held', flush=True); time.sleep(300)")],
        stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    one_line_error(farcast("ingest", run, "--store", store), f"PID {holder.pid}")
    holder.kill()
    holder.wait()
    p = farcast("ingest", run, "--store", store, env={"FARCAST_LOCK_WAIT": "0"})
    assert p.returncode == 0, p.stderr
    assert RunStore.open(store).steps[-1] == 60


def test_object_store_lock_names_a_holder_elsewhere_and_takes_over_a_dead_one():
    """fsspec stores lock with an object created exclusively; checked on fsspec's in-memory file system."""
    import json as _json
    import socket

    import fsspec

    from farcast_core.errors import StoreLockedError
    from farcast.storage.lock import StoreLock

    url = f"memory://farcast-lock-test-{os.getpid()}/store"
    fs, path = fsspec.core.url_to_fs(url + "/.farcast.lock")
    fs.pipe_file(path, _json.dumps({"pid": 4242, "host": "gpu-node-7", "since": "then", "command": "farcast ingest"}).encode())
    with pytest.raises(StoreLockedError, match=r"PID 4242 on gpu-node-7 .*delete memory://"):
        StoreLock(url, wait=0).__enter__()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fs.pipe_file(path, _json.dumps({"pid": dead.pid, "host": socket.gethostname()}).encode())
    with StoreLock(url, wait=0):  # a record left by a dead process on this host: taken over
        assert _json.loads(fs.cat_file(path))["pid"] == os.getpid()
    assert not fs.exists(path)


def test_a_commit_never_rewrites_a_committed_row(run, tmp_path):
    """Two handles that both think row 1 is next: the second commit is refused, the first row kept."""
    from farcast_core.errors import StoreError

    ingest(run, tmp_path / "store")
    one, two = RunStore.open(tmp_path / "store"), RunStore.open(tmp_path / "store")
    n = len(one.steps)
    one.commit(n, {"step": 100, "sources": [], "nonfinite": []})
    with pytest.raises(StoreError, match="changed by another writer"):
        two.commit(n, {"step": 101, "sources": [], "nonfinite": []})
    assert RunStore.open(tmp_path / "store").steps[-2:] == [60, 100]


# ------------------------------------------------------------------ kill -9 at random points


def _kill_at_random(cmd_args, delay: float, env=None) -> int:
    p = subprocess.Popen([sys.executable, "-m", "farcast.flows.cli", *map(str, cmd_args)], env={**ENV, **(env or {})},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    p.kill()
    return p.wait()


# one trial of each in the default suite, eight with -m slow (CI runs both)
TRIALS = [0, *(pytest.param(t, marks=pytest.mark.slow) for t in range(1, 8))]


@pytest.mark.parametrize("trial", TRIALS)
def test_ingest_killed_at_a_random_point_loses_nothing(big_states, tmp_path, trial):
    run = write_run(tmp_path / "run", big_states)
    store = tmp_path / "store"
    rng = random.Random(trial)
    # kill twice, at random points, then let a third ingest finish
    for _ in range(2):
        _kill_at_random(["ingest", run, "--store", store, "--workers", "1", "--memory-budget-mb", "1"],
                        rng.uniform(0.5, 3.0))
        if (store / "zarr.json").is_file():
            s = RunStore.open(store)
            committed = [c for c in discover(run).checkpoints if c.step in s.steps]
            store_equals_sources(s, committed)  # every committed row is its checkpoint, bit for bit
    p = farcast("ingest", run, "--store", store)
    assert p.returncode == 0, p.stderr
    store_equals_sources(RunStore.open(store), discover(run).checkpoints)
    assert not leftovers(store), leftovers(store)


def test_the_next_writer_sweeps_zarrs_chunk_temp_files(run, tmp_path):
    """zarr writes the sample and step arrays' chunks through temp files beside them; a writer killed
    mid-write leaves them (seen in a kill -9 trial), and the next ingest removes them."""
    store = tmp_path / "store"
    ingest(run, store)
    planted = [store / "sample" / "c" / "4" / "0.84fed6cf.partial", store / "step" / "c" / "0.1a2b.partial",
               store / "params" / "step" / "c" / "0.3c4d.partial"]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    assert farcast("ingest", run, "--store", store).returncode == 0
    assert not leftovers(store), leftovers(store)


@pytest.mark.parametrize("trial", TRIALS)
def test_emit_killed_at_a_random_point_leaves_nothing_half_written(big_states, tmp_path, trial):
    run = write_run(tmp_path / "run", big_states)
    store, out = tmp_path / "store", tmp_path / "out"
    ingest(run, store)
    args = ["emit", store, "--out", out, "--target-step", 60, "--allow-worse", "--sample", 256]
    rng = random.Random(100 + trial)
    code = _kill_at_random(args, rng.uniform(1.0, 6.0))
    final = out / "step_000060.safetensors"
    visible = [p for p in out.iterdir() if not p.name.startswith(".")] if out.exists() else []
    assert visible in ([], [final]), visible
    if visible:  # only complete files are ever visible
        assert set(load_file(final)) == set(load_file(run / "step_000045.safetensors"))
    p = farcast(*args, "--force")
    assert p.returncode == 0, p.stderr
    assert set(load_file(final)) == set(load_file(run / "step_000045.safetensors"))
    assert not leftovers(out), (code, leftovers(out))


def test_a_killed_replacement_puts_the_previous_output_back(run, tmp_path):
    """Killed between moving the old output aside and renaming the new one in: the old one comes back."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".farcast-old-999999-step_000090.safetensors").write_bytes(b"previous")
    (out / ".farcast-tmp-999999-step_000090.safetensors").write_bytes(b"half")
    from farcast.storage.writers import sweep_leftovers

    assert sweep_leftovers(out) == [".farcast-tmp-999999-step_000090.safetensors"]
    assert (out / "step_000090.safetensors").read_bytes() == b"previous"


# ------------------------------------------------------------------ disk full, permission denied


@pytest.fixture
def tiny_disk():
    """A 3 MiB tmpfs (needs root and mount rights; skipped with the reason where refused)."""
    d = Path(tempfile.mkdtemp(prefix="farcast-tmpfs-"))
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(d)], capture_output=True, text=True)
    if p.returncode != 0:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip() or p.returncode}")
    yield d
    subprocess.run(["umount", str(d)])
    d.rmdir()


def test_disk_full_during_ingest_is_one_line_and_loses_nothing(big_states, tmp_path, tiny_disk):
    run = write_run(tmp_path / "run", big_states[:3])
    p = cli("ingest", run, "--store", tiny_disk / "store")
    one_line_error(p, "No space left on device", str(tiny_disk / "store"))
    s = RunStore.open(tiny_disk / "store") if (tiny_disk / "store" / "zarr.json").exists() else None
    if s is not None and s.steps:
        store_equals_sources(s, discover(run).checkpoints[: len(s.steps)])
    # the partial chunk files are removed by the next writer, which then fails the same clear way
    one_line_error(cli("ingest", run, "--store", tiny_disk / "store"), "No space left on device")
    assert not [q for q in (tiny_disk / "store").rglob("*.partial")]


def test_disk_full_during_emit_leaves_no_output(big_states, tmp_path, tiny_disk):
    run = write_run(tmp_path / "run", big_states)
    ingest(run, tmp_path / "store")
    p = cli("emit", tmp_path / "store", "--out", tiny_disk / "out", "--target-step", 60, "--allow-worse",
                "--sample", 256)
    one_line_error(p, "No space left on device", str(tiny_disk / "out"))
    assert not [q for q in (tiny_disk / "out").iterdir() if not q.name.startswith(".")]
    assert not leftovers(tiny_disk / "out")


@pytest.fixture
def nobody_dir():
    """A directory tree that user 'nobody' can read but not write, and a command prefix running as 'nobody'."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop root's permission override")
    d = Path(tempfile.mkdtemp(prefix="farcast-perm-"))
    d.chmod(0o755)
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import farcast.flows.cli"], capture_output=True, text=True)
    if probe.returncode != 0:
        shutil.rmtree(d)
        pytest.skip(f"'nobody' cannot run this checkout: {probe.stderr.strip()[-200:]}")
    yield d, prefix
    shutil.rmtree(d)


def test_permission_denied_is_one_line_naming_the_path(nobody_dir, run):
    d, nobody = nobody_dir
    shutil.copytree(run, d / "run")
    for p in [d / "run", *(d / "run").iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (d / "locked").mkdir(mode=0o755)  # root's: nobody may not write here
    home = {"FARCAST_HOME": str(d / "locked" / "home"), "HOME": str(d / "locked")}
    one_line_error(farcast("ingest", d / "run", "--store", d / "locked" / "store", prefix=nobody, env=home),
                   "Permission denied", str(d / "locked"))
    ingest(d / "run", d / "store")
    (d / "store").chmod(0o755)
    for p in (d / "store").rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    started = time.time()
    one_line_error(farcast("emit", d / "store", "--out", d / "locked" / "out", "--ratio", 1.5, "--allow-worse",
                           prefix=nobody, env=home), "Permission denied", str(d / "locked"))
    assert time.time() - started < 60  # refused before any fit


# ------------------------------------------------------------------ bad option values


BAD_OPTIONS = [
    (["fit", "{store}", "--ratio", "inf"], "--ratio"),
    (["fit", "{store}", "--ratio", "nan"], "--ratio"),
    (["fit", "{store}", "--ratio", "0.5"], "--ratio"),
    (["fit", "{store}", "--target-step", str(10**30)], "--target-step"),
    (["fit", "{store}", "--ratio", "2", "--features", "0.5,abc"], "--features"),
    (["fit", "{store}", "--ratio", "2", "--features", "1.5"], "--features"),
    (["fit", "{store}", "--ratio", "2", "--cuts", "0"], "--cuts"),
    (["fit", "{store}", "--ratio", "2", "--sample", "0"], "--sample"),
    (["fit", "{store}", "--ratio", "2", "--lam", "-1"], "--lam"),
    (["fit", "{store}", "--ratio", "2", "--schedule", "cosine", "--peak-lr", "0"], "--peak-lr"),
    (["ingest", "{run}", "--store", "{tmp}/s2", "--workers", "0"], "--workers"),
    (["ingest", "{run}", "--store", "{tmp}/s3", "--memory-budget-mb", "0"], "--memory-budget-mb"),
    (["ingest", "{run}", "--store", "{tmp}/file"], "is a file"),
    (["emit", "{store}", "--out", "{tmp}/o", "--ratio", "2", "--optimizer", "drop"], "--optimizer"),
    (["emit", "{store}", "--out", "{tmp}/file/o", "--ratio", "1.5"], "is a file"),
    (["emit", "{store}", "--out", "{tmp}/o", "--target-step", "30"], "not after the newest checkpoint"),
    (["fit", "{store}", "--target-step", str(2**53)], "ratio"),
    (["run", "{run}", "--out", "{run}/forecast", "--ratio", "1.5"], "inside the checkpoint directory"),
    (["run", "{run}", "--out", "{tmp}/o"], "exactly one of --target-step or --ratio"),
]


@pytest.fixture
def ingested(run, tmp_path):
    ingest(run, tmp_path / "store")
    (tmp_path / "file").write_text("not a directory")
    return {"run": run, "store": tmp_path / "store", "tmp": tmp_path}


@pytest.mark.parametrize("args, words", BAD_OPTIONS, ids=[" ".join(a[:1] + a[2:]) for a, _ in BAD_OPTIONS])
def test_bad_option_values_are_one_line_and_exit_2(ingested, args, words):
    from click.testing import CliRunner

    from farcast.flows.cli import main

    before = {p: p.stat().st_mtime_ns for p in ingested["store"].rglob("*")}
    r = CliRunner().invoke(main, [a.format(**ingested) for a in args])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and words in lines[-1], r.stderr
    assert len([line for line in lines if line.startswith("error:")]) == 1 and "Traceback" not in r.output
    assert {p: p.stat().st_mtime_ns for p in ingested["store"].rglob("*")} == before  # nothing was written


# ------------------------------------------------------------------ the seven reproductions


def test_repro_2_emit_never_writes_nan(tmp_path):
    """A tensor NaN in the history and at the newest step: refused by name; the fallback takes its newest finite step."""
    run = tmp_path / "run"
    states = write_digits_run(run, steps=60, every=5, optimizer="adam", lr=1e-3)
    for step in (55, 60):
        f = states / f"step_{step:06d}.safetensors"
        sd = load_file(f)
        sd["3.bias"][0] = float("nan")
        save_file(sd, f)
    ingest(run, tmp_path / "store")
    p = cli("emit", tmp_path / "store", "--out", tmp_path / "out", "--ratio", 1.5, "--allow-worse")
    one_line_error(p, "tensor '3.bias'", "NaN/Inf at step 60", "--nonfinite last-finite", "step 50")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    p = cli("emit", tmp_path / "store", "--out", tmp_path / "out", "--ratio", 1.5, "--allow-worse",
                "--nonfinite", "last-finite")
    assert p.returncode == 0, p.stderr
    got = load_file(tmp_path / "out" / "step_000090.safetensors")
    assert all(torch.isfinite(v).all() for v in got.values() if v.is_floating_point())
    assert torch.equal(got["3.bias"], load_file(run / "step_000050.safetensors")["3.bias"])


def test_repro_3_fit_out_never_overwrites_a_checkpoint(run, tmp_path):
    ingest(run, tmp_path / "store")
    newest = run / "step_000060.safetensors"
    before = newest.read_bytes()
    one_line_error(cli("fit", tmp_path / "store", "--ratio", 1.5, "--out", run, "--sample", 256),
                   "inside the checkpoint directory")
    one_line_error(cli("fit", tmp_path / "store", "--ratio", 1.5, "--out", newest, "--sample", 256),
                   "is a file")
    assert newest.read_bytes() == before
    ok = cli("fit", tmp_path / "store", "--ratio", 1.5, "--out", tmp_path / "fc", "--sample", 256)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "fc" / "target_90.safetensors").is_file()
    one_line_error(cli("fit", tmp_path / "store", "--ratio", 1.5, "--out", tmp_path / "fc"),
                   "already exists", "--force")
    assert cli("fit", tmp_path / "store", "--ratio", 1.5, "--out", tmp_path / "fc", "--force",
               "--sample", 256).returncode == 0


def test_repro_4_sources_are_absolute_and_verified(hf_long_run, tmp_path):
    """Ingest run from one directory with a relative path, emit from a directory holding another run of that name."""
    (tmp_path / "a").mkdir()
    shutil.copytree(hf_long_run, tmp_path / "a" / "run")
    other = tmp_path / "b" / "run"
    shutil.copytree(hf_long_run, other)
    (other / "checkpoint-10" / "rng_state.pth").write_bytes(b"another run's file")
    assert cli("ingest", "run", "--store", tmp_path / "store", cwd=tmp_path / "a").returncode == 0
    rec = RunStore.open(tmp_path / "store").step_records[-1]
    assert Path(rec["path"]).is_absolute() and all(Path(p).is_absolute() for p in rec["sources"])
    p = cli("emit", tmp_path / "store", "--out", tmp_path / "out", "--target-step", 12, "--allow-worse",
                cwd=tmp_path / "b")
    assert p.returncode == 0, p.stderr
    emitted = tmp_path / "out" / "checkpoint-12"
    assert (emitted / "rng_state.pth").read_bytes() == (tmp_path / "a" / "run" / "checkpoint-10" / "rng_state.pth").read_bytes()
    # the run restarted into the same directory: the newest checkpoint rewritten
    time.sleep(0.01)
    state = tmp_path / "a" / "run" / "checkpoint-10" / "trainer_state.json"
    state.write_text(state.read_text())
    one_line_error(cli("emit", tmp_path / "store", "--out", tmp_path / "out2", "--target-step", 12, "--allow-worse"),
                   "checkpoint-10/trainer_state.json: changed since it was ingested", "restarted")
    one_line_error(cli("ingest", tmp_path / "a" / "run", "--store", tmp_path / "store"),
                   "changed since it was ingested", "restarted", "new --store")


@pytest.mark.parametrize("offsets", [[[-8, 2048], [2048, 2176]], [[0, 2048], [1024, 1152]]], ids=["negative", "overlap"])
def test_repro_5_bad_offsets_are_refused_and_not_kept(tmp_path, offsets):
    run = tmp_path / "run"
    run.mkdir()
    w = {step: {"w": torch.full((512,), float(step)), "b": torch.full((32,), -float(step))} for step in range(0, 20, 5)}
    for step, sd in w.items():
        save_file(sd, run / f"step_{step}.safetensors")
    bad = run / "step_15.safetensors"
    good = bad.read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[first]["data_offsets"], header[second]["data_offsets"] = offsets
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bad.write_bytes(len(raw).to_bytes(8, "little") + raw + good[8 + n:])
    one_line_error(cli("ingest", run, "--store", tmp_path / "store"), "step_15.safetensors", "tensor '")
    assert RunStore.open(tmp_path / "store").steps == []
    bad.write_bytes(good)  # fixed: the real weights go in, nothing of the bad file was kept
    assert cli("ingest", run, "--store", tmp_path / "store").returncode == 0
    store_equals_sources(RunStore.open(tmp_path / "store"), discover(run).checkpoints)


def test_repro_6_half_written_trainer_state_is_not_a_checkpoint(hf_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hf_run, run)
    state = run / "checkpoint-8" / "trainer_state.json"
    whole = state.read_text()
    state.write_text(whole[: len(whole) // 2])
    p = cli("ingest", run, "--store", tmp_path / "store")
    assert p.returncode == 0, p.stderr
    assert "checkpoint-8: trainer_state.json does not parse" in p.stdout
    assert RunStore.open(tmp_path / "store").steps == [0, 2, 4, 6]
    state.write_text(whole)
    assert cli("ingest", run, "--store", tmp_path / "store").returncode == 0
    s = RunStore.open(tmp_path / "store")
    assert s.steps == [0, 2, 4, 6, 8] and s.schedule["global_step"] == 8 and s.schedule["max_steps"] == 8


def test_repro_6b_schedule_facts_unreadable_at_commit_are_read_again(hf_run, tmp_path, monkeypatch):
    import farcast.pipelines.ingest

    monkeypatch.setattr(farcast.pipelines.ingest, "read_schedule_facts", lambda *a: None)  # unreadable at the commit
    ingest(hf_run, tmp_path / "store")
    assert RunStore.open(tmp_path / "store").schedule is None
    monkeypatch.undo()
    assert ingest(hf_run, tmp_path / "store").added == []  # nothing new, but the facts are read again
    facts = RunStore.open(tmp_path / "store").schedule
    assert facts["global_step"] == 8 and facts["logged"]


def test_repro_7_damaged_first_checkpoint_leaves_no_tensor_list(tmp_path, digits):
    run = tmp_path / "run"
    run.mkdir()
    for step, sd in digits:
        save_file(sd, run / f"step_{step:06d}.safetensors")
    first = run / "step_000000.safetensors"
    good = first.read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    header["0.weight"]["shape"] = list(reversed(header["0.weight"]["shape"]))  # valid header, one shape swapped
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    first.write_bytes(len(raw).to_bytes(8, "little") + raw + good[8 + n:])
    one_line_error(cli("ingest", run, "--store", tmp_path / "store"), "0.weight")
    first.write_bytes(good)
    p = cli("ingest", run, "--store", tmp_path / "store")
    assert p.returncode == 0, p.stderr
    store_equals_sources(RunStore.open(tmp_path / "store"), discover(run).checkpoints)


# ------------------------------------------------------------------ the rest of the list


def test_file_vanishing_mid_ingest_commits_nothing_of_its_step(run, tmp_path):
    code = f"""
import os
from farcast.storage.layouts import safetensors_files as checkpoints
real = checkpoints.SafetensorsReader.read
def read(self, name, start=0, stop=None):
    path = self._where[name][0]
    if path.name == "step_000030.safetensors" and path.exists():
        os.rename(path, {str(tmp_path / "held.safetensors")!r})  # rotated by the trainer mid-read
    return real(self, name, start, stop)
checkpoints.SafetensorsReader.read = read
from farcast.flows.cli import main
main(["ingest", {str(run)!r}, "--store", {str(tmp_path / "store")!r}, "--workers", "1"])
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    one_line_error(p, "step_000030.safetensors", "vanished")
    assert RunStore.open(tmp_path / "store").steps == [0, 5, 10, 15, 20, 25]
    assert farcast("ingest", run, "--store", tmp_path / "store").returncode == 0


@pytest.mark.parametrize("damage", ["pickled", "truncated"])
def test_pickles_at_emit_ask_for_allow_pickle_and_damaged_files_do_not(hf_long_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(hf_long_run, run)
    opt = run / "checkpoint-10" / "optimizer.pt"
    if damage == "pickled":
        torch.save({**torch.load(opt, weights_only=True), "extra": Opaque()}, opt)
    else:
        opt.write_bytes(opt.read_bytes()[:200])
    ingest(run, tmp_path / "store")
    err = one_line_error(cli("emit", tmp_path / "store", "--out", tmp_path / "out", "--target-step", 12,
                                 "--allow-worse", "--optimizer", "reset"), "optimizer.pt")
    assert ("--allow-pickle" in err) == (damage == "pickled") and ("damaged" in err) == (damage == "truncated"), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


class Opaque:
    """A Python object in a pickle: torch.load(weights_only=True) refuses it."""


def test_leftovers_of_killed_processes_are_removed(run, tmp_path):
    ingest(run, tmp_path / "store")
    junk_chunk = tmp_path / "store" / TMP_DIR / "12345.6789.partial"
    junk_chunk.parent.mkdir(exist_ok=True)
    junk_chunk.write_bytes(bytes(8 << 20))
    zarr_junk = tmp_path / "store" / "zarr.json.0123abcd.partial"
    zarr_junk.write_text("{")
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".farcast-tmp-{dead.pid}-step_000090.safetensors").write_bytes(b"half")
    (out / f".f.safetensors.tmp-{dead.pid}").write_bytes(b"half")
    assert cli("ingest", run, "--store", tmp_path / "store").returncode == 0
    assert not junk_chunk.exists() and not zarr_junk.exists()
    p = cli("emit", tmp_path / "store", "--out", out, "--ratio", 1.5, "--allow-worse")
    assert p.returncode == 0, p.stderr
    assert sorted(q.name for q in out.iterdir()) == ["step_000090.safetensors"]


def test_existing_output_is_refused_before_any_fit(run, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import farcast.pipelines.emit
    from farcast.flows.cli import main

    ingest(run, tmp_path / "store")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "step_000090.safetensors").write_bytes(b"a forecast from before")

    def no_fit(*a, **k):
        raise AssertionError("fitted before checking --out")

    monkeypatch.setattr(farcast.pipelines.emit, "backtest", no_fit)
    monkeypatch.setattr(farcast.pipelines.emit, "fit_store", no_fit)
    r = CliRunner().invoke(main, ["emit", str(tmp_path / "store"), "--out", str(tmp_path / "out"), "--ratio", "1.5"])
    assert r.exit_code == 2 and "already exists; pass --force" in r.stderr, r.output


@pytest.mark.slow  # starts a temporary Prefect server
def test_run_with_a_user_error_is_one_line_without_retries(run, tmp_path):
    """farcast run through the Prefect flow: the refusal comes before any fit, once, without tracebacks."""
    p = farcast("run", run, "--store", tmp_path / "store", "--out", tmp_path / "out", "--target-step", 30,
                env={"FARCAST_HOME": str(tmp_path / "home")})
    one_line_error(p, "not after the newest checkpoint")
    assert "Retr" not in p.stderr and "reduce-chunks" not in p.stderr
