r"""Structures: exact parametrizations theta = T(factors) with a weight-decay penalty.

Each structure holds the factors of one weight tensor theta as parameters and
computes theta from them in ``forward()``. Its penalty is plain weight decay on
the constrained factors, ``alpha * sum |factor|^2``, and each structure is
*exact*: every theta can be expressed, and the smallest penalty over all
factorizations of a given theta is a convex penalty of theta (paper section 4.5,
"every mirror symmetry plus weight decay has an L1 equivalent"):

=============  ==============================================  =================================
structure      theta = T(factors)                              min penalty over factorizations
=============  ==============================================  =================================
elementwise    (1 - m) * v + m * w * u          (``symfast.dcs``)    2 alpha |m * theta|_1     (lasso)
group          theta_g = s_g * w_g, groups along ``dim``        2 alpha sum_g |theta_g|_2 (group lasso)
lowrank        W = A B^T  (theta viewed as a matrix)            2 alpha |W|_*             (nuclear norm)
mirror         (I - O O^T) v + O[(O^T w) * (O^T u)]             2 alpha |O^T theta|_1
=============  ==============================================  =================================

(AM-GM: ``a^2 + b^2 >= 2 |a b|`` with equality when ``|a| = |b|``; for the group
``s^2 + |w|^2 >= 2 |s w|``; for low rank ``|A|^2 + |B|^2 >= 2 |A B^T|_*``.)
The free part ``v`` of the elementwise (with a mask) and mirror structures is
not penalized.

**Factorizations off the stationary conditions.** Every factorization has
mirror symmetries, and the fixed points of a mirror are stationary conditions:
gradient descent can never leave them (paper, Theorem 4). The balanced
factorization ``w = u = sqrt(theta)`` lies on the mirror ``w = u``, so theta could
never change sign; a zero gate ``s_g = 0`` together with ``w_g = 0`` is a dead group
forever; a low-rank pair with a common null direction ``A n = B n = 0`` can never
grow its rank. :meth:`Structure.set_theta` therefore factors theta strictly off
them, near the balanced point but on the side of a hyperbola:

* elementwise: ``w^2 > u^2`` for every constrained coordinate, so ``w != +-u`` and
  ``w != 0`` (a zero theta gets ``w > 0, u = 0``, from where ``u`` moves at once);
* group: ``s_g^2 > |w_g|^2``, so every gate is nonzero (a dead group gets
  ``s_g > 0, w_g = 0`` and can revive in any direction);
* lowrank: ``A^T A - B^T B = tau I`` with ``A`` of full column rank;
* mirror: ``(O^T w)^2 > (O^T u)^2`` coordinatewise.

For elementwise and group, the larger factor is a power of two, so theta is
reproduced bit for bit (``w * u`` and ``s * w`` are exact), except in float16
where theta / factor falls below the normal range (``|theta| < 2^-14 *
factor``) and rounds to the subnormal grid; low rank and mirror
go through an SVD or a projection and reproduce theta up to rounding. The gap
``tau`` scales with theta (its root mean square), so the factors are about as
large as the balanced ones.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops.checks import broadcasts_to
from ..orthonormal import orthonormality_error
from ..ops.dcs import dcs
from ..ops.dcs_group import dcs_group

__all__ = [
    "Structure",
    "Elementwise",
    "Group",
    "LowRank",
    "MirrorStructure",
    "permutation_basis",
    "STRUCTURES",
]

STRUCTURES = ("elementwise", "group", "lowrank", "mirror")


# ----------------------------------------------------------------- helpers
def check_alpha(alpha: float) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha must be a real number >= 0, got {alpha!r}") from None
    if not math.isfinite(a) or a < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return a


def _fallback_scale(shape: torch.Size) -> float:
    """Typical |theta| of a fresh layer of this shape (1/sqrt(fan_in)), used when theta is all zero."""
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return 1.0 / math.sqrt(max(1, fan_in))


def _gap(values: Tensor, fallback: float) -> float:
    """tau: the hyperbola gap, the root mean square of the values (float64), or the fallback."""
    if values.numel() == 0:
        return fallback
    rms = values.double().pow(2).mean().sqrt().item()
    return rms if rms > 0 and math.isfinite(rms) else fallback


def _big_factor(magnitude: Tensor, tau: float) -> Tensor:
    """The larger factor of a product of size ``magnitude`` (float64, >= 0), off the mirror.

    On the hyperbola ``big^2 - small^2 = tau`` with ``big * small = magnitude``,
    ``big^2 = (tau + sqrt(tau^2 + 4 magnitude^2)) / 2 > magnitude``; rounded to
    a power of two so that ``small = magnitude / big`` and ``big * small`` are
    exact in every floating dtype, and still ``big^2 > magnitude``: at most a
    factor sqrt(2) off the hyperbola either way.
    """
    big = ((tau + torch.sqrt(tau * tau + 4 * magnitude * magnitude)) / 2).sqrt()
    big = torch.exp2(torch.round(torch.log2(big)))
    # Rounding down may cross the mirror |big| = |small|: then one power up,
    # where strictly big^2 > magnitude again.
    return torch.where(big * big > magnitude, big, 2 * big)


def _param(shape: Sequence[int], device, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(tuple(shape), device=device, dtype=dtype))


# ------------------------------------------------------------------- base
class Structure(nn.Module):
    r"""Base class: an exact parametrization of one tensor of shape ``shape``.

    ``forward()`` returns theta; :meth:`penalty` is ``alpha * sum |factor|^2`` over
    :meth:`penalized_parameters`; :meth:`set_theta` factors a given theta (exactly,
    off every stationary condition); :meth:`convex_penalty` is the equivalent
    convex penalty of theta, the minimum of the penalty over factorizations.
    """

    kind: str = ""

    def __init__(self, shape: Sequence[int], *, alpha: float = 0.0) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.alpha = check_alpha(alpha)

    # -- the parametrization
    def forward(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def penalized_parameters(self) -> List[nn.Parameter]:
        """The factors under weight decay alpha * |p|^2."""
        raise NotImplementedError

    def free_parameters(self) -> List[nn.Parameter]:
        """Parameters without the DCS penalty (the free part v, if any)."""
        return []

    def _register_constant(self, name: str, value: Tensor) -> None:
        """Registers a constant buffer (a mask, O) on the factors' device. On meta it
        also keeps the value (on CPU), so that :meth:`reset_buffers` can restore it
        after ``to_empty``, which leaves buffers uninitialized."""
        device = self._ref().device
        self.register_buffer(name, value.to(device=device))
        if device.type == "meta":
            kept = self.__dict__.setdefault("_constant_values", {})
            kept[name] = None if value.is_meta else value.detach().to("cpu", copy=True)

    def reset_buffers(self) -> None:
        """Restores the constant buffers of a structure built on meta (after ``to_empty``)."""
        for name, value in self.__dict__.get("_constant_values", {}).items():
            if value is None:
                raise RuntimeError(
                    f"{type(self).__name__}: {name} was given on the meta device, so its values are unknown; "
                    f"set parametrization.{name} to the real values after to_empty()")
            with torch.no_grad():
                getattr(self, name).copy_(value)

    def penalty(self) -> Tensor:
        r"""``alpha * sum_p |p|^2`` over the penalized factors (a 0-d tensor)."""
        params = self.penalized_parameters()
        total = sum(p.pow(2).sum() for p in params)
        return self.alpha * total

    # -- conversion and export
    @torch.no_grad()
    def set_theta(self, theta: Tensor) -> None:
        """Sets the factors so that ``forward()`` returns ``theta``, off every stationary condition."""
        raise NotImplementedError

    @torch.no_grad()
    def convex_penalty(self, theta: Optional[Tensor] = None) -> Tensor:
        """The equivalent convex penalty of ``theta`` (default: the current theta)."""
        raise NotImplementedError

    @torch.no_grad()
    def thresholded(self, threshold: float) -> Tensor:
        """The current theta, detached, with the structure's parts of size <= threshold set to exact zeros."""
        raise NotImplementedError

    # -- helpers
    def _check_theta(self, theta: Tensor) -> Tensor:
        if not isinstance(theta, Tensor):
            raise TypeError(f"{type(self).__name__}.set_theta: theta must be a Tensor, got {type(theta).__name__}")
        if theta.shape != self.shape:
            raise ValueError(
                f"{type(self).__name__}.set_theta: theta must have shape {tuple(self.shape)}, got {tuple(theta.shape)}"
            )
        return theta.detach()

    def _ref(self) -> Tensor:
        return self.penalized_parameters()[0]

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, alpha={self.alpha:g}"


# ------------------------------------------------------------ elementwise
class Elementwise(Structure):
    r"""theta = (1 - m) * v + m * w * u (``symfast.dcs``); min penalty 2 alpha |m * theta|_1.

    Args:
        shape: theta's shape.
        alpha: the weight decay on ``w`` and ``u``.
        mask: bool (or 0/1) tensor broadcastable to ``shape``: the coordinates under
            the constraint. ``None`` means all (``theta = w * u``, no ``v``). With a
            mask, ``v`` is the free part (no penalty); ``w`` and ``u`` are kept at zero
            off the mask, so the penalty counts only the constrained coordinates.
    """

    kind = "elementwise"

    def __init__(self, shape, *, alpha: float = 0.0, mask: Optional[Tensor] = None, device=None, dtype=None):
        super().__init__(shape, alpha=alpha)
        self.w = _param(self.shape, device, dtype)
        self.u = _param(self.shape, device, dtype)
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"Elementwise: mask must be a Tensor or None, got {type(mask).__name__}")
            if mask.dtype != torch.bool:  # a 0/1 tensor of any real dtype is taken as that bool mask
                if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError(f"Elementwise: mask must be bool or hold only 0 and 1, got a {mask.dtype} "
                                     "tensor with other values")
                mask = mask != 0
            if not broadcasts_to(mask.shape, self.shape):
                raise ValueError(
                    f"Elementwise: mask must broadcast to theta's shape {tuple(self.shape)}, got {tuple(mask.shape)}"
                )
            self._register_constant("mask", mask.detach().clone())
            self.v = _param(self.shape, device, dtype)
        else:
            self.register_buffer("mask", None)
            self.register_parameter("v", None)

    def forward(self) -> Tensor:
        return dcs(self.w, self.u, self.v, self.mask)

    def penalized_parameters(self) -> List[nn.Parameter]:
        return [self.w, self.u]

    def free_parameters(self) -> List[nn.Parameter]:
        return [] if self.v is None else [self.v]

    def _full_mask(self) -> Tensor:
        if self.mask is None:
            return torch.ones(self.shape, dtype=torch.bool, device=self.w.device)
        return self.mask.expand(self.shape)

    @torch.no_grad()
    def set_theta(self, theta: Tensor) -> None:
        theta = self._check_theta(theta).to(device=self.w.device, dtype=self.w.dtype)
        m = self._full_mask()
        tau = _gap(theta[m], _fallback_scale(self.shape))
        big = _big_factor(theta.double().abs(), tau).to(self.w.dtype)
        w = torch.where(m, big, torch.zeros_like(big))
        # big is a power of two: theta / big is exact, and so is w * u.
        u = torch.where(m, theta / big, torch.zeros_like(theta))
        self.w.copy_(w)
        self.u.copy_(u)
        if self.v is not None:
            self.v.copy_(torch.where(m, torch.zeros_like(theta), theta))

    @torch.no_grad()
    def convex_penalty(self, theta: Optional[Tensor] = None) -> Tensor:
        theta = self().detach() if theta is None else theta
        return 2 * self.alpha * (theta * self._full_mask()).abs().sum()

    @torch.no_grad()
    def thresholded(self, threshold: float) -> Tensor:
        theta = self().detach().clone()
        theta[self._full_mask() & (theta.abs() <= threshold)] = 0
        return theta

    def extra_repr(self) -> str:
        return super().extra_repr() + (", mask=None" if self.mask is None else f", mask={tuple(self.mask.shape)}")


# ------------------------------------------------------------------ group
class Group(Structure):
    r"""theta_g = s_g * w_g for the slices g along ``dim``; min penalty 2 alpha sum_g |theta_g|_2.

    ``s`` (the gates, length ``shape[dim]``) and ``w`` (theta's shape) are both
    under weight decay alpha. theta = ``symfast.dcs_group(w, s, dim)``
    (fused CPU/CUDA kernels) = ``w * s`` broadcast along ``dim``.
    """

    kind = "group"

    def __init__(self, shape, *, alpha: float = 0.0, dim: int = 0, device=None, dtype=None):
        super().__init__(shape, alpha=alpha)
        if len(self.shape) == 0:
            raise ValueError("Group: theta must have at least one dimension")
        if not isinstance(dim, int) or not -len(self.shape) <= dim < len(self.shape):
            raise ValueError(f"Group: dim must be an int in [{-len(self.shape)}, {len(self.shape) - 1}], got {dim!r}")
        self.dim = dim % len(self.shape)
        self.w = _param(self.shape, device, dtype)
        self.s = _param((self.shape[self.dim],), device, dtype)

    def forward(self) -> Tensor:
        return dcs_group(self.w, self.s, self.dim)

    def penalized_parameters(self) -> List[nn.Parameter]:
        return [self.w, self.s]

    def _bshape(self) -> List[int]:
        shape = [1] * len(self.shape)
        shape[self.dim] = -1
        return shape

    def group_norms(self, theta: Optional[Tensor] = None) -> Tensor:
        """|theta_g|_2 for every group, in float64."""
        theta = self().detach() if theta is None else theta.detach()
        other = [d for d in range(theta.dim()) if d != self.dim]
        sq = theta.double().pow(2)
        return (sq.sum(dim=other) if other else sq).sqrt()

    def dead_groups(self, threshold: float = 0.0) -> Tensor:
        """Bool mask of the groups with |theta_g|_2 <= threshold."""
        return self.group_norms() <= threshold

    @torch.no_grad()
    def set_theta(self, theta: Tensor) -> None:
        theta = self._check_theta(theta).to(device=self.w.device, dtype=self.w.dtype)
        norms = self.group_norms(theta)
        group_size = max(1, self.shape.numel() // max(1, self.shape[self.dim]))
        tau = _gap(norms, math.sqrt(group_size) * _fallback_scale(self.shape))
        s = _big_factor(norms, tau).to(self.w.dtype)  # power of two: w = theta / s is exact
        self.s.copy_(s)
        self.w.copy_(theta / s.view(self._bshape()))

    @torch.no_grad()
    def convex_penalty(self, theta: Optional[Tensor] = None) -> Tensor:
        return 2 * self.alpha * self.group_norms(theta).sum()

    @torch.no_grad()
    def thresholded(self, threshold: float) -> Tensor:
        theta = self().detach().clone()
        dead = self.group_norms(theta) <= threshold
        return theta * (~dead).to(theta.dtype).view(self._bshape())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dim={self.dim}"


# ---------------------------------------------------------------- lowrank
class LowRank(Structure):
    r"""W = A B^T with theta viewed as the matrix (shape[0], prod(shape[1:])); min penalty 2 alpha |W|_*.

    ``a`` is (shape[0], rank) and ``b`` is (prod(shape[1:]), rank), both under weight
    decay alpha. ``rank=None`` is full rank, min(rows, cols): then every W is
    expressible. A smaller rank can only express matrices of at most that rank.
    """

    kind = "lowrank"

    def __init__(self, shape, *, alpha: float = 0.0, rank: Optional[int] = None, device=None, dtype=None):
        super().__init__(shape, alpha=alpha)
        if len(self.shape) < 2:
            raise ValueError(f"LowRank: theta must have at least 2 dimensions, got shape {tuple(self.shape)}")
        self.rows = self.shape[0]
        self.cols = math.prod(self.shape[1:])
        full = min(self.rows, self.cols)
        if rank is None:
            rank = full
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= max(1, full):
            raise ValueError(
                f"LowRank: rank must be an int in [1, {full}] (min of the matrix view {self.rows} x {self.cols}), "
                f"got {rank!r}"
            )
        self.rank = rank
        self.a = _param((self.rows, rank), device, dtype)
        self.b = _param((self.cols, rank), device, dtype)

    def forward(self) -> Tensor:
        return (self.a @ self.b.t()).view(self.shape)

    def penalized_parameters(self) -> List[nn.Parameter]:
        return [self.a, self.b]

    def singular_values(self, theta: Optional[Tensor] = None) -> Tensor:
        theta = self().detach() if theta is None else theta.detach()
        return torch.linalg.svdvals(theta.double().reshape(self.rows, self.cols))

    def numerical_rank(self, threshold: float = 0.0) -> int:
        """Number of singular values above max(threshold, the usual rounding tolerance)."""
        sv = self.singular_values()
        return int((sv > rank_tolerance(sv, self.rows, self.cols, self.a.dtype, threshold)).sum())

    @torch.no_grad()
    def set_theta(self, theta: Tensor) -> None:
        theta = self._check_theta(theta)
        mat = theta.double().reshape(self.rows, self.cols).to(self.a.device)
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
        tol = rank_tolerance(S, self.rows, self.cols, theta.dtype, 0.0)
        needed = int((S > tol).sum())
        if needed > self.rank:
            raise ValueError(
                f"LowRank: theta has rank {needed} (singular values above {tol:.3g}) but rank={self.rank}; "
                f"a rank-{self.rank} factorization would change it. Use rank=None (full) or rank >= {needed}."
            )
        U, S, V = U[:, : self.rank], S[: self.rank], Vh[: self.rank].t()
        # A^T A - B^T B = tau I: A has full column rank, so no direction n has
        # A n = B n = 0 (a rotation mirror's fixed point: the rank could never grow).
        tau = _gap(S, math.sqrt(self.cols) * _fallback_scale(self.shape))
        big = ((tau + torch.sqrt(tau * tau + 4 * S * S)) / 2).sqrt()
        self.a.copy_(U * big)
        self.b.copy_(V * (S / big))

    @torch.no_grad()
    def truncate(self, theta: Tensor) -> Tensor:
        """theta's best rank-``rank`` approximation, rescaled to theta's Frobenius norm.

        Used for a fresh layer of reduced rank: torch's random init is full rank,
        and the rescaling keeps its variance (so activations keep their scale).
        """
        mat = theta.detach().double().reshape(self.rows, self.cols)
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
        S = S.clone()
        S[self.rank:] = 0
        kept = float(S.norm())
        scale = float(mat.norm()) / kept if kept > 0 else 1.0
        return ((U * (S * scale)) @ Vh).reshape(self.shape).to(theta.dtype)

    @torch.no_grad()
    def convex_penalty(self, theta: Optional[Tensor] = None) -> Tensor:
        return 2 * self.alpha * self.singular_values(theta).sum()

    @torch.no_grad()
    def thin_factors(self, threshold: float) -> Tuple[Tensor, Tensor]:
        """(L, R) with theta ~ L R^T, keeping the singular values above the threshold (and rounding noise).

        L is (rows, r) and R is (cols, r), r the numerical rank; both in theta's dtype.
        """
        theta = self().detach()
        U, S, Vh = torch.linalg.svd(theta.double().reshape(self.rows, self.cols), full_matrices=False)
        keep = S > rank_tolerance(S, self.rows, self.cols, theta.dtype, threshold)
        U, S, V = U[:, keep], S[keep], Vh[keep].t()
        root = S.sqrt()
        return (U * root).to(theta.dtype), (V * root).to(theta.dtype)

    @torch.no_grad()
    def thresholded(self, threshold: float) -> Tensor:
        theta = self().detach()
        if threshold <= 0:
            return theta.clone()
        U, S, Vh = torch.linalg.svd(theta.double().reshape(self.rows, self.cols), full_matrices=False)
        S = torch.where(S > threshold, S, torch.zeros_like(S))
        return ((U * S) @ Vh).reshape(self.shape).to(theta.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"


def rank_tolerance(sv: Tensor, rows: int, cols: int, dtype: torch.dtype, threshold: float) -> float:
    """max(threshold, max(rows, cols) * eps(dtype) * sigma_max): numpy's matrix_rank tolerance."""
    top = float(sv.max()) if sv.numel() else 0.0
    return max(float(threshold), max(rows, cols) * torch.finfo(dtype).eps * top)


# ----------------------------------------------------------------- mirror
class MirrorStructure(Structure):
    r"""theta = (I - O O^T) v + O[(O^T w) * (O^T u)]; min penalty 2 alpha |O^T theta|_1.

    The paper's eq. 10 for a general mirror: ``O`` has k orthonormal columns and
    the loss is pushed towards the constraint ``O^T theta = 0``. ``w`` and ``u``
    (theta's shape, weight decay alpha) carry the constrained coordinates, ``v``
    (theta's shape, no penalty) the free part.

    Args:
        O: (n, k) with orthonormal columns. With ``dim=None`` it acts on the
            flattened theta (n = theta.numel()). With ``dim=d`` it acts along
            dimension d (n = shape[d]), on every slice of the other dimensions:
            the full mirror is O kron I, e.g. O's column (e_a - e_b)/sqrt(2) along
            the output units of a Linear layer is the permutation mirror of
            neurons a and b (paper eq. 5; see :func:`permutation_basis`).

    A non-orthonormal ``O`` is a ValueError that names it and the measured error.
    An ``O`` within the tolerance of its dtype (``max |O^T O - I| <= sqrt(eps)``)
    is stored as its nearest exactly orthonormal matrix (the polar factor), in
    the weights' dtype.
    """

    kind = "mirror"

    def __init__(self, shape, *, alpha: float = 0.0, O: Tensor, dim: Optional[int] = None, device=None, dtype=None):
        super().__init__(shape, alpha=alpha)
        if dim is not None:
            if not isinstance(dim, int) or not -len(self.shape) <= dim < len(self.shape):
                raise ValueError(
                    f"MirrorStructure: dim must be None or an int in [{-len(self.shape)}, {len(self.shape) - 1}], got {dim!r}"
                )
            dim = dim % len(self.shape)
        self.dim = dim
        n = self.shape.numel() if dim is None else self.shape[dim]
        self.w = _param(self.shape, device, dtype)
        self.u = _param(self.shape, device, dtype)
        self.v = _param(self.shape, device, dtype)
        O = _check_mirror(O, n, "theta.numel()" if dim is None else f"theta.shape[{dim}]")
        # Stored as the nearest matrix with exactly orthonormal columns (the polar
        # factor U V^T of O's SVD), in float64 and then in the weights' dtype:
        # set_theta assumes O^T O = I, and an O accepted at its own dtype's tolerance
        # (a float32 O in a float64 model, or one off by 1e-4) would make conversion
        # exact only to that tolerance instead of to the weights' rounding.
        U, _, Vh = torch.linalg.svd(O.detach().double(), full_matrices=False)
        self._register_constant("O", (U @ Vh).to(dtype=self.w.dtype))

    # O^T x as (k, rest) and its adjoint, O c reshaped to theta's shape
    def _moved_shape(self) -> List[int]:
        if self.dim is None:
            return [self.shape.numel()]
        d = self.dim
        return [self.shape[d]] + [s for i, s in enumerate(self.shape) if i != d]

    def coordinates(self, x: Tensor) -> Tensor:
        """O^T x, shape (k, rest) (rest = 1 when dim is None): the coordinates of x along O's columns."""
        O = self.O.to(x.dtype)
        if self.dim is None:
            return O.t() @ x.reshape(-1, 1)
        return O.t() @ x.movedim(self.dim, 0).reshape(self.O.shape[0], -1)

    def project(self, x: Tensor) -> Tensor:
        """Deprecated name of :meth:`coordinates` (``O^T x``; ``symfast.Mirror.project`` is ``O O^T theta``)."""
        warnings.warn("symfast.nn.MirrorStructure.project is deprecated; use .coordinates (O^T x)",
                      DeprecationWarning, stacklevel=2)
        return self.coordinates(x)

    def lift(self, c: Tensor) -> Tensor:
        """O c back to theta's shape."""
        y = self.O.to(c.dtype) @ c
        if self.dim is None:
            return y.reshape(self.shape)
        return y.reshape(self._moved_shape()).movedim(0, self.dim)

    def forward(self) -> Tensor:
        v = self.v
        return v + self.lift(self.coordinates(self.w) * self.coordinates(self.u) - self.coordinates(v))

    def penalized_parameters(self) -> List[nn.Parameter]:
        return [self.w, self.u]

    def free_parameters(self) -> List[nn.Parameter]:
        return [self.v]

    @torch.no_grad()
    def set_theta(self, theta: Tensor) -> None:
        theta = self._check_theta(theta).to(self.w.device)
        t64 = theta.double()
        z = self.coordinates(t64)  # float64 coordinates O^T theta
        tau = _gap(z, _fallback_scale(self.shape))
        a = ((tau + torch.sqrt(tau * tau + 4 * z * z)) / 2).sqrt()  # a^2 - b^2 = tau > 0: off a = +-b
        b = z / a
        self.w.copy_(self.lift(a).to(self.w.dtype))
        self.u.copy_(self.lift(b).to(self.w.dtype))
        self.v.copy_((t64 - self.lift(z)).to(self.w.dtype))

    @torch.no_grad()
    def convex_penalty(self, theta: Optional[Tensor] = None) -> Tensor:
        theta = self().detach() if theta is None else theta.detach()
        return 2 * self.alpha * self.coordinates(theta.double()).abs().sum()

    @torch.no_grad()
    def thresholded(self, threshold: float) -> Tensor:
        theta = self().detach()
        z = self.coordinates(theta.double())
        small = torch.where(z.abs() <= threshold, z, torch.zeros_like(z))
        return (theta.double() - self.lift(small)).to(theta.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", O={tuple(self.O.shape)}, dim={self.dim}"


def _check_mirror(O: Tensor, n: int, what: str) -> Tensor:
    if not isinstance(O, Tensor):
        raise TypeError(f"MirrorStructure: O must be a Tensor of shape (n, k) with orthonormal columns, got {type(O).__name__}")
    if O.dim() != 2 or O.shape[0] != n or not 1 <= O.shape[1] <= n:
        raise ValueError(
            f"MirrorStructure: O must have shape (n, k) with n = {what} = {n} and 1 <= k <= n, got {tuple(O.shape)}"
        )
    if not O.is_floating_point():
        raise TypeError(f"MirrorStructure: O must be a floating tensor, got {O.dtype}")
    err = orthonormality_error(O)
    tol = math.sqrt(torch.finfo(O.dtype).eps)
    if not err <= tol:  # also catches nan
        raise ValueError(
            f"MirrorStructure: O must have orthonormal columns (O^T O = I_{O.shape[1]}), but max |O^T O - I| = {err:.3g} "
            f"exceeds the tolerance {tol:.2g} for {O.dtype}; orthonormalize it first, e.g. O = torch.linalg.qr(O).Q"
        )
    return O


def permutation_basis(
    n: int,
    pairs: Iterable[Tuple[int, int]],
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
) -> Tensor:
    r"""O for the permutation mirror of pairs of units (paper eq. 5): columns (e_a - e_b) / sqrt(2).

    ``P = O O^T`` is eq. 5's projection for each pair, and ``O^T theta = (theta_a -
    theta_b) / sqrt(2)``, so the mirror structure's penalty is ``sqrt(2) alpha
    sum |theta_a - theta_b|_1``: it merges units a and b. Use it along the unit
    dimension, e.g. the output units (rows) of a Linear layer::

        O = permutation_basis(out_features, [(0, 1), (2, 3)])
        layer = DCSLinear(in_features, out_features, structure="mirror", mirror=O, mirror_dim=0, alpha=1e-3)

    Args:
        n: the number of units (the size of the dimension O acts on).
        pairs: disjoint pairs (a, b) of distinct unit indices.
    """
    pairs = [tuple(p) for p in pairs]
    if not pairs:
        raise ValueError("permutation_basis: pairs must hold at least one pair (a, b)")
    seen = set()
    for p in pairs:
        if len(p) != 2 or not all(isinstance(i, int) and 0 <= i < n for i in p) or p[0] == p[1]:
            raise ValueError(f"permutation_basis: each pair must be two distinct ints in [0, {n}), got {p!r}")
        if seen & set(p):
            raise ValueError(
                f"permutation_basis: pairs must be disjoint (overlapping pairs give non-orthogonal columns), "
                f"got {pairs!r}"
            )
        seen |= set(p)
    O = torch.zeros(n, len(pairs), dtype=dtype or torch.get_default_dtype(), device=device)
    for j, (a, b) in enumerate(pairs):
        O[a, j] = 1 / math.sqrt(2)
        O[b, j] = -1 / math.sqrt(2)
    return O
