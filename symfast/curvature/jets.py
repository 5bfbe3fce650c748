r"""Second-order Taylor mode: a ``TorchFunctionMode`` that carries each activation's first and
second derivatives along ``K`` directions through one pass of the batch.

Every floating tensor ``x`` of the forward pass carries a jet ``(x1, x2)`` of shape
``[K, *x.shape]``: the first and second derivatives along t of ``x(theta + t n_k)`` for each
direction ``n_k``. Ops bilinear in two operands use the closed form
``y2 = f(a2, b) + 2 f(a1, b1) + f(a, b2)``; activations, norms, softmax, cross-entropy and
symfast's own ops call the fused jet ops of :mod:`.jet_kernels`; ops linear in their floating
inputs act on each direction's slice; every other op is a nested jvp of that op alone, mapped
over ``K`` with ``vmap``. Where the jets cannot follow (an ``autograd.Function``, a custom op
without a rule, an in-place op on a jet) the op raises :class:`JetFallback`, which the API turns
into a :class:`~symfast.curvature.per_sample.PerSamplePathWarning` and nested forward mode.

The jet program is a pure function of its tensor inputs (no ``.item()``, no Python branch on
tensor values): the rules branch on shapes, dtypes and arguments only.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import jet_kernels as jk
from .exact import ExactMode, MHA_SIGNATURE, mha_forward


Tensor = torch.Tensor
__all__ = ["JetFallback", "JetMode", "jet_derivatives"]


class JetFallback(Exception):
    """The jet path met something it does not handle (``op`` names it); the caller reruns nested jvp."""

    def __init__(self, op: str, why: str):
        super().__init__(f"{op}: {why}")
        self.op = op
        self.why = why


_METADATA = {"__get__", "size", "dim", "numel", "item", "tolist", "is_floating_point", "is_complex", "stride",
             "storage_offset", "data_ptr", "element_size", "nelement", "ndimension", "is_contiguous", "__len__",
             "__bool__", "__int__", "__float__", "__index__", "__format__", "__repr__", "__hash__", "numpy",
             "get_device", "untyped_storage", "detach", "requires_grad_", "__reduce_ex__", "__deepcopy__"}
_IN_PLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__ipow__",
                     "__imatmul__", "__setitem__", "__iand__", "__ior__", "__ixor__"}


def _name(func) -> str:
    return getattr(func, "__name__", None) or str(func)


class JetMode(TorchFunctionMode):
    r"""Second-order Taylor mode along ``K`` directions, op by op (see the module doc).

    The jets live in a side table keyed by tensor identity, with weak references, so activations
    are freed as in a plain forward pass. ``second=False`` carries first-order jets only (x2 is
    None everywhere and no second-order work is done: the rules skip their second-order terms
    and call the fused jet ops with ``second=False``, so those write no y2 either).
    """

    def __init__(self, exact: ExactMode, K: int, second: bool = True):
        super().__init__()
        self.exact = exact
        self.K = K
        self.second = second
        self.table: Dict[int, Tuple[Any, Optional[Tensor], Optional[Tensor]]] = {}

    # ------------------------------------------------------------ table
    def put(self, t: Tensor, j1: Optional[Tensor], j2: Optional[Tensor]) -> None:
        if j1 is None and j2 is None:
            return
        if not self.second:
            j2 = None
        key = id(t)
        table = self.table

        def drop(_ref, key=key, table=table):
            table.pop(key, None)

        self.table[key] = (weakref.ref(t, drop), j1, j2)

    def get(self, t: object) -> Optional[Tuple[Optional[Tensor], Optional[Tensor]]]:
        if not isinstance(t, Tensor):
            return None
        entry = self.table.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1], entry[2]

    def tangents(self, t: Optional[object]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        j = self.get(t)
        return (None, None) if j is None else j

    # ------------------------------------------------------------ dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            # under no_grad inside loss_fn (the pass runs with grad on): a constant, as autograd
            # has it, so no jet out
            return self._call(func, args, kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        jets = [self.get(x) for x in flat]
        name = _name(func)
        for x, j in zip(flat, jets):
            # Parameters enter as leaves that require grad, so every tensor computed from them
            # has a grad_fn. One without a jet was made where this mode could not see
            # (inside an autograd.Function, a custom op): its derivatives are unknown here.
            if isinstance(x, Tensor) and x.grad_fn is not None and j is None:
                raise JetFallback(name, f"an input was computed outside the jet mode (by a "
                                        f"{type(x.grad_fn).__name__}: an autograd.Function or custom op?)")
        if not any(j is not None for j in jets) or (name in _METADATA and func not in _JET_RULES):
            # no jet in, or metadata (shape, dtype, .data, item(), ...): no derivative out
            return self._call(func, args, kwargs)
        rule = _JET_RULES.get(func)
        if rule is None and isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            rule = _CUSTOM_OP_RULES.get(_qualified_name(func))
            if rule is None:
                raise JetFallback(name, "a custom op without a jet rule; its forward-mode support is unknown")
        if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS or "out" in kwargs \
                or kwargs.get("inplace", False):
            raise JetFallback(name, "an in-place op on a tensor that carries a jet")
        if rule is not None:
            out = rule(self, func, args, kwargs, flat, spec, jets)
            if out is not NotImplemented:
                return out
        handler = self.exact.handlers.get(func)
        if handler is not None:
            # a decomposition into primitive ops: run it under this mode, so each op gets its rule
            with self:
                return handler(self.exact, *args, **kwargs)
        return self._generic(func, args, kwargs, flat, spec, jets)

    def _call(self, func, args, kwargs):
        handler = self.exact.handlers.get(func)
        if handler is not None:
            return handler(self.exact, *args, **kwargs)
        return func(*args, **kwargs)

    def _generic(self, func, args, kwargs, flat, spec, jets):
        """y1 = Df[x1], y2 = D2f[x1, x1] + Df[x2]: a jvp of a jvp of this op alone, vmapped over K."""
        out = self._call(func, args, kwargs)
        leaves, out_spec = pytree.tree_flatten(out)
        pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.is_floating_point()]
        if not pos:
            return out
        idx = [i for i, j in enumerate(jets) if j is not None]
        x0 = tuple(flat[i] for i in idx)
        K = self.K
        t1 = tuple(_zeros_k(jets[i][0], flat[i], K) for i in idx)
        has2 = self.second and any(jets[i][1] is not None for i in idx)
        t2 = tuple(_zeros_k(jets[i][1], flat[i], K) for i in idx) if has2 else None

        def f(*xs):
            full = list(flat)
            for i, x in zip(idx, xs):
                full[i] = x
            a, k = pytree.tree_unflatten(full, spec)
            res = pytree.tree_leaves(self._call(func, a, k))
            return tuple(res[i] for i in pos)

        if not self.second:
            y1 = torch.func.vmap(lambda *a: torch.func.jvp(f, x0, a)[1])(*t1)
            y2 = (None,) * len(pos)
        elif t2 is None:
            def per(*a1):
                return torch.func.jvp(lambda *xs: torch.func.jvp(f, xs, a1), x0, a1)[1]

            y1, y2 = torch.func.vmap(per)(*t1)
        else:
            n = len(idx)

            def per(*a):
                a1, a2 = a[:n], a[n:]
                (_, d1), (_, s) = torch.func.jvp(lambda *xs: torch.func.jvp(f, xs, a1), x0, a1)
                return d1, tuple(p + q for p, q in zip(s, torch.func.jvp(f, x0, a2)[1]))

            y1, y2 = torch.func.vmap(per)(*t1, *t2)
        for i, a, b in zip(pos, y1, y2):
            self.put(leaves[i], a, b)
        return out


# ================================================================ helpers
def _zeros_k(j: Optional[Tensor], like: Tensor, K: int) -> Tensor:
    return like.new_zeros((K, *like.shape)) if j is None else j


def _add_opt(*terms: Optional[Tensor]) -> Optional[Tensor]:
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def _scale(c, t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else (t if (isinstance(c, (int, float)) and c == 1) else c * t)


def _lift(t: Optional[Tensor], ndim: int) -> Optional[Tensor]:
    """A tangent [K, *s] as [K, 1, ..., 1, *s] with ndim dims after K: it then broadcasts against
    primals right-aligned while K stays in front."""
    if t is None:
        return None
    missing = ndim - (t.dim() - 1)
    return t if missing <= 0 else t.reshape(t.shape[:1] + (1,) * missing + t.shape[1:])


def _full(t: Optional[Tensor], y: Tensor) -> Optional[Tensor]:
    """A tangent broadcast to [K, *y.shape] (a stride-0 view where it broadcasts)."""
    if t is None:
        return None
    return _lift(t, y.dim()).expand(t.shape[0], *y.shape)


def _put_elementwise(mode: JetMode, y: Tensor, y1: Optional[Tensor], y2: Optional[Tensor]) -> Tensor:
    mode.put(y, _full(y1, y), _full(y2, y))
    return y


def _kmap(fn: Callable, *xs: Tensor, batched: Sequence[bool]):
    """fn over the per-direction slices of the batched arguments (vmap over their leading K)."""
    return torch.func.vmap(fn, in_dims=tuple(0 if b else None for b in batched))(*xs)


def _float_tensor(x) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


# ================================================================ linear ops
def _linear_rule(operands: bool = False):
    """Ops linear in their floating tensor inputs: each direction's slice goes through the op (vmap).

    ``operands``: every tensor argument is summed or concatenated into the output (cat, stack),
    so a constant of any dtype (an int offset, a bool mask) has zero derivative. Otherwise a
    non-floating tensor is an index or a size (``x[idx]``) and is passed as it is.
    """

    def rule(mode, func, args, kwargs, flat, spec, jets):
        y0 = func(*args, **kwargs)
        comps = []
        for order in (0, 1):
            tangents = [None if j is None else j[order] for j in jets]
            idx = [i for i, t in enumerate(tangents) if t is not None]
            if not idx:
                comps.append(None)
                continue
            base = [torch.zeros_like(x) if isinstance(x, Tensor) and (operands or x.is_floating_point()) else x
                    for x in flat]

            def f(*ts, base=base, idx=idx):
                full = list(base)
                for i, t in zip(idx, ts):
                    full[i] = t
                a, k = pytree.tree_unflatten(full, spec)
                return func(*a, **k)

            comps.append(torch.func.vmap(f)(*[tangents[i] for i in idx]))
        outs = pytree.tree_leaves(y0)
        parts = [pytree.tree_leaves(c) if c is not None else [None] * len(outs) for c in comps]
        for o, p1, p2 in zip(outs, *parts):
            if _float_tensor(o):
                mode.put(o, p1, p2)
        return y0

    return rule


def _map_tangents(fn: Callable[[Tensor, Tensor], Tensor]):
    """Shape ops on one tensor: fn(tangent, output) gives the tangent's image directly."""

    def rule(mode, func, args, kwargs, flat, spec, jets):
        x = args[0] if args else None
        if not isinstance(x, Tensor) or any(j is not None for j in jets[1:]):
            return NotImplemented
        y = func(*args, **kwargs)
        if not _float_tensor(y):
            return y
        x1, x2 = mode.tangents(x)
        mode.put(y, None if x1 is None else fn(x1, y, args, kwargs), None if x2 is None else fn(x2, y, args, kwargs))
        return y

    return rule


def _reshaped(t, y, args, kwargs):
    return t.reshape(t.shape[:1] + y.shape)


def _expanded(t, y, args, kwargs):
    return _full(t, y)


def _same(t, y, args, kwargs):
    return t


def _cast(t, y, args, kwargs):
    return t.to(dtype=y.dtype, device=y.device)


def _transposed(t, y, args, kwargs):
    n = args[0].dim()
    d0 = kwargs.get("dim0", args[1] if len(args) > 1 else None)
    d1 = kwargs.get("dim1", args[2] if len(args) > 2 else None)
    return t.transpose(d0 % n + 1, d1 % n + 1)


def _permuted(t, y, args, kwargs):
    n = args[0].dim()
    dims = kwargs.get("dims", args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1])
    return t.permute(0, *[d % n + 1 for d in dims])


def _matrix_transposed(t, y, args, kwargs):
    return t.transpose(-1, -2)


def _reversed_dims(t, y, args, kwargs):
    return t.permute(0, *range(t.dim() - 1, 0, -1))


def _getitem_rule(mode, func, args, kwargs, flat, spec, jets):
    x, idx = args[0], args[1]
    parts = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (Tensor, list)) for i in parts) or mode.get(x) is None or kwargs \
            or any(j is not None for j in jets[1:]):
        # tensor or list indices: advanced indexing moves dims by rules that vmap applies right
        return _linear_rule()(mode, func, args, kwargs, flat, spec, jets)
    key = (slice(None),) + (tuple(idx) if isinstance(idx, tuple) else (idx,))
    y = func(x, idx)
    x1, x2 = mode.tangents(x)
    mode.put(y, None if x1 is None else x1[key], None if x2 is None else x2[key])
    return y


def _cat_rule(stack: bool):
    def rule(mode, func, args, kwargs, flat, spec, jets):
        ts = kwargs.get("tensors", args[0] if args else None)
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if not isinstance(ts, (list, tuple)) or set(kwargs) - {"tensors", "dim"} or \
                not all(isinstance(t, Tensor) for t in ts):
            return NotImplemented
        y = func(*args, **kwargs)
        if not _float_tensor(y):
            return y
        d = dim % y.dim() + 1
        K = mode.K
        if not stack:
            # torch.cat skips 1-D empty tensors whatever the others' rank (a legacy rule); so do the tangents
            ts = [t for t in ts if not (t.dim() == 1 and t.numel() == 0 and y.dim() != 1)]
        for order in (0, 1):
            parts = [mode.tangents(t)[order] for t in ts]
            if all(p is None for p in parts):
                parts = None
            else:
                parts = [_zeros_k(p, t, K).to(y.dtype) for p, t in zip(parts, ts)]
            if order == 0:
                y1 = None if parts is None else (torch.stack if stack else torch.cat)(parts, d)
            else:
                y2 = None if parts is None else (torch.stack if stack else torch.cat)(parts, d)
        mode.put(y, y1, y2)
        return y

    return rule


def _add_rule(sign: float, reverse: bool = False):
    """a + alpha*b (sign -1: a - alpha*b; reverse: b - alpha*a for rsub): affine in each operand."""

    def rule(mode, func, args, kwargs, flat, spec, jets):
        if len(args) != 2 or set(kwargs) - {"alpha"}:
            return NotImplemented
        a, b = args
        alpha = kwargs.get("alpha", 1)
        if isinstance(alpha, Tensor):
            return NotImplemented
        y = func(*args, **kwargs)
        if not _float_tensor(y):
            return y
        ca, cb = (sign * alpha, 1) if reverse else (1, sign * alpha)
        a1, a2 = mode.tangents(a)
        b1, b2 = mode.tangents(b)
        n = y.dim()
        y1 = _add_opt(_scale(ca, _lift(a1, n)), _scale(cb, _lift(b1, n)))
        y2 = _add_opt(_scale(ca, _lift(a2, n)), _scale(cb, _lift(b2, n)))
        return _put_elementwise(mode, y, y1, y2)

    return rule


def _reduce_rule(mode, func, args, kwargs, flat, spec, jets):
    """sum / mean over dims: the same reduction of each direction's slice (dims shifted past K)."""
    o = _opts(args, kwargs, ("input", "dim", "keepdim"), {"dim": None, "keepdim": False})
    if o is None or not _float_tensor(o["input"]) or any(j is not None for j in jets[1:]) \
            or not (o["dim"] is None or isinstance(o["dim"], (int, list, tuple))):
        return _linear_rule()(mode, func, args, kwargs, flat, spec, jets)  # dtype=, names, ...
    x, dim = o["input"], o["dim"]
    y = func(*args, **kwargs)
    n = x.dim()
    dims = list(range(n)) if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0) else \
        [dim] if isinstance(dim, int) else list(dim)
    dims = [d % max(n, 1) + 1 for d in dims]
    keep = bool(o["keepdim"])
    red = torch.sum if func in (torch.sum, Tensor.sum) else torch.mean
    x1, x2 = mode.tangents(x)
    out = lambda t: None if t is None else (red(t, dims, keepdim=keep) if n else t)  # noqa: E731
    mode.put(y, out(x1), out(x2))
    return y


def _neg_rule(mode, func, args, kwargs, flat, spec, jets):
    y = func(*args, **kwargs)
    x1, x2 = mode.tangents(args[0])
    mode.put(y, None if x1 is None else -x1, None if x2 is None else -x2)
    return y


def _where_rule(mode, func, args, kwargs, flat, spec, jets):
    """where(cond, a, b): linear in (a, b) for a fixed condition."""
    if len(args) != 3 or kwargs or mode.get(args[0]) is not None:
        return NotImplemented
    cond, a, b = args
    y = func(*args)
    if not _float_tensor(y):
        return y
    n = y.dim()
    zero = y.new_zeros(())
    outs = []
    for order in (0, 1):
        ta, tb = mode.tangents(a)[order], mode.tangents(b)[order]
        if ta is None and tb is None:
            outs.append(None)
            continue
        outs.append(torch.where(cond, zero if ta is None else _lift(ta, n), zero if tb is None else _lift(tb, n)))
    return _put_elementwise(mode, y, *outs)


def _masked_fill_rule(mode, func, args, kwargs, flat, spec, jets):
    """x.masked_fill(mask, value) for a constant value: the tangents are filled with 0."""
    x = args[0]
    mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
    value = kwargs.get("value", args[2] if len(args) > 2 else None)
    if mode.get(value) is not None or mode.get(mask) is not None:
        return NotImplemented
    y = func(*args, **kwargs)
    x1, x2 = mode.tangents(x)
    n = y.dim()
    fill = lambda t: None if t is None else _lift(t, n).masked_fill(mask, 0.0)  # noqa: E731
    return _put_elementwise(mode, y, fill(x1), fill(x2))


def _embedding_rule(mode, func, args, kwargs, flat, spec, jets):
    """F.embedding(ids, weight, ...) is linear in weight: the tangents are gathered the same way."""
    ids = kwargs.get("input", args[0] if args else None)
    weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
    max_norm = kwargs.get("max_norm", args[3] if len(args) > 3 else None)
    if max_norm is not None or mode.get(ids) is not None or not isinstance(weight, Tensor):
        return NotImplemented  # max_norm renormalizes the weight in place
    y = func(*args, **kwargs)
    w1, w2 = mode.tangents(weight)
    mode.put(y, None if w1 is None else w1[:, ids], None if w2 is None else w2[:, ids])
    return y


# ============================================================= bilinear ops
def _bilinear(mode: JetMode, y0: Tensor, prod: Callable, a, b, extra1=None, extra2=None) -> Tensor:
    """Jets of y0 = prod(a, b) + (terms whose tangents are extra1, extra2), prod bilinear.

    ``prod(x, y, xk, yk)`` multiplies with a leading K on x (xk) and/or y (yk).
    y1 = prod(a1, b) + prod(a, b1), y2 = prod(a2, b) + 2 prod(a1, b1) + prod(a, b2).
    """
    a1, a2 = mode.tangents(a)
    b1, b2 = mode.tangents(b)
    f = lambda x, y, xk, yk: None if x is None or y is None else prod(x, y, xk, yk)  # noqa: E731
    y1 = _add_opt(f(a1, b, True, False), f(a, b1, False, True), extra1)
    y2 = None
    if mode.second:
        cross = f(a1, b1, True, True)
        y2 = _add_opt(f(a2, b, True, False), None if cross is None else 2.0 * cross, f(a, b2, False, True), extra2)
    mode.put(y0, _full(y1, y0), _full(y2, y0))
    return y0


def _mul_rule(mode, func, args, kwargs, flat, spec, jets):
    if len(args) != 2 or kwargs:
        return NotImplemented
    a, b = args
    y = func(a, b)
    if not _float_tensor(y):
        return y
    n = y.dim()

    def prod(x, z, xk, zk):
        return (_lift(x, n) if xk else x) * (_lift(z, n) if zk else z)

    return _bilinear(mode, y, prod, a, b)


def _div_rule(mode, func, args, kwargs, flat, spec, jets):
    """x / c for a constant c (tensor or number): linear in x. A divisor with a jet: generic."""
    if len(args) != 2 or kwargs or mode.get(args[1]) is not None:
        return NotImplemented
    x, c = args
    y = func(x, c)
    x1, x2 = mode.tangents(x)
    n = y.dim()
    return _put_elementwise(mode, y, None if x1 is None else _lift(x1, n) / c,
                            None if x2 is None else _lift(x2, n) / c)


def _linear_prod(x: Tensor, w: Tensor, xk: bool, wk: bool) -> Tensor:
    if not wk:
        return F.linear(x, w)
    # a batched weight [K, out, in]: matmul over the flattened rows
    lead = x.shape[: x.dim() - 1]
    rows = x.reshape(x.shape[0], -1, x.shape[-1]) if xk else x.reshape(-1, x.shape[-1])
    out = torch.matmul(rows, w.transpose(-1, -2))  # [K, rows, out]
    return out.reshape((w.shape[0],) + (lead[1:] if xk else lead) + (w.shape[-2],))


def _linear_jet(K: int, rows: Tensor, w: Tensor, base: Optional[Tensor],
                terms: Sequence[Tuple[float, Optional[Tensor], Optional[Tensor]]]) -> Optional[Tensor]:
    """base + sum of alpha * a @ b^T over terms (alpha, a, b), as [K, R, out]; None if nothing is there.

    ``a`` is a row tangent [K, R, in] or None for the primal rows [R, in]; ``b`` a weight tangent
    [K, out, in] or None for the primal weight. Every term is one batched GEMM that accumulates
    into the previous ones (baddbmm, beta = 1), the bias tangent ``base`` [K, 1, out] broadcast as
    its first input: no [K, R, out] partial products are added afterwards, and the primal operand
    enters as a stride-0 batch, so the output is in the jets' [K, ...] layout without a transposed
    copy. Scaling by alpha = 2 is exact, so only the order of the sums differs from the closed form.
    """
    acc = base
    for alpha, a, b in terms:
        lhs = rows.expand(K, *rows.shape) if a is None else a
        rhs = (w if b is None else b).transpose(-1, -2)
        if b is None:
            rhs = rhs.expand(K, *rhs.shape)
        if acc is None:
            acc = torch.bmm(lhs, rhs)
            if alpha != 1:
                acc = acc * alpha
        else:
            acc = torch.baddbmm(acc, lhs, rhs, alpha=alpha)
    return acc


def _f_linear_rule(mode, func, args, kwargs, flat, spec, jets):
    x = kwargs.get("input", args[0] if args else None)
    w = kwargs.get("weight", args[1] if len(args) > 1 else None)
    bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
    if not (isinstance(x, Tensor) and isinstance(w, Tensor)) or w.dim() != 2:
        return NotImplemented
    y = func(*args, **kwargs)
    c1, c2 = mode.tangents(bias)
    x1, x2 = mode.tangents(x)
    w1, w2 = mode.tangents(w)
    K = mode.K
    tangents = (x1, x2, w1, w2, c1, c2)
    if x.dim() == 0 or not all(t is None or t.dtype == y.dtype for t in tangents) or not all(
            t is None or t.shape == (K, *s.shape) for t, s in zip(tangents, (x, x, w, w, bias, bias))):
        # a scalar input, mixed dtypes or tangents of other shapes: the general bilinear form
        return _bilinear(mode, y, _linear_prod, x, w, _lift(c1, y.dim()), _lift(c2, y.dim()))
    n_in, n_out = x.shape[-1], w.shape[0]
    rows = x.reshape(-1, n_in)
    flat_rows = lambda t: None if t is None else t.reshape(K, -1, n_in)  # noqa: E731
    as_base = lambda c: None if c is None else c.reshape(K, 1, n_out)  # noqa: E731
    r1, r2 = flat_rows(x1), flat_rows(x2)
    # y1 = x1 W^T + x W1^T + c1,  y2 = x2 W^T + 2 x1 W1^T + x W2^T + c2
    terms1 = [(1.0, r1, None)] if r1 is not None else []
    if w1 is not None:
        terms1.append((1.0, None, w1))
    y1 = _linear_jet(K, rows, w, as_base(c1), terms1)
    y2 = None
    if mode.second:
        terms2 = [(1.0, r2, None)] if r2 is not None else []
        if r1 is not None and w1 is not None:
            terms2.append((2.0, r1, w1))
        if w2 is not None:
            terms2.append((1.0, None, w2))
        y2 = _linear_jet(K, rows, w, as_base(c2), terms2)
    out_shape = (K, *y.shape)
    # a bias-only tangent is [K, 1, out]: a stride-0 view over the rows
    fit = lambda t: None if t is None else (t.reshape(out_shape) if t.shape[1] == rows.shape[0]  # noqa: E731
                                            else t.expand(K, rows.shape[0], n_out).reshape(out_shape))
    mode.put(y, fit(y1), fit(y2))
    return y


def _matmul_prod(f: Callable):
    def prod(x, y, xk, yk):
        nx, ny = x.dim() - xk, y.dim() - yk
        if nx >= 2 and ny >= 2 and nx == ny:
            # same rank: the leading K is one more broadcast batch dim of torch.matmul
            return torch.matmul(x, y)
        return _kmap(f, x, y, batched=(xk, yk))

    return prod


def _matmul_rule(f: Callable):
    prod = _matmul_prod(f)

    def rule(mode, func, args, kwargs, flat, spec, jets):
        if len(args) != 2 or kwargs or not all(isinstance(t, Tensor) for t in args):
            return NotImplemented
        return _bilinear(mode, func(*args), prod, args[0], args[1])

    return rule


def _einsum_rule(mode, func, args, kwargs, flat, spec, jets):
    """einsum of two operands is bilinear in them; each direction's slice goes through it (vmap)."""
    if kwargs or len(args) < 2 or not isinstance(args[0], str):
        return NotImplemented
    ops = args[1:] if len(args) > 2 else args[1]
    if not (isinstance(ops, (list, tuple)) and len(ops) == 2 and all(isinstance(t, Tensor) for t in ops)):
        return NotImplemented  # one operand (linear) or three and more: the generic rule
    eq = args[0]
    y = func(*args)

    def prod(a, b, ak, bk):
        return _kmap(lambda p, q: torch.einsum(eq, p, q), a, b, batched=(ak, bk))

    return _bilinear(mode, y, prod, ops[0], ops[1])


def _addmm_rule(f: Callable):
    """addmm / baddbmm / addbmm-like: beta * input + alpha * (a @ b)."""
    prod = _matmul_prod(f)

    def rule(mode, func, args, kwargs, flat, spec, jets):
        if len(args) != 3 or set(kwargs) - {"beta", "alpha"}:
            return NotImplemented
        inp, a, b = args
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        if isinstance(beta, Tensor) or isinstance(alpha, Tensor) or not isinstance(a, Tensor):
            return NotImplemented
        y = func(*args, **kwargs)
        c1, c2 = mode.tangents(inp)
        n = y.dim()
        scaled = lambda x, z, xk, zk: _scale(alpha, prod(x, z, xk, zk))  # noqa: E731
        return _bilinear(mode, y, scaled, a, b, _scale(beta, _lift(c1, n)), _scale(beta, _lift(c2, n)))

    return rule


def _conv_rule(conv: Callable):
    def rule(mode, func, args, kwargs, flat, spec, jets):
        x = kwargs.get("input", args[0] if args else None)
        w = kwargs.get("weight", args[1] if len(args) > 1 else None)
        bias = kwargs.get("bias", args[2] if len(args) > 2 else None)
        rest = args[3:]
        opts = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
        if not (isinstance(x, Tensor) and isinstance(w, Tensor)):
            return NotImplemented
        y = func(*args, **kwargs)

        def prod(a, b, ak, bk):
            return _kmap(lambda p, q: conv(p, q, None, *rest, **opts), a, b, batched=(ak, bk))

        c1, c2 = mode.tangents(bias)
        chan = lambda c: None if c is None else c.reshape((c.shape[0], 1, -1) + (1,) * (y.dim() - 2))  # noqa
        if y.dim() == w.dim() - 1:  # unbatched input [C, ...]
            chan = lambda c: None if c is None else c.reshape((c.shape[0], -1) + (1,) * (y.dim() - 1))  # noqa
        return _bilinear(mode, y, prod, x, w, chan(c1), chan(c2))

    return rule


# ============================================================ fused jet ops
def _opts(args, kwargs, names: Sequence[str], defaults: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Binds positional and keyword arguments to ``names``; None when something else was passed."""
    if len(args) > len(names) or set(kwargs) - set(names):
        return None
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


def _jets_only_on(mode: JetMode, flat, jets, allowed: Sequence[Any]) -> bool:
    ids = {id(t) for t in allowed if isinstance(t, Tensor)}
    return all(j is None or id(x) in ids for x, j in zip(flat, jets))


def _activation_rule(kind: str, names: Sequence[str] = ("input",), defaults=None, fixed=None,
                     kind_of: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None):
    """An elementwise activation through ``jet_kernels.jet_activation``. ``fixed``: options that must
    have these values (inplace=False); ``kind_of`` picks the kind from the options (gelu approximate)."""
    defaults = defaults or {}
    fixed = fixed or {}

    def rule(mode, func, args, kwargs, flat, spec, jets):
        o = _opts(args, kwargs, names, defaults)
        if o is None:
            return NotImplemented
        if any(o.get(k, v) != v for k, v in fixed.items()):  # inplace=True passed by position
            raise JetFallback(_name(func), "an in-place op on a tensor that carries a jet")
        x = o.get(names[0])
        k = kind if kind_of is None else kind_of(o)
        if not _float_tensor(x) or k is None or not _jets_only_on(mode, flat, jets, [x]):
            return NotImplemented
        x1, x2 = mode.tangents(x)
        y, y1, y2 = jk.jet_activation(x, x1, x2, k, float(o.get("beta", 1.0)), float(o.get("threshold", 20.0)),
                                      mode.second)
        mode.put(y, y1, y2 if (mode.second and (x1 is not None or x2 is not None)) else None)
        return y

    return rule


def _gelu_kind(o):
    return {"none": "gelu", "tanh": "gelu_tanh"}.get(o.get("approximate", "none"))


def _softmax_rule(log: bool, names: Sequence[str]):
    def rule(mode, func, args, kwargs, flat, spec, jets):
        o = _opts(args, kwargs, names, {"dtype": None, "_stacklevel": 3})
        if o is None or o.get("dim") is None or o["dtype"] is not None:
            return NotImplemented
        x = o[names[0]]
        if not _float_tensor(x) or not _jets_only_on(mode, flat, jets, [x]):
            return NotImplemented
        x1, x2 = mode.tangents(x)
        y, y1, y2 = jk.jet_softmax(x, x1, x2, o["dim"], log, mode.second)
        mode.put(y, y1, y2)
        return y

    return rule


def _layer_norm_rule(mode, func, args, kwargs, flat, spec, jets):
    o = _opts(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
              {"weight": None, "bias": None, "eps": 1e-5, "cudnn_enable": True})
    if o is None:
        return NotImplemented
    x, ns, w, b = o["input"], o["normalized_shape"], o["weight"], o["bias"]
    ns = (ns,) if isinstance(ns, int) else tuple(ns)
    if not _float_tensor(x) or isinstance(o["eps"], Tensor):
        return NotImplemented
    x1, x2 = mode.tangents(x)
    w1, w2 = mode.tangents(w)
    b1, b2 = mode.tangents(b)
    y, y1, y2 = jk.jet_layer_norm(x, x1, x2, ns, w, b, w1, b1, w2, b2, float(o["eps"]), mode.second)
    mode.put(y, y1, y2)
    return y


def _rms_norm_rule(mode, func, args, kwargs, flat, spec, jets):
    o = _opts(args, kwargs, ("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None})
    if o is None:
        return NotImplemented
    x, ns, w = o["input"], o["normalized_shape"], o["weight"]
    ns = (ns,) if isinstance(ns, int) else tuple(ns)
    if not _float_tensor(x) or isinstance(o["eps"], Tensor):
        return NotImplemented
    x1, x2 = mode.tangents(x)
    w1, w2 = mode.tangents(w)
    y, y1, y2 = jk.jet_rms_norm(x, x1, x2, ns, w, w1, w2, o["eps"], mode.second)
    mode.put(y, y1, y2)
    return y


def _cross_entropy_rule(mode, func, args, kwargs, flat, spec, jets):
    o = _opts(args, kwargs, ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                             "label_smoothing"),
              {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None, "reduction": "mean",
               "label_smoothing": 0.0})
    if o is None:
        return NotImplemented
    z, t = o["input"], o["target"]
    if (o["reduction"] != "none" or o["weight"] is not None or o["size_average"] is not None
            or o["reduce"] is not None or o["label_smoothing"] != 0.0 or not _float_tensor(z) or z.dim() != 2
            or not isinstance(t, Tensor) or t.is_floating_point() or t.dim() != 1
            or not _jets_only_on(mode, flat, jets, [z])):
        return NotImplemented  # other forms: the generic rule (exact, slower)
    z1, z2 = mode.tangents(z)
    y, y1, y2 = jk.jet_cross_entropy(z, z1, z2, t, int(o["ignore_index"]), mode.second)
    mode.put(y, y1, y2)
    return y


def _dcs_rule(mode, func, args, kwargs, flat, spec, jets):
    o = _opts(args, kwargs, ("w", "u", "v", "mask"), {"v": None, "mask": None})
    if o is None or mode.get(o["mask"]) is not None:
        return NotImplemented
    w, u, v, mask = o["w"], o["u"], o["v"], o["mask"]
    (w1, w2), (u1, u2), (v1, v2) = mode.tangents(w), mode.tangents(u), mode.tangents(v)
    # the jet op's primal is the op's value (the same products, bit for bit): no second pass
    y, y1, y2 = jk.jet_dcs(w, u, v, mask, w1, u1, v1, w2, u2, v2, mode.second)
    mode.put(y, y1, y2)
    return y


def _dcs_group_rule(mode, func, args, kwargs, flat, spec, jets):
    o = _opts(args, kwargs, ("w", "s", "dim"), {})
    if o is None:
        return NotImplemented
    w, s, dim = o["w"], o["s"], o["dim"]
    (w1, w2), (s1, s2) = mode.tangents(w), mode.tangents(s)
    y, y1, y2 = jk.jet_dcs_group(w, s, dim, w1, s1, w2, s2, mode.second)
    mode.put(y, y1, y2)
    return y


# ======================================================= other elementwise
def _unary_rule(derivs: Callable[..., Tuple[Tensor, Tensor, Optional[Tensor]]], n_args: int = 1):
    """Elementwise f(x, *consts): y1 = f'(x) x1, y2 = f'(x) x2 + f''(x) x1^2, derivs -> (f, f', f'')."""

    def rule(mode, func, args, kwargs, flat, spec, jets):
        if len(args) != n_args or kwargs or not _float_tensor(args[0]) or \
                any(isinstance(a, Tensor) for a in args[1:]):
            return NotImplemented
        x = args[0]
        y, d1, d2 = derivs(func, *args)
        x1, x2 = mode.tangents(x)
        y1 = None if x1 is None else d1 * x1
        y2 = None
        if mode.second:
            y2 = _add_opt(None if x2 is None else d1 * x2, None if (x1 is None or d2 is None) else d2 * x1 * x1)
        mode.put(y, y1, y2)
        return y

    return rule


def _exp_d(func, x):
    y = func(x)
    return y, y, y


def _log_d(func, x):
    r = 1.0 / x
    return func(x), r, -r * r


def _sqrt_d(func, x):
    y = func(x)
    return y, 0.5 / y, -0.25 / (y * y * y)


def _rsqrt_d(func, x):
    y = func(x)
    y3 = y * y * y
    return y, -0.5 * y3, 0.75 * y3 * y * y


def _sin_d(func, x):
    s, c = torch.sin(x), torch.cos(x)
    return s, c, -s


def _cos_d(func, x):
    s, c = torch.sin(x), torch.cos(x)
    return c, -s, -c


def _reciprocal_d(func, x):
    y = func(x)
    return y, -y * y, 2.0 * y * y * y


def _pow_d(func, x, p):
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        raise TypeError  # not reached: the rule checks
    y = func(x, p)
    if p == 0:
        return y, torch.zeros_like(x), None
    if p == 1:
        return y, torch.ones_like(x), None
    if p == 2:
        return y, 2.0 * x, torch.full_like(x, 2.0)
    return y, p * torch.pow(x, p - 1), p * (p - 1) * torch.pow(x, p - 2)


def _pow_rule(mode, func, args, kwargs, flat, spec, jets):
    if len(args) != 2 or kwargs or not isinstance(args[1], (int, float)) or isinstance(args[1], bool) \
            or not isinstance(args[0], Tensor):
        return NotImplemented
    return _unary_rule(_pow_d, 2)(mode, func, args, kwargs, flat, spec, jets)


# ============================================================== attention
def _mha_jet_rule(mode, func, args, kwargs, flat, spec, jets):
    """Runs attention as its own ops under the jet mode, so its projections and bmm get the bilinear rule."""
    bound = MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    if (a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"] or a["static_k"] is not None
            or a["static_v"] is not None):
        return NotImplemented  # rare options: one generic (nested jvp) step for the whole op
    if a["training"] and a["dropout_p"] > 0:
        mha_forward(mode.exact, *args, **kwargs)  # refuses
    with mode:
        return _mha_math(a)


def _mha_math(a: Dict[str, Any]):
    """F.multi_head_attention_forward's explicit (need_weights=True) branch, for the options it accepts here."""
    query, key, value, num_heads = a["query"], a["key"], a["value"], a["num_heads"]
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    head_dim = embed_dim // num_heads
    if a["use_separate_proj_weight"]:
        wq, wk, wv = a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]
    else:
        wq, wk, wv = a["in_proj_weight"].chunk(3)
    bq = bk = bv = None
    if a["in_proj_bias"] is not None:
        bq, bk, bv = a["in_proj_bias"].chunk(3)
    q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def as_float_mask(m):
        if m is None:
            return None
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, float("-inf"))
        return m.to(q.dtype)

    attn_mask, kpm = as_float_mask(a["attn_mask"]), a["key_padding_mask"]
    if a["is_causal"] and attn_mask is None:
        raise RuntimeError("multi_head_attention_forward: is_causal=True needs attn_mask (as in PyTorch)")
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if kpm is not None:
        if not batched:
            kpm = kpm.unsqueeze(0)
        kpm = as_float_mask(kpm).view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(
            bsz * num_heads, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.reshape(src_len, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(src_len, bsz * num_heads, head_dim).transpose(0, 1)
    scores = torch.bmm(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).reshape(tgt_len, bsz, embed_dim)
    w = None
    if a["need_weights"]:
        w = weights.reshape(bsz, num_heads, tgt_len, src_len)
        if a["average_attn_weights"]:
            w = w.mean(dim=1)
        if not batched:
            w = w.squeeze(0)
    if not batched:
        out = out.squeeze(1)
    return out, w


# ================================================================== table
def _qualified_name(func) -> str:
    """"ns::name" of a custom op, its packet or one of its overloads."""
    if isinstance(func, torch._ops.OpOverload):
        return func._schema.name
    return getattr(func, "_qualified_op_name", "")


# Custom ops by qualified name: the library registers them when symfast's extension loads,
# which may be after this module is imported. The public symfast.dcs / dcs_group reach the mode
# as one of these (the C++ autograd op in eager mode, the raw op under torch.compile).
_CUSTOM_OP_RULES: Dict[str, Callable] = {}


def _jet_rules() -> Dict[Callable, Callable]:
    rules: Dict[Callable, Callable] = {}

    def add(funcs, rule):
        for f in funcs:
            if f is not None:
                rules[f] = rule

    add([F.multi_head_attention_forward], _mha_jet_rule)
    # activations: the fused jet op
    add([F.gelu], _activation_rule("gelu", ("input", "approximate"), {"approximate": "none"}, kind_of=_gelu_kind))
    add([F.silu], _activation_rule("silu", ("input", "inplace"), {"inplace": False}, {"inplace": False}))
    add([F.relu], _activation_rule("relu", ("input", "inplace"), {"inplace": False}, {"inplace": False}))
    add([torch.relu, Tensor.relu], _activation_rule("relu"))
    add([torch.tanh, Tensor.tanh, F.tanh], _activation_rule("tanh"))
    add([torch.sigmoid, Tensor.sigmoid, F.sigmoid], _activation_rule("sigmoid"))
    add([F.softplus], _activation_rule("softplus", ("input", "beta", "threshold"), {"beta": 1.0, "threshold": 20.0}))
    # rows
    add([F.softmax, torch.softmax, Tensor.softmax], _softmax_rule(False, ("input", "dim", "_stacklevel", "dtype")))
    add([F.log_softmax, torch.log_softmax, Tensor.log_softmax],
        _softmax_rule(True, ("input", "dim", "_stacklevel", "dtype")))
    add([F.layer_norm, torch.layer_norm], _layer_norm_rule)
    add([getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)], _rms_norm_rule)
    add([F.cross_entropy], _cross_entropy_rule)
    for n in ("symfast::dcs", "symfast::_dcs_autograd"):
        _CUSTOM_OP_RULES[n] = _dcs_rule
    for n in ("symfast::dcs_group", "symfast::_dcs_group_autograd"):
        _CUSTOM_OP_RULES[n] = _dcs_group_rule
    # bilinear
    add([F.linear], _f_linear_rule)
    for conv in (F.conv1d, F.conv2d, F.conv3d):
        rules[conv] = _conv_rule(conv)
    add([torch.matmul, Tensor.matmul, Tensor.__matmul__], _matmul_rule(torch.matmul))
    add([torch.mm, Tensor.mm], _matmul_rule(torch.mm))
    add([torch.bmm, Tensor.bmm], _matmul_rule(torch.bmm))
    add([torch.addmm, Tensor.addmm], _addmm_rule(torch.mm))
    add([torch.baddbmm, Tensor.baddbmm], _addmm_rule(torch.bmm))
    add([torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__], _mul_rule)
    add([torch.einsum], _einsum_rule)
    add([torch.div, Tensor.div, Tensor.__truediv__, torch.true_divide], _div_rule)
    # elementwise, closed forms
    add([torch.exp, Tensor.exp], _unary_rule(_exp_d))
    add([torch.log, Tensor.log], _unary_rule(_log_d))
    add([torch.sqrt, Tensor.sqrt], _unary_rule(_sqrt_d))
    add([torch.rsqrt, Tensor.rsqrt], _unary_rule(_rsqrt_d))
    add([torch.sin, Tensor.sin], _unary_rule(_sin_d))
    add([torch.cos, Tensor.cos], _unary_rule(_cos_d))
    add([torch.reciprocal, Tensor.reciprocal], _unary_rule(_reciprocal_d))
    add([torch.pow, Tensor.pow, Tensor.__pow__], _pow_rule)
    # affine and shape ops
    add([torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__], _add_rule(1.0))
    add([torch.sub, Tensor.sub, Tensor.__sub__, torch.subtract], _add_rule(-1.0))
    add([Tensor.__rsub__, torch.rsub], _add_rule(-1.0, reverse=True))
    add([Tensor.__neg__, torch.neg, Tensor.neg], _neg_rule)
    add([torch.where], _where_rule)
    add([torch.masked_fill, Tensor.masked_fill], _masked_fill_rule)
    add([F.embedding], _embedding_rule)
    add([Tensor.reshape, torch.reshape, Tensor.flatten, torch.flatten, Tensor.unflatten, Tensor.unsqueeze,
         torch.unsqueeze, Tensor.squeeze, torch.squeeze, Tensor.view_as, Tensor.reshape_as],
        _map_tangents(_reshaped))
    add([Tensor.view], _view_rule)
    add([Tensor.expand, Tensor.expand_as, torch.broadcast_to, Tensor.broadcast_to], _map_tangents(_expanded))
    add([Tensor.contiguous, Tensor.clone, torch.clone], _map_tangents(_same))
    add([Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.type_as], _map_tangents(_cast))
    add([Tensor.to], _to_rule)
    add([Tensor.transpose, torch.transpose, Tensor.swapaxes, torch.swapaxes], _map_tangents(_transposed))
    add([Tensor.permute, torch.permute], _map_tangents(_permuted))
    add([Tensor.mT.__get__], _map_tangents(_matrix_transposed))
    add([Tensor.T.__get__, Tensor.t, torch.t], _map_tangents(_reversed_dims))
    add([Tensor.__getitem__], _getitem_rule)
    add([torch.cat, torch.concat, torch.concatenate], _cat_rule(False))
    add([torch.stack], _cat_rule(True))
    lin = _linear_rule()
    add([torch.sum, Tensor.sum, torch.mean, Tensor.mean], _reduce_rule)
    add([Tensor.chunk, torch.chunk, Tensor.split, torch.split,
         Tensor.unbind, torch.unbind, Tensor.movedim, torch.movedim,
         Tensor.repeat_interleave, torch.repeat_interleave, Tensor.repeat, Tensor.flip, torch.flip,
         Tensor.narrow, torch.narrow, Tensor.select, torch.select, Tensor.roll, torch.roll, Tensor.tril,
         torch.tril, Tensor.triu, torch.triu, Tensor.diagonal, torch.diagonal, Tensor.gather, torch.gather,
         Tensor.index_select, torch.index_select, Tensor.cumsum, torch.cumsum, F.avg_pool1d, F.avg_pool2d,
         F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, Tensor.unfold, F.unfold, F.fold, Tensor.tile, torch.tile],
        lin)
    return rules


def _view_rule(mode, func, args, kwargs, flat, spec, jets):
    if len(args) == 2 and isinstance(args[1], torch.dtype):
        return NotImplemented  # a reinterpreting view: not linear
    return _map_tangents(_reshaped)(mode, func, args, kwargs, flat, spec, jets)


def _to_rule(mode, func, args, kwargs, flat, spec, jets):
    y = func(*args, **kwargs)
    if not _float_tensor(y) or y is args[0]:
        return y  # a no-op .to() returns its input, whose jet stays
    x1, x2 = mode.tangents(args[0])
    mode.put(y, None if x1 is None else x1.to(dtype=y.dtype, device=y.device),
             None if x2 is None else x2.to(dtype=y.dtype, device=y.device))
    return y


_JET_RULES = _jet_rules()


# ============================================================ entry point
def _drop(_x: Any) -> None:
    return None


def jet_derivatives(op: str, loss_fn: Callable[[Dict[str, Tensor], Any], Tensor], params: Dict[str, Tensor],
                    directions: Dict[str, Tensor], batch: Any, exact: ExactMode, *,
                    second: bool = True) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    r"""Per-sample losses, g and h along K directions in one pass of the batch.

    ``directions[name]`` is ``[K, *params[name].shape]``; ``loss_fn(params, batch)`` returns the
    ``[B]`` losses (checked by the caller's ``loss_fn``). Returns ``(losses [B], g [B, K],
    h [B, K] or None)`` with :math:`g_{ik} = n_k^\top \nabla \ell_i` and
    :math:`h_{ik} = n_k^\top H_i n_k`; ``second=False`` skips all second-order work (h is None).
    Raises :class:`JetFallback` where the jets cannot follow the model.
    """
    K = next(iter(directions.values())).shape[0] if directions else 0
    # Fresh leaves sharing storage (no copy): tied parameters get their own jet, and
    # requires_grad marks everything computed from them (see JetMode.__torch_function__).
    # The autograd graph is recorded but keeps no tensors and is never run.
    aliases = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    # The batch is data, a constant here, even when it carries autograd history of its own (the
    # output of another model): detached, it is not mistaken for a result made outside the mode.
    batch = pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) and t.grad_fn is not None else t, batch)
    mode = JetMode(exact, K, second)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _drop):
        with mode:
            for k, p in aliases.items():
                mode.put(p, directions[k].to(p.dtype), None)
            losses = loss_fn(aliases, batch)
            jet = mode.get(losses)
    if losses.grad_fn is not None and jet is None:
        raise JetFallback("loss_fn", "the losses were computed outside the jet mode")
    losses = losses.detach()
    B = losses.shape[0]
    zeros = losses.new_zeros(B, K)
    g1, g2 = (None, None) if jet is None else jet
    g = zeros if g1 is None else g1.detach().T
    h = None
    if second:
        h = zeros if g2 is None else g2.detach().T
    return losses, g, h
