"""checkpoint dir -> Zarr store: exact round trip, incremental, idempotent, validated, crash safe."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from farcast_core.errors import CheckpointError, SequenceMismatchError, StoreError
from farcast.pipelines.ingest import IngestConfig, ingest
from farcast.storage.checkpoints import discover
from farcast.storage.store import RunStore
from tests.conftest import store_equals_sources

REPO = Path(__file__).resolve().parents[1]
SMALL = IngestConfig(memory_budget_mb=1)  # 4 Ki values per chunk: the digits weights span chunks


def test_round_trip_is_exact_and_chunked(safetensors_run, tmp_path):
    r = ingest(safetensors_run, tmp_path / "store", SMALL)
    store = RunStore.open(tmp_path / "store")
    assert r.added == [0, 3, 6, 9, 12] and r.tensors == 9
    w = store.tensors["0.weight"]
    assert (w.kind, w.dtype, w.shape, w.chunk) == ("float", "float32", (32, 64), 2048)  # smaller than a chunk
    assert w.plan.n_chunks == 1 and store.array("0.weight").chunks == (1, 2048)
    assert store.tensors["1.num_batches_tracked"].kind == "buffer"
    store_equals_sources(store, discover(safetensors_run).checkpoints)
    rec = store.step_records[1]
    assert rec["step"] == 3 and rec["sources"][0].endswith("step_000003.safetensors") and rec["nonfinite"] == []


def test_tensor_larger_than_a_chunk_round_trips(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    g = torch.Generator().manual_seed(0)
    for step in (0, 5):
        save_file({"big": torch.randn(3, 5000, generator=g), "small": torch.randn(7, generator=g)},
                  run / f"step_{step}.safetensors")
    ingest(run, tmp_path / "store", SMALL)
    store = RunStore.open(tmp_path / "store")
    assert store.tensors["big"].plan.n_chunks == 4  # 15000 values in chunks of 4096
    store_equals_sources(store, discover(run).checkpoints)


@pytest.mark.parametrize("layout", ["hf", "lightning", "dcp", "torch"])
def test_every_layout_round_trips(layout, request, tmp_path, digits):
    if layout == "hf":
        run = request.getfixturevalue("hf_run")
    elif layout == "lightning":
        run = request.getfixturevalue("lightning_run")
    else:
        run = tmp_path / "run"
        run.mkdir()
        for step, sd in digits[:3]:
            if layout == "dcp":
                import torch.distributed.checkpoint as dcp

                dcp.save(sd, checkpoint_id=run / f"step_{step}", no_dist=True)
            else:
                torch.save({"model": sd}, run / f"model_{step}.pt")
    ingest(run, tmp_path / "store", SMALL)
    store_equals_sources(RunStore.open(tmp_path / "store"), discover(run).checkpoints)


def test_bf16_stored_as_exact_bits(tmp_path, digits):
    run = tmp_path / "run"
    run.mkdir()
    for step, sd in digits[:3]:
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()},
                  run / f"step_{step}.safetensors")
    ingest(run, tmp_path / "store")
    store = RunStore.open(tmp_path / "store")
    assert store.tensors["0.weight"].dtype == "bfloat16"
    assert store.array("0.weight").dtype == np.uint16
    store_equals_sources(store, discover(run).checkpoints)


def test_incremental_and_idempotent(safetensors_run, tmp_path, digits):
    later = safetensors_run.parent / "later"
    later.mkdir()
    for p in sorted(safetensors_run.iterdir())[3:]:
        p.rename(later / p.name)  # the trainer has written only steps 0, 3, 6 so far
    store = tmp_path / "store"
    assert ingest(safetensors_run, store).added == [0, 3, 6]
    again = ingest(safetensors_run, store)
    assert again.added == [] and again.present == [0, 3, 6]
    for p in later.iterdir():
        p.rename(safetensors_run / p.name)  # ... then steps 9 and 12
    r = ingest(safetensors_run, store)
    assert r.added == [9, 12] and r.present == [0, 3, 6]
    store_equals_sources(RunStore.open(store), discover(safetensors_run).checkpoints)


def test_older_step_is_refused(safetensors_run, tmp_path):
    (safetensors_run / "step_000006.safetensors").rename(tmp_path / "held.safetensors")
    ingest(safetensors_run, tmp_path / "store")
    (tmp_path / "held.safetensors").rename(safetensors_run / "step_000006.safetensors")
    with pytest.raises(StoreError, match=r"step\(s\) \[6\] are older than step 12.*new --store"):
        ingest(safetensors_run, tmp_path / "store")
    assert RunStore.open(tmp_path / "store").steps == [0, 3, 9, 12]


def _corrupt_last(run: Path, change) -> None:
    """Rewrite the newest step file with ``change(state_dict)``."""
    from safetensors.torch import load_file

    last = sorted(run.iterdir())[-1]
    save_file(change(load_file(last)), last)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda sd: {**sd, "0.weight": sd["0.weight"][:16]}, r"'0.weight' is float32\[16, 64\] at step 12 but float32\[32, 64\]"),
        (lambda sd: {**sd, "0.weight": sd["0.weight"].half()}, r"'0.weight' is float16\[32, 64\]"),
        (lambda sd: {k: v for k, v in sd.items() if k != "3.bias"}, r"step 12 lacks tensor '3.bias'"),
        (lambda sd: {**sd, "extra": torch.zeros(2)}, r"tensor 'extra' that earlier steps lack"),
    ],
)
def test_changed_tensors_are_refused_before_anything_is_written(safetensors_run, tmp_path, change, match):
    _corrupt_last(safetensors_run, change)
    with pytest.raises(SequenceMismatchError, match=match) as e:
        ingest(safetensors_run, tmp_path / "store")
    assert "step_000012.safetensors" in str(e.value)
    assert RunStore.open(tmp_path / "store").steps == []  # nothing committed, not even the good steps


def test_truncated_file_is_refused_and_nothing_committed(safetensors_run, tmp_path):
    ingest(safetensors_run, tmp_path / "store")
    extra = safetensors_run / "step_000015.safetensors"
    data = (safetensors_run / "step_000012.safetensors").read_bytes()
    extra.write_bytes(data[: len(data) - 64])
    with pytest.raises(CheckpointError, match="step_000015.safetensors: truncated"):
        ingest(safetensors_run, tmp_path / "store")
    assert RunStore.open(tmp_path / "store").steps == [0, 3, 6, 9, 12]


def test_nonfinite_values_are_recorded(safetensors_run, tmp_path):
    def poison(sd):
        sd["3.weight"][0, 0] = float("nan")
        sd["3.bias"][1] = float("inf")
        return sd

    _corrupt_last(safetensors_run, poison)
    r = ingest(safetensors_run, tmp_path / "store")
    assert r.nonfinite == {12: ["3.bias", "3.weight"]}
    store = RunStore.open(tmp_path / "store")
    assert store.step_records[-1]["nonfinite"] == ["3.bias", "3.weight"]
    assert np.isnan(store.read("3.weight", [4])[0, 0])


def test_store_inside_input_and_foreign_store_are_refused(safetensors_run, tmp_path, digits):
    with pytest.raises(StoreError, match="inside the checkpoint directory"):
        ingest(safetensors_run, safetensors_run / "store")
    ingest(safetensors_run, tmp_path / "store")
    other = tmp_path / "other"
    other.mkdir()
    save_file(digits[0][1], other / "step_0.safetensors")
    with pytest.raises(StoreError, match="holds the run from"):
        ingest(other, tmp_path / "store")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        ingest(other, tmp_path / "junk")


def test_run_not_starting_at_step_zero_warns(safetensors_run, tmp_path):
    (safetensors_run / "step_000000.safetensors").unlink()
    r = ingest(safetensors_run, tmp_path / "store")
    assert any("earliest checkpoint is step 3" in w for w in r.warnings)


CRASHER = """
import os, sys, time
sys.path.insert(0, {repo!r})
from farcast.storage.store import RunStore
from farcast.pipelines.ingest import ingest, IngestConfig

real_write, seen = RunStore.write, []

def write(self, name, row, start, values):
    real_write(self, name, row, start, values)
    seen.append(row)
    if row == 2 and len([r for r in seen if r == 2]) == 3:  # mid-way through the third step
        open({marker!r}, "w").close()
        time.sleep(60)

RunStore.write = write
ingest({run!r}, {store!r}, IngestConfig(workers=1))
"""


def test_killed_mid_ingest_loses_nothing_and_duplicates_nothing(safetensors_run, tmp_path):
    store, marker = tmp_path / "store", tmp_path / "marker"
    code = CRASHER.format(repo=str(REPO), run=str(safetensors_run), store=str(store), marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, "the ingest process ended before the kill"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s = RunStore.open(store)
    assert s.steps == [0, 3]  # the third step was half written: not visible
    assert s.array("0.weight").shape[0] == 5  # its rows were reserved and partly written
    r = ingest(safetensors_run, store)
    assert r.added == [6, 9, 12] and r.present == [0, 3]
    store_equals_sources(RunStore.open(store), discover(safetensors_run).checkpoints)


def test_direct_chunk_writes_are_the_bytes_zarr_writes(tmp_path):
    """The local fast path writes each chunk file exactly as zarr's own write path does."""
    import zarr

    run = tmp_path / "run"
    run.mkdir()
    g = torch.Generator().manual_seed(0)
    for step in (0, 1):  # 10000 values in 4096-value chunks: the last chunk is an edge chunk
        save_file({"w": torch.randn(10000, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g)},
                  run / f"step_{step}.safetensors")
    ingest(run, tmp_path / "store", SMALL)
    store = RunStore.open(tmp_path / "store")
    for name in ("w", "b"):
        m = store.tensors[name]
        ref = zarr.open_group(str(tmp_path / "ref"), mode="a", zarr_format=3).create_array(
            name, shape=(2, m.numel), chunks=(1, m.chunk), dtype=store.array(name).dtype, fill_value=0,
            compressors=None, overwrite=True)
        ref[:, :] = store.read(name, [0, 1])
        for row in (0, 1):
            for i in range(m.plan.n_chunks):
                ours = (tmp_path / "store" / m.path / "c" / str(row) / str(i)).read_bytes()
                theirs = (tmp_path / "ref" / name / "c" / str(row) / str(i)).read_bytes()
                assert ours == theirs, (name, row, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reading_chunk_files_directly_equals_zarrs_reads(tmp_path, dtype, monkeypatch):
    """RunStore.read and read_sample take local plain chunks from their files (zarr's per-call
    overhead is ~1 ms); every span, across chunk edges and at the ragged last chunk, must equal what
    zarr itself reads."""
    monkeypatch.setattr("farcast.storage.store.SAMPLE_CHUNK", 1000)  # the sample array in several chunks
    g = torch.Generator().manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    for s in range(3):
        save_file({"w": torch.randn(3 * 4096 + 77, generator=g).to(dtype), "b": torch.randn(5, generator=g).to(dtype)},
                  run / f"step_{s:03d}.safetensors")
    ingest(run, tmp_path / "store", IngestConfig(memory_budget_mb=1))  # 4 Ki-value chunks: w spans 4
    store = RunStore.open(tmp_path / "store")
    assert store._plain_dir(store.tensors["w"].path) and store.tensors["w"].plan.n_chunks == 4
    a = store.array("w")
    for start, stop in [(0, None), (10, 20), (4000, 8300), (4096, 8192), (12200, 12365), (0, 1)]:
        got = store.read("w", [2, 0, 1], start, stop)
        want = np.stack([a[r, start:stop] for r in (2, 0, 1)])
        assert got.dtype == want.dtype and np.array_equal(got, want), (start, stop)
    cols = np.array([3, 4095, 4096, 9000, 12364])
    assert np.array_equal(store.read("w", [1], cols=cols), a[1:2, :][:, cols])
    assert np.array_equal(store.read("b", [0, 1, 2]), a_b := store.array("b")[:]) and a_b.shape == (3, 5)
    sample = store._sample_array()
    assert store._plain_dir("sample") and sample.chunks[1] == 1000 < sample.shape[1]
    for start, stop in [(0, None), (990, 2100), (1000, 2000), (sample.shape[1] - 5, None)]:
        got = store.read_sample([2, 0], start, stop)
        want = np.stack([sample[r, start:stop] for r in (2, 0)])
        assert got.dtype == want.dtype and np.array_equal(got, want), (start, stop)


def test_store_opens_with_xarray_and_dask(safetensors_run, tmp_path, digits):
    """xarray sees every tensor with a step coordinate; dask reads the same values; a tensor named 'step' keeps its data."""
    import dask.array as da
    import xarray as xr

    states = [(s, {**sd, "step": sd["0.bias"] * 2}) for s, sd in digits]  # a tensor named like the coordinate
    run = tmp_path / "run2"
    run.mkdir()
    for step, sd in states:
        save_file(sd, run / f"step_{step:06d}.safetensors")
    store = tmp_path / "store"
    ingest(run, store, SMALL)
    ds = xr.open_zarr(store, group="params", consolidated=False)
    assert ds["step"].values.tolist() == [0, 3, 6, 9, 12]
    w = ds["0.weight"]
    assert w.dims == ("step", "0.weight.i") and w.shape == (5, 32 * 64)
    np.testing.assert_array_equal(w.sel(step=6).values, states[2][1]["0.weight"].numpy().ravel())
    np.testing.assert_array_equal(ds["%73tep"].sel(step=12).values, states[4][1]["step"].numpy().ravel())
    root = xr.open_zarr(store, consolidated=False)
    assert root["sample"].dims == ("step", "sample.i") and root["step"].values.tolist() == [0, 3, 6, 9, 12]
    a = da.from_zarr(str(store), component="params/0.weight")
    np.testing.assert_array_equal(a[1].compute(), states[1][1]["0.weight"].numpy().ravel())


def test_uncommitted_rows_show_step_minus_one(safetensors_run, tmp_path):
    """Rows reserved by an ingest that died before committing them are marked -1 in the step coordinate."""
    store_path = tmp_path / "store"
    ingest(safetensors_run, store_path, SMALL)
    s = RunStore.open(store_path)
    s.reserve(7)
    import xarray as xr

    ds = xr.open_zarr(store_path, group="params", consolidated=False)
    assert ds["step"].values.tolist() == [0, 3, 6, 9, 12, -1, -1]
    assert RunStore.open(store_path).steps == [0, 3, 6, 9, 12]
