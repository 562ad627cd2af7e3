"""The farcaster's numerics on in-memory series: synthetic SGD, closed forms, the regulariser."""

import numpy as np
import pytest
import torch

from farcast_core import baselines
from farcast_core.calibration import max_ratio, plan_pairs
from farcast_core.errors import ForecastError
from farcast_core.forecaster import FitConfig, grad_reg
from farcast_core.series import backtest_series, fit_series, forecast_series

T = np.arange(0, 201, 10)  # 21 checkpoints, every 10 steps


def sgd_least_squares(seed: int, dim: int = 50, lr: float = 0.001, steps: int = 200, every: int = 10):
    """Weights of a least-squares problem solved by minibatch SGD from a random start (paper, Fig. 1)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(500, dim, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, dim, dtype=torch.float64)
    y = X @ torch.randn(dim, generator=g, dtype=torch.float64) + 0.1 * torch.randn(500, generator=g, dtype=torch.float64)
    w = torch.randn(dim, generator=g, dtype=torch.float64)
    out = [w.clone()]
    for s in range(1, steps + 1):
        i = torch.randint(0, 500, (32,), generator=g)
        w -= lr * X[i].T @ (X[i] @ w - y[i]) / 32
        if s % every == 0:
            out.append(w.clone())
    return torch.stack(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sgd_least_squares_beats_persistence_and_chord(seed):
    r = backtest_series(sgd_least_squares(seed), T, 2.0)
    assert r["farcast"] < 0.5 * r["persistence"], r
    assert r["farcast"] < 0.8 * r["chord"], r


def exp_decay(rate_times_tn: float, P: int = 2000):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(P, generator=g, dtype=torch.float64)
    w_star = torch.randn(P, generator=g, dtype=torch.float64)
    k = rate_times_tn / T[-1]
    return torch.stack([w_star + (w0 - w_star) * np.exp(-k * t) for t in T])


def test_exponential_decay_is_forecast_almost_exactly_with_the_feature_subset():
    W = exp_decay(1.0)
    moved = float((W[-1] - W[10]).abs().mean())  # what persistence misses in the backtest
    r = backtest_series(W, T, 2.0, FitConfig(extra_features=(0.5, 0.8)))
    assert r["persistence"] == pytest.approx(moved)
    assert r["farcast"] < 0.03 * moved, r


def test_exponential_decay_with_the_papers_two_features_beats_persistence_and_chord():
    # [w(s_0), w(s_c)] cannot express how a decay slows down between cuts: close, not exact
    for rate in (0.5, 1.0):
        r = backtest_series(exp_decay(rate), T, 2.0, FitConfig(extra_features=()))
        assert r["farcast"] < 0.4 * r["persistence"] and r["farcast"] < 0.6 * r["chord"], (rate, r)


def test_constant_trajectory_is_forecast_constant():
    w = torch.randn(300, dtype=torch.float64)
    W = w.expand(len(T), -1).clone()
    assert torch.allclose(forecast_series(W, T, 2.0), w, atol=1e-12, rtol=0)


def test_zero_initialised_bias_works():
    c = torch.randn(64, dtype=torch.float64)
    W = torch.stack([c * t for t in T.astype(np.float64)])  # starts at exactly 0, moves linearly
    assert torch.all(W[0] == 0)
    pred = forecast_series(W, T, 2.0)
    assert torch.isfinite(pred).all()
    assert torch.allclose(pred, c * 400.0, rtol=1e-3, atol=1e-6)


def test_regulariser_hand_computed():
    # one parameter, times 0..3, values 0, 1, 3, 4: speeds 1, 2, 1 -> one acceleration of 1
    traj = torch.tensor([[0.0, 1.0, 3.0, 4.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    assert grad_reg(traj, t).item() == pytest.approx(1.0)
    # two parameters, uneven times: speeds (mean |step| / dt) = 1/1, 4/2, 3/1 -> 1 + 1 = 2
    traj = torch.tensor([[0.0, 1.0, 5.0, 8.0], [0.0, -1.0, -5.0, -8.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 3.0, 4.0], dtype=torch.float64)
    assert grad_reg(traj, t).item() == pytest.approx(2.0)
    assert grad_reg(traj.flip(-1), t.flip(-1) * -1).item() == pytest.approx(0.0)  # decelerating: no penalty


def horizon_speeds(W, lam):
    fitted, plan = fit_series(W, T, 3.0, FitConfig(lam=lam, horizons=4, iters=300, extra_features=()))
    feats = torch.stack([W[0], W[-1]], -1)
    pred = feats @ fitted.A[0] + fitted.b[0]  # (P, m)
    traj = torch.cat([W[-1:].T, pred], 1)
    t = np.array([1.0, *plan.ratios])
    return (traj[:, 1:] - traj[:, :-1]).abs().mean(0) / torch.tensor(np.diff(t))


def test_large_lambda_makes_the_forecast_decelerate():
    # weights that accelerate (w ~ t^2): unregularised, the forecast accelerates too
    g = torch.Generator().manual_seed(0)
    c = torch.rand(500, generator=g, dtype=torch.float64)
    W = torch.stack([c * (t / 200.0) ** 2 + 0.01 * torch.randn(500, generator=g, dtype=torch.float64) for t in T])
    free = horizon_speeds(W, 0.0)
    assert (free[1:] > free[:-1] * 1.05).all()
    held = horizon_speeds(W, 100.0)
    assert (held[1:] <= held[:-1] * 1.01).all(), held


def test_fit_is_deterministic_for_a_seed():
    W = sgd_least_squares(0)
    a, _ = fit_series(W, T, 2.0, FitConfig(sample=20, seed=3))
    b, _ = fit_series(W, T, 2.0, FitConfig(sample=20, seed=3))
    c, _ = fit_series(W, T, 2.0, FitConfig(sample=20, seed=4))
    assert torch.equal(a.A, b.A) and torch.equal(a.b, b.b)
    assert not torch.equal(a.A, c.A)


def test_calibration_plan_and_too_far_error():
    plan = plan_pairs(T, 2.0, horizons=4, max_cuts=8)
    assert plan.ratios == (1.25, 1.5, 1.75, 2.0)
    assert len(plan.cuts) == 8 and max(plan.cuts) == 10  # 2 * 100 <= 200
    cut = plan.cuts[0]
    lo = plan.targets[0][0]  # ratio 1.25 of an early cut falls between checkpoints
    assert T[lo.lo] + lo.w * (T[lo.hi] - T[lo.lo]) == pytest.approx(1.25 * T[cut])
    assert max_ratio(T) == 20.0
    with pytest.raises(ForecastError, match="largest ratio this run supports is 20"):
        plan_pairs(T, 25.0)


def test_baselines_closed_form():
    w0, wn = torch.tensor([0.0]), torch.tensor([1.0])
    assert baselines.chord(w0, wn, 0, 10, 20).item() == 2.0
    assert baselines.last_segment(torch.tensor([0.5]), wn, 5, 10, 20).item() == 2.0
    ws = torch.tensor([[1.0], [2.0], [3.0]])
    assert baselines.linefit(ws, torch.tensor([0.0, 1.0, 2.0]), 4.0).item() == pytest.approx(5.0)


def test_float32_fit_as_on_a_gpu_solves_constant_chunks():
    """The GPU path fits in float32: a chunk that never moves (a LayerNorm weight at 1) must still solve,
    and a moving chunk must agree with the float64 fit (found on CPU: the float64 ridge vanished in float32)."""
    from farcast_core.calibration import plan_pairs
    from farcast_core.forecaster import apply, fit_batch
    from farcast_core.series import at, pairs

    moving = sgd_least_squares(0)  # (21, 50)
    still = torch.ones(len(T), 50, dtype=torch.float64)
    plan = plan_pairs(T, 2.0, 4, 8, (0.5, 0.8))
    rows = list(range(len(T)))
    samples = [pairs(W, rows, plan) for W in (moving, still)]
    out = {}
    for dt in (torch.float64, torch.float32):
        feats = torch.stack([s[0] for s in samples]).to(dt)
        targets = torch.stack([s[1] for s in samples]).to(dt)
        app = torch.stack([s[2] for s in samples]).to(dt)
        mask = torch.ones(feats.shape[:2], dtype=torch.bool)
        app_mask = torch.ones(app.shape[:2], dtype=torch.bool)
        fitted = fit_batch(feats, targets, mask, app, app_mask, torch.tensor(plan.ratios, dtype=dt), FitConfig())
        assert torch.isfinite(fitted.A).all() and torch.isfinite(fitted.b).all(), dt
        feats_n = torch.stack([at(moving, rows, it) for it in plan.app_features], -1)
        out[dt] = apply(fitted.A[0].double(), fitted.b[0].double(), feats_n)[:, -1]
        still_n = torch.stack([at(still, rows, it) for it in plan.app_features], -1)
        assert torch.allclose(apply(fitted.A[1].double(), fitted.b[1].double(), still_n)[:, -1], still[-1], atol=1e-3)
    moved = (moving[-1] - moving[0]).abs().mean()
    assert (out[torch.float32] - out[torch.float64]).abs().mean() < 0.05 * moved
