"""Framework adapters: the Jumper (``farcast.pipelines.jump``) driven from a training loop
(``loop.TorchJumper``), a Hugging Face Trainer (``huggingface.hf_callback``) or a Lightning Trainer
(``lightning.lightning_callback``). Each imports its framework only when used."""

from farcast.adapters.huggingface import hf_callback
from farcast.adapters.lightning import lightning_callback
from farcast.adapters.loop import TorchJumper

__all__ = ["hf_callback", "lightning_callback", "TorchJumper"]
