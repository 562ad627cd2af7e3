"""Discovery and lazy reading of every supported layout, on files the real libraries wrote."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from farcast_core.errors import CheckpointError, FarcastError
from farcast.storage.checkpoints import discover, open_checkpoint, step_of
from tests.conftest import bits, library_state


@pytest.mark.parametrize(
    "name, step",
    [
        ("checkpoint-500", 500), ("step_000100.safetensors", 100), ("model_1000.pt", 1000),
        ("epoch=3-step=1200.ckpt", 1200), ("global_step700", 700), ("iter_42.pth", 42),
        ("weights.safetensors", None),
    ],
)
def test_step_numbers_from_names(name, step):
    assert step_of(name) == step


def test_ambiguous_step_number_says_how_to_name_files():
    with pytest.raises(CheckpointError, match="step_001200.safetensors"):
        step_of("model_3_1000.pt")


def _assert_reads_exactly(found):
    for c in found.checkpoints:
        want = library_state(c)
        with open_checkpoint(c, allow_pickle=True) as r:
            assert set(r.tensors) == set(want)
            for name, t in want.items():
                info = r.tensors[name]
                assert info.shape == tuple(t.shape)
                from farcast_core.dtypes import from_storage

                whole = from_storage(r.read(name), info.dtype).reshape(t.shape)
                assert torch.equal(bits(whole), bits(t)), name
                if info.numel > 3:  # a slice reads exactly that slice
                    part = from_storage(r.read(name, 1, 3), info.dtype)
                    assert torch.equal(bits(part), bits(t.reshape(-1)[1:3]))


def test_flat_safetensors_files(safetensors_run, digits):
    found = discover(safetensors_run)
    assert found.layout == "files"
    assert [c.step for c in found.checkpoints] == [s for s, _ in digits]
    _assert_reads_exactly(found)


@pytest.mark.parametrize("container", ["raw", "model", "state_dict"])
def test_plain_torch_files(tmp_path, digits, container):
    for step, sd in digits[:3]:
        obj = sd if container == "raw" else {container: sd, "step": step}
        torch.save(obj, tmp_path / f"model_{step}.pt")
    found = discover(tmp_path)
    assert [c.step for c in found.checkpoints] == [0, 3, 6]
    _assert_reads_exactly(found)


def test_lightning_ckpt_files(lightning_run):
    found = discover(lightning_run)
    assert [c.step for c in found.checkpoints] == [2, 4, 6, 8]
    assert any(p.name == "last.ckpt" for p, _ in found.skipped)
    _assert_reads_exactly(found)


def test_hf_trainer_dirs(hf_run):
    found = discover(hf_run)
    assert found.layout == "hf"
    assert [c.step for c in found.checkpoints] == [0, 2, 4, 6, 8]
    _assert_reads_exactly(found)


def test_hf_checkpoint_without_trainer_state_is_skipped(hf_run, tmp_path):
    run = tmp_path / "out"
    shutil.copytree(hf_run, run)
    (run / "checkpoint-8" / "trainer_state.json").unlink()
    found = discover(run)
    assert [c.step for c in found.checkpoints] == [0, 2, 4, 6]
    assert [(p.name, "trainer_state.json" in why) for p, why in found.skipped] == [("checkpoint-8", True)]


def test_hf_sharded_safetensors_and_pytorch_bin(tmp_path):
    from tests.conftest import tiny_gpt2

    model = tiny_gpt2()
    for step in (0, 10, 20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        model.save_pretrained(tmp_path / "sharded" / f"checkpoint-{step}", max_shard_size="5KB")
        (tmp_path / "bin" / f"checkpoint-{step}").mkdir(parents=True)
        torch.save(model.state_dict(), tmp_path / "bin" / f"checkpoint-{step}" / "pytorch_model.bin")
    index = json.loads((tmp_path / "sharded" / "checkpoint-0" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    for layout in ("sharded", "bin"):
        found = discover(tmp_path / layout)
        assert found.layout == "dirs" and [c.step for c in found.checkpoints] == [0, 10, 20]
        _assert_reads_exactly(found)


def test_dcp_dirs(tmp_path, digits):
    import torch.distributed.checkpoint as dcp

    for step, sd in digits[:3]:
        dcp.save(sd, checkpoint_id=tmp_path / f"step_{step}", no_dist=True)
    found = discover(tmp_path)
    assert found.layout == "dcp" and [c.step for c in found.checkpoints] == [0, 3, 6]
    _assert_reads_exactly(found)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"])
def test_low_precision_dtypes_read_exactly(tmp_path, digits, dtype):
    if not hasattr(torch, dtype):
        pytest.skip(f"torch has no {dtype}")
    for step, sd in digits[:2]:
        save_file({k: (v.to(getattr(torch, dtype)) if v.is_floating_point() else v) for k, v in sd.items()},
                  tmp_path / f"step_{step}.safetensors")
    found = discover(tmp_path)
    _assert_reads_exactly(found)
    with open_checkpoint(found.checkpoints[0]) as r:
        assert r.tensors["0.weight"].dtype == dtype
        assert r.tensors["1.num_batches_tracked"].dtype == "int64"


def test_errors_name_the_path(tmp_path, digits):
    with pytest.raises(CheckpointError, match="no such directory"):
        discover(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoints found"):
        discover(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="no checkpoints found"):
        discover(tmp_path)
    save_file(digits[0][1], tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match="weights.safetensors: no step number"):
        discover(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    save_file(digits[0][1], tmp_path / "a_5.safetensors")
    save_file(digits[0][1], tmp_path / "b_5.safetensors")
    with pytest.raises(CheckpointError, match="both are step 5"):
        discover(tmp_path)


def test_pointing_at_one_checkpoint_says_use_the_parent(hf_run):
    with pytest.raises(CheckpointError, match="single checkpoint"):
        discover(hf_run / "checkpoint-2")


def test_trainer_output_dir_after_save_model(hf_run, tmp_path):
    """trainer.save_model() writes the final model into output_dir beside checkpoint-N/: the run is still
    the checkpoint directories, the root's files are skipped and said so once."""
    out = tmp_path / "out"
    shutil.copytree(hf_run, out)
    newest = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    for f in newest.iterdir():
        if f.suffix in (".safetensors", ".json") and f.name != "trainer_state.json":
            shutil.copy(f, out / f.name)
    found = discover(out)
    assert [c.step for c in found.checkpoints] == [c.step for c in discover(hf_run).checkpoints]
    assert [p for p, _ in found.skipped] == [out.resolve()] and "save_model" in found.skipped[0][1]


def test_truncated_and_corrupt_safetensors(tmp_path, digits):
    save_file(digits[0][1], tmp_path / "step_0.safetensors")
    data = (tmp_path / "step_0.safetensors").read_bytes()
    (tmp_path / "step_1.safetensors").write_bytes(data[:-100])
    (tmp_path / "step_2.safetensors").write_bytes(b"\xff" * 8 + data[8:])
    (tmp_path / "step_3.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    (tmp_path / "step_4.safetensors").write_bytes(data[:5])
    found = discover(tmp_path)
    expect = {1: "truncated: tensor", 2: "bad safetensors header", 3: "not JSON", 4: "truncated"}
    for c in found.checkpoints[1:]:
        with pytest.raises(CheckpointError, match=expect[c.step]) as e:
            open_checkpoint(c)
        assert str(c.path) in str(e.value)


class Opaque:
    """A Python object that weights_only loading refuses."""


def test_corrupt_torch_file_and_pickle_refusal(tmp_path, digits):
    torch.save(digits[0][1], tmp_path / "model_0.pt")
    data = (tmp_path / "model_0.pt").read_bytes()
    (tmp_path / "model_1.pt").write_bytes(data[: len(data) // 2])

    torch.save({"state_dict": digits[0][1], "extra": Opaque()}, tmp_path / "model_2.pt")
    found = discover(tmp_path)
    with pytest.raises(CheckpointError, match="model_1.pt: cannot be loaded"):
        open_checkpoint(found.checkpoints[1])
    with pytest.raises(CheckpointError, match="allow-pickle"):
        open_checkpoint(found.checkpoints[2])


def test_errors_share_one_root_and_builtin():
    assert issubclass(CheckpointError, FarcastError) and issubclass(CheckpointError, ValueError)


def test_nonfinite_from_bits():
    from farcast_core.dtypes import nonfinite, to_storage

    for dtype in ("bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2"):
        if not hasattr(torch, dtype):
            continue
        ok = torch.tensor([0.0, -1.5, 2.0, 448.0 if "e4m3" in dtype else 3.0]).to(getattr(torch, dtype))
        assert not nonfinite(to_storage(ok), dtype), dtype
        bad = torch.tensor([1.0, float("nan")]).to(getattr(torch, dtype))
        assert nonfinite(to_storage(bad), dtype), dtype
        if dtype != "float8_e4m3fn":  # e4m3fn has no infinity
            inf = torch.tensor([1.0, float("-inf")]).to(getattr(torch, dtype))
            assert nonfinite(to_storage(inf), dtype), dtype


def test_ingesting_safetensors_does_not_import_torch(safetensors_run, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from farcast.pipelines.ingest import ingest\n"
        "ingest(%r, %r)\n"
        "print('torch' in sys.modules)\n" % (str(__import__('pathlib').Path(__file__).resolve().parents[1]), str(safetensors_run), str(tmp_path / "s"))
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
