"""Farcasting a whole (steps, params) series held in memory: one chunk, for tests and small models.

The pipelines do the same chunk by chunk from the store; this is the reference they agree with.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from farcast_core import baselines
from farcast_core.calibration import PairPlan, at, backtest_row, plan_pairs
from farcast_core.forecaster import FitConfig, BatchFit, fit_values, forecast_rows
from farcast_core.sampling import sample_index


def pairs(values: torch.Tensor, rows: Sequence[int], plan: PairPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feats (cuts*P, F), targets (cuts*P, m), app_feats (P, F)) from rows ``rows`` of a chunk."""
    feats = torch.cat([torch.stack([at(values, rows, it) for it in f], -1) for f in plan.features], 0)
    targets = torch.cat([torch.stack([at(values, rows, it) for it in g], -1) for g in plan.targets], 0)
    app = torch.stack([at(values, rows, it) for it in plan.app_features], -1)
    return feats, targets, app


def fit_series(
    W: torch.Tensor, times: Sequence[float], rho: float, config: FitConfig = FitConfig()
) -> tuple[BatchFit, PairPlan]:
    """Fit one forecaster on a (T, P) series observed at ``times``."""
    plan = plan_pairs(times, rho, config.horizons, config.max_cuts, config.extra_features, recency=config.recency)
    W = W.to(torch.float64)
    idx = torch.from_numpy(sample_index(W.shape[1], config.sample, config.seed))
    values = W[plan.rows][:, idx]  # (R, l): the rows the plan reads, of the sampled parameters
    ratios = torch.tensor(plan.ratios, dtype=torch.float64)
    fitted = fit_values(values[None], torch.ones(1, values.shape[1], dtype=torch.bool), plan.coefficients(), ratios,
                        config, plan.cut_weights)
    return fitted, plan


def forecast_series(W: torch.Tensor, times: Sequence[float], rho: float, config: FitConfig = FitConfig()) -> torch.Tensor:
    """The farcast of every parameter of a (T, P) series at ratio ``rho``: (P,)."""
    fitted, plan = fit_series(W, times, rho, config)
    return forecast_rows(fitted.A[0], fitted.b[0], plan.app_features, list(range(W.shape[0])), W)


def backtest_series(
    W: torch.Tensor, times: Sequence[float], rho: float, config: FitConfig = FitConfig()
) -> dict[str, float]:
    """MAE at the newest row of every method, pretending the run ended where ``rho`` reaches it."""
    times = np.asarray(times, dtype=np.float64)
    b = backtest_row(times, rho)
    W = W.to(torch.float64)
    truth = W[-1]
    T = float(times[-1])
    seen, ts = W[: b + 1], times[: b + 1]
    real_rho = (T - ts[0]) / (ts[-1] - ts[0])
    k = min(config.linefit_k, b + 1)
    preds = {
        "farcast": forecast_series(seen, ts, real_rho, config),
        "persistence": baselines.persistence(seen[-1]),
        "chord": baselines.chord(seen[0], seen[-1], ts[0], ts[-1], T),
        "linear": baselines.last_segment(seen[-2], seen[-1], ts[-2], ts[-1], T),
        "linefit": baselines.linefit(seen[-k:], torch.tensor(ts[-k:]), T),
    }
    return {m: float((p - truth).abs().mean()) for m, p in preds.items()}

