r"""Collapse prediction: when does (S)GD fall into a symmetric solution?

Near a symmetric solution :math:`O^\top\theta = 0` the component :math:`z` of
the parameters along a symmetry direction :math:`n` follows the linear
stochastic dynamics of the paper's eqs. (8) and (14),

.. math:: z_{t+1} = (1 - \lambda\, h(x_t))\, z_t,

where :math:`h(x) = n^\top H(x)\, n` is the per-sample curvature along
:math:`n` (:func:`symfast.per_sample_curvatures`) *of the loss that is
trained*, regularizer included, and :math:`\lambda` the learning rate. With
:math:`x_t` drawn uniformly from the samples at hand, :math:`z_t \to 0` in
probability if and only if the Lyapunov exponent is negative (Theorem 5,
eq. 16):

.. math:: \Lambda(\lambda) = \mathbb{E}_x \log|1 - \lambda h(x)| < 0.

Weight-decay conventions: with the paper's eq. (1),
:math:`\ell_\gamma = \ell_0 + \gamma\|\theta\|^2`, the curvature along a unit
:math:`n` is :math:`h = \xi + 2\gamma` (:math:`\xi` that of :math:`\ell_0`).
``torch.optim.SGD(weight_decay=wd)`` adds :math:`wd\,\theta` to the gradient,
i.e. :math:`\gamma = wd/2` and :math:`h = \xi + wd`. (The paper's §4.3 writes
:math:`\xi + \gamma`, which is the SGD convention.)

Functions
---------
* :func:`lyapunov_exponent`: :math:`\Lambda(\lambda)`, eq. (16).
* :func:`critical_learning_rate`: the exact :math:`\lambda^*`, the smallest
  :math:`\lambda > 0` from which :math:`\Lambda < 0`, solved from
  :math:`\Lambda` itself.
* :func:`approx_critical_learning_rate`: eq. (9),
  :math:`-2\mathbb{E}[h]/\mathbb{E}[h^2]`, the second-order expansion of
  :math:`\Lambda`.
* :func:`critical_weight_decay`: the GD threshold :math:`\gamma^* = -\xi^*/2`
  (§4.3), with :math:`\xi^*` the smallest eigenvalue of :math:`\mathbb{E}_x[O^\top H(x) O]`.
* :func:`weight_decay_threshold`: Theorem 1's :math:`\gamma_0` (eq. 20) and its
  generalization, Theorem 4 part 3.

Inputs ``h`` are ``[B]`` (one direction) or ``[B, K]`` (K directions, each
treated on its own: the commutation approximation of §4.3, exact when the
per-sample Hessians share the directions as eigenvectors, e.g. rank-1 mirrors).
Results are float64 tensors of shape ``[]`` or ``[K]``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Tuple, Union

import torch

Tensor = torch.Tensor

__all__ = [
    "lyapunov_exponent",
    "critical_learning_rate",
    "approx_critical_learning_rate",
    "critical_weight_decay",
    "weight_decay_threshold",
]


def _check_real(op: str, arg: str, h: Tensor) -> None:
    # complex curvatures have no order and bool ones no meaning: refuse them, not cast them
    if not (h.is_floating_point() or h.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{op}: {arg} must be a real (floating or integer) tensor, got dtype {h.dtype}")


def _as_h(op: str, h: object, arg: str = "h", shapes: str = "[B] or [B, K]") -> Tuple[Tensor, bool]:
    """(h as a float64 [B, K] tensor, whether it was [B]); checks shape and values. ``arg`` is the
    caller's name for the argument, ``shapes`` the shapes it accepts (for the messages)."""
    if not isinstance(h, Tensor):
        try:
            h = torch.as_tensor(h, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{op}: {arg} must be a tensor of per-sample curvatures of shape {shapes}, "
                            f"got {type(h).__name__}") from exc
    if h.dim() not in (1, 2):
        raise ValueError(f"{op}: {arg} must have shape {shapes} (per-sample curvatures), got {tuple(h.shape)}")
    _check_real(op, arg, h)
    if h.shape[0] == 0:
        raise ValueError(f"{op}: {arg} is empty (shape {tuple(h.shape)}); it needs at least one sample")
    h = h.detach().to(torch.float64)
    if not torch.isfinite(h).all():
        raise ValueError(f"{op}: {arg} must be finite, got {int((~torch.isfinite(h)).sum())} non-finite value(s)")
    return (h, False) if h.dim() == 2 else (h.unsqueeze(1), True)


def _out(x: Tensor, was_1d: bool) -> Tensor:
    return x[..., 0] if was_1d else x


def lyapunov_exponent(h: Tensor, lr: Union[float, Tensor]) -> Tensor:
    r"""Lyapunov exponent of :math:`z \leftarrow (1 - \lambda h(x)) z`, eq. (16).

    .. math:: \Lambda(\lambda) = \frac{1}{B}\sum_{i=1}^B \log|1 - \lambda h_i|

    :math:`\Lambda < 0`: the symmetric solution attracts (collapse);
    :math:`\Lambda > 0`: SGD escapes it. :math:`\Lambda = -\infty` where
    :math:`\lambda h_i = 1` for some sample (that step zeroes :math:`z`).

    Args:
        h: per-sample curvatures along the symmetry direction(s), regularizer
            included, ``[B]`` or ``[B, K]``.
        lr: a learning rate, or a tensor of them (any shape ``S``).

    Returns:
        float64 tensor of shape ``S`` (``[B]`` input) or ``S + [K]``.
    """
    op = "symfast.lyapunov_exponent"
    hh, was_1d = _as_h(op, h)
    lr_t = torch.as_tensor(lr, dtype=torch.float64, device=hh.device)
    if not torch.isfinite(lr_t).all():
        raise ValueError(f"{op}: lr must be finite, got {lr}")
    x = lr_t.reshape(lr_t.shape + (1, 1)) * hh  # S + [B, K]
    # log1p below 1: accurate where lr*h is small, which is where Lambda is.
    out = torch.where(x < 1.0, torch.log1p(-torch.clamp(x, max=1.0)), torch.log(x - 1.0)).mean(dim=-2)
    return _out(out, was_1d)


def _lyap_column(h: Tensor, lr: Tensor) -> Tensor:
    """Lambda(lr) for a [B] column and lr of shape [M] with all lr * h_i < 1 (log1p: accurate near 0)."""
    return torch.log1p(-lr.unsqueeze(1) * h.unsqueeze(0)).mean(1)


def _bits(x: Tensor) -> Tensor:
    return x.view(torch.int64)


def _from_bits(b: Tensor) -> Tensor:
    return b.view(torch.float64)


def _critical_column(h: Tensor) -> float:
    mean = h.mean().item()
    if bool((h == 0).all()):
        return math.inf  # Lambda == 0 for every lr: never negative
    if mean >= 0:
        # Lambda(0) = 0, Lambda'(0) = -E[h] < 0 (or = 0 with Lambda''(0) = -E[h^2] < 0):
        # negative right away, GD itself already converges to the symmetric solution.
        return 0.0
    h_max = h.max().item()
    if h_max <= 0:
        return math.inf  # every term log(1 + lr |h_i|) >= 0
    # E[h] < 0 < max h. On (0, 1/h_max) every term log(1 - lr h_i) is finite and
    # concave in lr, so Lambda is concave there, with Lambda(0) = 0,
    # Lambda'(0) = -E[h] > 0 and Lambda -> -inf at 1/h_max: exactly one root,
    # below it Lambda > 0. Bisection on the float64 bit patterns (monotone for
    # positive floats) ends with two adjacent floats around the root.
    upper = 1.0 / h_max
    lo = torch.tensor([0.0], dtype=torch.float64)
    hi = torch.tensor([upper], dtype=torch.float64)
    lo_b, hi_b = _bits(lo).clone(), _bits(hi).clone()
    while (hi_b - lo_b).item() > 1:
        mid_b = lo_b + (hi_b - lo_b) // 2
        mid = _from_bits(mid_b)
        if mid.item() * h_max >= 1.0 or _lyap_column(h, mid).item() < 0:
            hi_b = mid_b
        else:
            lo_b = mid_b
    return _from_bits(hi_b).item()


def critical_learning_rate(h: Tensor) -> Tensor:
    r"""Exact critical learning rate :math:`\lambda^* = \inf\{\lambda > 0 : \Lambda(\lambda) < 0\}`.

    Solved from :math:`\Lambda` of eq. (16) for the empirical distribution of
    ``h`` (SGD with batch size 1 drawing the given samples uniformly; pass
    per-minibatch curvatures for larger batches, footnote 10):

    * :math:`\mathbb{E}[h] > 0` (or :math:`= 0` with some :math:`h_i \ne 0`):
      :math:`\Lambda < 0` for every small :math:`\lambda`; returns ``0``.
    * all :math:`h_i \le 0` and not all zero, or all zero: :math:`\Lambda \ge 0`
      for every :math:`\lambda`; returns ``inf`` (no collapse at any rate).
    * :math:`\mathbb{E}[h] < 0 < \max h`: :math:`\Lambda` is concave on
      :math:`(0, 1/\max h)`, positive near 0 and :math:`\to -\infty` at
      :math:`1/\max h` (the log singularity of the largest :math:`h_i`), so it
      has exactly one root there; returns it to float64 precision (the
      smallest float at which the computed :math:`\Lambda` is negative).

    :math:`\Lambda` is negative on :math:`(\lambda^*, 1/\max h)` and near every
    other singularity :math:`1/h_i`, and positive again for large
    :math:`\lambda` (:math:`\Lambda \approx \log\lambda + \mathbb{E}\log|h|`):
    use :func:`lyapunov_exponent` to scan beyond :math:`\lambda^*`.

    Args:
        h: ``[B]`` or ``[B, K]`` per-sample curvatures, regularizer included.

    Returns:
        float64 tensor ``[]`` or ``[K]``.
    """
    op = "symfast.critical_learning_rate"
    hh, was_1d = _as_h(op, h)
    hh = hh.cpu()
    out = torch.tensor([_critical_column(hh[:, k].contiguous()) for k in range(hh.shape[1])], dtype=torch.float64)
    return _out(out, was_1d)


def approx_critical_learning_rate(h: Tensor) -> Tensor:
    r"""Eq. (9): :math:`\lambda^* \approx -2\,\mathbb{E}[h] / \mathbb{E}[h^2]`.

    From :math:`\Lambda(\lambda) = -\lambda\mathbb{E}[h] - \tfrac12\lambda^2\mathbb{E}[h^2] + O(\lambda^3)`:
    good when :math:`\lambda^* |h|` is small, i.e. when the noise
    :math:`\mathbb{E}[h^2]` dominates the signal :math:`\mathbb{E}[h]^2`. A value
    :math:`\le 0` (:math:`\mathbb{E}[h] \ge 0`) means collapse at every rate;
    ``inf`` when every :math:`h_i = 0`.

    Returns:
        float64 tensor ``[]`` or ``[K]``.
    """
    op = "symfast.approx_critical_learning_rate"
    hh, was_1d = _as_h(op, h)
    # scale-invariant: h / max|h| is in [-1, 1], so h * h neither overflows nor underflows;
    # -2 E[h] / E[h^2] = -2 E[u] / (s E[u^2]) with u = h / s
    s = hh.abs().amax(0)
    ok = s > 0
    u = hh / torch.where(ok, s, torch.ones_like(s))
    m1, m2 = u.mean(0), (u * u).mean(0)
    out = torch.where(ok, -2.0 * m1 / (torch.where(ok, m2, torch.ones_like(m2)) * torch.where(ok, s, torch.ones_like(s))),
                      torch.full_like(m2, math.inf))
    return _out(out, was_1d)


def critical_weight_decay(curvature: Tensor, *, convention: str = "eq1") -> Tensor:
    r"""Critical weight decay of gradient descent at a symmetric solution (§4.3).

    GD moves the symmetry component as :math:`z \leftarrow (I - \lambda(\bar H + 2\gamma I)) z`
    with :math:`\bar H = \mathbb{E}_x[O^\top H(x) O]` the Hessian of the
    unregularized loss :math:`\ell_0` on the mirror's image. With
    :math:`\xi^* = \lambda_{\min}(\bar H)` ("the largest negative eigenvalue"),
    small-step GD is attracted to the symmetric solution iff
    :math:`\xi^* + 2\gamma > 0`:

    .. math:: \gamma^* = \max(0, -\xi^*/2) \quad (\text{eq. 1: } \ell_0 + \gamma\|\theta\|^2),

    or :math:`wd^* = \max(0, -\xi^*)` for ``torch.optim.SGD(weight_decay=wd)``
    (``convention="sgd"``). (At a finite step GD also needs
    :math:`\lambda(\lambda_{\max}(\bar H) + 2\gamma) < 2`.)

    Args:
        curvature: curvatures of :math:`\ell_0`, **without** the regularizer:
            ``[B]`` (one direction: :math:`\xi^* = \mathbb{E}[h]`), ``[B, K]``
            (K directions, each its own :math:`\xi^*`, result ``[K]``), or
            ``[B, K, K]`` per-sample blocks :math:`O^\top H(x_i) O` (e.g. rows
            of :func:`symfast.per_sample_hvp` with ``onto``): one threshold
            from :math:`\lambda_{\min}` of their mean.
        convention: ``"eq1"`` (:math:`\gamma\|\theta\|^2`) or ``"sgd"`` (gradient + :math:`wd\,\theta`).
    """
    op = "symfast.critical_weight_decay"
    if convention not in ("eq1", "sgd"):
        raise ValueError(f"{op}: convention must be 'eq1' or 'sgd', got {convention!r}")
    factor = 0.5 if convention == "eq1" else 1.0
    shapes = "[B], [B, K] or [B, K, K]"
    if isinstance(curvature, Tensor) and curvature.dim() == 3:
        _check_real(op, "curvature", curvature)
        if curvature.shape[0] == 0:
            raise ValueError(f"{op}: curvature is empty (shape {tuple(curvature.shape)}); it needs at least one sample")
        if curvature.shape[1] != curvature.shape[2]:
            raise ValueError(f"{op}: per-sample blocks must be square [B, K, K], got {tuple(curvature.shape)}")
        if curvature.shape[1] == 0:
            raise ValueError(f"{op}: curvature blocks [B, K, K] need K >= 1 (lambda_min of an empty block is "
                             f"undefined), got shape {tuple(curvature.shape)}")
        mean = curvature.detach().to(torch.float64).mean(0)
        if not torch.isfinite(mean).all():
            raise ValueError(f"{op}: curvature must be finite, got {int((~torch.isfinite(curvature)).sum())} "
                             "non-finite value(s)")
        xi = torch.linalg.eigvalsh(0.5 * (mean + mean.T))[0]
        return torch.clamp(-factor * xi, min=0.0) + 0.0  # + 0.0: -0.0 (from -factor * 0) becomes +0.0
    hh, was_1d = _as_h(op, curvature, "curvature", shapes)
    return _out(torch.clamp(-factor * hh.mean(0), min=0.0) + 0.0, was_1d)


def weight_decay_threshold(
    loss_fn: Callable[[Mapping[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    directions: Mapping[str, Tensor],
    batch: Any,
    *,
    reduction: str = "mean",
    atol: float = 1e-6,
) -> Tensor:
    r"""Theorem 1's :math:`\gamma_0` (eq. 20), generalized by Theorem 4 part 3.

    For the mirror whose image is spanned by the orthonormal ``directions``
    (the columns of :math:`O`), the symmetric solution
    :math:`\bar\theta = (I - OO^\top)\theta` beats :math:`\theta` under
    :math:`\ell_\gamma = \ell_0 + \gamma\|\theta\|^2` iff
    :math:`\gamma > \gamma_0`:

    .. math:: \gamma_0 = \max\Big(0, \frac{\ell_0(\bar\theta) - \ell_0(\theta)}{\|O^\top\theta\|^2}\Big)

    (since :math:`\|\theta\|^2 - \|\bar\theta\|^2 = \|O^\top\theta\|^2`). For the
    rescaling symmetry :math:`O = I` on :math:`(u, w)`: :math:`\bar\theta = 0`
    and the denominator is :math:`\|u\|^2 + \|w\|^2`, eq. (20). As
    :math:`\theta \to \bar\theta` along :math:`n`, :math:`\gamma_0 \to \max(0, -n^\top \bar H n/2)`,
    the local threshold of :func:`critical_weight_decay`. This is the
    ``eq1`` convention; ``torch.optim.SGD``'s ``weight_decay`` is :math:`2\gamma`.

    Args:
        loss_fn: ``loss_fn(params, batch) -> [B]`` per-sample losses of
            :math:`\ell_0` (without the regularizer).
        directions: dict like params with tensors ``[K, *shape]``: the
            columns of :math:`O`, orthonormal (checked to ``atol``).
        reduction: ``"mean"`` (the empirical risk :math:`L_0`, a scalar) or
            ``"none"`` (per sample, ``[B]``: Theorem 1 holds for every x).
    """
    from .curvature.checks import check_directions, check_losses, check_params
    from .orthonormal import orthonormality_error

    op = "symfast.weight_decay_threshold"
    if reduction not in ("mean", "none"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'none', got {reduction!r}")
    params = check_params(op, params)
    dirs, K = check_directions(op, "directions", directions, params, leading=True)
    if K == 0:
        raise ValueError(f"{op}: directions is empty (K = 0); give at least one column of O")
    O = torch.cat([dirs[k].reshape(K, -1) for k in params], dim=1).to(torch.float64)  # [K, P]
    off = orthonormality_error(O.T)
    if not off <= atol:  # also catches nan
        raise ValueError(f"{op}: directions must be orthonormal (O^T O = I); max |O^T O - I| = {off:.3e} > atol={atol}")
    theta = torch.cat([params[k].reshape(-1) for k in params]).to(torch.float64)
    coeff = O @ theta  # O^T theta
    s2 = (coeff * coeff).sum().item()
    if s2 == 0.0:
        raise ValueError(f"{op}: params already satisfy O^T theta = 0 (they are the symmetric solution); "
                         "gamma_0 is defined for theta off the mirror")
    sym = {k: params[k] - torch.einsum("k,k...->...", coeff.to(params[k].dtype), dirs[k]) for k in params}
    with torch.no_grad():
        l_theta = check_losses(op, loss_fn(params, batch)).to(torch.float64)
        l_sym = check_losses(op, loss_fn(sym, batch), l_theta.shape[0]).to(torch.float64)
    diff = l_sym - l_theta
    if reduction == "mean":
        diff = diff.mean()
    return torch.clamp(diff / s2, min=0.0)
