"""The arithmetic of weight averaging: SLERP of task vectors and its fold over M runs, LITI, EMA.

Pure functions of tensors and numbers; nothing here reads or writes files. The streaming merges
(:mod:`.engine`) take their per-tensor coefficients from here.

SLERP (WARP, Ramé et al. 2024, section 3.2)::

    slerp(u, v, lam) = sin((1 - lam) * Omega) / sin(Omega) * u  +  sin(lam * Omega) / sin(Omega) * v

with Omega the angle between u and v, both flattened (one angle per tensor). It is applied to
task vectors delta_m = theta_m - theta_init, folded over the runs with lam = 1/m::

    merged_1 = delta_1,   merged_m = slerp(merged_{m-1}, delta_m, 1/m),   theta = theta_init + merged_M

Degenerate pairs fall back to linear interpolation (1 - lam) * u + lam * v:

- either vector is exactly zero (the angle is undefined);
- sin(Omega) < ``PARALLEL_SIN_THRESHOLD`` = 1e-3, i.e. the vectors are within 0.057 degrees of
  parallel or antiparallel. Near parallel, slerp and lerp differ by about
  lam (1 - lam) Omega^2 / 2 relative (<= 1.3e-7 at the threshold: float32 rounding), so the
  switch is invisible. Near antiparallel slerp has no well-defined great circle and its
  coefficients grow like 1 / sin(Omega), amplifying rounding; lerp is the documented answer there
  (two antiparallel task vectors of equal norm average to zero at lam = 1/2).

Every u and v in the fold is a linear combination of the task vectors, so the fold runs in
coefficient space on the M x M Gram matrix G_ij = <delta_i, delta_j> (:func:`fold_slerp_coefficients`):
merged_M = sum_i c_i delta_i. That is what lets the streaming merge read a tensor in pieces.
There, an intermediate merged_m counts as zero when its norm is below ZERO_RELATIVE = 1e-6 of
sum_i |c_i| |delta_i| (parts that cancel, e.g. two antiparallel runs, leave only rounding noise,
whose direction means nothing).

LITI (linear interpolation towards the initialisation): theta_eta = (1 - eta) theta_init + eta theta_M.
EMA: theta_ema <- (1 - mu) theta_ema + mu theta (:func:`ema_update`, in place).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "PARALLEL_SIN_THRESHOLD",
    "WEIGHT_SUM_TOLERANCE",
    "slerp_coefficients",
    "slerp",
    "fold_slerp_coefficients",
    "slerp_task_vectors",
    "FLOAT32_MAX",
    "FLOAT32_TINY",
    "check_coefficient",
    "check_weights",
    "check_eta",
    "ema_update",
]

# Below this sin(angle) between two task vectors, SLERP falls back to linear interpolation.
PARALLEL_SIN_THRESHOLD = 1e-3
# In the fold, a combination of task vectors whose norm is below this fraction of the sum of its
# parts' norms counts as zero (their cancellation residue has no meaningful direction).
ZERO_RELATIVE = 1e-6
# Linear-merge weights must sum to 1 within this (absolute) tolerance, unless normalised.
WEIGHT_SUM_TOLERANCE = 1e-6
# The range of a merge coefficient (a weight, eta, 1 - eta): the kernels multiply float32 tensors
# by it, so it is a float32 too; beyond the largest it overflows every product, below the smallest
# normal one it rounds away (its model would silently count for nothing).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


def slerp_coefficients(uu: float, vv: float, uv: float, lam: float) -> tuple[float, float]:
    """(a, b) with slerp(u, v, lam) = a * u + b * v, from |u|^2, |v|^2 and <u, v>.

    Linear interpolation (1 - lam, lam) when u or v is zero, or sin(angle) < PARALLEL_SIN_THRESHOLD.
    """
    a, b, _ = _slerp_coefficients(uu, vv, uv, lam)
    return a, b


def _slerp_coefficients(uu: float, vv: float, uv: float, lam: float, *, u_is_zero: bool | None = None):
    """(a, b, fell_back_to_lerp). `u_is_zero` overrides the exact test uu == 0 (the fold decides
    it relative to the size of u's parts, see fold_slerp_coefficients)."""
    uu, vv, uv, lam = float(uu), float(vv), float(uv), float(lam)
    for name, value in (("|u|^2", uu), ("|v|^2", vv), ("<u, v>", uv), ("lambda", lam)):
        if not math.isfinite(value):
            raise ValueError(f"slerp: {name} is {value}; the inputs must be finite.")
    if (uu <= 0.0 if u_is_zero is None else u_is_zero) or vv <= 0.0:
        return 1.0 - lam, lam, True
    cos = max(-1.0, min(1.0, uv / math.sqrt(uu * vv)))
    omega = math.acos(cos)
    sin = math.sin(omega)
    if sin < PARALLEL_SIN_THRESHOLD:
        return 1.0 - lam, lam, True
    return math.sin((1.0 - lam) * omega) / sin, math.sin(lam * omega) / sin, False


def slerp(u: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """SLERP of two tensors (flattened for the angle), per the formula above; u's shape, the
    promoted dtype of u and v. Norms and dot product are accumulated in float64."""
    if u.shape != v.shape:
        raise ValueError(f"slerp: shapes differ, {tuple(u.shape)} vs {tuple(v.shape)}.")
    u64, v64 = u.detach().reshape(-1).double(), v.detach().reshape(-1).double()
    a, b = slerp_coefficients(torch.dot(u64, u64).item(), torch.dot(v64, v64).item(), torch.dot(u64, v64).item(), lam)
    return (a * u64 + b * v64).reshape(u.shape).to(torch.promote_types(u.dtype, v.dtype))


def fold_slerp_coefficients(gram: Sequence[Sequence[float]] | torch.Tensor) -> tuple[list[float], dict]:
    """The M-run SLERP fold in coefficient space.

    `gram` is the M x M matrix of inner products of the task vectors. Returns (c, stats) with
    merged_M = sum_i c_i delta_i, and stats = {"lerp_fallbacks": folds that used lerp,
    "cosines": cosine of every pair (i < j) of non-zero task vectors}.
    """
    g = torch.as_tensor(gram, dtype=torch.float64)
    m = g.shape[0]
    if g.shape != (m, m) or m == 0:
        raise ValueError(f"fold_slerp_coefficients: expected a square non-empty Gram matrix, got shape {tuple(g.shape)}.")
    if not torch.isfinite(g).all():
        raise ValueError("fold_slerp_coefficients: the Gram matrix holds NaN or Inf.")
    diag = torch.diagonal(g)
    norms = torch.sqrt(diag.clamp(min=0.0))
    c = torch.zeros(m, dtype=torch.float64)
    c[0] = 1.0
    fallbacks = 0
    for k in range(1, m):  # merged_{k+1} = slerp(merged_k, delta_{k+1}, 1/(k+1))
        lam = 1.0 / (k + 1)
        uu = float(c @ g @ c)
        # merged_k is "zero" when its parts cancel (|u| <= 1e-6 * sum |c_i| |delta_i|): |u|^2 from
        # the Gram matrix then is rounding noise, and so would be its angle.
        u_is_zero = uu <= (ZERO_RELATIVE * float(c.abs() @ norms)) ** 2
        a, b, fell_back = _slerp_coefficients(uu, float(g[k, k]), float(c @ g[:, k]), lam, u_is_zero=u_is_zero)
        fallbacks += fell_back
        c = a * c
        c[k] += b
    cosines = [
        float(g[i, j] / math.sqrt(diag[i] * diag[j]))
        for i in range(m) for j in range(i + 1, m) if diag[i] > 0 and diag[j] > 0
    ]
    return c.tolist(), {"lerp_fallbacks": fallbacks, "cosines": cosines}


def slerp_task_vectors(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """merged_M of the fold above, computed directly in tensor space (float64), for tensors that
    fit in memory. theta = theta_init + slerp_task_vectors([theta_m - theta_init for m ...])."""
    if not deltas:
        raise ValueError("slerp_task_vectors: no task vectors.")
    merged = deltas[0].double()
    for m, delta in enumerate(deltas[1:], start=2):
        merged = slerp(merged, delta.double(), 1.0 / m)
    return merged.to(deltas[0].dtype)


# ---------------------------------------------------------------------------------------------
# Parameter checks shared by the library and the CLI


def check_coefficient(value: float, what: str) -> None:
    """A coefficient the merge multiplies tensors by must survive the float32 arithmetic of the
    kernels: at most FLOAT32_MAX in magnitude (else every product overflows), and either 0 or at
    least FLOAT32_TINY (else it rounds to a subnormal or to 0, and its model silently counts for
    nothing). `what` names the option, e.g. "--weights (normalised) 3rd weight"."""
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{what} is {value:g}, beyond the largest float32 ({FLOAT32_MAX:.4g}) that the merge computes "
                         "with: every weighted tensor would overflow.")
    if value != 0 and abs(value) < FLOAT32_TINY:
        raise ValueError(f"{what} is {value:g}, below the smallest normal float32 ({FLOAT32_TINY:.4g}) that the merge "
                         "computes with: it would round to 0 or lose its precision. Use 0, or a larger value.")


def ordinal(i: int) -> str:
    """1st, 2nd, 3rd, 4th, ... 11th, 21st: positions in an option's list of values, for messages."""
    suffix = "th" if 10 <= i % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(i % 10, "th")
    return f"{i}{suffix}"


def check_weights(weights: Sequence[float] | None, count: int, *, normalize: bool = False,
                  allow_extrapolation: bool = False) -> list[float]:
    """The weights of a linear merge of `count` models, checked.

    None: uniform 1/count. Otherwise one finite weight per model, summing to 1 within
    WEIGHT_SUM_TOLERANCE -- a weighted average whose weights do not sum to 1 rescales every
    tensor (norms, embeddings) and is almost never intended. With `normalize`, weights are
    divided by their sum instead (which must be positive, and representable: a sum that
    overflows a float is refused). A negative weight extrapolates beyond the models and needs
    `allow_extrapolation`. The weights used (after normalising) must fit the float32 arithmetic of
    the merge (:func:`check_coefficient`). Messages name the command line's --weights.
    """
    if count < 1:
        raise ValueError("a linear merge needs at least one model.")
    if weights is None:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"--weights must be numbers, got {list(weights)!r}.") from None
    if len(weights) != count:
        raise ValueError(f"--weights got {len(weights)} values for {count} models; give one weight per model.")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ValueError(f"--weights must be finite numbers, got {bad[0]}.")
    try:
        total = math.fsum(weights)
    except OverflowError:  # fsum raises on an intermediate overflow rather than return inf
        total = math.inf
    if not math.isfinite(total):
        raise ValueError(
            f"--weights {' '.join(f'{w:g}' for w in weights)} sum to more than the largest float "
            f"({sys.float_info.max:.4g}); give weights of a usable size (e.g. their ratios: "
            "--weights 1 1 --normalize for equal weights)."
        )
    if normalize:
        if not total > 0:
            raise ValueError(f"--normalize cannot divide --weights that sum to {total:g}; their sum must be positive.")
        normalised = [w / total for w in weights]
        for i, (w, n) in enumerate(zip(weights, normalised), start=1):
            if not math.isfinite(n):
                raise ValueError(f"--normalize divides the {ordinal(i)} of --weights ({w:g}) by their sum {total:g}, "
                                 "which overflows; the sum must not be tiny next to a weight.")
        weights = normalised
    elif abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        shown = " ".join(f"{w / total:.6g}" for w in weights) if total > 0 else None
        raise ValueError(
            f"--weights sum to {total:.6g}, not 1: a weighted average must sum to 1, or it rescales every "
            "tensor. Pass normalized weights"
            + (f" ({shown}), or --normalize / normalize=True to divide by the sum." if shown else ".")
        )
    if any(w < 0 for w in weights) and not allow_extrapolation:
        raise ValueError(
            f"--weights: weight {min(weights):g} is negative: that extrapolates beyond the models. Pass "
            "--allow-extrapolation / allow_extrapolation=True if that is intended."
        )
    for i, w in enumerate(weights, start=1):
        check_coefficient(w, f"the {ordinal(i)} of --weights" + (" (normalised)" if normalize else ""))
    return weights


def check_eta(eta: float, *, allow_extrapolation: bool = False) -> float:
    """A LITI coefficient: finite and >= 0; at most 1 unless `allow_extrapolation` (eta > 1 moves
    past the fine-tuned model, away from the initialisation). eta and 1 - eta must fit the float32
    arithmetic of the merge (:func:`check_coefficient`). Messages name the command line's --eta."""
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"--eta must be a number, got {eta!r}.") from None
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"--eta must be a finite number >= 0, got {eta}.")
    if eta > 1 and not allow_extrapolation:
        raise ValueError(
            f"--eta {eta:g} > 1 extrapolates past the model (theta = {1 - eta:g} * theta_init + {eta:g} * theta_M); "
            "LITI interpolates with eta in [0, 1]. Pass --allow-extrapolation / allow_extrapolation=True if "
            "that is intended."
        )
    check_coefficient(eta, "--eta")
    check_coefficient(1.0 - eta, f"1 - eta (--eta {eta:g})")
    return eta


# ---------------------------------------------------------------------------------------------
# EMA


@torch.no_grad()
def ema_update(ema, current, mu: float):
    """theta_ema <- (1 - mu) * theta_ema + mu * theta, in place; returns `ema`.

    `ema` and `current` are both tensors, both mappings of name -> tensor (state dicts), or both
    torch modules (their state dicts, which share storage with the parameters). Mappings must
    hold the same names and shapes. Floating-point tensors are interpolated in their own dtype
    (torch.lerp_, which computes bfloat16/float16 in float32); other tensors (integer counters)
    are copied from `current`. mu in [0, 1]: mu = 1 copies `current`, mu = 0 changes nothing.
    """
    mu = float(mu)
    if not (math.isfinite(mu) and 0.0 <= mu <= 1.0):
        raise ValueError(f"ema_update: mu must be in [0, 1], got {mu}.")
    if isinstance(ema, torch.nn.Module) or isinstance(current, torch.nn.Module):
        if not (isinstance(ema, torch.nn.Module) and isinstance(current, torch.nn.Module)):
            raise TypeError("ema_update: pass two modules, two state dicts or two tensors.")
        ema_update(ema.state_dict(keep_vars=True), current.state_dict(keep_vars=True), mu)
        return ema
    if isinstance(ema, torch.Tensor):
        if not isinstance(current, torch.Tensor):
            raise TypeError("ema_update: pass two modules, two state dicts or two tensors.")
        _ema_tensor(ema, current, mu, "tensor")
        return ema
    if not (isinstance(ema, Mapping) and isinstance(current, Mapping)):
        raise TypeError("ema_update: pass two modules, two state dicts or two tensors.")
    missing = sorted(set(ema) - set(current))
    extra = sorted(set(current) - set(ema))
    if missing or extra:
        first = (f"{missing[0]!r} is in the EMA but not in the current weights" if missing
                 else f"{extra[0]!r} is in the current weights but not in the EMA")
        raise KeyError(f"ema_update: the two state dicts differ ({len(missing) + len(extra)} names): {first}.")
    for name, target in ema.items():
        _ema_tensor(target, current[name], mu, name)
    return ema


def _ema_tensor(ema: torch.Tensor, current: torch.Tensor, mu: float, name: str) -> None:
    ema_data = ema.data if isinstance(ema, torch.nn.Parameter) else ema
    cur = current.detach()
    if ema_data.shape != cur.shape:
        raise ValueError(
            f"ema_update: {name}: shape {tuple(ema_data.shape)} in the EMA, {tuple(cur.shape)} in the current weights.")
    cur = cur.to(device=ema_data.device, dtype=ema_data.dtype)
    if ema_data.is_floating_point():
        ema_data.lerp_(cur, mu)
    else:
        ema_data.copy_(cur)
