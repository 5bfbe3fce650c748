r"""Per-sample directional derivatives, curvatures and Hessian-vector products.

For a per-sample loss :math:`\ell(\theta, x_i)` and directions :math:`n_k` in
parameter space, the engine computes, for every sample of a batch at once,

.. math::

    g_{ik} = n_k^\top \nabla_\theta \ell(\theta, x_i), \qquad
    h_{ik} = n_k^\top H(x_i)\, n_k, \qquad H(x_i) = \nabla^2_\theta \ell(\theta, x_i),

and the per-sample Hessian-vector products :math:`H(x_i) n` or their
projections :math:`m_k^\top H(x_i) n`. These are the quantities of the paper's
stability analysis: :math:`h_{ik}` along a symmetry direction is the
:math:`h(x)` of eqs. (8), (9), (14) and (16), see :mod:`symfast.collapse`.

Conventions
-----------
``loss_fn(params, batch)`` returns the per-sample losses, a tensor of shape
``[B]``. ``params`` is a dict of tensors. ``directions`` is a dict with the
same keys whose tensors have a leading ``K`` dimension (``K`` directions:
``directions[name][k]`` has the shape of ``params[name]``). A direction is used
as given: it is not normalized, so ``h`` scales with its squared norm.

What ``loss_fn`` computes under ``torch.no_grad()`` (a bootstrapped target, a
running estimate) is a constant on every path, as it is to autograd, and the
same as ``.detach()``: no derivative of any order flows through it, so ``h``
is the curvature of the loss with those results frozen at their value.
Forward mode ignores ``no_grad`` by itself; the engine enforces this (the
whole call runs with grad mode on, so only ``no_grad`` inside ``loss_fn``
counts).

How it is computed
------------------
*Fast path* (``method="fast"``, the default). The direction is shared by all
samples, so derivatives along it are derivatives of the whole ``[B]`` loss
vector with respect to one scalar: ``t -> loss_fn(params + t n, batch)``.
One forward-mode pass (``torch.func.jvp``) gives every :math:`g_{ik}`; a nested
jvp with two tangents gives :math:`m^\top H(x_i) n` (mixed second derivative
:math:`\partial_s\partial_t \ell(\theta + s m + t n, x_i)`). The curvatures
:math:`h_{ik}` come from second-order Taylor mode (:class:`_JetMode`): one
pass of the batch carrying, for every activation, its first and second
derivatives along t; ops bilinear in two operands (Linear, matmul, bmm,
conv, mul, and attention, which is run as its own ops) use the closed form
:math:`y_2 = f(a_2, b) + 2 f(a_1, b_1) + f(a, b_2)`, every other op a nested
jvp of that op alone. Where the jets cannot follow (in-place ops on
activations, ``autograd.Function``s, custom ops) the engine falls back, for the
whole call, to forward over forward mode on the batch (jvp of jvp of
``t -> loss_fn(params + t n)``), which ``method="forward"`` selects
explicitly. No tensor of per-sample parameter size is ever formed: the
tangents are parameter-sized, the activations batch-sized, as in one forward
pass. Directions are processed one at a time or, in forward mode,
``chunk_size`` at a time under ``torch.func.vmap`` (memory grows linearly with
the chunk); the batch may also be split (``batch_chunk_size``) when samples do
not interact.

Full per-sample HVPs :math:`H(x_i) n` (``per_sample_hvp`` without ``onto``)
are per-sample parameter-sized by definition; they are computed per sample,
reverse over forward (``vmap`` over samples of ``grad`` of the jvp), in
chunks of ``batch_chunk_size`` samples.

*Reference path* (``method="reference"``): ``torch.func.vmap`` over samples of
``jvp(grad(per-sample loss))``, the textbook torch.func recipe. It costs about
200 forward+backward passes of the batch on an MLP (see benchmarks) and is
kept as the oracle the fast path is tested against.

Exactness
---------
PyTorch's own forward-mode rules are wrong or missing for some ops. Checked on
torch 2.13 (CPU, float64, against central finite differences and reverse-mode
double backward):

* jvp of jvp is **silently wrong** through ``layer_norm`` (with and without
  affine), training-mode ``batch_norm``, ``instance_norm``, ``linalg.det``,
  ``slogdet``/``logdet``, ``linalg.solve`` and ``cholesky_inverse``;
* ``scaled_dot_product_attention`` (so ``nn.MultiheadAttention`` with
  ``need_weights=False`` and ``nn.TransformerEncoderLayer``) has no forward-mode
  rule, nor double backward on CPU; ``huber_loss``, ``glu`` and
  ``hardsigmoid`` have no second-order forward rule;
* ``vmap(jvp(grad))`` fails on ``F.mse_loss(..., reduction="mean")``.

Both paths therefore run under :class:`_ExactMode`, a ``TorchFunctionMode``
that replaces ``F.layer_norm``, ``F.batch_norm``, ``F.instance_norm``,
``F.scaled_dot_product_attention``, ``F.mse_loss``, ``F.huber_loss``,
``F.glu`` and ``F.hardsigmoid`` with decompositions into primitive ops whose
rules are right, routes ``F.multi_head_attention_forward`` through its explicit
(bmm/softmax) branch, and refuses, with an error naming the op, the ops above
that are silently wrong and have no decomposition here, random ops (dropout in
training mode: the per-sample loss is then not a function of the parameters),
and PyTorch's fused attention kernels. The mode also disables the fused
"fast paths" of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
(they check for torch-function overrides), so those modules take the
decomposable route. The reference path keeps PyTorch's own ``layer_norm``
(its forward-over-reverse rule is right), so the two paths stay independent
where they can.

Samples that interact: training-mode batch norm makes :math:`\ell_i` depend on
the whole batch. The fast path differentiates the i-th entry of the full-batch
loss vector, which is the meaningful per-sample quantity then; the reference
path and ``batch_chunk_size`` would change it (a per-sample vmap normalizes
each sample by its own statistics), so they refuse. The decomposed batch norm
does not update running statistics: computing curvatures has no side effects.
"""

from __future__ import annotations

import inspect
import math
import operator
import weakref
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

Tensor = torch.Tensor
Params = Mapping[str, Tensor]
LossFn = Callable[[Dict[str, Tensor], Any], Tensor]

__all__ = [
    "per_sample_directional_derivatives",
    "per_sample_curvatures",
    "per_sample_hvp",
    "functional_loss",
    "UnsupportedOpError",
]

_METHODS = ("fast", "forward", "reference")


class UnsupportedOpError(RuntimeError):
    """An op whose derivatives PyTorch gets wrong (or that makes the loss random)
    was met on a path where no exact substitute exists."""


class _CoupledSamplesError(UnsupportedOpError):
    """An op that couples samples met a path that evaluates parts of the batch."""


# =================================================================== checks
def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype}"
    return type(x).__name__


def _check_params(op: str, params: object) -> Dict[str, Tensor]:
    if not isinstance(params, Mapping):
        raise TypeError(f"{op}: params must be a dict of tensors, got {_describe(params)}")
    if len(params) == 0:
        raise ValueError(f"{op}: params must hold at least one tensor, got an empty dict")
    out: Dict[str, Tensor] = {}
    for name, p in params.items():
        if not isinstance(p, Tensor):
            raise TypeError(f"{op}: params[{name!r}] must be a torch.Tensor, got {_describe(p)}")
        if not p.is_floating_point():
            raise TypeError(f"{op}: params[{name!r}] must be a floating tensor, got dtype {p.dtype}")
        out[name] = p
    return out


def _check_directions(
    op: str, arg: str, directions: object, params: Dict[str, Tensor], *, leading: bool
) -> Tuple[Dict[str, Tensor], int]:
    """Same keys as params; shape [K, *p.shape] (leading) or p.shape; same dtype/device.

    Returns the directions as a dict and K (1 when not leading).
    """
    if not isinstance(directions, Mapping):
        raise TypeError(f"{op}: {arg} must be a dict of tensors keyed like params, got {_describe(directions)}")
    missing = [k for k in params if k not in directions]
    extra = [k for k in directions if k not in params]
    if missing:
        raise ValueError(
            f"{op}: {arg} is missing keys {missing}; it needs one tensor for every entry of params "
            f"(keys {list(params)}), zeros where the direction has no component"
        )
    if extra:
        raise ValueError(f"{op}: {arg} has keys {extra} that are not in params (keys {list(params)})")
    out: Dict[str, Tensor] = {}
    K: Optional[int] = None
    for name, p in params.items():
        d = directions[name]
        if not isinstance(d, Tensor):
            raise TypeError(f"{op}: {arg}[{name!r}] must be a torch.Tensor, got {_describe(d)}")
        if leading:
            if d.dim() != p.dim() + 1 or tuple(d.shape[1:]) != tuple(p.shape):
                raise ValueError(
                    f"{op}: {arg}[{name!r}] must have shape (K, *params[{name!r}].shape) = "
                    f"(K, {', '.join(map(str, p.shape))}), got {tuple(d.shape)}"
                )
            if K is None:
                K = d.shape[0]
            elif d.shape[0] != K:
                raise ValueError(
                    f"{op}: every tensor of {arg} must have the same leading K; "
                    f"{arg}[{name!r}] has K={d.shape[0]}, earlier entries have K={K}"
                )
        elif tuple(d.shape) != tuple(p.shape):
            raise ValueError(
                f"{op}: {arg}[{name!r}] must have the shape of params[{name!r}], {tuple(p.shape)}, "
                f"got {tuple(d.shape)}"
            )
        if d.dtype != p.dtype:
            raise TypeError(f"{op}: {arg}[{name!r}] must have dtype {p.dtype} like params[{name!r}], got {d.dtype}")
        if d.device != p.device:
            raise ValueError(f"{op}: {arg}[{name!r}] must be on {p.device} like params[{name!r}], got {d.device}")
        out[name] = d
    return out, (K if leading else 1)  # type: ignore[return-value]


def _check_losses(op: str, losses: object, expected_b: Optional[int] = None) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"{op}: loss_fn must return a tensor of per-sample losses of shape [B], got {_describe(losses)}")
    if losses.dim() != 1:
        hint = (
            " (a scalar: build the loss with reduction='none' so it returns one loss per sample)"
            if losses.dim() == 0
            else " (average the extra dimensions per sample, e.g. losses.flatten(1).mean(1))"
        )
        raise ValueError(
            f"{op}: loss_fn must return per-sample losses of shape [B], got shape {tuple(losses.shape)}{hint}"
        )
    if not losses.is_floating_point():
        raise TypeError(f"{op}: loss_fn must return a floating tensor, got dtype {losses.dtype}")
    if expected_b is not None and losses.shape[0] != expected_b:
        raise ValueError(
            f"{op}: loss_fn returned {losses.shape[0]} losses for a batch of {expected_b} samples; "
            f"it must return one loss per sample"
        )
    return losses


def _check_method(op: str, method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"{op}: method must be one of {_METHODS}, got {method!r}")


def _check_chunk(op: str, name: str, value: Optional[int]) -> Optional[int]:
    """None or a positive int; any integer type (numpy's too, via operator.index) becomes an int."""
    if value is None:
        return None
    try:
        index = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        index = None
    if index is None or index < 1:
        raise ValueError(f"{op}: {name} must be None or a positive int, got {value!r}")
    return index


def _batch_size(op: str, batch: Any) -> int:
    """Leading size shared by every tensor leaf of the batch."""
    leaves = [x for x in pytree.tree_leaves(batch) if isinstance(x, Tensor)]
    if not leaves:
        raise ValueError(f"{op}: batch must contain at least one tensor with a leading batch dimension")
    sizes = {x.shape[0] if x.dim() > 0 else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [tuple(x.shape) for x in leaves]
        raise ValueError(
            f"{op}: every tensor of batch must have the same leading batch dimension to be split per sample, "
            f"got shapes {shapes}"
        )
    return sizes.pop()  # type: ignore[return-value]


def _slice_batch(batch: Any, start: int, stop: int) -> Any:
    return pytree.tree_map(lambda x: x[start:stop] if isinstance(x, Tensor) else x, batch)


# ============================================================= exact mode
def _refuse(what: str, why: str, advice: str, error: type = UnsupportedOpError) -> None:
    raise error(f"{what}: {why}. {advice}")


def _acc(x: Tensor) -> Tensor:
    # Half types: the native norms accumulate in float; so do the decompositions.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _standardized(input, dims, eps):
    """(x - mean) / sqrt(var + eps) with the biased mean and variance over ``dims``, computed in
    the accumulation type and returned in ``input``'s dtype."""
    x = _acc(input)
    mean = x.mean(dims, keepdim=True)
    centered = x - mean
    var = (centered * centered).mean(dims, keepdim=True)
    return (centered * torch.rsqrt(var + eps)).to(input.dtype)


def _affine(out, weight, bias):
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    dims = tuple(range(-len(normalized_shape), 0))
    return _affine(_standardized(input, dims, eps), weight, bias)


def _channel_view(t: Optional[Tensor], ndim: int) -> Optional[Tensor]:
    return None if t is None else t.reshape((1, -1) + (1,) * (ndim - 2))


def _normalize(input, mean, var, weight, bias, eps):
    x = _acc(input)
    out = ((x - mean) * torch.rsqrt(var + eps)).to(input.dtype)
    return _affine(out, _channel_view(weight, input.dim()), _channel_view(bias, input.dim()))


def _normalize_by_statistics(input, dims, weight, bias, eps):
    """:func:`_standardized` over ``dims``, then the per-channel affine: batch and instance norm
    in primitive ops."""
    return _affine(_standardized(input, dims, eps), _channel_view(weight, input.dim()),
                   _channel_view(bias, input.dim()))


def _batch_norm_impl(mode, input, running_mean, running_var, weight, bias, training, eps):
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm: expected an input with at least 2 dims (N, C, ...), got shape {tuple(input.shape)}")
    use_batch_stats = training or running_mean is None or running_var is None
    if use_batch_stats:
        mode.coupled("training-mode batch_norm (batch statistics)")
        return _normalize_by_statistics(input, [0] + list(range(2, input.dim())), weight, bias, eps)
    return _normalize(
        input, _channel_view(running_mean, input.dim()), _channel_view(running_var, input.dim()), weight, bias, eps
    )


def _instance_norm_impl(input, running_mean, running_var, weight, bias, use_input_stats, eps):
    if input.dim() < 3:
        raise ValueError(
            f"instance_norm: expected an input with at least 3 dims (N, C, L, ...), got shape {tuple(input.shape)}")
    if use_input_stats:
        return _normalize_by_statistics(input, tuple(range(2, input.dim())), weight, bias, eps)
    return _normalize(
        input, _channel_view(running_mean, input.dim()), _channel_view(running_var, input.dim()), weight, bias, eps
    )


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q k^T * scale + mask) v, PyTorch's documented math, with primitive ops."""
    if dropout_p > 0.0:
        _refuse(
            f"scaled_dot_product_attention(dropout_p={dropout_p})",
            "attention dropout makes the per-sample loss random, so it has no curvature",
            "Call the model in eval mode or set dropout to 0",
        )
    L, S = query.size(-2), key.size(-2)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        if attn_mask is not None:
            raise ValueError("scaled_dot_product_attention: attn_mask and is_causal=True cannot be used together")
        allowed = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.matmul(torch.softmax(scores, dim=-1), value)


def _mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    diff = input - target
    out = diff * diff
    if weight is not None:
        out = out * weight
    return _reduce(out, reduction)


def _huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    diff = input - target
    a = diff.abs()
    out = torch.where(a < delta, 0.5 * diff * diff, delta * (a - 0.5 * delta))
    if weight is not None:
        out = out * weight
    return _reduce(out, reduction)


def _reduce(out: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return out
    if reduction == "mean":
        return out.mean()
    if reduction == "sum":
        return out.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _glu(input, dim=-1):
    a, b = input.chunk(2, dim=dim)
    return a * torch.sigmoid(b)


def _hardsigmoid(input, inplace=False):
    return torch.clamp(input + 3.0, 0.0, 6.0) / 6.0


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class _ExactMode(TorchFunctionMode):
    """Swaps ops with wrong/missing higher-order rules for exact decompositions.

    ``decompose_norms``: replace layer/instance norm (needed for forward over
    forward; the reference path keeps PyTorch's, right under forward over
    reverse). ``per_sample``: the loss is evaluated one sample at a time (vmap)
    or on a slice of the batch, so ops that couple samples must refuse.
    """

    def __init__(self, op: str, *, decompose_norms: bool, per_sample: str = ""):
        super().__init__()
        self.op = op
        self.decompose_norms = decompose_norms
        self.per_sample = per_sample  # "" or a description of why samples are separated
        self.handlers = _handlers(decompose_norms)

    def coupled(self, what: str) -> None:
        if self.per_sample:
            _refuse(
                f"{self.op}: {what}",
                f"it couples the samples of a batch, but {self.per_sample} evaluates the loss on "
                "parts of the batch, which would change each sample's loss",
                "Use method='fast' without batch_chunk_size (it differentiates each entry of the "
                "full-batch loss vector), or put the model in eval mode",
                _CoupledSamplesError,
            )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = self.handlers.get(func)
        if handler is None:
            return func(*args, **kwargs)
        return handler(self, *args, **kwargs)


def _random_op(name: str, training_default: bool):
    """dropout-like ops: (input, p, training/train, ...)."""

    def handler(mode, *args, **kwargs):
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else training_default))
        if training and p > 0:
            _refuse(
                f"{mode.op}: {name}(p={p}) in training mode",
                "dropout makes the per-sample loss random, so it has no gradient or curvature to compute",
                "Call the model in eval mode (model.eval()) or set its dropout to 0",
            )
        return args[0] if args else kwargs["input"]

    return handler


def _silently_wrong(name: str):
    def handler(mode, *args, **kwargs):
        _refuse(
            f"{mode.op}: {name}",
            "PyTorch's forward-mode rule for this op gives wrong second derivatives (checked on torch 2.13)",
            "No exact substitute is implemented; compute this quantity with reverse-mode double backward",
        )

    return handler


def _fused_kernel(name: str):
    def handler(mode, *args, **kwargs):
        _refuse(
            f"{mode.op}: {name}",
            "this fused kernel has no forward-mode (and on CPU no double-backward) rule",
            "Call the public op (e.g. F.scaled_dot_product_attention / nn.MultiheadAttention), which the engine "
            "replaces with an exact decomposition",
        )

    return handler


def _handlers(decompose_norms: bool) -> Dict[Callable, Callable]:
    h: Dict[Callable, Callable] = {}

    def add(funcs: Iterable[Optional[Callable]], handler: Callable) -> None:
        for f in funcs:
            if f is not None:
                h[f] = handler

    g = lambda name: getattr(torch, name, None)  # noqa: E731

    # Batch norm: decomposed on both paths, because the coupling check must see it.
    add([F.batch_norm], lambda m, input, running_mean, running_var, weight=None, bias=None, training=False,
        momentum=0.1, eps=1e-5: _batch_norm_impl(m, input, running_mean, running_var, weight, bias, training, eps))
    add([torch.batch_norm], lambda m, input, weight, bias, running_mean, running_var, training, momentum, eps,
        cudnn_enabled=True: _batch_norm_impl(m, input, running_mean, running_var, weight, bias, training, eps))
    if decompose_norms:
        add([F.layer_norm, torch.layer_norm], lambda m, *a, **k: _layer_norm(*a, **k))
        add([F.instance_norm], lambda m, input, running_mean=None, running_var=None, weight=None, bias=None,
            use_input_stats=True, momentum=0.1, eps=1e-5: _instance_norm_impl(
                input, running_mean, running_var, weight, bias, use_input_stats, eps))
        add([torch.instance_norm], lambda m, input, weight, bias, running_mean, running_var, use_input_stats,
            momentum, eps, cudnn_enabled=True: _instance_norm_impl(
                input, running_mean, running_var, weight, bias, use_input_stats, eps))
        for name in ("native_layer_norm", "native_batch_norm", "_native_batch_norm_legit",
                     "_native_batch_norm_legit_no_training", "native_group_norm"):
            add([g(name)], _silently_wrong(f"torch.{name} (called directly)"))
    for name in ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"):
        if g(name) not in h:
            add([g(name)], _silently_wrong(f"torch.{name} (called directly)"))

    # Attention: no forward-mode rule for the fused kernels.
    add([F.scaled_dot_product_attention], lambda m, *a, **k: _sdpa(*a, **k))
    add([F.multi_head_attention_forward], _mha_forward)
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_native_multi_head_attention", "_transformer_encoder_layer_fwd"):
        add([g(name)], _fused_kernel(f"torch.{name}"))

    # Losses and activations without a (second-order) forward rule.
    add([F.mse_loss], lambda m, *a, **k: _mse_loss(*a, **k))
    add([F.huber_loss], lambda m, *a, **k: _huber_loss(*a, **k))
    add([F.glu], lambda m, *a, **k: _glu(*a, **k))
    add([F.hardsigmoid], lambda m, *a, **k: _hardsigmoid(*a, **k))

    # Silently wrong under jvp of jvp and not decomposed here.
    for f, name in ((torch.det, "torch.det"), (torch.linalg.det, "torch.linalg.det"),
                    (torch.logdet, "torch.logdet"), (torch.slogdet, "torch.slogdet"),
                    (torch.linalg.slogdet, "torch.linalg.slogdet"), (torch.linalg.solve, "torch.linalg.solve"),
                    (torch.linalg.solve_ex, "torch.linalg.solve_ex"),
                    (torch.cholesky_inverse, "torch.cholesky_inverse"),
                    (Tensor.det, "Tensor.det"), (Tensor.logdet, "Tensor.logdet"), (Tensor.slogdet, "Tensor.slogdet"),
                    (Tensor.cholesky_inverse, "Tensor.cholesky_inverse")):
        add([f], _silently_wrong(name))

    # Random ops: the loss would not be a function of the parameters.
    for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
        add([f], _random_op(f"F.{f.__name__}", True))
    for f in (F.alpha_dropout, F.feature_alpha_dropout):
        add([f], _random_op(f"F.{f.__name__}", False))
    for name in ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"):
        add([g(name)], _random_op(f"torch.{name}", True))
    add([F.rrelu], _rrelu)
    return h


def _rrelu(mode, input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    if training:
        _refuse(f"{mode.op}: rrelu in training mode", "it draws a random slope, so the loss is random",
                "Call the model in eval mode")
    return F.rrelu(input, lower, upper, False, False)


def _mha_forward(mode, *args, **kwargs):
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    if a["training"] and a["dropout_p"] > 0:
        _refuse(
            f"{mode.op}: multi_head_attention_forward(dropout_p={a['dropout_p']}) in training mode",
            "attention dropout makes the per-sample loss random",
            "Call the model in eval mode or build MultiheadAttention with dropout=0",
        )
    need_weights = a["need_weights"]
    # need_weights=True takes the explicit bmm/softmax branch (exact rules)
    # instead of scaled_dot_product_attention (no forward-mode rule); the
    # output is the same, the attention weights come for free.
    a["need_weights"] = True
    out, weights = F.multi_head_attention_forward(**a)
    return out, (weights if need_weights else None)


def _wrap_errors(op: str, exc: NotImplementedError) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"{op}: PyTorch has no higher-order rule for an op of this model: {exc}. "
        "Decompose the op into primitive ops, or file an issue naming it"
    )


# ========================================================= Taylor mode
class _JetFallback(Exception):
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


class _JetMode(TorchFunctionMode):
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
      PyTorch's rules, with the :class:`_ExactMode` substitutions applied first).

    The jets live in a side table keyed by tensor identity, with weak
    references, so activations are freed as in a plain forward pass. Anything
    unusual on a jet (in-place ops, ``out=``) raises :class:`_JetFallback`.
    """

    def __init__(self, exact: _ExactMode):
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
                raise _JetFallback(f"{name}: an input was computed outside the jet mode (autograd.Function?)")
        if not any(j is not None for j in jets) or (name in _METADATA and func not in _JET_RULES):
            # no jet in, or metadata (shape, dtype, .data, item(), ...): no derivative out
            return self._call(func, args, kwargs)
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            raise _JetFallback(f"custom op {func} on a jet: its forward-mode support is unknown")
        if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS or "out" in kwargs \
                or kwargs.get("inplace", False):
            raise _JetFallback(f"in-place op {name} on a tensor that carries a jet")
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
                raise _JetFallback(f"{getattr(func, '__name__', func)} returned no tensor from a jet input")
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
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    if (a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"] or a["static_k"] is not None
            or a["static_v"] is not None):
        return NotImplemented  # rare options: one generic (nested jvp) step for the whole op
    if a["training"] and a["dropout_p"] > 0:
        _mha_forward(mode.exact, *args, **kwargs)  # refuses
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


# ================================================================== helpers
def _direction(directions: Dict[str, Tensor], k: int) -> Dict[str, Tensor]:
    return {name: d[k] for name, d in directions.items()}


def _over_directions(
    fn: Callable[[Dict[str, Tensor]], Tensor], directions: Dict[str, Tensor], K: int, chunk_size: Optional[int]
) -> Tensor:
    """Stacks fn(direction_k) ([B] each) into [B, K]: a loop, or vmap in chunks."""
    if chunk_size is None or chunk_size == 1 or K == 1:
        return torch.stack([fn(_direction(directions, k)) for k in range(K)], dim=1)
    return torch.func.vmap(fn, in_dims=(0,), out_dims=1, chunk_size=chunk_size)(directions)


def _over_batch(fn: Callable[[Any], Tensor], batch: Any, batch_chunk_size: Optional[int], B: int) -> Tensor:
    if batch_chunk_size is None or batch_chunk_size >= B:
        return fn(batch)
    return torch.cat([fn(_slice_batch(batch, s, min(s + batch_chunk_size, B))) for s in range(0, B, batch_chunk_size)])


def _per_sample_loss(op: str, loss_fn: LossFn, batch: Any) -> Tuple[Callable, Any]:
    """(single(params, sample) -> scalar, in_dims) for vmap over the batch's dim 0."""
    in_dims = pytree.tree_map(lambda x: 0 if isinstance(x, Tensor) else None, batch)

    def single(p: Dict[str, Tensor], sample: Any) -> Tensor:
        one = pytree.tree_map(lambda x: x.unsqueeze(0) if isinstance(x, Tensor) else x, sample)
        return _check_losses(op, _call_loss(loss_fn, p, one), 1)[0]

    return single, in_dims


class _NoGradAsConstant(TorchFunctionMode):
    """Inside loss_fn, a result computed under ``torch.no_grad()`` is a constant, like ``.detach()``.

    Reverse mode already sees it so, but forward mode (``torch.func.jvp``) ignores no_grad and
    would differentiate through it; detaching the results makes every path agree.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            return out
        inputs = {id(x) for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, Tensor)}
        # an in-place op returns its input: keep it as it is
        return pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) and id(t) not in inputs else t, out)


def _call_loss(loss_fn: LossFn, p: Dict[str, Tensor], batch: Any) -> Tensor:
    # grad mode on at entry (the caller may be under no_grad): only no_grad inside loss_fn makes constants
    with torch.enable_grad(), _NoGradAsConstant():
        return loss_fn(p, batch)


def _n_out(op: str, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any) -> int:
    with torch.no_grad():
        return _check_losses(op, loss_fn(params, batch)).shape[0]


def _common_checks(op, loss_fn, params, method, chunk_size, batch_chunk_size):
    if not callable(loss_fn):
        raise TypeError(f"{op}: loss_fn must be callable as loss_fn(params, batch), got {_describe(loss_fn)}")
    _check_method(op, method)
    chunk_size = _check_chunk(op, "chunk_size", chunk_size)
    batch_chunk_size = _check_chunk(op, "batch_chunk_size", batch_chunk_size)
    return _check_params(op, params), chunk_size, batch_chunk_size


def _fast_mode(op: str, batch_chunked: bool) -> _ExactMode:
    return _ExactMode(op, decompose_norms=True, per_sample="batch_chunk_size" if batch_chunked else "")


# ==================================================================== API
def per_sample_directional_derivatives(
    loss_fn: LossFn,
    params: Params,
    directions: Params,
    batch: Any,
    *,
    method: str = "fast",
    chunk_size: Optional[int] = None,
    batch_chunk_size: Optional[int] = None,
) -> Tensor:
    r"""Per-sample directional derivatives :math:`g_{ik} = n_k^\top \nabla_\theta \ell(\theta, x_i)`.

    Args:
        loss_fn: ``loss_fn(params, batch) -> [B]`` per-sample losses.
        params: dict of floating tensors, the point :math:`\theta`.
        directions: dict with params' keys; each tensor ``[K, *params[name].shape]``.
        batch: anything ``loss_fn`` accepts (tensor, tuple, dict, ...). Only
            ``method="reference"`` and ``batch_chunk_size`` split it, along
            dim 0 of every tensor it holds.
        method: ``"fast"`` or ``"forward"`` (both: one forward-mode pass of the batch
            per direction) or ``"reference"`` (``vmap`` over samples of ``grad``, then dot with n).
            On every method, results computed under ``torch.no_grad()`` inside ``loss_fn`` are
            constants (as with ``.detach()``), see the module doc.
        chunk_size: directions evaluated together under ``vmap`` (None: one at a time).
        batch_chunk_size: samples per evaluation (None: the whole batch). Only for
            models whose samples do not interact.

    Returns:
        ``[B, K]`` tensor, dtype of the losses.
    """
    op = "symfast.per_sample_directional_derivatives"
    params, chunk_size, batch_chunk_size = _common_checks(op, loss_fn, params, method, chunk_size, batch_chunk_size)
    directions, K = _check_directions(op, "directions", directions, params, leading=True)

    if method == "reference":
        B = _batch_size(op, batch)
        single, in_dims = _per_sample_loss(op, loss_fn, batch)
        with _ExactMode(op, decompose_norms=False, per_sample="method='reference' (vmap over samples)"):
            grads = torch.func.vmap(torch.func.grad(single), in_dims=(None, in_dims))(params, batch)
        # explicit sizes: -1 cannot be inferred from an empty tensor (B = 0 or K = 0)
        out = sum(torch.einsum("bp,kp->bk", grads[k].reshape(B, params[k].numel()),
                               directions[k].reshape(K, params[k].numel())) for k in params)
        return out  # type: ignore[return-value]

    B = _batch_size(op, batch) if batch_chunk_size is not None else None

    def on(part: Any) -> Tensor:
        along = _along_fn(op, loss_fn, part)
        return _over_directions(lambda n: along(params, n), directions, K, chunk_size)

    try:
        with _fast_mode(op, batch_chunk_size is not None):
            if K == 0:
                return _empty_result(op, loss_fn, params, batch)
            return _over_batch(on, batch, batch_chunk_size, B or 0)
    except NotImplementedError as exc:
        raise _wrap_errors(op, exc) from exc


def _empty_result(op, loss_fn, params, batch) -> Tensor:
    losses = _check_losses(op, loss_fn(params, batch))
    return losses.new_zeros(losses.shape[0], 0)


def _along_fn(op: str, loss_fn: LossFn, part: Any):
    """(p, n) -> the per-sample losses' derivative at p along n: one jvp."""
    def along(p: Dict[str, Tensor], n: Dict[str, Tensor]) -> Tensor:
        return torch.func.jvp(lambda q: _check_losses(op, _call_loss(loss_fn, q, part)), (p,), (n,))[1]

    return along


def _second_fn(op: str, loss_fn: LossFn, params: Dict[str, Tensor], part: Any):
    along = _along_fn(op, loss_fn, part)

    def second(n: Dict[str, Tensor], m: Dict[str, Tensor]) -> Tensor:
        return torch.func.jvp(lambda p: along(p, n), (params,), (m,))[1]

    return second


def per_sample_curvatures(
    loss_fn: LossFn,
    params: Params,
    directions: Params,
    batch: Any,
    *,
    method: str = "fast",
    chunk_size: Optional[int] = None,
    batch_chunk_size: Optional[int] = None,
) -> Tensor:
    r"""Per-sample curvatures :math:`h_{ik} = n_k^\top H(x_i)\, n_k = \partial_t^2 \ell(\theta + t n_k, x_i)|_{t=0}`.

    ``method="fast"``: second-order Taylor mode on the whole batch, one pass per
    direction (about 2 forward+backward passes of an MLP), falling back to
    ``"forward"`` where the jets cannot follow the model (see the module doc);
    ``chunk_size > 1`` uses ``"forward"``. ``method="forward"``: jvp of jvp of
    the batch loss along each direction. ``method="reference"``: ``vmap`` over
    samples of ``jvp(grad(loss))``. No path but the reference forms a
    per-sample parameter-sized tensor. Arguments as in
    :func:`per_sample_directional_derivatives`; results computed under
    ``torch.no_grad()`` inside ``loss_fn`` are constants on every method.

    Returns:
        ``[B, K]`` tensor.
    """
    op = "symfast.per_sample_curvatures"
    params, chunk_size, batch_chunk_size = _common_checks(op, loss_fn, params, method, chunk_size, batch_chunk_size)
    directions, K = _check_directions(op, "directions", directions, params, leading=True)

    if method == "reference":
        hv = _reference_hvps(op, loss_fn, params, batch, directions, K, chunk_size)
        B = next(iter(hv.values())).shape[1]
        out = sum((hv[k] * directions[k].unsqueeze(1)).reshape(K, B, params[k].numel()).sum(-1) for k in params)
        return out.T  # type: ignore[union-attr]

    B = _batch_size(op, batch) if batch_chunk_size is not None else 0
    if K == 0:
        with _fast_mode(op, False):
            return _empty_result(op, loss_fn, params, batch)
    try:
        if method == "fast" and (chunk_size is None or chunk_size == 1 or K == 1):
            try:
                exact = _fast_mode(op, batch_chunk_size is not None)
                return _over_batch(
                    lambda part: torch.stack(
                        [_jet_curvature(op, loss_fn, params, _direction(directions, k), part, exact)
                         for k in range(K)], dim=1),
                    batch, batch_chunk_size, B)
            except _JetFallback:
                pass  # something the jets do not handle: nested forward mode below
        with _fast_mode(op, batch_chunk_size is not None):
            def on(part):
                second = _second_fn(op, loss_fn, params, part)
                return _over_directions(lambda n: second(n, n), directions, K, chunk_size)

            return _over_batch(on, batch, batch_chunk_size, B)
    except NotImplementedError as exc:
        raise _wrap_errors(op, exc) from exc


def _jet_curvature(op: str, loss_fn: LossFn, params: Dict[str, Tensor], n: Dict[str, Tensor], part: Any,
                   exact: _ExactMode) -> Tensor:
    """n^T H(x_i) n for every sample by second-order Taylor mode (see _JetMode)."""
    # Fresh leaves sharing storage (no copy): tied parameters get their own jet, and
    # requires_grad marks everything computed from them (see _JetMode.__torch_function__).
    # The autograd graph is recorded but keeps no tensors and is never run.
    aliases = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    mode = _JetMode(exact)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _drop):
        with mode:
            for k, p in aliases.items():
                mode.put(p, n[k], None)
            losses = _check_losses(op, loss_fn(aliases, part))
            jet = mode.get(losses)
    if losses.grad_fn is not None and jet is None:
        raise _JetFallback("the losses were computed outside the jet mode")
    losses = losses.detach()
    if jet is None or jet[1] is None:
        return torch.zeros_like(losses)  # the losses do not depend on the parameters along n
    return jet[1].detach()


def _drop(_x: Any) -> None:
    return None


def _reference_hvps(op, loss_fn, params, batch, directions, K, chunk_size) -> Dict[str, Tensor]:
    """{name: [K, B, *shape]} = H(x_i) n_k by vmap over samples of jvp(grad)."""
    single, in_dims = _per_sample_loss(op, loss_fn, batch)

    def hvp_one(n, sample):
        return torch.func.jvp(lambda p: torch.func.grad(single)(p, sample), (params,), (n,))[1]

    per_sample = torch.func.vmap(hvp_one, in_dims=(None, in_dims))
    with _ExactMode(op, decompose_norms=False, per_sample="method='reference' (vmap over samples)"):
        if K == 0:  # no direction: nothing to stack
            B = _batch_size(op, batch)
            return {name: p.new_zeros((0, B) + tuple(p.shape)) for name, p in params.items()}
        if chunk_size is None or chunk_size == 1 or K == 1:
            outs = [per_sample(_direction(directions, k), batch) for k in range(K)]
            return {name: torch.stack([o[name] for o in outs]) for name in params}
        return torch.func.vmap(per_sample, in_dims=(0, None), chunk_size=chunk_size)(directions, batch)


def per_sample_hvp(
    loss_fn: LossFn,
    params: Params,
    direction: Params,
    batch: Any,
    onto: Optional[Params] = None,
    *,
    method: str = "fast",
    chunk_size: Optional[int] = None,
    batch_chunk_size: Optional[int] = None,
) -> Union[Dict[str, Tensor], Tensor]:
    r"""Per-sample Hessian-vector products :math:`H(x_i)\, n`, or :math:`m_k^\top H(x_i)\, n`.

    Args:
        direction: dict with params' keys, each tensor of its parameter's shape
            (one direction, no K dimension).
        onto: optional dict like ``directions`` (``[K, *shape]`` tensors).

    Results computed under ``torch.no_grad()`` inside ``loss_fn`` are constants
    on every method (as with ``.detach()``), see the module doc.

    Returns:
        Without ``onto``: dict ``{name: [B, *params[name].shape]}`` with
        :math:`H(x_i) n` (per-sample parameter-sized: B times the parameters).
        The fast path is reverse over forward per sample (``vmap`` over samples
        of ``grad`` of the jvp along n), ``batch_chunk_size`` samples at a time;
        for models whose samples interact (training-mode batch norm) it falls
        back to one reverse pass of the whole batch per sample.

        With ``onto``: ``[B, K]`` tensor of :math:`m_k^\top H(x_i) n =
        \partial_s \partial_t \ell(\theta + s m_k + t n, x_i)`, by nested
        forward mode on the whole batch (no per-sample parameter-sized tensor).
    """
    op = "symfast.per_sample_hvp"
    params, chunk_size, batch_chunk_size = _common_checks(op, loss_fn, params, method, chunk_size, batch_chunk_size)
    direction, _ = _check_directions(op, "direction", direction, params, leading=False)
    if onto is not None:
        onto, K = _check_directions(op, "onto", onto, params, leading=True)

    if method == "reference":
        hv = _reference_hvps(op, loss_fn, params, batch, {k: v.unsqueeze(0) for k, v in direction.items()}, 1, None)
        hv = {k: v[0] for k, v in hv.items()}
        if onto is None:
            return hv
        B = next(iter(hv.values())).shape[0]
        return sum(  # type: ignore[return-value]
            torch.einsum("bp,kp->bk", hv[k].reshape(B, params[k].numel()), onto[k].reshape(K, params[k].numel()))
            for k in params)

    if onto is not None:
        B = _batch_size(op, batch) if batch_chunk_size is not None else 0
        try:
            with _fast_mode(op, batch_chunk_size is not None):
                if K == 0:
                    return _empty_result(op, loss_fn, params, batch)

                def on(part):
                    second = _second_fn(op, loss_fn, params, part)
                    return _over_directions(lambda m: second(direction, m), onto, K, chunk_size)

                return _over_batch(on, batch, batch_chunk_size, B)
        except NotImplementedError as exc:
            raise _wrap_errors(op, exc) from exc

    B = _batch_size(op, batch)
    try:
        return _per_sample_hvp_full(op, loss_fn, params, direction, batch, B, batch_chunk_size)
    except _CoupledSamplesError:
        pass
    except NotImplementedError as exc:
        raise _wrap_errors(op, exc) from exc
    if batch_chunk_size is not None:
        raise UnsupportedOpError(
            f"{op}: the model couples the samples of a batch (training-mode batch norm), so the batch "
            "cannot be split: call it without batch_chunk_size"
        )
    return _coupled_hvp_full(op, loss_fn, params, direction, batch)


def _per_sample_hvp_full(op, loss_fn, params, direction, batch, B, batch_chunk_size):
    single, in_dims = _per_sample_loss(op, loss_fn, batch)

    def tangent(p, sample):  # n^T grad l(p, x_i), forward mode
        return torch.func.jvp(lambda q: single(q, sample), (p,), (direction,))[1]

    per_sample = torch.func.vmap(torch.func.grad(tangent), in_dims=(None, in_dims))
    with _ExactMode(op, decompose_norms=True, per_sample="the per-sample Hessian-vector product (vmap over samples)"):
        if batch_chunk_size is None or batch_chunk_size >= B:
            return per_sample(params, batch)
        parts = [per_sample(params, _slice_batch(batch, s, min(s + batch_chunk_size, B)))
                 for s in range(0, B, batch_chunk_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in params}


def _coupled_hvp_full(op, loss_fn, params, direction, batch):
    """Row i of the Jacobian of the [B] vector n^T grad l_i(theta) of the full batch: O(B) reverse passes."""
    with _ExactMode(op, decompose_norms=True):
        def tangent(p):
            return torch.func.jvp(lambda q: _check_losses(op, _call_loss(loss_fn, q, batch)), (p,), (direction,))[1]

        out, vjp_fn = torch.func.vjp(tangent, params)
        eye = torch.eye(out.shape[0], dtype=out.dtype, device=out.device)
        return torch.func.vmap(vjp_fn)(eye)[0]


# ====================================================== module convenience
def functional_loss(
    module: torch.nn.Module,
    loss: Callable[[Tensor, Any], Tensor],
    *,
    parameters: Optional[Sequence[str]] = None,
    weight_decay: float = 0.0,
) -> Tuple[LossFn, Dict[str, Tensor]]:
    r"""``(loss_fn, params)`` for a module and a loss, ready for the engine.

    ``loss_fn(params, (inputs, targets))`` runs
    ``loss(torch.func.functional_call(module, params, inputs), targets)``
    (``inputs`` may be a tuple of positional inputs) and returns per-sample
    losses ``[B]``: the loss must be built with ``reduction="none"``; extra
    dimensions (e.g. per-element MSE ``[B, D]``) are averaged per sample, so
    the mean of the per-sample losses is the ``reduction="mean"`` loss.
    ``weight_decay`` adds :math:`\gamma \|\theta\|^2` (the paper's eq. 1,
    over the selected parameters) to every per-sample loss, which adds
    :math:`2\gamma \|n\|^2` to every curvature.

    Args:
        module: the model. Its buffers (batch-norm running statistics) are read, never
            updated: every call works on copies.
        loss: ``loss(outputs, targets) -> [B] or [B, ...]``.
        parameters: names of the parameters to differentiate (default: every
            parameter that requires grad); the others stay fixed.

    Returns:
        ``loss_fn`` and ``params``, detached copies (no autograd history) of the
        selected parameters.
    """
    op = "symfast.functional_loss"
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{op}: module must be a torch.nn.Module, got {_describe(module)}")
    if not callable(loss):
        raise TypeError(f"{op}: loss must be callable as loss(outputs, targets), got {_describe(loss)}")
    reduction = getattr(loss, "reduction", "none")
    if reduction != "none":
        raise ValueError(
            f"{op}: loss must return per-sample losses; got a {type(loss).__name__} with "
            f"reduction={reduction!r}, build it with reduction='none'"
        )
    named = dict(module.named_parameters())
    if parameters is None:
        names = [n for n, p in named.items() if p.requires_grad]
    else:
        names = list(parameters)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(f"{op}: parameters {unknown} are not parameters of the module (it has {list(named)})")
    params = {n: named[n].detach() for n in names}
    gamma = float(weight_decay)

    def loss_fn(p: Dict[str, Tensor], batch: Any) -> Tensor:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"{op}: batch must be a pair (inputs, targets), got {_describe(batch)}")
        inputs, targets = batch
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        # Buffers are copied inside the (transformed) call: training-mode batch
        # norm increments num_batches_tracked in place, which torch.func refuses
        # on captured tensors, and a diagnostic must not change the model.
        state = {k: b.clone() for k, b in module.named_buffers()}
        # parameters not differentiated are constants (detached: no autograd history)
        state.update({k: v.detach() for k, v in module.named_parameters() if k not in p})
        state.update(p)
        out = loss(torch.func.functional_call(module, state, args), targets)
        if not isinstance(out, Tensor) or out.dim() == 0:
            raise ValueError(
                f"{op}: loss returned {_describe(out)}; it must return per-sample losses "
                "(build it with reduction='none')"
            )
        if out.dim() > 1:
            out = out.reshape(out.shape[0], -1).mean(1)
        if gamma:
            out = out + gamma * sum((v * v).sum() for v in p.values())
        return out

    return loss_fn, params
