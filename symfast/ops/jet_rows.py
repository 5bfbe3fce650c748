"""Registration glue for the jet row ops: checks, fake kernels, autograd, thin wrappers.

The ops (``torch.ops.symfast.jet_layer_norm``, ``jet_rms_norm``, ``jet_softmax``,
``jet_cross_entropy``) are declared in ``csrc/ops.cpp`` with CPU and CUDA kernels in
``csrc/{cpu,cuda}/jet_rows.*``; their pure-PyTorch twins are in :mod:`symfast.reference`.
A second-order jet of x along K directions is ``(x, x1, x2)``, x1 and x2 of shape
``(K, *x.shape)``; each op returns ``(y, y1, y2)`` with ``y1 = f'(x) x1`` and
``y2 = f'(x) x2 + f''(x)[x1, x1]``, a missing tangent counting as zero.

* one check function per op, shared by the wrapper and the fake kernel, so that eager
  calls and ``torch.compile`` tracing reject the same input with the same message as the
  C++ checks (``csrc/jet_rows_checks.h``) of a direct ``torch.ops.symfast.*`` call;
* ``register_fake`` for ``torch.compile(fullgraph=True)``;
* ``register_autograd``: the backward is the vector-Jacobian product of the reference
  twin (``torch.func.vjp``), plain differentiable torch code, so gradients of any order
  work (the curvature engine calls these ops forward only; gradients are a convenience).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.symfast.*)
from .. import reference
from .checks import FLOAT_DTYPES, DeviceMismatchError, require_tensor

Tensor = torch.Tensor
Jet = Tuple[Tensor, Tensor, Tensor]
_lib_ops = torch.ops.symfast

_LAYER_NORM = "symfast.jet_layer_norm"
_RMS_NORM = "symfast.jet_rms_norm"
_SOFTMAX = "symfast.jet_softmax"
_CROSS_ENTROPY = "symfast.jet_cross_entropy"


# ------------------------------------------------------------------- checks
def _shape_str(shape) -> str:
    shape = tuple(int(s) for s in shape)
    return str(shape)


def _shape_with_k(k: Optional[int], base) -> str:
    head = "K" if k is None else str(k)
    return "(" + ", ".join([head] + [str(int(s)) for s in base]) + ("" if len(base) else ",") + ")"


def _check_primal(op: str, name: str, x) -> None:
    require_tensor(op, name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float64, float16 or bfloat16, got {x.dtype}")


def _check_like(op: str, name: str, t: Tensor, x: Tensor, xname: str) -> None:
    require_tensor(op, name, t)
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {xname} ({x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise DeviceMismatchError(f"{op}: {name} must be on {xname}'s device ({x.device}), got {t.device}")


class _Directions:
    """K, the number of directions, and the tangent it was read from."""

    def __init__(self) -> None:
        self.k: Optional[int] = None
        self.source = ""

    def check(self, op: str, name: str, t: Optional[Tensor], x: Tensor, xname: str, base, base_name: str) -> None:
        """t, when given, has shape (K, *base); the first tangent given fixes K."""
        if t is None:
            return
        _check_like(op, name, t, x, xname)
        base = tuple(base)
        ok = t.dim() == len(base) + 1 and tuple(t.shape[1:]) == base
        ok = ok and (self.k is None or t.shape[0] == self.k)
        if not ok:
            source = "" if self.k is None else f" (K from {self.source})"
            raise ValueError(f"{op}: {name} must have shape (K, *{base_name}) = {_shape_with_k(self.k, base)}"
                             f"{source}, got {_shape_str(t.shape)}")
        if self.k is None:
            self.k, self.source = t.shape[0], name

    def require(self, op: str, names: str) -> int:
        if self.k is None:
            raise ValueError(f"{op}: at least one of {names} must be given (K, the number of directions, is read "
                             "from them), got none")
        return self.k


def _check_normalized_shape(op: str, x: Tensor, normalized_shape: Sequence[int]) -> Tuple[int, ...]:
    ns = tuple(int(s) for s in normalized_shape)
    if not (1 <= len(ns) <= x.dim() and tuple(x.shape[x.dim() - len(ns):]) == ns):
        raise ValueError(f"{op}: normalized_shape must be non-empty and equal the trailing dims of x "
                         f"{_shape_str(x.shape)}, got {_shape_str(ns)}")
    return ns


def _check_param(op: str, name: str, t: Optional[Tensor], x: Tensor, ns) -> None:
    if t is None:
        return
    _check_like(op, name, t, x, "x")
    if tuple(t.shape) != ns:
        raise ValueError(f"{op}: {name} must have shape normalized_shape = {_shape_str(ns)}, got {_shape_str(t.shape)}")


def _check_param_given(op: str, name: str, jet: Optional[Tensor], param: str, p: Optional[Tensor]) -> None:
    if jet is not None and p is None:
        raise ValueError(f"{op}: {name} was given without {param} (without {param} there is nothing for its jet "
                         "to move)")


def check_jet_layer_norm(x, x1, x2, normalized_shape, weight, bias, weight1, bias1, weight2, bias2) -> int:
    """Validates a jet_layer_norm call; returns K."""
    op = _LAYER_NORM
    _check_primal(op, "x", x)
    ns = _check_normalized_shape(op, x, normalized_shape)
    _check_param(op, "weight", weight, x, ns)
    _check_param(op, "bias", bias, x, ns)
    dirs = _Directions()
    for name, t in (("x1", x1), ("x2", x2)):
        dirs.check(op, name, t, x, "x", x.shape, "x.shape")
    for name, t in (("weight1", weight1), ("bias1", bias1), ("weight2", weight2), ("bias2", bias2)):
        dirs.check(op, name, t, x, "x", ns, "normalized_shape")
    _check_param_given(op, "weight1", weight1, "weight", weight)
    _check_param_given(op, "weight2", weight2, "weight", weight)
    _check_param_given(op, "bias1", bias1, "bias", bias)
    _check_param_given(op, "bias2", bias2, "bias", bias)
    return dirs.require(op, "x1, x2, weight1, bias1, weight2, bias2")


def check_jet_rms_norm(x, x1, x2, normalized_shape, weight, weight1, weight2) -> int:
    """Validates a jet_rms_norm call; returns K."""
    op = _RMS_NORM
    _check_primal(op, "x", x)
    ns = _check_normalized_shape(op, x, normalized_shape)
    _check_param(op, "weight", weight, x, ns)
    dirs = _Directions()
    for name, t in (("x1", x1), ("x2", x2)):
        dirs.check(op, name, t, x, "x", x.shape, "x.shape")
    for name, t in (("weight1", weight1), ("weight2", weight2)):
        dirs.check(op, name, t, x, "x", ns, "normalized_shape")
    _check_param_given(op, "weight1", weight1, "weight", weight)
    _check_param_given(op, "weight2", weight2, "weight", weight)
    return dirs.require(op, "x1, x2, weight1, weight2")


def check_jet_softmax(x, x1, x2, dim: int) -> int:
    """Validates a jet_softmax call; returns K. An out-of-range dim is an IndexError, as in torch."""
    op = _SOFTMAX
    _check_primal(op, "x", x)
    nd = max(x.dim(), 1)  # torch treats a 0-d tensor as one row of one element
    if not -nd <= dim < nd:
        plural = "" if x.dim() == 1 else "s"
        raise IndexError(f"{op}: dim must be in the range [{-nd}, {nd - 1}] for x with {x.dim()} dimension{plural}, "
                         f"got {dim}")
    dirs = _Directions()
    for name, t in (("x1", x1), ("x2", x2)):
        dirs.check(op, name, t, x, "x", x.shape, "x.shape")
    return dirs.require(op, "x1, x2")


def check_jet_cross_entropy(z, z1, z2, target) -> int:
    """Validates a jet_cross_entropy call's shapes and dtypes; returns K. Whether the targets are
    in range depends on their values, so the kernels check that (a fake tensor has none)."""
    op = _CROSS_ENTROPY
    _check_primal(op, "z", z)
    if z.dim() != 2:
        raise ValueError(f"{op}: z must have shape (N, C), got {_shape_str(z.shape)}")
    require_tensor(op, "target", target)
    if target.dtype != torch.int64:
        raise TypeError(f"{op}: target must hold int64 class indices, got {target.dtype}")
    if target.device != z.device:
        raise DeviceMismatchError(f"{op}: target must be on z's device ({z.device}), got {target.device}")
    if target.dim() != 1 or target.shape[0] != z.shape[0]:
        raise ValueError(f"{op}: target must have shape (N,) = ({z.shape[0]},), got {_shape_str(target.shape)}")
    dirs = _Directions()
    for name, t in (("z1", z1), ("z2", z2)):
        dirs.check(op, name, t, z, "z", z.shape, "z.shape")
    return dirs.require(op, "z1, z2")


# ------------------------------------------------------------- fake kernels
def _empty_jet(x: Tensor, k: int, second: bool, shape=None) -> Jet:
    """y, y1 and y2, or with second=False an empty (0,) y2 (first order only)."""
    shape = tuple(x.shape) if shape is None else tuple(shape)
    return x.new_empty(shape), x.new_empty((k,) + shape), x.new_empty((k,) + shape if second else (0,))


@torch.library.register_fake("symfast::jet_layer_norm")
def _jet_layer_norm_fake(x, x1, x2, normalized_shape, weight, bias, weight1, bias1, weight2, bias2, eps,
                         second=True):
    k = check_jet_layer_norm(x, x1, x2, normalized_shape, weight, bias, weight1, bias1, weight2, bias2)
    return _empty_jet(x, k, second)


@torch.library.register_fake("symfast::jet_rms_norm")
def _jet_rms_norm_fake(x, x1, x2, normalized_shape, weight, weight1, weight2, eps, second=True):
    return _empty_jet(x, check_jet_rms_norm(x, x1, x2, normalized_shape, weight, weight1, weight2), second)


@torch.library.register_fake("symfast::jet_softmax")
def _jet_softmax_fake(x, x1, x2, dim, log, second=True):
    return _empty_jet(x, check_jet_softmax(x, x1, x2, dim), second)


@torch.library.register_fake("symfast::jet_cross_entropy")
def _jet_cross_entropy_fake(z, z1, z2, target, ignore_index=-100, second=True):
    return _empty_jet(z, check_jet_cross_entropy(z, z1, z2, target), second, (z.shape[0],))


# ----------------------------------------------------------------- autograd
def _layer_norm_twin(x, x1, x2, weight, bias, weight1, bias1, weight2, bias2, normalized_shape, eps, second):
    return reference.jet_layer_norm(x, x1, x2, normalized_shape, weight, bias, weight1, bias1, weight2, bias2, eps,
                                    second)


def _register_autograd() -> None:
    # The schemas put constants between tensors (normalized_shape after x2); these shims move
    # them last so that one helper serves every op.
    def reorder(name, twin, tensor_positions, n_args):
        n = len(tensor_positions)
        const_positions = [i for i in range(n_args) if i not in tensor_positions]

        def setup_context(ctx, inputs, output):
            inner.setup(ctx, [inputs[i] for i in tensor_positions] + [inputs[i] for i in const_positions], output)

        def backward(ctx, *grads):
            needs = [ctx.needs_input_grad[i] for i in tensor_positions]
            got = inner.backward(ctx, needs, *grads)
            result = [None] * n_args
            for j, i in enumerate(tensor_positions):
                result[i] = got[j]
            return tuple(result)

        inner = _VjpOfReference(twin, n)
        torch.library.register_autograd(name, backward, setup_context=setup_context)

    reorder("symfast::jet_layer_norm", _layer_norm_twin, [0, 1, 2, 4, 5, 6, 7, 8, 9], 12)
    reorder("symfast::jet_rms_norm",
            lambda x, x1, x2, w, w1, w2, ns, eps, second: reference.jet_rms_norm(x, x1, x2, ns, w, w1, w2, eps,
                                                                                  second),
            [0, 1, 2, 4, 5, 6], 9)
    reorder("symfast::jet_softmax", reference.jet_softmax, [0, 1, 2], 6)
    reorder("symfast::jet_cross_entropy", reference.jet_cross_entropy, [0, 1, 2, 3], 6)


class _VjpOfReference:
    """Backward of an op as the vjp of its reference twin ``twin(*tensors, *constants)``.

    A tensor that is None, not floating or needing no gradient gets None. torch.func.vjp
    records an ordinary autograd graph when the backward itself is differentiated, so
    double backward (gradgradcheck) works too.
    """

    def __init__(self, twin, n_tensors: int) -> None:
        self.twin, self.n = twin, n_tensors

    def setup(self, ctx, inputs, output) -> None:
        tensors = inputs[: self.n]
        ctx.present = [isinstance(t, Tensor) for t in tensors]
        ctx.constants = tuple(inputs[self.n:])
        ctx.save_for_backward(*[t for t in tensors if isinstance(t, Tensor)])

    def backward(self, ctx, needs, *grads):
        saved = iter(ctx.saved_tensors)
        tensors = [next(saved) if p else None for p in ctx.present]
        wanted = [i for i, t in enumerate(tensors) if t is not None and t.is_floating_point() and needs[i]]
        if not wanted:
            return (None,) * self.n

        def f(*diff):
            args = list(tensors)
            for i, t in zip(wanted, diff):
                args[i] = t
            return self.twin(*args, *ctx.constants)

        outs, pullback = torch.func.vjp(f, *[tensors[i] for i in wanted])
        cotangents = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads))
        result = [None] * self.n
        for i, g in zip(wanted, pullback(cotangents)):
            result[i] = g
        return tuple(result)


_register_autograd()


# ------------------------------------------------------------- public API
def jet_layer_norm(
    x: Tensor,
    x1: Optional[Tensor],
    x2: Optional[Tensor],
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    weight1: Optional[Tensor] = None,
    bias1: Optional[Tensor] = None,
    weight2: Optional[Tensor] = None,
    bias2: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    second: bool = True,
) -> Jet:
    r"""Second-order jet of ``F.layer_norm(x, normalized_shape, weight, bias, eps)``.

    With u = x - mean(x), :math:`\sigma = \sqrt{\mathrm{mean}(u^2) + \epsilon}`, :math:`\hat x = u/\sigma`
    over the normalized dims and u1, u2 the centered tangents:
    :math:`\sigma' = \langle \hat x, u_1\rangle/D`,
    :math:`\sigma'' = (\langle u_1, u_1\rangle/D - \sigma'^2)/\sigma + \langle \hat x, u_2\rangle/D`,
    :math:`\hat x' = (u_1 - \hat x \sigma')/\sigma`,
    :math:`\hat x'' = (u_2 - 2\hat x'\sigma' - \hat x\sigma'')/\sigma`; then
    y1 = x̂' w + x̂ w1 + b1 and y2 = x̂'' w + 2 x̂' w1 + x̂ w2 + b2.

    x1, x2: (K, *x.shape) or None (zero); weight1/bias1/weight2/bias2: (K, *normalized_shape) or
    None, each only with its weight or bias. Returns y (x.shape), y1 and y2 (K, *x.shape); with
    ``second=False`` (every jet op) the first-order jet only, y2 an empty (0,) tensor.
    """
    check_jet_layer_norm(x, x1, x2, normalized_shape, weight, bias, weight1, bias1, weight2, bias2)
    return _lib_ops.jet_layer_norm(x, x1, x2, list(normalized_shape), weight, bias, weight1, bias1, weight2,
                                   bias2, float(eps), bool(second))


def jet_rms_norm(
    x: Tensor,
    x1: Optional[Tensor],
    x2: Optional[Tensor],
    normalized_shape: Sequence[int],
    weight: Optional[Tensor] = None,
    weight1: Optional[Tensor] = None,
    weight2: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    second: bool = True,
) -> Jet:
    r"""Second-order jet of ``F.rms_norm``: y = x * rsqrt(mean(x², normalized dims) + eps) * weight.

    The jet of :func:`jet_layer_norm` with u = x (no centering). ``eps=None`` means
    ``torch.finfo(x.dtype).eps``, as in ``F.rms_norm``.
    """
    check_jet_rms_norm(x, x1, x2, normalized_shape, weight, weight1, weight2)
    eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
    return _lib_ops.jet_rms_norm(x, x1, x2, list(normalized_shape), weight, weight1, weight2, eps, second)


def jet_softmax(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], dim: int, *, log: bool = False,
                second: bool = True) -> Jet:
    r"""Second-order jet of ``softmax(x, dim)`` (or ``log_softmax`` with ``log=True``).

    With s = softmax(x), :math:`a_j = x_j - \langle s, x_j\rangle` along dim and
    :math:`e = \langle s, a_1^2\rangle`: softmax gives y1 = s a1, y2 = s (a1² + a2 - e);
    log_softmax gives y1 = a1, y2 = a2 - e.
    """
    check_jet_softmax(x, x1, x2, dim)
    return _lib_ops.jet_softmax(x, x1, x2, int(dim), bool(log), bool(second))


def jet_cross_entropy(
    z: Tensor, z1: Optional[Tensor], z2: Optional[Tensor], target: Tensor, *, ignore_index: int = -100,
    second: bool = True
) -> Jet:
    r"""Second-order jet of ``F.cross_entropy(z, target, reduction='none')``, z of shape (N, C).

    loss = logsumexp(z) - z[t], l1 = <s, z1> - z1[t], l2 = <s, z2> - z2[t] + <s, z1²> - <s, z1>²
    (s = softmax(z)); rows whose target is ``ignore_index`` give 0. Returns loss (N,), l1, l2 (K, N).
    """
    check_jet_cross_entropy(z, z1, z2, target)
    return _lib_ops.jet_cross_entropy(z, z1, z2, target, int(ignore_index), bool(second))
