r"""Second-order Taylor mode: a ``TorchFunctionMode`` that carries each activation's first and
second derivatives along one direction through one pass of the batch.

Ops bilinear in two operands use the closed form ``y2 = f(a2, b) + 2 f(a1, b1) + f(a, b2)``;
elementwise activations and softmax have their own rules; every other op a nested jvp of that op
alone. Where the jets cannot follow, :class:`JetFallback` sends the call to forward over forward.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .exact import ExactMode, MHA_SIGNATURE, mha_forward


Tensor = torch.Tensor


class JetFallback(Exception):
    """The jet path met something it does not handle; the caller reruns nested jvp."""


def _bilinear_linear(a, b, bias, rest):
    return F.linear(a, b, bias)


def _conv_bilinear(conv):
    def call(a, b, bias, rest):
        return conv(a, b, bias, *rest)

    return call


_METADATA = {"__get__", "size", "dim", "numel", "item", "tolist", "is_floating_point", "is_complex", "stride",
             "storage_offset", "data_ptr", "element_size", "nelement", "ndimension", "is_contiguous", "__len__",
             "__bool__", "__int__", "__float__", "__index__", "__format__", "__repr__", "__hash__", "numpy",
             "get_device", "untyped_storage", "detach", "requires_grad_", "__reduce_ex__", "__deepcopy__"}
_IN_PLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__ipow__",
                     "__imatmul__", "__setitem__", "__iand__", "__ior__", "__ixor__"}


class JetMode(TorchFunctionMode):
    r"""Second-order Taylor mode along one direction, op by op.

    Every floating tensor x of the forward pass carries a jet (x1, x2): its
    first and second derivatives along t of ``loss_fn(params + t n)``. Each
    top-level op maps input jets to output jets:

    * ops bilinear in two operands (``F.linear``, ``matmul``, ``bmm``, ``mul``,
      ``conv*d``): :math:`y_1 = f(a_1, b) + f(a, b_1)`,
      :math:`y_2 = f(a_2, b) + 2 f(a_1, b_1) + f(a, b_2)`: 5 products
      where nested forward mode spends 8 (it cannot see that both tangents
      are n);
    * ops linear in their floating inputs (add, sum, views, cat, ...): applied
      to each component;
    * any other op: a jvp of a jvp of that op alone along :math:`x_1`, plus a
      jvp along :math:`x_2`: :math:`y_2 = D^2 f[x_1, x_1] + Df[x_2]` (exact by
      PyTorch's rules, with the :class:`ExactMode` substitutions applied first).

    The jets live in a side table keyed by tensor identity, with weak
    references, so activations are freed as in a plain forward pass. Anything
    unusual on a jet (in-place ops, ``out=``) raises :class:`JetFallback`.
    """

    def __init__(self, exact: ExactMode):
        super().__init__()
        self.exact = exact
        self.table: Dict[int, Tuple[Any, Optional[Tensor], Optional[Tensor]]] = {}

    # ------------------------------------------------------------ table
    def put(self, t: Tensor, j1: Optional[Tensor], j2: Optional[Tensor]) -> None:
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

    # ------------------------------------------------------------ rules
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            # under no_grad inside loss_fn (the pass runs with grad on): a constant, as autograd
            # has it, so no jet out
            return self._call(func, args, kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        jets = [self.get(x) for x in flat]
        name = getattr(func, "__name__", "")
        for x, j in zip(flat, jets):
            # Parameters enter as leaves that require grad, so every tensor computed from them
            # has a grad_fn. One without a jet was made where this mode could not see
            # (inside an autograd.Function, a custom op): its derivatives are unknown here.
            if isinstance(x, Tensor) and x.grad_fn is not None and (
                    j is None or isinstance(x.grad_fn, torch.autograd.function.BackwardCFunction)):
                raise JetFallback(f"{name}: an input was computed outside the jet mode (autograd.Function?)")
        if not any(j is not None for j in jets) or (name in _METADATA and func not in _JET_RULES):
            # no jet in, or metadata (shape, dtype, .data, item(), ...): no derivative out
            return self._call(func, args, kwargs)
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            raise JetFallback(f"custom op {func} on a jet: its forward-mode support is unknown")
        if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS or "out" in kwargs \
                or kwargs.get("inplace", False):
            raise JetFallback(f"in-place op {name} on a tensor that carries a jet")
        rule = _JET_RULES.get(func)
        if rule is not None:
            out = rule(self, func, args, kwargs, flat, spec, jets)
            if out is not NotImplemented:
                return out
        return self._generic(func, flat, spec, jets)

    def _call(self, func, args, kwargs):
        handler = self.exact.handlers.get(func)
        if handler is not None:
            return handler(self.exact, *args, **kwargs)
        return func(*args, **kwargs)

    def _generic(self, func, flat, spec, jets):
        idx = [i for i, j in enumerate(jets) if j is not None]
        x0 = tuple(flat[i] for i in idx)
        x1 = tuple(_zeros_if_none(jets[i][0], flat[i]) for i in idx)
        x2 = [jets[i][1] for i in idx]
        meta: Dict[str, Any] = {}

        def f(*xs):
            # only the op's tensor outputs go through jvp (it may also return None, ints, ...)
            full = list(flat)
            for i, x in zip(idx, xs):
                full[i] = x
            a, k = pytree.tree_unflatten(full, spec)
            leaves, out_spec = pytree.tree_flatten(self._call(func, a, k))
            pos = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
            if not pos:
                raise JetFallback(f"{getattr(func, '__name__', func)} returned no tensor from a jet input")
            meta.update(leaves=leaves, spec=out_spec, pos=pos)
            return tuple(leaves[i] for i in pos)

        # y1 = Df[x1], y2 = D2f[x1, x1] + Df[x2]: jvp of jvp along x1 (this op alone), plus one jvp along x2.
        (y0, y1), (_, second) = torch.func.jvp(lambda *xs: torch.func.jvp(f, xs, x1), x0, x1)
        if any(c is not None for c in x2):
            x2t = tuple(_zeros_if_none(c, x) for c, x in zip(x2, x0))
            second = tuple(a + b for a, b in zip(second, torch.func.jvp(f, x0, x2t)[1]))
        leaves = list(meta["leaves"])
        for i, v, a, b in zip(meta["pos"], y0, y1, second):
            leaves[i] = v
            if v.is_floating_point():
                self.put(v, a, b)
        return pytree.tree_unflatten(leaves, meta["spec"])


def _zeros_if_none(j: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if j is None else j


def _add_opt(*terms: Optional[Tensor]) -> Optional[Tensor]:
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def _bilinear_rule(bil, a_pos, a_name, b_pos, b_name, bias_pos=None, bias_name=None, n_named=3, channel_bias=False):
    """Rule for f(a, b, bias, *rest) = bil(a, b) + bias, bilinear in (a, b)."""

    def rule(mode, func, args, kwargs, flat, spec, jets):
        args = list(args)

        def pick(pos, name):
            if name in kwargs:
                return kwargs[name]
            return args[pos] if pos is not None and len(args) > pos else None

        a, b = pick(a_pos, a_name), pick(b_pos, b_name)
        bias = pick(bias_pos, bias_name) if bias_pos is not None else None
        scalar = isinstance(a, (int, float)) or isinstance(b, (int, float))
        if bias_pos is None and not kwargs and len(args) == 2 and scalar:
            return _linear_rule()(mode, func, args, kwargs, flat, spec, jets)  # x * 2.0 is linear in x
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return NotImplemented
        extra = {k: v for k, v in kwargs.items() if k not in (a_name, b_name, bias_name)}
        rest = args[n_named:] if bias_pos is not None else args[2:]
        if extra:
            return NotImplemented
        ja, jb, jc = mode.get(a), mode.get(b), mode.get(bias)
        a1, a2 = ja if ja else (None, None)
        b1, b2 = jb if jb else (None, None)
        c1, c2 = jc if jc else (None, None)
        y0 = bil(a, b, bias, rest)
        f = lambda x, y: None if x is None or y is None else bil(x, y, None, rest)  # noqa: E731
        if channel_bias:  # conv: bias [C] is added along dim 1
            c1, c2 = (None if c is None else c.reshape((1, -1) + (1,) * (y0.dim() - 2)) for c in (c1, c2))
        y1 = _add_opt(f(a1, b), f(a, b1), c1)
        cross = f(a1, b1)
        y2 = _add_opt(f(a2, b), None if cross is None else 2 * cross, f(a, b2), c2)
        # a jet on the bias alone (frozen weight, BitFit) has the bias's shape: broadcast it to the output's
        y1, y2 = (None if y is None else y.expand_as(y0) for y in (y1, y2))
        mode.put(y0, y1, y2)
        return y0

    return rule


def _linear_rule(both_tensors: bool = False, operands: bool = False):
    """Ops linear in their floating tensor inputs: the jets go through the op itself.

    ``operands``: every tensor argument is summed or concatenated into the output (add, sub,
    cat, stack), so a constant of any dtype (an int offset, a bool mask) has zero derivative.
    Otherwise a non-floating tensor is an index or a size (``x[idx]``) and is passed as it is.
    """

    def rule(mode, func, args, kwargs, flat, spec, jets):
        if both_tensors and not (len(args) >= 2 and isinstance(args[0], Tensor) and isinstance(args[1], Tensor)):
            return NotImplemented
        y0 = func(*args, **kwargs)
        comps = []
        for order in (0, 1):
            if all(j is None or j[order] is None for j in jets):
                comps.append(None)
                continue
            full = [
                (j[order] if j[order] is not None else torch.zeros_like(x)) if j is not None
                else (torch.zeros_like(x) if isinstance(x, Tensor) and (operands or x.is_floating_point()) else x)
                for x, j in zip(flat, jets)
            ]
            a, k = pytree.tree_unflatten(full, spec)
            comps.append(func(*a, **k))
        outs = pytree.tree_leaves(y0)
        parts = [pytree.tree_leaves(c) if c is not None else [None] * len(outs) for c in comps]
        for o, p1, p2 in zip(outs, *parts):
            if isinstance(o, Tensor) and o.is_floating_point():
                mode.put(o, p1, p2)
        return y0

    return rule


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


def _unary_rule(derivs: Callable[..., Tuple[Tensor, Tensor, Optional[Tensor]]], allowed: Dict[str, Any]):
    """Elementwise f(x): y1 = f'(x) x1, y2 = f'(x) x2 + f''(x) x1^2, from derivs(x) = (f, f', f'')."""

    def rule(mode, func, args, kwargs, flat, spec, jets):
        if not args or not isinstance(args[0], Tensor) or len(args) > 1 + len(allowed):
            return NotImplemented
        opts = dict(zip(list(allowed)[: len(args) - 1], args[1:]), **kwargs)
        if any(k not in allowed or opts[k] != allowed[k] for k in opts):
            return NotImplemented
        if any(j is not None for j in jets[1:]):
            return NotImplemented
        x = args[0]
        j = mode.get(x)
        y0, d1, d2 = derivs(x)
        x1, x2 = j
        y1 = None if x1 is None else d1 * x1
        y2 = _add_opt(None if x2 is None else d1 * x2, None if (x1 is None or d2 is None) else d2 * x1 * x1)
        mode.put(y0, y1, y2)
        return y0

    return rule


def _gelu_derivs(x):
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return F.gelu(x), cdf + x * pdf, pdf * (2.0 - x * x)


def _relu_derivs(x):
    return torch.relu(x), (x > 0).to(x.dtype), None


def _tanh_derivs(x):
    t = torch.tanh(x)
    d = 1.0 - t * t
    return t, d, -2.0 * t * d


def _sigmoid_derivs(x):
    sig = torch.sigmoid(x)
    d = sig * (1.0 - sig)
    return sig, d, d * (1.0 - 2.0 * sig)


def _softmax_rule(mode, func, args, kwargs, flat, spec, jets):
    """s = softmax(x); u = x1 - <s, x1>; s1 = s u; s2 = s (u^2 - <s, u^2> + x2 - <s, x2>)."""
    names = ("dim", "_stacklevel", "dtype") if func is F.softmax else ("dim", "dtype")
    if not args or not isinstance(args[0], Tensor) or any(j is not None for j in jets[1:]):
        return NotImplemented
    opts = dict(zip(names, args[1:]), **kwargs)
    dim = opts.get("dim")
    if dim is None or opts.get("dtype") is not None or set(opts) - set(names):
        return NotImplemented
    x = args[0]
    x1, x2 = mode.get(x)
    s = torch.softmax(x, dim)
    if x1 is None:
        u = torch.zeros_like(x)
    else:
        u = x1 - (s * x1).sum(dim, keepdim=True)
    y1 = None if x1 is None else s * u
    inner = u * u - (s * u * u).sum(dim, keepdim=True)
    if x2 is not None:
        inner = inner + x2 - (s * x2).sum(dim, keepdim=True)
    mode.put(s, y1, s * inner)
    return s


def _jet_rules() -> Dict[Callable, Callable]:
    rules: Dict[Callable, Callable] = {}
    rules[F.multi_head_attention_forward] = _mha_jet_rule
    rules[F.gelu] = _unary_rule(_gelu_derivs, {"approximate": "none"})
    for f in (F.relu, torch.relu, Tensor.relu):
        rules[f] = _unary_rule(_relu_derivs, {"inplace": False} if f is F.relu else {})
    for f in (torch.tanh, Tensor.tanh, F.tanh):
        rules[f] = _unary_rule(_tanh_derivs, {})
    for f in (torch.sigmoid, Tensor.sigmoid, F.sigmoid):
        rules[f] = _unary_rule(_sigmoid_derivs, {})
    for f in (F.softmax, torch.softmax, Tensor.softmax):
        rules[f] = _softmax_rule
    rules[F.linear] = _bilinear_rule(_bilinear_linear, 0, "input", 1, "weight", 2, "bias")
    for conv in (F.conv1d, F.conv2d, F.conv3d):
        rules[conv] = _bilinear_rule(_conv_bilinear(conv), 0, "input", 1, "weight", 2, "bias", channel_bias=True)
    mm = lambda f: (lambda a, b, bias, rest: f(a, b))  # noqa: E731
    for f in (torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, torch.bmm, Tensor.bmm,
              torch.mul, Tensor.mul, Tensor.__mul__):
        rules[f] = _bilinear_rule(mm(f), 0, "input", 1, "other")
    rules[Tensor.__rmul__] = _bilinear_rule(mm(Tensor.__rmul__), 0, "self", 1, "other")
    lin = _linear_rule()
    for f in (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, torch.sub, Tensor.sub, Tensor.__sub__):
        rules[f] = _linear_rule(both_tensors=True, operands=True)  # a + 1.0 is affine: generic rule
    for f in (torch.cat, torch.stack):
        rules[f] = _linear_rule(operands=True)
    for f in (Tensor.__neg__, torch.neg, torch.sum, Tensor.sum, torch.mean, Tensor.mean, Tensor.reshape,
              torch.reshape, Tensor.view, Tensor.flatten, torch.flatten, Tensor.unflatten, Tensor.transpose,
              torch.transpose, Tensor.permute, torch.permute, Tensor.unsqueeze, torch.unsqueeze, Tensor.squeeze,
              torch.squeeze, Tensor.expand, Tensor.contiguous, Tensor.__getitem__,
              Tensor.chunk, torch.chunk, Tensor.split, torch.split, Tensor.t, Tensor.T.__get__, Tensor.mT.__get__,
              Tensor.movedim, torch.movedim, Tensor.clone):
        rules[f] = lin
    return rules


_JET_RULES = _jet_rules()
