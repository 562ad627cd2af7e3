"""farcast: weight farcasting for training runs. Checkpoints in, a forecast checkpoint far ahead out.

The pipeline, one function per stage (each in ``farcast.pipelines``)::

    import farcast
    farcast.ingest("runs/bert", "runs/bert.farcast")                   # checkpoints -> Zarr run store
    fc, path, target = farcast.fit("runs/bert.farcast", ratio=2.0)     # store -> forecasters (saved)
    report = farcast.backtest("runs/bert.farcast", target_step=target) # is the forecast worth emitting?
    farcast.emit("runs/bert.farcast", "forecasts", target_step=target, forecasters=fc, report=report)

During training, a Jumper forecasts and jumps the weights every K steps: ``farcast.hf_callback``
(Hugging Face Trainer), ``farcast.lightning_callback`` (Lightning), ``farcast.TorchJumper`` (a plain
loop), configured by ``farcast.JumpConfig``. The Prefect flow is ``farcast.flows.flows.farcast_flow``
(imported on first use of ``farcast.farcast_flow``: it loads Prefect).

Layout: ``farcast_core`` (the method, pure), ``farcast.storage`` (every file access), ``farcast.pipelines``
(one module per stage), ``farcast.flows`` (Prefect and the command line), ``farcast.adapters``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from farcast.adapters import TorchJumper, hf_callback, lightning_callback
from farcast.pipelines.backtest import backtest
from farcast.pipelines.emit import EmitConfig, EmitResult, emit, write_forecast
from farcast.pipelines.fit import fit
from farcast.pipelines.ingest import IngestConfig, IngestReport, ingest
from farcast.pipelines.jump import JumpConfig, Jumper
from farcast_core.errors import FarcastError
from farcast_core.forecaster import FitConfig, Forecasters

try:
    __version__ = version("farcast")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ingest", "fit", "backtest", "emit", "write_forecast",
    "IngestConfig", "IngestReport", "FitConfig", "Forecasters", "EmitConfig", "EmitResult", "FarcastError",
    "JumpConfig", "Jumper", "hf_callback", "lightning_callback", "TorchJumper", "farcast_flow", "__version__",
]


def __getattr__(name: str):
    if name == "farcast_flow":  # Prefect is heavy to import: only when asked for
        from farcast.flows.flows import farcast_flow

        return farcast_flow
    raise AttributeError(f"module 'farcast' has no attribute {name!r}")
