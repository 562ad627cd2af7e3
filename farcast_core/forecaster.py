"""The 1-layer farcaster (method page, section 2), fitted for many chunks at once.

    y = f A + b,   f = [w(t_0), (w at extra feature times), w(t_c)],  A: (F, m), b: (m,)

Fitted in a residual, normalised parametrisation (predict y - w_c from [f_k - w_c ..., w_c, 1],
each column scaled to unit mean magnitude), warm-started by least squares, then refined on
L1 loss + lambda * L_grad with Adam. The rows are read once, into second moments per chunk
(``reduce_values``); the refinement then runs on those for all chunks at once (``solve``), so its
cost does not grow with the rows sampled.

Arrays: numpy on the CPU, torch tensors on a GPU (the same functions take either). torch is not
imported here: a CPU fit runs without it (``import torch`` alone costs ~3 s on a small machine,
20x the fit of a small run), and a GPU fit's caller has it loaded.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from farcast_core.config import FitConfig  # noqa: F401  (re-exported: where the fit's settings are used)
from farcast_core.errors import ForecastError

if TYPE_CHECKING:
    import torch

# device nodes of an NVIDIA (or ROCm) GPU: without one, torch cannot find a GPU and is not imported to ask
GPU_NODES = ("/dev/nvidiactl", "/dev/kfd")


def default_device():
    """The environment's FARCAST_DEVICE ("cpu" or "cuda") where set, else torch.device("cuda") where
    torch sees a GPU, else "cpu" (numpy). torch is imported to ask only where it is loaded already or
    a GPU device node exists. FARCAST_DEVICE=cpu keeps a fit off a GPU that is busy training."""
    asked = os.environ.get("FARCAST_DEVICE", "").strip().lower()
    if asked not in ("", "cpu", "cuda"):
        raise ForecastError(f"FARCAST_DEVICE is {asked!r}; set it to cpu or cuda, or unset it to use a GPU when there is one")
    if asked == "cpu" or (not asked and "torch" not in sys.modules and not any(os.path.exists(n) for n in GPU_NODES)):
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if asked:
        raise ForecastError("FARCAST_DEVICE is cuda but torch sees no CUDA device (a CPU build of torch, or no driver); "
                            "unset it to fit on the CPU")
    return "cpu"


def on_cpu(device) -> bool:
    """Is ``device`` ("cpu", "cuda:0", a torch.device, None: the CPU) the CPU?"""
    return device is None or str(device).split(":")[0] == "cpu"


def _is_tensor(x) -> bool:
    """A torch tensor? (A process that never imported torch has none.)"""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _lib(x):
    """x's array library: torch for a tensor, else numpy (their functions used here share names)."""
    return sys.modules["torch"] if _is_tensor(x) else np


def _zeros(like, *shape):
    """Zeros of ``shape`` with like's library, dtype and device."""
    return like.new_zeros(shape) if _is_tensor(like) else np.zeros(shape, like.dtype)


def _empty(like, *shape):
    """An uninitialised array of ``shape`` with like's library, dtype and device."""
    return like.new_empty(shape) if _is_tensor(like) else np.empty(shape, like.dtype)


def _asarray(values, like):
    """``values`` (numpy or nested lists) as an array of like's library, dtype and device."""
    if _is_tensor(like):
        return sys.modules["torch"].as_tensor(np.asarray(values), dtype=like.dtype, device=like.device)
    return np.asarray(values, like.dtype)


def _cat(xs, axis: int):
    return sys.modules["torch"].cat(xs, axis) if _is_tensor(xs[0]) else np.concatenate(xs, axis)


def numpy64(x) -> np.ndarray:
    """x (a tensor on any device, or an array) as a float64 numpy array on the CPU."""
    if _is_tensor(x):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, np.float64)


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
    return (v[..., 1:] - v[..., :-1]).clamp_min(0).sum(-1)


@dataclass
class BatchFit:
    """Forecasters of a batch of chunks, in the original parametrisation."""

    A: np.ndarray  # (K, F, m) float64
    b: np.ndarray  # (K, m)
    loss: np.ndarray | None = field(default=None)  # (K,) final objective in normalised units (None: not refined)


# Rows of each chunk kept after the reduction, to re-measure the shape of the residuals (kappa)
# during the refinement; the second moments themselves use every row. bench/forecast_quality.py
# (3 seeds): 512 gives the 1024 rows' figures within 0.004 at half the cost of each kappa measurement;
# 256 cost digits ratio 2 up to 0.011.
KAPPA_ROWS = 512


@dataclass
class Moments:
    """A batch of chunks' fitting problems, reduced to what the refinement needs (method page, 2).

    In the normalised residual parametrisation (X: (f_k - w_c)/s_rel, w_c/s_wc, 1; Y: (y - w_c)/s_y)
    the calibration error of coefficients P is exactly (P - P0)' G (P - P0) + mse0 per horizon, and
    the forecast's mean squared step over the sampled parameters is D' Ga D: every iteration costs
    O(chunks), not O(rows). Mean absolute values are kappa times root mean squares, kappa measured
    on a subset of the rows (``X``, ``Y``, ``Xa``) at the start and re-measured during the refinement.
    numpy arrays from a CPU reduction, tensors on the device from a GPU one.
    """

    G: np.ndarray  # (K, D, D) mean x x' over calibration rows
    P0: np.ndarray  # (K, D, m) least-squares coefficients
    mse0: np.ndarray | None  # (K, m) mean squared residual of P0 (from the moments, clamped at 0)
    Ga: np.ndarray | None  # (K, D, D) mean x x' over the sampled parameters at the newest step
    scale: np.ndarray  # (K, F+1): s_rel (F-1), s_wc, s_y, to map P back to (A, b)
    # the kappa rows; these, mse0 and Ga are None where the fit does not refine (iters=0: only G, P0
    # and scale are used)
    X: np.ndarray | None  # (K, r, D) a subset of the calibration rows, Y (K, r, m) their targets
    Y: np.ndarray | None
    mask: np.ndarray | None  # (K, r)
    Xa: np.ndarray | None  # (K, ra, D) a subset of the sampled parameters' rows at the newest step
    app_mask: np.ndarray | None  # (K, ra)

    @staticmethod
    def cat(parts: list["Moments"]) -> "Moments":
        """One batch from several (subsets padded to the longest)."""
        if len(parts) == 1:
            return parts[0]
        def pad(ts, n):
            out = _zeros(ts[0], sum(t.shape[0] for t in ts), n, *ts[0].shape[2:])
            k = 0
            for t in ts:
                out[k : k + t.shape[0], : t.shape[1]] = t
                k += t.shape[0]
            return out
        moments = [None if getattr(parts[0], f) is None else _cat([getattr(p, f) for p in parts], 0)
                   for f in ("G", "P0", "mse0", "Ga", "scale")]  # mse0, Ga: None without refinement
        if parts[0].X is None:
            return Moments(*moments, None, None, None, None, None)
        r, ra = max(p.X.shape[1] for p in parts), max(p.Xa.shape[1] for p in parts)
        return Moments(
            *moments, pad([p.X for p in parts], r), pad([p.Y for p in parts], r), pad([p.mask for p in parts], r),
            pad([p.Xa for p in parts], ra), pad([p.app_mask for p in parts], ra),
        )

    def numpy(self) -> "Moments":
        """These moments as numpy arrays on the CPU (float64; masks stay bool): what a GPU reduction
        hands to a process or task that has no GPU."""
        def f(t):
            if t is None:
                return t
            t = t.detach().cpu().numpy() if _is_tensor(t) else t
            return t if t.dtype == bool else t.astype(np.float64, copy=False)
        return Moments(*(f(getattr(self, k)) for k in self.__dataclass_fields__))


def _ridge(like, D: int):
    # a tiny ridge keeps degenerate chunks (constant ones) solvable; in float32, as on a GPU, 1e-8 of
    # the diagonal is below rounding, so the ridge is 100 ulps there
    return _asarray(max(1e-8, 100 * _lib(like).finfo(like.dtype).eps) * np.eye(D), like)


def reduce_values(W, mask, coefs, cut_weights=()) -> Moments:
    """Moments of a batch of chunks straight from their sampled values, without forming the pairs.

    W (K, R, P), numpy or a tensor: chunk k's P sampled parameters at the R stored rows a plan reads, zero outside
    mask (K, P), the real parameters; coefs = PairPlan.coefficients() (features (C, F, R), targets
    (C, m, R), newest features (F, R)). Every feature and target is a fixed weighted sum of the
    rows, and the normalised design is linear in V = [w - w_newest (R rows), w_newest, 1]; so the
    mean of x x' over all C x P calibration rows is the mean over cuts of T_c S T_c' with S the
    (R+2) x (R+2) second moment of V: one pass over the values. tests/test_forecaster.py pins this
    to the same moments computed from the explicit pairs. ``cut_weights`` (C,), mean 1: each cut's
    pairs count that much in the moments (PairPlan.cut_weights; empty: all alike); the normalisers
    and the kappa subsets stay unweighted (they set units and the residuals' shape).
    """
    return reduce_many(W, mask, [(coefs, cut_weights)])[0]


def reduce_many(W, mask, problems, refine: bool = True) -> list[Moments]:
    """``reduce_values`` for several fitting problems on the same rows: ``problems`` is a list of
    (coefs, cut_weights), each coefs over all R rows of W (PairPlan.coefficients(rows)). V and its
    second moment, the one pass over the values, are shared. The reference row is W's last (any row
    gives the same moments: every feature weighs the rows with weights summing to one).

    W: (K, R, P) zero-padded with ``mask`` (K, P) the real parameters, or (numpy, mask None) a list
    of each chunk's (R, P_k) values, views of the rows as read (the CPU fit: no padded copy).
    V = [w - w_newest (R rows), w_newest, 1] is formed run by run of alike chunks (plan_fit sorts a
    batch by size) over their real columns only: a batch's padding (a bias of 10 values padded to a
    sample of 1024) costs nothing. From each run: its rows of S = mean V V' and its chunks' kappa
    subsets (every q-th parameter, q from the chunk's own size, so the subset does not depend on
    how chunks are batched), zero-padded to the longest. ``refine=False`` (a fit without refinement):
    the subsets only the normalisers need, and Moments with only what least squares uses."""
    ragged = isinstance(W, list)
    K, R = len(W), W[0].shape[0] if ragged else W.shape[1]
    sizes = [int(w.shape[1]) for w in W] if ragged else [int(n) for n in mask.sum(-1).tolist()]
    like = np.zeros(0) if ragged else W  # the reduction's library, float dtype and device
    cuts = sorted({len(coefs[0]) for coefs, _ in problems})
    # the subsets' strides: one per cut count for the pairs, one over the parameters for the forecast's steps
    strides = {C: [max(1, -(-C * p // KAPPA_ROWS)) for p in sizes] for C in cuts}
    if refine:
        strides[0] = [max(1, -(-p // KAPPA_ROWS)) for p in sizes]
    subsets = {c: _zeros(like, K, R + 2, max(1, max(-(-n // q) for n, q in zip(sizes, st)))) for c, st in strides.items()}
    S = _zeros(like, K, R + 2, R + 2)
    k = 0
    for n, run in itertools.groupby(sizes):
        e = k + len(list(run))
        V = _empty(like, e - k, R + 2, n)  # every entry is written below
        if ragged:
            for j in range(k, e):  # small and exact: relative to the newest
                np.subtract(W[j], W[j][-1:], out=V[j - k, :R], dtype=V.dtype)  # float32 rows: exact in float64
                V[j - k, R] = W[j][-1]
        else:
            _lib(W).subtract(W[k:e, :, :n], W[k:e, -1:, :n], out=V[:, :R])
            V[:, R] = W[k:e, -1, :n]
        V[:, R + 1] = 1.0
        S[k:e] = V @ V.swapaxes(-1, -2)
        for c, st in strides.items():
            q = st[k]
            subsets[c][k:e, :, : -(-n // q)] = V[:, :, ::q]
        k = e
    S /= _asarray([max(n, 1) for n in sizes], S)[:, None, None]  # (K, R+2, R+2)
    return [_moments(S, subsets[len(coefs[0])], subsets.get(0), coefs, cut_weights) for coefs, cut_weights in problems]


def _moments(S, Vs, Va, coefs, cut_weights) -> Moments:
    """One problem's Moments from the batch's S = mean V V' (K, R+2, R+2) and V's kappa subsets (K, R+2, .)
    for the pairs (Vs) and for the forecast's steps (Va; None: no refinement, least squares only)
    (``reduce_many``)."""
    Fc, Tg, Ap = (_asarray(c, S) for c in coefs)
    C, F, R = Fc.shape
    m = Tg.shape[1]
    K = S.shape[0]
    in_s = Vs[:, -1] > 0  # (K, Ps) the subset's real parameters (V's last row is the mask)
    # normalisers: mean |f_k - w_c| and mean |w_c| over all cuts, on the subset's parameters (they only
    # set the units of the problem; a pass over every row cost a third of the reduction)
    rel_c = Fc[:, :-1, :] - Fc[:, -1:, :]  # (C, F-1, R): f_k - w_c as row weights
    ns = in_s.sum(-1)[:, None]  # (K, 1)
    ns = ns + (ns == 0)
    s_rel = abs(rel_c.reshape(C * (F - 1), R) @ Vs[:, :R]).sum(-1).reshape(K, C, F - 1).sum(1) / (C * ns) + 1e-12
    s_wc = abs(Fc[:, -1] @ Vs[:, :R] + Vs[:, R : R + 1]).sum(-1).sum(-1)[:, None] / (C * ns) + 1e-12
    s_y = s_rel[:, :1]
    D = F + 1

    def design(lin_rel, lin_wc):  # row weights (.., F-1, R), (.., R) -> (K, .., D, R+2) maps of V to x
        shape = lin_rel.shape[:-2]
        T = _zeros(S, K, *shape, D, R + 2)
        T[..., : F - 1, :R] = lin_rel / s_rel.reshape(K, *(1,) * len(shape), F - 1, 1)
        T[..., F - 1, :R] = lin_wc / s_wc.reshape(K, *(1,) * len(shape), 1)
        T[..., F - 1, R] = 1.0 / s_wc.reshape(K, *(1,) * len(shape))
        T[..., F, R + 1] = 1.0
        return T

    T = design(rel_c, Fc[:, -1, :])  # (K, C, D, R+2)
    U = _zeros(S, K, C, m, R + 2)
    U[..., :R] = (Tg - Fc[:, -1:, :]) / s_y.reshape(K, 1, 1, 1)  # (y - w_c) / s_y
    Z = _cat([T, U], 2)  # (K, C, D+m, R+2)
    per_cut = Z @ S[:, None] @ Z.swapaxes(-1, -2)  # (K, C, D+m, D+m)
    if len(cut_weights):
        per_cut = per_cut * _asarray(cut_weights, S).reshape(1, C, 1, 1)
    Mbar = per_cut.mean(1)  # (K, D+m, D+m)
    G, H, YY = Mbar[:, :D, :D], Mbar[:, :D, D:], Mbar[:, D:, D:]
    P0 = _lib(S).linalg.solve(G + _ridge(G, D), H)
    scale = _cat([s_rel, s_wc, s_y], -1)
    if Va is None:
        return Moments(G, P0, None, None, scale, None, None, None, None, None)
    mse0 = ((G @ P0) * P0).sum(-2) - 2 * (H * P0).sum(-2) + YY.diagonal(0, -2, -1)
    mse0[mse0 < 0] = 0
    Ta = design(Ap[:-1] - Ap[-1:], Ap[-1])  # (K, D, R+2)
    Ga = Ta @ S @ Ta.swapaxes(-1, -2)
    XYs = (Z @ Vs[:, None]).swapaxes(-1, -2).reshape(K, -1, D + m)  # (K, C * Ps, D + m), cut-major
    Xs, Ys = XYs[..., :D], XYs[..., D:]
    ms = _lib(S).tile(in_s, (1, C))
    Xas = (Ta @ Va).swapaxes(-1, -2)
    return Moments(G, P0, mse0, Ga, scale, Xs, Ys, ms, Xas, Va[:, -1] > 0)


def _kappa(z, mask, work=None) -> np.ndarray:
    """mean |z| / rms z over dim -2 where mask (K, r) holds: (K, r, m) -> (K, m) float64 numpy; 1 where
    z is all zero. numpy arrays or tensors on the rows' device (these are the only passes over rows in
    the loop); ``work``: a numpy array of z's shape to hold |z| and z^2 (else temporaries). The rows
    outside the mask are zero (their values are zeroed in ``reduce_values``), so they add nothing to
    the sums; the mask only counts the rows."""
    n = mask.sum(-1)[..., None]  # (K, 1)
    n = n + (n == 0)
    if work is None:
        mean_abs, rms = _colsum(abs(z)) / n, (_colsum(z * z) / n) ** 0.5
    else:
        mean_abs = _colsum(np.abs(z, out=work)) / n
        rms = (_colsum(np.multiply(z, z, out=work)) / n) ** 0.5
    zero = rms == 0
    k = mean_abs / (rms + zero) + zero
    return numpy64(k)


def _colsum(x):
    """x summed over dim -2 (numpy sums a middle axis ~7x slower than this product with ones)."""
    return np.ones(x.shape[-2], x.dtype) @ x if isinstance(x, np.ndarray) else x.sum(-2)


def _steps(P):
    """The forecast's steps between horizon points, D_j = P_j - P_{j-1} with P_0 = 0: (K, D, m); for numpy
    arrays one product with ``_differences``' matrix (fewer operations in ``objective``'s loop)."""
    if _is_tensor(P):
        return _cat([P[..., :1], P[..., 1:] - P[..., :-1]], -1)
    return _times(P, _differences(P.shape[-1])[0])


TINY = np.finfo(np.float64).tiny
ACC_TOL = 1e-5  # relative speed-up below which the regulariser sees no acceleration


@functools.lru_cache(maxsize=None)
def _differences(m: int) -> tuple[np.ndarray, np.ndarray]:
    """(Delta (m, m), B (m-1, m)) for m horizons: the forecast's steps are D = P @ Delta (``_steps``), the
    accelerations v @ B.T (v_j - v_{j-1}); as matrices, so that ``objective`` runs fewer, larger
    operations (the subtractions are exact either way: the other entries are 0). Read-only: cached."""
    delta, B = np.eye(m) - np.eye(m, k=1), (np.eye(m, k=1) - np.eye(m))[:-1]
    delta.flags.writeable = B.flags.writeable = False
    return delta, B


def objective(P: np.ndarray, M: dict, kappa: np.ndarray, kappa_a: np.ndarray, dt: np.ndarray, lam: float):
    """(loss (K,), gradient (K, D, m)) of the reduced objective

        sum_j kappa_j rms_j(P) + lam * sum_{j>=2} relu(v_j - v_{j-1}),   v_j = kappa_a_j rms(Xa D_j) / dt_j

    the L1 + lambda L_grad of the method page with each mean |.| written as kappa x root mean square.
    M: the Moments' G, P0, mse0, Ga as float64 numpy arrays. The gradient is written out
    (tests/test_forecaster.py checks it against autograd), in numpy: the loop runs on (K, 5, 4)
    arrays, where torch's per-operation overhead and autograd's bookkeeping cost more than the
    arithmetic, and so does numpy's (a few microseconds per operation): the fewer operations, the better.
    """
    E = P - M["P0"]
    GE = M["G"] @ E
    q = np.einsum("kdm,kdm->km", GE, E)  # (K, m) (twice as fast as a sum over the middle axis)
    np.maximum(q, 0, out=q)
    q += M["mse0"]
    rms = np.sqrt(np.maximum(q, TINY, out=q), out=q)
    loss = (kappa * rms).sum(-1)
    grad = GE * (kappa / rms)[..., None, :]
    if lam == 0:
        return loss, grad
    delta, B = _differences(P.shape[-1])
    D = _steps(P)
    GD = M["Ga"] @ D
    u = np.einsum("kdm,kdm->km", GD, D)
    u = np.sqrt(np.maximum(u, TINY, out=u), out=u)  # (K, m)
    ka = kappa_a / dt
    v = ka * u
    # speeds equal to 1e-5 are not an acceleration: float32 weights on an exactly straight path
    # give speeds that differ by ~1e-7 through rounding alone, and Adam, which normalises the size
    # of its steps, would turn that rounding-level gradient into full steps away from an exact fit
    acc = v @ B.T
    accelerating = acc > ACC_TOL * v.max(-1, keepdims=True)
    loss += lam * (acc * accelerating).sum(-1)
    dv = accelerating.astype(P.dtype) @ B  # d relu-sum / d v_j
    grad += _times(GD * (lam * dv * ka / u)[..., None, :], delta.T)
    return loss, grad


def _times(X: np.ndarray, B: np.ndarray) -> np.ndarray:
    """X (K, D, m) @ B (m, n) as one 2-D product (numpy multiplies a stack matrix by matrix: 5x slower at K=100)."""
    return (X.reshape(-1, X.shape[-1]) @ B).reshape(*X.shape[:-1], B.shape[1])


def cosine_lr(lr: float, it: int, total: int) -> float:
    """torch's CosineAnnealingLR (to 0 over ``total`` steps) at step ``it``, in closed form."""
    return lr * (1 + math.cos(math.pi * it / total)) / 2


@dataclass
class AdamState:
    """torch.optim.Adam's update (betas 0.9, 0.999, eps 1e-8), written out (numpy arrays or tensors)."""

    m1: object
    m2: object

    @classmethod
    def like(cls, P) -> "AdamState":
        return cls(P * 0, P * 0)

    def step(self, P, g, lr: float, it: int, b1=0.9, b2=0.999, eps=1e-8):
        self.m1 = b1 * self.m1 + (1 - b1) * g
        self.m2 = b2 * self.m2 + (1 - b2) * (g * g)
        denom = (self.m2 / (1 - b2 ** (it + 1))) ** 0.5 + eps
        return P - (lr / (1 - b1 ** (it + 1))) * self.m1 / denom


# kappa is re-measured this many times during the refinement (evenly spaced); measured on
# bench/forecast_quality.py: 2, 4 and 9 gave the same figures, none at all was worse.
REFRESH = 2


class KappaRows:
    """The rows kappa is measured on (``Moments``' X, Y, mask, Xa, app_mask) and the measurement:
    numpy arrays on the CPU (a few microseconds per operation, where torch's cost tens), else tensors
    on their device. On the CPU the residuals go into scratch arrays made once per solve: each fresh
    temporary of this size costs its page faults again, more than the arithmetic on it."""

    def __init__(self, X, Y, mask, Xa, app_mask):
        self.X, self.Y, self.mask, self.Xa, self.app_mask = X, Y, mask, Xa, app_mask
        self.cpu, self._scratch = isinstance(X, np.ndarray), None

    @classmethod
    def of(cls, M: Moments) -> "KappaRows":
        rows = (M.X, M.Y, M.mask, M.Xa, M.app_mask)
        return cls(*(t.numpy() if _is_tensor(t) and t.device.type == "cpu" else t for t in rows))

    def take(self, chunks: np.ndarray) -> "KappaRows":
        """The rows of these chunks only (sharing the scratch arrays, which are long enough)."""
        idx = chunks if self.cpu else sys.modules["torch"].from_numpy(chunks).to(self.X.device)
        out = KappaRows(*(t[idx] for t in (self.X, self.Y, self.mask, self.Xa, self.app_mask)))
        out._scratch = self._scratch
        return out

    def measure(self, P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """kappa of the calibration residuals and of the forecast's steps at coefficients P (``_kappa``)."""
        if not self.cpu:
            Pt = _asarray(P, self.X)
            return _kappa(self.X @ Pt - self.Y, self.mask), _kappa(self.Xa @ _steps(Pt), self.app_mask)
        P = P.astype(self.X.dtype, copy=False)
        if self._scratch is None:  # one residual and one work array, long enough for either set of rows
            n = self.X.shape[0] * max(self.X.shape[1], self.Xa.shape[1]) * P.shape[-1]
            self._scratch = np.empty(n, self.X.dtype), np.empty(n, self.X.dtype)
        return self._kappa_of(self.X, P, self.Y, self.mask), self._kappa_of(self.Xa, _steps(P), None, self.app_mask)

    def _kappa_of(self, X: np.ndarray, Q: np.ndarray, Y: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
        """``_kappa`` of X @ Q - Y (no Y: X @ Q), computed in the scratch arrays."""
        shape = (X.shape[0], X.shape[1], Q.shape[-1])
        z, work = (a[: math.prod(shape)].reshape(shape) for a in self._scratch)
        np.matmul(X, Q, out=z)
        if Y is not None:
            z -= Y
        return _kappa(z, mask, work)


def _refine(rows: KappaRows, cpu: dict, P: np.ndarray, kappas: tuple[np.ndarray, np.ndarray], dt: np.ndarray,
            config: FitConfig) -> tuple[np.ndarray, np.ndarray]:
    """``solve``'s Adam loop from P: (best iterate, its loss) per chunk. rows: the chunks' kappa rows;
    cpu: their G, P0, mse0, Ga; ``kappas``: measured at P."""
    kappa, kappa_a = kappas
    best, best_loss = P.copy(), np.full(P.shape[:1], np.inf)
    adam, T = AdamState.like(P), config.iters
    every = T // (REFRESH + 1) if T > REFRESH else 0
    for it in range(T + 1):
        if every and 0 < it < T and it % every == 0:
            # the residuals' shape moved with P: measure it again. The reduced objective is only
            # faithful near where kappa was measured, so the best iterate is chosen among those
            # since (keeping earlier ones, least squares included, measured the same or up to
            # 0.014 worse on the rows of bench/forecast_quality.py)
            kappa, kappa_a = rows.measure(P)
            best_loss[:] = np.inf
        loss, g = objective(P, cpu, kappa, kappa_a, dt, config.lam)
        better = loss < best_loss
        best[better], best_loss[better] = P[better], loss[better]
        if it == T:
            break
        P = adam.step(P, g, cosine_lr(config.lr, it, T), it)
    return best, best_loss


def solve(M: Moments, ratios, config: FitConfig) -> BatchFit:
    """Refine every chunk's least-squares start on the reduced objective with Adam (cosine-decayed
    rate, torch.optim.Adam's update written out), keeping each chunk's best iterate. ``ratios``: the
    horizons, (m,) for every chunk or (K, m), one row per chunk, so that fits for different targets
    share the loop.

    Runs in float64 numpy on the CPU whatever device reduced the rows: the moments are a few
    numbers per chunk, so they move once and the loop pays no per-operation device overhead.
    The least-squares start minimises the L1 term (each horizon's rms is smallest there), so a chunk
    whose start does not accelerate has a zero gradient: Adam would never move it, and it is its own
    best iterate. Only the other chunks enter the loop (the same iterates as a loop over all of them).
    """
    P, best_loss = numpy64(M.P0).copy(), None  # iters=0: the least-squares forecasters, nothing measured
    if config.iters:
        cpu = {k: numpy64(getattr(M, k)) for k in ("G", "P0", "mse0", "Ga")}
        r = numpy64(ratios)  # (m,) shared, or (K, m): each chunk's own horizons
        t = np.concatenate([np.ones(r.shape[:-1] + (1,)), r], -1)  # ratio 1 is w_c
        dt = t[..., 1:] - t[..., :-1]
        rows = KappaRows.of(M)
        kappa, kappa_a = rows.measure(P)
        best_loss, g = objective(P, cpu, kappa, kappa_a, dt, config.lam)
        moving = np.flatnonzero((g != 0).any((-2, -1)))  # the others are their own best iterate: P0
        if moving.size:
            P[moving], best_loss[moving] = _refine(rows.take(moving), {k: v[moving] for k, v in cpu.items()},
                                                   P[moving], (kappa[moving], kappa_a[moving]),
                                                   dt[moving] if dt.ndim > 1 else dt, config)
    sc = numpy64(M.scale)
    s_rel, s_wc, s_y = sc[..., :-2], sc[..., -2:-1], sc[..., -1:]
    Pw = P * s_y[..., None, :]  # residual per unit feature, in weight units
    c_rel = Pw[..., :-2, :] / s_rel[..., None]  # (K, F-1, m) coefficients on (f_k - w_c)
    c_wc = Pw[..., -2:-1, :] / s_wc[..., None]  # (K, 1, m)
    A = np.concatenate([c_rel, 1.0 - c_rel.sum(-2, keepdims=True) + c_wc], -2)  # (K, F, m)
    return BatchFit(A, np.ascontiguousarray(Pw[..., -1, :]), best_loss)


def fit_values(W, mask, coefs, ratios, config: FitConfig,
               cut_weights=()) -> BatchFit:
    """Fit one forecaster per chunk (``reduce_values`` then ``solve``; see them for the shapes)."""
    return solve(reduce_values(W, mask, coefs, cut_weights), ratios, config)


def apply(A, b, feats):
    """Forecast (P, m) from features (P, F) with one chunk's A (F, m), b (m,) (tensor features: a tensor)."""
    if _is_tensor(feats):
        A, b = _asarray(A, feats), _asarray(b, feats)
    return feats @ A + b


def forecast_rows(A, b, interps, rows, values, dtype=None):
    """The forecast of the target (the last horizon) of one chunk's parameters from its stored rows:
    what backtest, emit and jumps all compute.

    A (F, m), b (m,): the chunk's forecaster; ``interps``: how each feature is read from the rows
    (``calibration.feature_interps``); ``values`` (len(rows), P), numpy or a tensor: the chunk at
    ``rows``. Each feature is a weighted sum of rows, so the forecast is one weighted sum of rows: the
    weights are folded in float64 (``row_weights``), then applied in ``dtype`` (``weighted_rows``).
    Equals ``apply`` on the interpolated features (tests/test_forecaster.py).
    A batch of chunks at once: A (K, F, m), b (K, m), values (K, len(rows), P) -> (K, P).
    """
    return weighted_rows(row_weights(A, interps, rows), b, values, dtype)


def row_weights(A, interps, rows) -> np.ndarray:
    """The target's forecast as weights on the stored ``rows`` (.., len(rows)), float64: the last
    horizon's coefficients on the features folded with the features' interpolation weights. For a
    batch of chunks, A (K, F, m): one product for all (emit computes it once per target)."""
    from farcast_core.calibration import interp_weights

    return numpy64(A[..., -1]) @ interp_weights(interps, rows)


def weighted_rows(w, b, values, dtype=None):
    """``values``' rows weighed by ``w`` (.., R) plus the last horizon of ``b``: the forecast, in ``dtype``
    (values' library; default float64; float32 is exact enough for float32-and-narrower weights and
    twice as fast)."""
    if not _is_tensor(values):
        dt = dtype or np.float64
        return (w.astype(dt)[..., None, :] @ values.astype(dt, copy=False))[..., 0, :] + numpy64(b[..., -1:]).astype(dt)
    torch = sys.modules["torch"]
    values = values.to(dtype or torch.float64)
    return (_asarray(w, values)[..., None, :] @ values)[..., 0, :] + _asarray(numpy64(b[..., -1:]), values)


def shrink_factor(moved: np.ndarray, needed: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The alpha in [0, 1] that minimises sum_i weights_i |needed_i - alpha moved_i| (docs/method.md, "Shrinkage").

    ``moved``: each parameter's forecast step (forecast - newest), ``needed``: its real step. The
    objective is sum_i w_i |moved_i| |needed_i / moved_i - alpha|, so the minimiser is the median of
    the ratios weighted by w_i |moved_i| (exact; a test pins it to a brute-force search).
    """
    moved, needed = np.asarray(moved, np.float64).ravel(), np.asarray(needed, np.float64).ravel()
    w = np.abs(moved) * (1.0 if weights is None else np.asarray(weights, np.float64).ravel())
    keep = (w > 0) & np.isfinite(w) & np.isfinite(needed)
    if not keep.any():
        return 1.0  # the forecast moves nothing: alpha does not matter
    with np.errstate(over="ignore"):  # a tiny step's ratio may overflow to inf: its weight is tiny too
        r, w = needed[keep] / moved[keep], w[keep]
    # the median clipped to [0, 1]: only the ratios inside (0, 1) need sorting
    half, low, inside = 0.5 * w.sum(), r <= 0, (r > 0) & (r < 1)
    below = w[low].sum()
    if below >= half:
        return 0.0
    if below + w[inside].sum() < half:
        return 1.0
    r, w = r[inside], w[inside]
    order = np.argsort(r, kind="stable")
    cw = below + np.cumsum(w[order])
    return float(r[order][min(np.searchsorted(cw, half), len(r) - 1)])


@dataclass
class Forecasters:
    """Fitted forecasters of a run: one (A, b) per chunk, plus what produced them."""

    keys: list[tuple[str, int]]  # (tensor name, chunk index) of row k of A and b
    chunks: dict[str, int]  # tensor name -> chunk length, so a transfer can check the plan
    A: np.ndarray  # (K, F, m) float64
    b: np.ndarray  # (K, m) float64
    config: FitConfig
    rho: float  # target ratio the forecasters were fitted for
    ratios: tuple[float, ...]  # horizon ratios, the last is rho
    feature_ratios: tuple[float, ...]  # feature times as fractions of t_c - t_0: (0, ..., 1)
    steps: list[int]  # the observed steps they were fitted on
    excluded: list[str] = field(default_factory=list)  # float tensors not forecast (NaN/Inf seen)
    times: list[float] | None = None  # the steps on the time axis used (None: the steps themselves)
    axis: dict | None = None  # that axis (TimeAxis.to_json())
    shrink: dict | None = None  # {"alpha": the shrinkage folded into A and b, "chosen": how} (None: none)

    def shrunk(self, alpha: float, chosen: str) -> "Forecasters":
        """These forecasters with every horizon's forecast pulled towards the newest weights:
        w_c + alpha (y - w_c), folded into A and b (the last feature is w_c), so every consumer
        (emit, backtest, jumps, transfer) applies it without knowing."""
        A = alpha * self.A
        A[:, -1, :] += 1.0 - alpha
        return replace(self, A=A, b=alpha * self.b, shrink={"alpha": float(alpha), "chosen": chosen})

    def row(self) -> dict[tuple[str, int], int]:
        return {k: i for i, k in enumerate(self.keys)}
