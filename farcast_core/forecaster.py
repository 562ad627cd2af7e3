"""The 1-layer farcaster (method page, section 2), fitted for many chunks at once.

    y = f A + b,   f = [w(t_0), (w at extra feature times), w(t_c)],  A: (F, m), b: (m,)

Fitted in a residual, normalised parametrisation (predict y - w_c from [f_k - w_c ..., w_c, 1],
each column scaled to unit mean magnitude), warm-started by least squares, then refined on
L1 loss + lambda * L_grad with Adam. All chunks of a batch are one batched problem.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class FitConfig:
    horizons: int = 4  # m: horizon points, evenly spaced in ratio between the newest step and the target
    max_cuts: int = 8  # calibration cuts, spread over the admissible range
    sample: int = 4096  # l: parameters sampled per chunk to fit its forecaster
    lam: float = 1.0  # weight of the deceleration regulariser L_grad (chosen on bench/forecast_quality.py)
    iters: int = 150  # Adam iterations of the L1 refinement after the least-squares warm start
    lr: float = 0.02  # Adam learning rate in the normalised parametrisation (cosine-decayed to 0)
    # Extra feature times as fractions of t_c - t_0 (the paper's general subset T). The paper and
    # docs/method.md recommend none ({s_0, s_c} only); bench/forecast_quality.py measured (0.5, 0.8)
    # far better (ratio 2: 0.70 vs 1.09 x persistence on average, beats every baseline on 4/4 runs
    # vs 2/4), so it is the default here. extra_features=() gives the paper's forecaster.
    extra_features: tuple[float, ...] = (0.5, 0.8)
    linefit_k: int = 4  # checkpoints in the per-weight line-fit baseline
    seed: int = 0  # seeds the parameter sample of each chunk
    # Chunks fitted together in one batched problem. Each chunk's fit is independent of the others
    # (elementwise Adam, per-chunk losses), so this changes memory and speed, never the result.
    # bench/fit_cost.py on the CPU: 4 vs 32 gave the same forecasters, 1.5x faster (the Adam loop's
    # rows stay in cache), fit RSS +166 vs +474 MiB. On a GPU a larger batch may pay: measure there.
    batch_chunks: int = 4
    # Time axis (farcast_core.timeaxis): "auto" takes cumulative learning rate ("lr") whenever the
    # schedule is known, else global steps; "steps" or "lr" force one. schedule: a stated schedule
    # {name, peak_lr, warmup, total, options}, preferred over what the checkpoints recorded.
    axis: str = "auto"
    schedule: dict | None = None

    def __post_init__(self):
        from farcast_core.errors import ConfigError

        ints = {"horizons": 1, "max_cuts": 1, "sample": 1, "iters": 0, "linefit_k": 2, "batch_chunks": 1}
        for name, least in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"{name} must be a whole number >= {least}, got {v!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"lam (the regulariser's weight) must be a finite number >= 0, got {self.lam!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        bad = [f for f in self.extra_features if not (isinstance(f, (int, float)) and 0 < f < 1)]
        if bad:
            raise ConfigError(f"feature times are fractions strictly between 0 and 1, got {bad[0]!r}")
        if self.axis not in ("auto", "steps", "lr"):
            raise ConfigError(f"axis must be auto, steps or lr, got {self.axis!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["extra_features"] = list(self.extra_features)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "FitConfig":
        d = dict(d)
        if "extra_features" in d:
            d["extra_features"] = tuple(d["extra_features"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def grad_reg(traj: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_grad = sum_{j>=2} max(v_j - v_{j-1}, 0), v_j the mean |step| per time on segment j.

    traj: (..., L, m+1) predicted values with traj[..., 0] the last input; t: (m+1,) times;
    mask: (..., L) which rows count. Returns (...,).
    """
    steps = (traj[..., 1:] - traj[..., :-1]).abs()  # (..., L, m)
    if mask is None:
        speed = steps.mean(-2)
    else:
        w = mask.to(steps.dtype).unsqueeze(-1)
        speed = (steps * w).sum(-2) / w.sum(-2).clamp_min(1)
    v = speed / (t[1:] - t[:-1])  # (..., m)
    return torch.relu(v[..., 1:] - v[..., :-1]).sum(-1)


@dataclass
class Fitted:
    """Forecasters of a batch of chunks, in the original parametrisation."""

    A: torch.Tensor  # (K, F, m)
    b: torch.Tensor  # (K, m)
    loss: torch.Tensor = field(default=None)  # (K,) final training L1 in normalised units


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim -2 of (K, N, C) where mask (K, N) is true -> (K, C)."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(-2) / w.sum(-2).clamp_min(1)


def fit_batch(
    feats: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    app_feats: torch.Tensor,
    app_mask: torch.Tensor,
    ratios: torch.Tensor,
    config: FitConfig,
) -> Fitted:
    """Fit one forecaster per chunk.

    feats (K, N, F) calibration features (last column w(t_c)); targets (K, N, m);
    mask (K, N) which rows are real (chunks are padded to N); app_feats (K, L, F) features of
    sampled parameters at the newest step, app_mask (K, L); ratios (m,) horizon ratios.
    """
    dt = feats.dtype
    wc = feats[..., -1:]  # (K, N, 1)
    rel = feats[..., :-1] - wc  # (K, N, F-1)
    s_rel = _masked_mean(rel.abs(), mask) + 1e-12  # (K, F-1)
    s_wc = _masked_mean(wc.abs(), mask) + 1e-12  # (K, 1)
    s_y = s_rel[..., :1]  # (K, 1): how far weights moved, the natural unit of the residual

    def design(f):  # (K, *, F) -> (K, *, F+1) normalised residual features
        c = f[..., -1:]
        ones = torch.ones_like(c)
        return torch.cat([(f[..., :-1] - c) / s_rel.unsqueeze(-2), c / s_wc.unsqueeze(-2), ones], -1)

    X = design(feats)  # (K, N, F+1)
    Y = (targets - wc) / s_y.unsqueeze(-2)  # (K, N, m)
    Xa = design(app_feats)  # (K, L, F+1)
    w = mask.to(dt).unsqueeze(-1)

    # least-squares warm start (tiny ridge keeps degenerate chunks, e.g. constant ones, solvable; in
    # float32, as on a GPU, 1e-8 of the diagonal is below rounding, so the ridge is 100 ulps there)
    XtX = (X * w).transpose(-1, -2) @ X
    rel = max(1e-8, 100 * torch.finfo(dt).eps)
    ridge = rel * w.sum(-2, keepdim=True).clamp_min(1) * torch.eye(X.shape[-1], dtype=dt, device=X.device)
    P = torch.linalg.solve(XtX + ridge, (X * w).transpose(-1, -2) @ Y)  # (K, F+1, m)

    t = torch.cat([torch.ones(1, dtype=dt, device=X.device), ratios.to(dt)])  # (m+1,): ratio 1 is w_c
    # L1 + lambda L_grad refinement; each chunk keeps the best iterate it saw (Adam's normalised
    # steps jitter around an exact optimum, e.g. a trajectory least squares already fits exactly)
    best = P.clone()
    best_loss = torch.full(P.shape[:1], float("inf"), dtype=dt, device=P.device)
    P = P.clone().requires_grad_(True)
    opt = torch.optim.Adam([P], lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, config.iters))
    for it in range(config.iters + 1):
        loss = _loss(P, X, Y, mask, Xa, app_mask, t, config.lam)
        with torch.no_grad():
            better = loss < best_loss
            best[better], best_loss[better] = P[better], loss[better]
        if it == config.iters:
            break
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = _loss(best, X, Y, mask, Xa, app_mask, t, 0.0)
        P = best * s_y.unsqueeze(-2)  # residual per unit feature, in weight units
        c_rel = P[..., :-2, :] / s_rel.unsqueeze(-1)  # (K, F-1, m) coefficients on (f_k - w_c)
        c_wc = P[..., -2:-1, :] / s_wc.unsqueeze(-1)  # (K, 1, m)
        A = torch.cat([c_rel, 1.0 - c_rel.sum(-2, keepdim=True) + c_wc], -2)  # (K, F, m)
        b = P[..., -1, :]
    return Fitted(A, b, final)


def _loss(P, X, Y, mask, Xa, app_mask, t, lam) -> torch.Tensor:
    """(K,) L1 over calibration pairs + lam * L_grad over the forecast of the sampled parameters."""
    l1 = _masked_mean((X @ P - Y).abs().sum(-1, keepdim=True), mask)[..., 0]
    if lam == 0:
        return l1
    pred = Xa @ P  # (K, L, m) residuals from w_n in normalised units
    traj = torch.cat([torch.zeros_like(pred[..., :1]), pred], -1)
    return l1 + lam * grad_reg(traj, t, app_mask)


def apply(A: torch.Tensor, b: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Forecast (P, m) from features (P, F) with one chunk's A (F, m), b (m,)."""
    return feats @ A + b


@dataclass
class Forecasters:
    """Fitted forecasters of a run: one (A, b) per chunk, plus what produced them."""

    keys: list[tuple[str, int]]  # (tensor name, chunk index) of row k of A and b
    chunks: dict[str, int]  # tensor name -> chunk length, so a transfer can check the plan
    A: torch.Tensor  # (K, F, m) float64
    b: torch.Tensor  # (K, m) float64
    config: FitConfig
    rho: float  # target ratio the forecasters were fitted for
    ratios: tuple[float, ...]  # horizon ratios, the last is rho
    feature_ratios: tuple[float, ...]  # feature times as fractions of t_c - t_0: (0, ..., 1)
    steps: list[int]  # the observed steps they were fitted on
    excluded: list[str] = field(default_factory=list)  # float tensors not forecast (NaN/Inf seen)
    times: list[float] | None = None  # the steps on the time axis used (None: the steps themselves)
    axis: dict | None = None  # that axis (TimeAxis.to_json())

    def row(self) -> dict[tuple[str, int], int]:
        return {k: i for i, k in enumerate(self.keys)}
