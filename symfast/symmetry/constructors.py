r"""One constructor of a :class:`~symfast.symmetry.mirror.Mirror` per symmetry of the paper's §2-3.

:func:`rescaling_mirror` (Theorem 1), :func:`permutation_mirror` (eq. 5, Theorem 3),
:func:`rotation_mirror` and :func:`double_rotation_mirror` (Theorem 2 and the double rotation), and
the hidden-unit conveniences :func:`unit_permutation_mirror` and :func:`unit_sign_mirror`. Groups
of parameters are named by a spec (a parameter name, ``(name, index)``, a mask, a slice or a list).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .layout import ParamLayout, default_atol, flatten
from .mirror import Mirror

__all__ = [
    "rescaling_mirror",
    "permutation_mirror",
    "rotation_mirror",
    "double_rotation_mirror",
    "unit_permutation_mirror",
    "unit_sign_mirror",
]


GroupSpec = Union[str, Tuple[str, Any], Tensor, slice, Sequence[Any]]


def _parameter_grid(op: str, what: str, layout, name: str, index):
    """``(t, grid[index])``: parameter ``name``'s position in ``layout`` and the flat indices (within
    the parameter) that ``index`` selects, laid out in its shape; ``what`` names the argument in errors."""
    if name not in layout.names:
        raise KeyError(f"{op}: {what} names parameter {name!r}, which is not in params (have {list(layout.names)[:8]})")
    t = layout.index(name)
    grid = torch.arange(layout.numels[t]).view(layout.shapes[t])
    try:
        return t, grid[index]
    except (IndexError, TypeError) as e:
        raise IndexError(f"{op}: {what} does not index parameter {name!r} of shape {tuple(layout.shapes[t])}: {e}") from None


def _layout_arg(params: Any, op: str) -> ParamLayout:
    if isinstance(params, int):
        return ParamLayout(("<flat>",), (torch.Size([params]),))
    try:
        return ParamLayout.of(params)
    except TypeError as e:
        raise TypeError(f"{op}: params must be a dict of tensors, an nn.Module, a ParamLayout or an int D; {e}") from None


def _positions(layout: ParamLayout, spec: GroupSpec, op: str, arg: str) -> Tensor:
    """Flat positions (in layout order) of the entries a group spec selects.

    A group is: a parameter name (all its entries); ``(name, index)`` (the entries ``p[index]``,
    index being anything tensor indexing accepts); a list of groups (concatenated); or, for
    flat mirrors, a LongTensor of flat positions or a slice.
    """
    if isinstance(spec, str):
        return _positions(layout, (spec, slice(None)), op, arg)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        name, index = spec
        t, sel = _parameter_grid(op, f"{arg} = {spec!r}", layout, name, index)
        return sel.reshape(-1) + layout.offsets[t]
    if isinstance(spec, slice):
        return torch.arange(layout.numel)[spec]
    if isinstance(spec, Tensor):
        if spec.dtype == torch.bool:
            if spec.shape != (layout.numel,):
                raise ValueError(f"{op}: {arg} as a bool mask must have shape ({layout.numel},), got {tuple(spec.shape)}")
            return spec.nonzero().reshape(-1)
        if spec.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"{op}: {arg} as a tensor must hold integer flat positions, got {spec.dtype}")
        spec = spec.reshape(-1).long()
        if spec.numel() and (spec.min() < 0 or spec.max() >= layout.numel):
            raise IndexError(f"{op}: {arg} has flat positions outside [0, {layout.numel})")
        return spec
    if isinstance(spec, (list, tuple)):
        parts = [_positions(layout, s, op, arg) for s in spec]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    raise TypeError(f"{op}: {arg} must be a name, (name, index), a list of those or flat positions, got {type(spec).__name__}")


def _disjoint(op: str, *groups: Tuple[str, Tensor]) -> None:
    allpos = torch.cat([g for _, g in groups])
    if allpos.numel() and torch.bincount(allpos).max().item() > 1:
        names = " and ".join(n for n, _ in groups)
        raise ValueError(f"{op}: {names} must select distinct entries (no entry twice), but they overlap")




# =============================================================================== constructors
def rescaling_mirror(params: Any, a: GroupSpec, b: GroupSpec, *, kind: str = "sign") -> Mirror:
    r"""The mirrors of a rescaling symmetry :math:`\ell(\rho a, b/\rho) = \ell(a, b)` (Theorem 1, eq. 2).

    Following the paper's corollary of Theorem 4:

    * ``kind="sign"`` (any sizes): ``O = I`` on the entries of ``a`` and ``b``, so ``R`` flips
      the signs of both groups (the case rho = -1). Stationary condition: ``a = 0`` and ``b = 0``.
    * For scalar pairs, e.g. every coordinate of the Hadamard/DCS factorization ``theta = w * u``
      where ``l`` depends on ``a_i * b_i`` only, each pair ``(a_i, b_i)`` has two mirror planes:

      * ``kind="swap"``: ``n_2 = (1, -1)/sqrt(2)`` per pair, ``R: (a_i, b_i) -> (b_i, a_i)``;
        stationary condition ``a = b``;
      * ``kind="antiswap"``: ``n_1 = (1, 1)/sqrt(2)`` per pair, ``R: (a_i, b_i) -> (-b_i, -a_i)``
        (for ``theta = w * u``: ``w -> -u``, ``u -> -w``); stationary condition ``a = -b``.

      Together they give the condition ``a = b = 0`` of ``kind="sign"``. ``a`` and ``b`` must
      select the same number of entries, paired in order.

    Args:
        params: dict of tensors / module / :class:`ParamLayout` (or an int D for flat vectors).
        a, b: groups of entries: a name, ``(name, index)``, a list of those, or flat positions.
    """
    op = "rescaling_mirror"
    layout = _layout_arg(params, op)
    pa, pb = _positions(layout, a, op, "a"), _positions(layout, b, op, "b")
    _disjoint(op, ("a", pa), ("b", pb))
    if pa.numel() == 0 or pb.numel() == 0:
        raise ValueError(f"{op}: a and b must select at least one entry each, got {pa.numel()} and {pb.numel()}")
    if kind == "sign":
        idx = torch.cat([pa, pb])[:, None]
        return Mirror._sparse(layout, idx, torch.ones(idx.shape, dtype=torch.float64), kind="rescaling-sign",
                              description=f"sign flip of a={_desc(a)} and b={_desc(b)}", op=op)
    if kind not in ("swap", "antiswap"):
        raise ValueError(f"{op}: kind must be 'sign', 'swap' or 'antiswap', got {kind!r}")
    if pa.numel() != pb.numel():
        raise ValueError(
            f"{op}: kind={kind!r} pairs a and b entry by entry, so they must select the same number of entries; "
            f"got {pa.numel()} (a) and {pb.numel()} (b)"
        )
    sign = -1.0 if kind == "swap" else 1.0
    idx = torch.stack([pa, pb], dim=1)
    coef = torch.tensor([1.0, sign], dtype=torch.float64).expand(idx.shape)  # (1, -+1)/sqrt(2), stored unnormalized
    what = "swap a <-> b" if kind == "swap" else "a -> -b, b -> -a"
    return Mirror._sparse(layout, idx, coef, kind=f"rescaling-{kind}", description=f"{what} for a={_desc(a)}, b={_desc(b)}", op=op)


def permutation_mirror(params: Any, a: GroupSpec, b: GroupSpec) -> Mirror:
    r"""The mirror of a permutation symmetry :math:`\ell(\theta_a, \theta_b) = \ell(\theta_b, \theta_a)` (eq. 4).

    Eq. 5: ``P = 1/2 [[I, -I], [-I, I]]``, i.e. ``O = [I; -I]/sqrt(2)`` over the paired entries,
    so ``O^T theta = (theta_a - theta_b)/sqrt(2)``, ``R`` swaps ``theta_a`` and ``theta_b`` and the
    stationary condition is ``theta_a = theta_b`` (Theorem 3). ``a`` and ``b`` select the same
    number of entries, paired in order (e.g. a hidden unit's incoming row, bias and outgoing
    column; see :func:`unit_permutation_mirror`).
    """
    op = "permutation_mirror"
    layout = _layout_arg(params, op)
    pa, pb = _positions(layout, a, op, "a"), _positions(layout, b, op, "b")
    if pa.numel() != pb.numel() or pa.numel() == 0:
        raise ValueError(
            f"{op}: theta_a and theta_b must have the same (nonzero) number of entries; got {pa.numel()} (a) and {pb.numel()} (b)"
        )
    _disjoint(op, ("a", pa), ("b", pb))
    idx = torch.stack([pa, pb], dim=1)
    coef = torch.tensor([1.0, -1.0], dtype=torch.float64).expand(idx.shape)  # (1, -1)/sqrt(2), stored unnormalized
    return Mirror._sparse(layout, idx, coef, kind="permutation", description=f"swap {_desc(a)} <-> {_desc(b)}", op=op)


AxisSpec = Union[Tuple[str, int], Tuple[str, Any, int]]


def _axis_positions(layout: ParamLayout, spec: AxisSpec, op: str) -> Tensor:
    """[m, h] flat positions: the entries of one axis spec, the rotated dim last."""
    if not (isinstance(spec, tuple) and len(spec) in (2, 3) and isinstance(spec[0], str)):
        raise TypeError(f"{op}: each axis must be (name, dim) or (name, index, dim), got {spec!r}")
    name, index, dim = (spec[0], slice(None), spec[1]) if len(spec) == 2 else spec
    t, view = _parameter_grid(op, f"axis {spec!r}", layout, name, index)
    if not isinstance(dim, int) or not -view.dim() <= dim < view.dim():
        raise ValueError(f"{op}: axis {spec!r}: dim must be an int in [-{view.dim()}, {view.dim()}) for the selected view of shape {tuple(view.shape)}")
    view = view.movedim(dim, -1)
    return view.reshape(-1, view.shape[-1]) + layout.offsets[t]


def _rotation(params: Any, axes: Sequence[AxisSpec], directions: Optional[Tensor], op: str, kind: str, desc: str) -> Mirror:
    layout = _layout_arg(params, op)
    if isinstance(axes, tuple) and axes and isinstance(axes[0], str):
        axes = [axes]
    blocks = [_axis_positions(layout, a, op) for a in axes]
    hs = {b.shape[1] for b in blocks}
    if len(hs) != 1:
        raise ValueError(f"{op}: every axis must have the same length h (the rotated dimension); got lengths {[b.shape[1] for b in blocks]}")
    h = hs.pop()
    pos = torch.cat(blocks)  # [m, h]
    if directions is None:
        if isinstance(params, (int, ParamLayout)):
            raise ValueError(f"{op}: directions=None picks the least-used direction from the parameter values; pass a dict or a module, or give directions")
        flat = flatten(params).detach().to(torch.float64)
        vals = flat[pos]  # [m, h]
        evals, evecs = torch.linalg.eigh(vals.T @ vals)
        N = evecs[:, :1]
    else:
        if not isinstance(directions, Tensor):
            raise TypeError(f"{op}: directions must be a tensor of shape (h,) or (h, r), got {type(directions).__name__}")
        N = directions.detach().to(torch.float64)
        N = N[:, None] if N.dim() == 1 else N
        if N.dim() != 2 or N.shape[0] != h or N.shape[1] == 0:
            raise ValueError(f"{op}: directions must have shape ({h},) or ({h}, r) with h = {h} the rotated length, got {tuple(directions.shape)}")
        err = (N.T @ N - torch.eye(N.shape[1], dtype=torch.float64)).abs().max().item()
        tol = default_atol(directions.dtype)
        if not err <= tol:
            raise ValueError(f"{op}: directions must have orthonormal columns; got max |N^T N - I| = {err:.3g} > atol = {tol:.3g}")
        # the nearest exactly orthonormal basis (same span and orientation), so that float32
        # directions give an O orthonormal to float64 precision
        Q, Rq = torch.linalg.qr(N)
        N = Q * torch.sign(torch.diagonal(Rq))[None, :]
    r = N.shape[1]
    # one column of O per (row of the other dims, direction): the direction laid along the axis
    idx = pos[:, None, :].expand(-1, r, -1).reshape(-1, h)
    coef = N.T[None, :, :].expand(pos.shape[0], -1, -1).reshape(-1, h)
    return Mirror._sparse(layout, idx, coef, kind=kind, description=desc, op=op)


def rotation_mirror(params: Any, axes: Union[AxisSpec, Sequence[AxisSpec]], directions: Optional[Tensor] = None) -> Mirror:
    r"""The mirror of a rotation symmetry :math:`\ell(W) = \ell(\Omega W)` (eq. 3, Theorem 2).

    With the orthogonal :math:`\Omega = I - 2NN^\top` (``N``: ``[h, r]`` orthonormal directions)
    acting along one dimension of ``W``, the mirror is the block repetition of ``I - 2NN^T`` over
    the other dims (one block per column of W): ``O^T theta = vec(N^T W)`` and the stationary
    condition ``N^T W = 0`` says W is low-rank with ``N`` in its left null space.

    Args:
        axes: ``(name, dim)`` or ``(name, index, dim)``: the tensor (or the view ``p[index]``) and
            the dim along which Omega acts (dim 0 for eq. 3's ``Omega W``). Several axes of the
            same length rotate together by the same Omega (see :func:`double_rotation_mirror`).
        directions: ``[h]`` or ``[h, r]`` orthonormal; None takes the direction along which the
            current values are smallest (the left singular vector with the smallest singular
            value, so the symmetric solution is Theorem 2's ``W`` with that singular value zeroed).
    """
    return _rotation(params, axes, directions, "rotation_mirror", "rotation", f"rotation along {axes!r}")


def double_rotation_mirror(
    params: Any,
    u: Union[str, AxisSpec, Sequence[Any]],
    w: Union[str, AxisSpec, Sequence[Any]],
    directions: Optional[Tensor] = None,
) -> Mirror:
    r"""The mirror of a double rotation :math:`\ell(U, W) = \ell(UR, R^\top W)` (§2.2).

    With ``R = I - 2NN^T`` (symmetric), ``U -> U R`` and ``W -> R W``: ``O^T theta`` stacks
    ``U N`` and ``N^T W``, and the stationary condition is ``U N = 0`` and ``N^T W = 0``.
    For two consecutive linear maps ``y = W2 (W1 x + b1)`` take ``u = "W2"`` (rotated along its
    columns, dim 1) and ``w = ["W1", ("b1", 0)]`` (rows, dim 0).

    ``u`` and ``w``: a name (U along its last dim, W along dim 0) or axis specs / lists of them as
    in :func:`rotation_mirror`.
    """
    def axes_of(spec, default_dim):
        if isinstance(spec, str):
            return [(spec, default_dim)]
        if isinstance(spec, tuple):
            return [spec]
        out = []
        for s in spec:
            out += axes_of(s, default_dim)
        return out

    axes = axes_of(u, -1) + axes_of(w, 0)
    return _rotation(params, axes, directions, "double_rotation_mirror", "double-rotation", f"U R, R^T W over {axes!r}")


def _unit_axes(layout: ParamLayout, incoming: Sequence[Any], outgoing: Sequence[Any]) -> Tuple[list, list]:
    """(name, dim) of each parameter: names in ``incoming`` default to dim 0, in ``outgoing`` to dim
    1 (dim 0 for 1-D tensors); ``(name, dim)`` pairs are taken as given."""
    def axis(spec, default):
        if isinstance(spec, tuple):
            return spec
        shape = layout.shape_of(spec) if spec in layout.names else None
        return (spec, default if shape is None or len(shape) > default else 0)
    return [axis(x, 0) for x in incoming], [axis(x, 1) for x in outgoing]


def _unit_groups(layout: ParamLayout, incoming: Sequence[Any], outgoing: Sequence[Any], j: int) -> Tuple[list, list]:
    inc, out = _unit_axes(layout, incoming, outgoing)

    def at(name, dim):
        return (name, (slice(None),) * dim + (j,))
    return [at(*x) for x in inc], [at(*x) for x in out]


def _names(specs: Sequence[Any]) -> str:
    return ", ".join(x if isinstance(x, str) else x[0] for x in specs)


def unit_permutation_mirror(params: Any, incoming: Sequence[Any], outgoing: Sequence[Any], i: int, j: int) -> Mirror:
    """The permutation mirror of hidden units ``i`` and ``j`` between two layers.

    ``incoming``: parameters indexed by the unit along dim 0 (the first layer's weight rows and
    bias, per-unit norm/activation parameters); ``outgoing``: parameters indexed along dim 1 (the
    next layer's weight columns). Either list may hold ``(name, dim)`` to give the unit's dim
    explicitly (e.g. ``(b, 0)`` for the factor ``b`` of a low-rank ``W = a b^T``). Holds for any
    elementwise activation between the layers.
    """
    layout = _layout_arg(params, "unit_permutation_mirror")
    ai, ao = _unit_groups(layout, incoming, outgoing, i)
    bi, bo = _unit_groups(layout, incoming, outgoing, j)
    m = permutation_mirror(layout, ai + ao, bi + bo)
    m.description = f"swap hidden units {i} <-> {j} ({_names(incoming)} -> {_names(outgoing)})"
    return m


def unit_sign_mirror(params: Any, incoming: Sequence[Any], outgoing: Sequence[Any], j: int) -> Mirror:
    """The sign-flip mirror of hidden unit ``j`` (rescaling with rho = -1): a mirror when the two
    layers meet with no nonlinearity between them, or through an odd activation (tanh)."""
    layout = _layout_arg(params, "unit_sign_mirror")
    inc, out = _unit_groups(layout, incoming, outgoing, j)
    m = rescaling_mirror(layout, inc, out, kind="sign")
    m.description = f"sign flip of hidden unit {j} ({_names(incoming)} -> {_names(outgoing)})"
    return m


def _desc(spec: Any) -> str:
    s = repr(spec)
    return s if len(s) < 60 else s[:57] + "..."
