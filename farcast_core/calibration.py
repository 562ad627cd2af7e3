"""Where training pairs come from: time-rescaled self-calibration (method page, section 3).

Times are whatever axis the caller measures in (global steps today; cumulative learning rate
later): every formula uses ``t`` relative to the run's start ``t_0``. Values between two
checkpoints are linearly interpolated; a plan only says which stored rows to combine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from farcast_core.errors import ForecastError

EPS = 1e-9


@dataclass(frozen=True)
class Interp:
    """The value at one time: ``(1 - w) * row[lo] + w * row[hi]``."""

    lo: int
    hi: int
    w: float


@dataclass(frozen=True)
class PairPlan:
    """Which rows make the calibration pairs and the application features for one target."""

    rho: float  # target ratio (T* - t_0) / (t_n - t_0)
    ratios: tuple[float, ...]  # horizon ratios rho_1 < ... < rho_m = rho
    feature_ratios: tuple[float, ...]  # feature times as fractions of (t_c - t_0): (0, ..., 1)
    cuts: tuple[int, ...]  # rows used as "current" for the calibration pairs
    features: tuple[tuple[Interp, ...], ...]  # per cut: one Interp per feature
    targets: tuple[tuple[Interp, ...], ...]  # per cut: one Interp per horizon ratio
    app_features: tuple[Interp, ...]  # the features at the newest row, for the forecast itself
    cut_weights: tuple[float, ...] = ()  # per cut, mean 1: how much its pairs count (empty: all 1)

    def coefficients(self, rows: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every value the plan uses as a weighted sum of its ``rows`` (or of ``rows``, ascending, a
        superset that a caller reads for several plans): (features (C, F, R), targets (C, m, R),
        newest features (F, R)), C cuts, R = len(rows)."""
        rows = self.rows if rows is None else rows
        C, F, m = len(self.features), len(self.app_features), len(self.targets[0])
        w = interp_weights([it for group in (*self.features, *self.targets) for it in group] + list(self.app_features),
                           rows)  # one matrix for all: (C F + C m + F, R)
        return w[: C * F].reshape(C, F, -1), w[C * F : C * (F + m)].reshape(C, m, -1), w[C * (F + m) :]

    @property
    def rows(self) -> list[int]:
        """Every stored row the plan reads, ascending."""
        out = set()
        for group in (*self.features, *self.targets, self.app_features):
            for it in group:
                out.update((it.lo, it.hi))
        return sorted(out)


def interp_weights(interps: Sequence[Interp], rows: Sequence[int]) -> np.ndarray:
    """(len(interps), len(rows)): each Interp's value as weights on the stored ``rows`` it reads."""
    pos = {r: i for i, r in enumerate(rows)}
    out = np.zeros((len(interps), len(pos)))
    for k, it in enumerate(interps):
        out[k, pos[it.lo]] += 1.0 - it.w
        out[k, pos[it.hi]] += it.w
    return out


def interp_at(times: np.ndarray, t: float) -> Interp:
    """How to get the value at time ``t`` from the rows around it (``t`` within the run)."""
    return interp_many(times, [t])[0]


def interp_many(times: np.ndarray, ts: Sequence[float]) -> list[Interp]:
    """``interp_at`` for each of ``ts``, in one pass of array operations (a plan asks for dozens)."""
    times = np.asarray(times, dtype=np.float64)
    ts = np.asarray(ts, dtype=np.float64)
    n = len(times) - 1
    tol = EPS * np.maximum(1.0, np.abs(ts))
    bad = (ts > times[-1] + EPS * max(1.0, abs(times[-1]))) | (ts < times[0])
    if bad.any():
        raise ValueError(f"time {ts[bad][0]} outside the observed {times[0]}..{times[-1]}")
    hi = np.minimum(np.searchsorted(times, ts - tol, side="left"), n)  # (np.clip costs 20 us a call)
    exact = np.abs(times[hi] - ts) <= tol
    lo = np.where(exact, hi, hi - 1)
    span = times[hi] - times[lo]
    span[exact] = 1.0  # the exact ones' w is 0
    w = np.where(exact, 0.0, (ts - times[lo]) / span)
    return [Interp(a, b, c) for a, b, c in zip(lo.tolist(), hi.tolist(), w.tolist())]


def feature_interps(times: Sequence[float], feature_ratios: Sequence[float]) -> tuple[Interp, ...]:
    """The features at the newest time: values at t_0 + g (t_n - t_0) for each feature ratio g."""
    times = np.asarray(times, dtype=np.float64)
    return tuple(interp_many(times, [min(times[0] + g * (times[-1] - times[0]), times[-1]) for g in feature_ratios]))


def max_ratio(times: Sequence[float]) -> float:
    """The largest target ratio the run supports: the first checkpoint after t_0 is the only cut."""
    times = np.asarray(times, dtype=np.float64)
    if len(times) < 3:
        return 1.0
    return float((times[-1] - times[0]) / (times[1] - times[0]))


def plan_pairs(
    times: Sequence[float],
    rho: float,
    horizons: int = 4,
    max_cuts: int = 8,
    extra_features: Sequence[float] = (),
    unit: str = "steps",
    recency: float = 0.0,
) -> PairPlan:
    """Calibration pairs for target ratio ``rho`` on a run observed at ``times`` (ascending); each
    cut's pairs weighted by (t_c - t_0) ** recency (normalised to mean 1).

    Raises ForecastError naming the largest supported ratio when no cut is admissible.
    """
    times = np.asarray(times, dtype=np.float64)
    if len(times) < 3:
        raise ForecastError(f"farcasting needs at least 3 checkpoints (s_0, a cut, the newest); this run has {len(times)}")
    if not rho > 1.0 + 1e-12:
        raise ForecastError(f"the target must lie after the newest checkpoint (ratio > 1), got ratio {rho:.4g}")
    t0, tn = times[0], times[-1]
    span = tn - t0
    admissible = [c for c in range(1, len(times) - 1) if t0 + rho * (times[c] - t0) <= tn + EPS * span]
    if not admissible:
        biggest = max_ratio(times)
        raise ForecastError(
            f"ratio {rho:.4g} is too far for the observed history: it needs a checkpoint at or before "
            f"{t0 + span / rho:.6g} {unit} besides the first; the largest ratio this run supports is {biggest:.4g} "
            f"(ask for less, or let the run save more checkpoints)"
        )
    # evenly spread over the admissible cuts (sorted(set()): np.unique imports numpy.ma, 30 ms per process)
    pick = sorted({round(x) for x in _linspace(len(admissible) - 1, min(max_cuts, len(admissible)))})
    cuts = tuple(admissible[i] for i in pick)
    ratios = tuple(float(r) for r in 1.0 + (rho - 1.0) * np.arange(1, horizons + 1) / horizons)
    fr = tuple(sorted({0.0, *(float(g) for g in extra_features), 1.0}))
    if any(not 0.0 <= g <= 1.0 for g in fr):
        raise ForecastError(f"extra feature times must be fractions in [0, 1] of the way to the cut, got {extra_features}")

    # every feature's and target's time, as interp_at would be asked for them one by one
    tc = times[list(cuts)] - t0
    f_at = interp_many(times, [min(t0 + g * d, tn) for d in tc.tolist() for g in fr])
    g_at = interp_many(times, [min(t0 + r * d, tn) for d in tc.tolist() for r in ratios])
    features = tuple(tuple(f_at[i * len(fr) : (i + 1) * len(fr)]) for i in range(len(cuts)))
    targets = tuple(tuple(g_at[i * len(ratios) : (i + 1) * len(ratios)]) for i in range(len(cuts)))
    app = feature_interps(times, fr)
    w = (times[list(cuts)] - t0) ** recency
    return PairPlan(float(rho), ratios, fr, cuts, features, targets, app, tuple(float(x) for x in w / w.mean()))


def _linspace(stop: float, num: int) -> list[float]:
    """np.linspace(0, stop, num) in plain floats, the same values (i * step, the last exactly ``stop``)."""
    if num == 1:
        return [0.0]
    step = stop / (num - 1)
    return [i * step for i in range(num - 1)] + [float(stop)]


def backtest_row(times: np.ndarray, rho: float) -> int:
    """The row s_b that needs ratio ``rho`` to reach the newest row (nearest checkpoint)."""
    t0, tn = times[0], times[-1]
    want = t0 + (tn - t0) / rho
    b = int(np.argmin(np.abs(times[:-1] - want)))
    return max(b, 2)  # keep s_0, a cut and s_b


def at(values, rows: Sequence[int], it: Interp):
    """Value at one Interp from ``values`` (R, P), numpy or a tensor, whose i-th row is stored row
    ``rows[i]``, by the formula torch.lerp uses (exact at both ends) in either library."""
    pos = {r: i for i, r in enumerate(rows)}
    lo = values[pos[it.lo]]
    if it.w == 0.0:
        return lo
    hi = values[pos[it.hi]]
    return lo + it.w * (hi - lo) if it.w < 0.5 else hi - (hi - lo) * (1.0 - it.w)
