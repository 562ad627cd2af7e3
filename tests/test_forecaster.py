"""The farcaster's numerics on in-memory series: synthetic SGD, closed forms, the regulariser."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from farcast_core import baselines
from farcast_core.calibration import max_ratio, plan_pairs
from farcast_core.errors import ForecastError
from farcast_core.forecaster import FitConfig, apply, grad_reg
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
    pred = apply(fitted.A[0], fitted.b[0], feats)  # (P, m)
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
    assert np.array_equal(a.A, b.A) and np.array_equal(a.b, b.b)
    assert not np.array_equal(a.A, c.A)


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
    from farcast_core.forecaster import apply, fit_values
    from farcast_core.series import at

    moving = sgd_least_squares(0)  # (21, 50)
    still = torch.ones(len(T), 50, dtype=torch.float64)
    plan = plan_pairs(T, 2.0, 4, 8, (0.5, 0.8))
    rows = list(range(len(T)))
    W = torch.stack([moving[plan.rows], still[plan.rows]])  # (2, R, 50)
    out = {}
    for dt in (torch.float64, torch.float32):
        fitted = fit_values(W.to(dt), torch.ones(2, 50, dtype=torch.bool), plan.coefficients(),
                            torch.tensor(plan.ratios, dtype=dt), FitConfig())
        assert np.isfinite(fitted.A).all() and np.isfinite(fitted.b).all(), dt
        feats_n = torch.stack([at(moving, rows, it) for it in plan.app_features], -1)
        out[dt] = apply(fitted.A[0], fitted.b[0], feats_n)[:, -1]
        still_n = torch.stack([at(still, rows, it) for it in plan.app_features], -1)
        assert torch.allclose(apply(fitted.A[1], fitted.b[1], still_n)[:, -1], still[-1], atol=1e-3)
    moved = (moving[-1] - moving[0]).abs().mean()
    assert (out[torch.float32] - out[torch.float64]).abs().mean() < 0.05 * moved


def explicit_moments(feats, targets, app, row_weights=None):
    """The reduced problem computed the plain way, from the explicit pairs of one chunk (the reference);
    ``row_weights``: each pair's weight in the moments (the normalisers stay unweighted)."""
    wc = feats[:, -1:]
    s_rel = (feats[:, :-1] - wc).abs().mean(0) + 1e-12
    s_wc = wc.abs().mean(0) + 1e-12
    s_y = s_rel[:1]

    def design(f):
        c = f[:, -1:]
        return torch.cat([(f[:, :-1] - c) / s_rel, c / s_wc, torch.ones_like(c)], -1)

    X, Xa, Y = design(feats), design(app), (targets - wc) / s_y
    w = torch.ones(len(X), dtype=X.dtype) if row_weights is None else row_weights
    G = (X * w[:, None]).T @ X / len(X)
    P0 = torch.linalg.solve(G + 1e-8 * torch.eye(G.shape[0], dtype=G.dtype), (X * w[:, None]).T @ Y / len(X))
    return dict(G=G, P0=P0, mse0=(w[:, None] * (X @ P0 - Y) ** 2).mean(0), Ga=Xa.T @ Xa / len(Xa),
                scale=torch.cat([s_rel, s_wc, s_y]), X=X, Y=Y, Xa=Xa)


def padded(chunks, rows, width=50):
    """(batch (K, len(rows), width), mask (K, width)): each (T, P_k) chunk's ``rows``, zero-padded to
    ``width`` as the fit pads the chunks of a batch."""
    batch = torch.zeros(len(chunks), len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(chunks), width, dtype=torch.bool)
    for k, c in enumerate(chunks):
        batch[k, :, : c.shape[1]], mask[k, : c.shape[1]] = c[rows], True
    return batch, mask


@pytest.mark.parametrize("extra,recency", [((), 0.0), ((0.5, 0.8), 0.0), ((0.5, 0.8), 2.0)])
def test_moments_from_values_equal_those_of_the_explicit_pairs(extra, recency):
    """reduce_values never forms the calibration pairs; it must give what forming them gives, for
    chunks of different sizes padded into one batch (real SGD weights, interpolated cuts), with each
    cut's pairs weighted by (t_c - t_0) ** recency."""
    from farcast_core.forecaster import reduce_values
    from farcast_core.series import pairs

    W = sgd_least_squares(1, dim=50)
    plan = plan_pairs(T, 2.5, 4, 8, extra, recency=recency)  # ratio 2.5: targets fall between checkpoints
    tc = T[list(plan.cuts)].astype(float)
    assert np.allclose(plan.cut_weights, tc**recency / np.mean(tc**recency)) and np.mean(plan.cut_weights) == pytest.approx(1)
    rows = list(range(len(T)))
    chunks = [W[:, :50], W[:, 10:30] * 3 + 1]
    batch, mask = padded(chunks, plan.rows)
    M = reduce_values(batch, mask, plan.coefficients(), plan.cut_weights)
    for k, c in enumerate(chunks):
        per_row = torch.tensor(plan.cut_weights, dtype=torch.float64).repeat_interleave(c.shape[1])  # pairs are cut-major
        ref = explicit_moments(*pairs(c, rows, plan), per_row)
        for name in ("G", "P0", "Ga", "scale"):
            assert torch.allclose(getattr(M, name)[k], ref[name], rtol=1e-9, atol=1e-9), name
        assert torch.allclose(M.mse0[k], ref["mse0"], rtol=1e-6, atol=1e-9)
        n = c.shape[1]  # the kappa rows here are every row (fewer than KAPPA_ROWS), cut-major
        C = len(plan.cuts)
        got = M.X[k].reshape(C, -1, M.X.shape[-1])[:, :n].reshape(-1, M.X.shape[-1])
        assert torch.allclose(got, ref["X"], rtol=1e-9, atol=1e-9)
        assert torch.allclose(M.Xa[k, :n], ref["Xa"], rtol=1e-9, atol=1e-9)
        assert int(M.mask[k].sum()) == C * n and int(M.app_mask[k].sum()) == n


def test_the_written_out_gradient_is_autograds():
    from farcast_core.forecaster import objective, reduce_values

    W = sgd_least_squares(2, dim=40)
    plan = plan_pairs(T, 2.0, 4, 8, (0.5, 0.8))
    M = reduce_values(W[plan.rows][None], torch.ones(1, 40, dtype=torch.bool), plan.coefficients())
    Mn = {k: getattr(M, k).numpy() for k in ("G", "P0", "mse0", "Ga")}
    g = torch.Generator().manual_seed(0)
    kappa, kappa_a = torch.rand(1, 4, generator=g, dtype=torch.float64) + 0.5, torch.rand(1, 4, generator=g, dtype=torch.float64) + 0.5
    dt = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    accelerating = 0
    for trial in range(8):
        P = (M.P0 + 0.3 * torch.randn(M.P0.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
        loss, grad = objective(P.detach().numpy(), Mn, kappa.numpy(), kappa_a.numpy(), dt.numpy(), 1.0)
        E = P - M.P0
        rms = (((M.G @ E) * E).sum(-2) + M.mse0).sqrt()
        D = torch.cat([P[..., :1], P[..., 1:] - P[..., :-1]], -1)
        v = kappa_a * ((M.Ga @ D) * D).sum(-2).sqrt() / dt
        ref = (kappa * rms).sum(-1) + torch.relu(v[..., 1:] - v[..., :-1]).sum(-1)
        ref.sum().backward()
        accelerating += int((v[..., 1:] > v[..., :-1]).any())
        assert np.allclose(loss, ref.detach().numpy(), rtol=1e-12)
        assert np.allclose(grad, P.grad.numpy(), rtol=1e-9, atol=1e-12)
    assert accelerating > 0  # the regulariser's gradient was exercised


def test_solve_refines_only_the_chunks_that_move_and_equals_the_loop_over_all():
    """A chunk whose least-squares start does not accelerate has a zero gradient there, so solve leaves
    it out of the Adam loop: on a batch with both kinds (SGD and exponential-decay chunks that do not
    move, an accelerating one and a rescaled SGD chunk that do), the same result as the loop over all."""
    from farcast_core import forecaster as F

    W = sgd_least_squares(0, dim=50)
    g = torch.Generator().manual_seed(0)
    accelerating = torch.stack([W[0] + (W[-1] - W[0]) * (t / 200) ** 2 for t in T])
    accelerating += 0.01 * torch.randn(accelerating.shape, generator=g, dtype=torch.float64)
    plan = plan_pairs(T, 2.0, 4, 8, (0.5, 0.8))
    batch, mask = padded([W[:, :50], exp_decay(1.0, 50), W[:, 10:30] * 3 + 1, accelerating], plan.rows)
    M = F.reduce_values(batch, mask, plan.coefficients(), plan.cut_weights)
    cpu = {k: getattr(M, k).numpy() for k in ("G", "P0", "mse0", "Ga")}
    dt = np.diff(np.concatenate([[1.0], plan.ratios]))
    rows = F.KappaRows.of(M)
    kappas = rows.measure(cpu["P0"])
    config = FitConfig(iters=60)
    moving = (F.objective(cpu["P0"].copy(), cpu, *kappas, dt, config.lam)[1] != 0).any((-2, -1))
    assert moving.tolist() == [False, False, True, True]
    best, loss = F._refine(rows, cpu, cpu["P0"].copy(), kappas, dt, config)  # every chunk in the loop
    assert np.array_equal(best[~moving], cpu["P0"][~moving])  # Adam never moved them
    fit = F.solve(M, torch.tensor(plan.ratios, dtype=torch.float64), config)
    assert np.allclose(fit.loss, loss, rtol=1e-12)  # the same best iterates
    ref = F.solve(M, torch.tensor(plan.ratios, dtype=torch.float64), FitConfig(iters=0))  # the starts
    assert not np.allclose(fit.A[2:], ref.A[2:])  # the moving chunks were refined
    assert np.array_equal(fit.A[:2], ref.A[:2])


def test_the_written_out_adam_is_torchs():
    """solve's update is torch.optim.Adam's with a cosine-annealed rate, on the same gradients."""
    from farcast_core import forecaster as fc

    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    P = torch.zeros(3, 5, 4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([P], lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)
    mine, state = torch.zeros_like(target), fc.AdamState.like(target)
    for it in range(20):
        loss = ((P - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        mine = state.step(mine, 2 * (mine - target), fc.cosine_lr(0.02, it, 20), it)
    assert torch.allclose(mine, P.detach(), rtol=1e-10, atol=1e-12)


def test_problems_reduced_together_equal_each_reduced_alone():
    """reduce_many reduces several plans (the fit's and its inner backtest's, which reads fewer, partly
    other rows) from one V over the union of their rows, with each plan's coefficients placed on it and
    the union's newest row as the reference: the same moments as reducing each on its own rows."""
    from farcast_core.forecaster import reduce_many, reduce_values

    W = sgd_least_squares(2, dim=50)
    main = plan_pairs(T, 2.0, 4, 2, (0.5, 0.8), recency=2.0)  # two cuts: 13 of the 21 rows
    inner = plan_pairs(T[:9], 2.5, 4, 8, (0.5, 0.8), recency=2.0)  # rows 0..8, ratio 2.5: interpolated targets
    rows = sorted({*main.rows, *inner.rows})
    assert set(inner.rows) - set(main.rows)  # the inner plan reads rows the fit's does not
    chunks = [W[:, :50], W[:, 10:30] * 3 + 1]
    batch, mask = padded(chunks, rows)
    together = reduce_many(batch, mask, [(p.coefficients(rows), p.cut_weights) for p in (main, inner)])
    for plan, got in zip((main, inner), together):
        alone = reduce_values(padded(chunks, plan.rows)[0], mask, plan.coefficients(), plan.cut_weights)
        for name in ("G", "P0", "Ga", "scale", "X", "Y", "Xa"):
            assert torch.allclose(getattr(got, name), getattr(alone, name), rtol=1e-9, atol=1e-12), name
        assert torch.allclose(got.mse0, alone.mse0, rtol=1e-6, atol=1e-12)
        assert torch.equal(got.mask, alone.mask) and torch.equal(got.app_mask, alone.app_mask)


def test_kappa_ignores_the_padded_rows_bit_for_bit():
    """_kappa sums over every row and counts only the masked ones: the rows outside the mask are zero
    (reduce_values zeroes padding), so it equals the masked mean |z| / rms z exactly, on a real padded
    batch and the residuals of its least-squares start; on tensors and on numpy arrays alike."""
    from farcast_core.forecaster import KappaRows, _kappa, _steps, reduce_values

    W = sgd_least_squares(1, dim=50)
    plan = plan_pairs(T, 2.0, 4, 8, (0.5, 0.8))
    batch, mask = padded([W[:, :50], W[:, 10:30] * 3 + 1], plan.rows)
    M = reduce_values(batch, mask, plan.coefficients(), plan.cut_weights)
    for z, m in ((M.X @ M.P0 - M.Y, M.mask), (M.Xa @ _steps(M.P0), M.app_mask)):
        assert not m.all() and (z[~m] == 0).all()
        w = m.to(z.dtype).unsqueeze(-1)
        n = w.sum(-2).clamp_min(1)
        masked = ((z.abs() * w).sum(-2) / n) / ((z * z * w).sum(-2) / n).sqrt()
        assert np.array_equal(_kappa(z, m), masked.numpy())
        # the same function on numpy arrays (the solve's CPU path): the same up to summation order
        assert np.allclose(_kappa(z.numpy(), m.numpy()), masked.numpy(), rtol=1e-14, atol=0)
        # with a work array (the solve's scratch), and through KappaRows.measure: the same numbers
        assert np.array_equal(_kappa(z.numpy(), m.numpy(), np.empty(tuple(z.shape))), _kappa(z.numpy(), m.numpy()))
    rows, tensors = KappaRows.of(M), KappaRows(M.X, M.Y, M.mask, M.Xa, M.app_mask)  # numpy + scratch; torch
    for P in (M.P0.numpy(), 1.5 * M.P0.numpy(), M.P0.numpy()):  # the scratch reused holds nothing over
        for got, ref in zip(rows.measure(P), tensors.measure(P)):
            assert np.allclose(got, ref, rtol=1e-14, atol=0)


# ---------------------------------------------------------------- shrinkage towards the newest weights

def _l1(alpha, moved, needed, w):
    return float(np.sum(w * np.abs(needed - alpha * moved)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-10, 10), st.floats(-10, 10), st.floats(0.01, 100)), min_size=1, max_size=40))
def test_shrink_factor_is_the_l1_minimiser_over_zero_to_one(rows):
    """The weighted median equals a brute-force search: the L1 objective is piecewise linear in alpha,
    so its minimum over [0, 1] lies at 0, 1 or a breakpoint needed/moved."""
    from farcast_core.forecaster import shrink_factor

    moved, needed, w = (np.array(c, dtype=np.float64) for c in zip(*rows))
    alpha = shrink_factor(moved, needed, w)
    assert 0.0 <= alpha <= 1.0
    nz = moved != 0
    with np.errstate(over="ignore"):
        candidates = [0.0, 1.0, *np.clip(needed[nz] / moved[nz], 0, 1)]
    best = min(_l1(a, moved, needed, w) for a in candidates)
    assert _l1(alpha, moved, needed, w) <= best + 1e-9 * (1 + best)


def test_shrink_factor_on_known_cases():
    from farcast_core.forecaster import shrink_factor

    moved = np.array([1.0, -2.0, 0.5, 4.0])
    assert shrink_factor(moved, 0.6 * moved) == pytest.approx(0.6)  # every parameter went 60% of the way
    assert shrink_factor(moved, 3 * moved) == 1.0  # farther than forecast: never extrapolate more
    assert shrink_factor(moved, -moved) == 0.0  # the other way: keep the newest weights
    assert shrink_factor(np.zeros(3), np.ones(3)) == 1.0  # a forecast that moves nothing


def test_shrunk_forecasters_move_alpha_of_the_way_at_every_horizon():
    """Folding alpha into A and b gives w_c + alpha (y - w_c) for every horizon, the last feature being w_c."""
    from farcast_core.forecaster import Forecasters, apply

    g = torch.Generator().manual_seed(0)
    A, b = torch.randn(3, 4, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    fc = Forecasters(keys=[("w", i) for i in range(3)], chunks={"w": 10}, A=A, b=b, config=FitConfig(), rho=2.0,
                     ratios=(1.5, 2.0), feature_ratios=(0.0, 0.5, 0.8, 1.0), steps=[0, 10, 20])
    s = fc.shrunk(0.3, "stated")
    feats = torch.randn(5, 4, generator=g, dtype=torch.float64)
    for k in range(3):
        y, ys = apply(fc.A[k], fc.b[k], feats), apply(s.A[k], s.b[k], feats)
        assert torch.allclose(ys, feats[:, -1:] + 0.3 * (y - feats[:, -1:]), atol=1e-12)
    assert s.shrink == {"alpha": 0.3, "chosen": "stated"} and fc.shrink is None and torch.equal(fc.A, A)


def test_a_batch_of_mixed_chunks_in_any_order_reduces_as_each_chunk_alone():
    """reduce_many forms V run by run of alike chunks over their real columns, and takes each chunk's
    kappa subsets (every q-th parameter, q from its own size) there: in a batch of chunks of several
    sizes in no particular order (strides above 1 included), each chunk's moments and kappa rows are
    those of the chunk reduced alone, unpadded."""
    from farcast_core.forecaster import KAPPA_ROWS, reduce_many

    g = torch.Generator().manual_seed(0)
    plan = plan_pairs(T, 2.0, 4, 8, (0.5, 0.8), recency=2.0)
    R, C = len(plan.rows), len(plan.cuts)
    sizes = [1500, 1500, 9, 700, 1, 9, 9]
    assert -(-C * 700 // KAPPA_ROWS) > 1 and -(-1500 // KAPPA_ROWS) > 1  # strided subsets, both kinds
    chunks = [torch.cumsum(torch.randn(R, n, generator=g, dtype=torch.float64), 0) + k for k, n in enumerate(sizes)]
    batch = torch.zeros(len(sizes), R, max(sizes), dtype=torch.float64)
    mask = torch.zeros(len(sizes), max(sizes), dtype=torch.bool)
    for k, c in enumerate(chunks):
        batch[k, :, : c.shape[1]], mask[k, : c.shape[1]] = c, True
    problems = [(plan.coefficients(), plan.cut_weights)]
    (M,) = reduce_many(batch, mask, problems)
    for k, c in enumerate(chunks):
        (alone,) = reduce_many(c[None], torch.ones(1, c.shape[1], dtype=torch.bool), problems)
        for name, tol in (("G", 1e-12), ("Ga", 1e-12), ("scale", 1e-12), ("P0", 1e-7), ("mse0", 1e-6)):
            # relative to the largest entry (P0 of the one-parameter chunk rests on the ridge: 7e-9)
            got, ref = getattr(M, name)[k], getattr(alone, name)[0]
            assert (got - ref).abs().max() <= tol * ref.abs().max(), name
        ps, pa = alone.X.shape[1] // C, alone.Xa.shape[1]  # the chunk's subset sizes; the batch pads them
        for name, n, width in (("X", ps, M.X.shape[1] // C), ("Y", ps, M.Y.shape[1] // C)):
            got = getattr(M, name)[k].reshape(C, width, -1)
            assert torch.allclose(got[:, :n], getattr(alone, name)[0].reshape(C, n, -1), rtol=1e-9, atol=1e-12), name
            assert not got[:, n:].any()
        assert torch.allclose(M.Xa[k, :pa], alone.Xa[0], rtol=1e-9, atol=1e-12) and not M.Xa[k, pa:].any()
        assert int(M.mask[k].sum()) == int(alone.mask[0].sum()) and int(M.app_mask[k].sum()) == pa
        assert pa == -(-c.shape[1] // -(-c.shape[1] // KAPPA_ROWS))  # every q-th parameter
    # the CPU fit's input: each chunk's columns as views of float32 rows (no padded copy), the same bits
    # as the padded float64 batch of those float32 values; without refinement the same least squares
    rows32 = torch.cat(chunks, 1).float()
    edges = np.cumsum([0] + sizes)
    views = [rows32.numpy()[:, a:b] for a, b in zip(edges[:-1], edges[1:])]
    padded64 = np.zeros((len(sizes), R, max(sizes)))
    for k, v in enumerate(views):
        padded64[k, :, : v.shape[1]] = v
    (from_views,) = reduce_many(views, None, problems)
    (from_padded,) = reduce_many(padded64, mask.numpy(), problems)
    (bare,) = reduce_many(views, None, problems, refine=False)
    for name in ("G", "P0", "mse0", "Ga", "scale", "X", "Y", "mask", "Xa", "app_mask"):
        assert np.array_equal(getattr(from_views, name), getattr(from_padded, name)), name
        assert getattr(bare, name) is None if name not in ("G", "P0", "scale") else np.array_equal(
            getattr(bare, name), getattr(from_views, name)), name


def _interp_one(times, t):
    """interp_at as it was written for one time (the reference for the vectorised interp_many)."""
    from farcast_core.calibration import EPS, Interp

    n = len(times) - 1
    if t > times[-1] + EPS * max(1.0, abs(times[-1])) or t < times[0]:
        raise ValueError("outside")
    hi = min(max(int(np.searchsorted(times, t - EPS * max(1.0, abs(t)), side="left")), 0), n)
    if abs(times[hi] - t) <= EPS * max(1.0, abs(t)):
        return Interp(hi, hi, 0.0)
    return Interp(hi - 1, hi, float((t - times[hi - 1]) / (times[hi] - times[hi - 1])))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=30), st.floats(0, 1e4),
       st.lists(st.floats(-0.1, 1.1), min_size=1, max_size=20), st.data())
def test_interp_many_is_interp_at_one_time_at_a_time(gaps, t0, fractions, data):
    """The plan's interpolations, asked for all at once, are those of one time at a time: at, between
    and just beside the stored times, and outside the run (an error)."""
    from farcast_core.calibration import interp_many

    times = t0 + np.concatenate([[0.0], np.cumsum(gaps)])
    ts = [times[0] + f * (times[-1] - times[0]) for f in fractions]
    ts += [float(times[i]) * (1 + data.draw(st.sampled_from([0.0, 1e-12, -1e-12]))) for i in
           data.draw(st.lists(st.integers(0, len(times) - 1), max_size=5))]
    try:
        want = [_interp_one(times, t) for t in ts]
    except ValueError:
        with pytest.raises(ValueError):
            interp_many(times, ts)
        return
    assert interp_many(times, ts) == want


def test_the_plans_linspace_is_numpys():
    """plan_pairs spreads its cuts with a plain-float linspace (np.linspace costs ~30 us a call): the same
    values, so the same cuts."""
    from farcast_core.calibration import _linspace

    for stop in range(0, 300):
        for num in range(1, 40):
            assert _linspace(stop, num) == [float(x) for x in np.linspace(0, stop, num)], (stop, num)
