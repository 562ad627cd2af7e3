"""Tiny real training runs, saved by the real libraries in every layout farcast reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test (about 20 s to start)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def digits_states(steps: int = 12, every: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A digits MLP trained for real with Adam: [(step, state_dict)] every ``every`` steps, from 0."""
    from farcast.examples import train_digits

    return train_digits(steps=steps, every=every, dtype=dtype, seed=seed)


@pytest.fixture(scope="session")
def digits():
    return digits_states()


@pytest.fixture
def safetensors_run(tmp_path, digits):
    from safetensors.torch import save_file

    d = tmp_path / "run"
    d.mkdir()
    for step, sd in digits:
        save_file(sd, d / f"step_{step:06d}.safetensors")
    return d


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def token_data(n: int = 64, length: int = 16, vocab: int = 64):
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(n):
        start = int(torch.randint(0, vocab, (1,), generator=g))
        ids = (torch.arange(length) * 3 + start) % vocab  # a learnable pattern
        data.append({"input_ids": ids, "labels": ids.clone()})
    return data


@pytest.fixture(scope="session")
def hf_run(tmp_path_factory) -> Path:
    """A tiny GPT-2 trained with the real Trainer: checkpoint-0 (save_pretrained) + checkpoint-2..8."""
    from transformers import Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("hf") / "out"
    model = tiny_gpt2()
    model.save_pretrained(out / "checkpoint-0")
    args = TrainingArguments(
        output_dir=str(out), max_steps=8, save_steps=2, per_device_train_batch_size=8,
        learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=token_data()).train()
    return out


def hf_args(out, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), max_steps=40, save_steps=2, per_device_train_batch_size=8, learning_rate=5e-3,
        report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, **kw,
    )


class StopAt:
    """A TrainerCallback that stops training at a given global step."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= step:
                    control.should_training_stop = True

        return _Stop()


@pytest.fixture(scope="session")
def hf_long_run(tmp_path_factory):
    """Trainer run scheduled for 40 steps (linear decay), stopped at step 10, checkpoints every 2."""
    from transformers import Trainer

    out = tmp_path_factory.mktemp("hfemit") / "out"
    model = tiny_gpt2()
    model.save_pretrained(out / "checkpoint-0")
    Trainer(model=model, args=hf_args(out), train_dataset=token_data(), callbacks=[StopAt(10)]).train()
    return out


def _lightning():
    import lightning as L

    class LitNet(L.LightningModule):
        """A digits MLP as a LightningModule; counts the training steps it runs."""

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
            self.steps_run = 0

        def training_step(self, batch, _):
            self.steps_run += 1
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return LitNet


def __getattr__(name):  # LitNet is built lazily so importing conftest does not import Lightning
    if name == "LitNet":
        return _lightning()
    raise AttributeError(name)


def digits_loader():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    ds = torch.utils.data.TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    return torch.utils.data.DataLoader(ds, batch_size=32)


@pytest.fixture(scope="session")
def lightning_run(tmp_path_factory) -> Path:
    """Lightning .ckpt files written by a real Trainer with ModelCheckpoint every 2 steps."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = tmp_path_factory.mktemp("lightning") / "ckpts"
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_steps=8, callbacks=[ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1, save_last=True)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(_lightning()(), digits_loader())
    return out


def library_state(c) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as the real library loads them (not through farcast's readers)."""
    from safetensors.torch import load_file

    if c.format == "safetensors":
        sd = {}
        for f in c.files:
            sd.update(load_file(f))
        return sd
    if c.format == "torch":
        sd = {}
        for f in c.files:
            obj = torch.load(f, weights_only=False)
            obj = obj.get("state_dict", obj.get("model", obj))
            sd.update({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})
        return sd
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    import tempfile

    ref = Path(tempfile.mkdtemp()) / "ref.pt"
    dcp_to_torch_save(c.files[0], ref)
    return torch.load(ref)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's exact bit pattern (so NaN == NaN and -0.0 != 0.0)."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def store_equals_sources(store, checkpoints) -> None:
    """Assert every committed row of ``store`` holds exactly the tensors of its checkpoint."""
    from farcast_core.dtypes import from_storage

    assert store.steps == [c.step for c in checkpoints]
    for row, c in enumerate(checkpoints):
        sd = library_state(c)
        assert set(sd) == set(store.tensors), c.path
        for name, m in store.tensors.items():
            got = from_storage(store.read(name, [row])[0], m.dtype).reshape(m.shape)
            want = sd[name]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(bits(got), bits(want)), (c.step, name)
