"""farcast: weight farcasting for training runs. Checkpoints in, a forecast checkpoint far ahead out.

The pipeline, one function per stage (each in ``farcast.pipelines``)::

    import farcast
    farcast.ingest("runs/bert", "runs/bert.farcast")                   # checkpoints -> Zarr run store
    fc, path, target = farcast.fit("runs/bert.farcast", ratio=2.0)     # store -> forecasters (saved)
    report = farcast.backtest("runs/bert.farcast", target_step=target) # is the forecast worth emitting?
    farcast.emit("runs/bert.farcast", "forecasts", target_step=target, forecasters=fc, report=report)

During training, a Jumper forecasts and jumps the weights every K steps: ``farcast.hf_callback``
(Hugging Face Trainer), ``farcast.lightning_callback`` (Lightning), ``farcast.TorchJumper`` (a plain
loop), configured by ``farcast.JumpConfig``. The Prefect flow is ``farcast.farcast_flow``.
Every name is imported on first use.

Layout: ``farcast_core`` (the method, pure), ``farcast.storage`` (every file access), ``farcast.pipelines``
(one module per stage), ``farcast.flows`` (Prefect and the command line), ``farcast.adapters``.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("farcast")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# name -> the module that defines it. Imported on first use: ``import farcast.pipelines.ingest`` (what
# the command line's ingest loads) must not import torch, Prefect or the frameworks.
_API = {
    "ingest": "farcast.pipelines.ingest", "IngestConfig": "farcast_core.config",
    "IngestReport": "farcast.pipelines.ingest",
    "fit": "farcast.pipelines.fit",
    "backtest": "farcast.pipelines.backtest",
    "emit": "farcast.pipelines.emit", "write_forecast": "farcast.pipelines.emit",
    "EmitConfig": "farcast_core.config", "EmitResult": "farcast.pipelines.emit",
    "FitConfig": "farcast_core.config", "Forecasters": "farcast_core.forecaster",
    "FarcastError": "farcast_core.errors",
    "JumpConfig": "farcast.pipelines.jump", "Jumper": "farcast.pipelines.jump",
    "hf_callback": "farcast.adapters.huggingface", "lightning_callback": "farcast.adapters.lightning",
    "TorchJumper": "farcast.adapters.loop",
    "farcast_flow": "farcast.flows.flows",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'farcast' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
