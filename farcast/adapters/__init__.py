"""Framework adapters: the Jumper (``farcast.pipelines.jump``) driven from a training loop, a Hugging
Face Trainer or a Lightning Trainer. Each imports its framework only when used."""

from farcast.adapters.huggingface import hf_callback
from farcast.adapters.lightning import lightning_callback
from farcast.adapters.loop import TorchJumper

__all__ = ["hf_callback", "lightning_callback", "TorchJumper"]
