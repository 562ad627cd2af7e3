"""The baselines every report shows beside the farcaster (method page, section 5).

All take weights as (P,) or (k, P) arrays (numpy, or torch tensors) and times on the caller's axis;
T is the target time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

METHODS = ("farcast", "persistence", "chord", "linear", "linefit")


def persistence(w_n: torch.Tensor) -> torch.Tensor:
    return w_n


def chord(w_0: torch.Tensor, w_n: torch.Tensor, t_0: float, t_n: float, T: float) -> torch.Tensor:
    return w_n + (w_n - w_0) * ((T - t_n) / (t_n - t_0))


def last_segment(w_prev: torch.Tensor, w_n: torch.Tensor, t_prev: float, t_n: float, T: float) -> torch.Tensor:
    return w_n + (w_n - w_prev) * ((T - t_n) / (t_n - t_prev))


def linefit(ws: torch.Tensor, ts: torch.Tensor, T: float) -> torch.Tensor:
    """Per-weight least-squares line through (ts, ws) (k, P), evaluated at T."""
    ts = (ts.astype(ws.dtype) if isinstance(ws, np.ndarray) else ts.to(ws.dtype)).reshape(-1, 1)
    tm = ts.mean()
    wm = ws.mean(0)
    dt = ts - tm
    slope = (dt * (ws - wm)).sum(0) / max(float((dt * dt).sum()), 1e-300)
    return wm + slope * (T - tm)
