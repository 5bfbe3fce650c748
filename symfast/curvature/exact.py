r"""Exact mode: a ``TorchFunctionMode`` that makes forward mode exact.

It replaces the ops whose forward-mode (or second-order) rules PyTorch gets wrong or lacks with
decompositions into primitive ops whose rules are right, and refuses, with an error naming the op,
the ones that have no decomposition here, random ops and fused attention kernels. See the package
docstring for the list and why.
"""

from __future__ import annotations

import functools
import inspect
import math
from types import MappingProxyType
from typing import Callable, Dict, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .checks import CoupledSamplesError, UnsupportedOpError


Tensor = torch.Tensor


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
    if attn_mask is None:
        return torch.matmul(torch.softmax(scores, dim=-1), value)
    if attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
        no_key = ~attn_mask.any(dim=-1, keepdim=True)
    else:
        scores = scores + attn_mask
        no_key = torch.isneginf(attn_mask).all(dim=-1, keepdim=True)
    # A query row that the mask allows to see no key (a left-padded position
    # of an HF model) has the output 0 in torch >= 2.5 (its "safe softmax"),
    # not softmax([-inf, ...]) = NaN. Those rows are constant, so their scores
    # are replaced by zeros before the softmax (finite jets) and their weights
    # by zeros after it; the mask is data, not a parameter, so this holds for
    # every derivative too.
    scores = scores.masked_fill(no_key, 0.0)
    weights = torch.softmax(scores, dim=-1).masked_fill(no_key, 0.0)
    return torch.matmul(weights, value)


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


MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class ExactMode(TorchFunctionMode):
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
                CoupledSamplesError,
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


@functools.lru_cache(maxsize=None)
def _handlers(decompose_norms: bool) -> Mapping[Callable, Callable]:
    # Built once per flag, read-only: every engine call enters this mode, and rebuilding the table
    # each time cost 0.25 ms, 4% of a replayed call on a small model.
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
    add([F.multi_head_attention_forward], mha_forward)
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
    return MappingProxyType(h)


def _rrelu(mode, input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    if training:
        _refuse(f"{mode.op}: rrelu in training mode", "it draws a random slope, so the loss is random",
                "Call the model in eval mode")
    return F.rrelu(input, lower, upper, False, False)


def mha_forward(mode, *args, **kwargs):
    bound = MHA_SIGNATURE.bind(*args, **kwargs)
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


def wrap_errors(op: str, exc: NotImplementedError) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"{op}: PyTorch has no higher-order rule for an op of this model: {exc}. "
        "Decompose the op into primitive ops, or file an issue naming it"
    )
