r"""Per-sample gradient norms :math:`\|\nabla_\theta \ell(\theta, x_i)\|` from one forward and backward.

For a layer whose parameter enters the loss only through its own op, the per-sample gradient has a
closed form in the layer's input ``a_i`` and the gradient ``delta_i`` of the loss at the layer's
output, and so does its norm, without forming the ``[B, *param]`` per-sample gradients (the "ghost
norm" of Goodfellow (2015), BackPACK's ``BatchL2Grad`` and Opacus' ghost clipping):

* ``F.linear`` with input ``[B, in]``: :math:`\|G_i\|^2 = \|a_i\|^2 \|\delta_i\|^2`; with
  sequence dims ``[B, T, in]``: the Gram form :math:`\sum_{t,t'} (a_i a_i^\top)_{tt'}
  (\delta_i \delta_i^\top)_{tt'}`, or :math:`\|\delta_i^\top a_i\|^2` where that is cheaper; the
  bias :math:`\|\sum_t \delta_{it}\|^2`;
* ``F.embedding``: :math:`\sum_{t,t'} [x_{it} = x_{it'}]\, \delta_{it} \cdot \delta_{it'}`
  (rows at ``padding_idx`` get no gradient);
* ``F.layer_norm``'s affine weight and bias: :math:`\sum_t \delta_{it} \odot \hat a_{it}` and
  :math:`\sum_t \delta_{it}` (small: the normalized shape);
* ``F.conv2d`` (``groups=1``, numeric padding): :math:`\delta_i U_i^\top` with ``U_i`` the
  unfolded input (a per-sample gradient of the kernel's size only).

Where does the closed form not hold? A parameter used twice (tied weights), through any other op
(a transpose, weight decay, ``dcs``), or a layer whose output rows are not the samples (a
sequence-first layout, samples coupled by batch statistics). The first two are seen by a
``TorchFunctionMode`` that watches every use of the parameters; the last by a second, partial
backward of :math:`\sum_i w_i \ell_i` with per-sample weights :math:`w_i = \pm 2^{e_i}`, which must
scale row ``i`` of every layer's output gradient by exactly :math:`w_i` (a power of two scales
floating-point sums exactly, so any mixing of samples shows; two samples that drew the same weight
out of 34 are not told apart). Those parameters take the exact fallback: per-sample gradients by
``torch.func.vmap`` of ``grad`` (with respect to those parameters only), named in ``methods``.

The per-sample loss is ``loss_fn(params, batch)[i]``, the engine's batch convention. Where the
check fails, the samples may be coupled (batch statistics), and sample ``i`` evaluated alone would
have another loss, so the fallback is then the rows of the whole batch's Jacobian, by backwards of
the kept graph (``methods``: ``"Jacobian rows of the batch (...)"``).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.func as tf
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .checks import CoupledSamplesError
from .per_sample import (_VMAP_UNSUPPORTED, PerSamplePathWarning, _known_failure, map_samples,
                         per_sample_losses, single_sample_loss)

__all__ = ["per_sample_grad_norms", "GradNorms"]


@dataclass
class GradNorms:
    """Result of :func:`per_sample_grad_norms`.

    Attributes:
        norms: ``[B]`` float64, :math:`\\|\\nabla_\\theta \\ell(\\theta, x_i)\\|`.
        methods: per parameter name, how its part was computed: ``"ghost (linear)"`` and the like,
            ``"vmap (<why the closed form does not apply>)"``, or ``"unused"`` (zero gradient).
        losses: ``[B]``, the per-sample losses of the forward pass.
    """

    norms: Tensor
    methods: Dict[str, str]
    losses: Tensor


@dataclass(eq=False)  # compared by identity: the fields hold tensors
class _Use:
    kind: str
    names: Dict[str, str]  # role ("weight", "bias") -> parameter name
    inp: Any
    out: Tensor
    extra: Dict[str, Any]


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


class _Watch(TorchFunctionMode):
    """Records every use of the parameters: the ops with a closed form, and the others by name."""

    def __init__(self, leaves: Dict[int, str]):
        super().__init__()
        self.leaves = leaves
        self.uses: List[_Use] = []
        self.other: Dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        hit = [t for t in _tensor_args(args, kwargs) if id(t) in self.leaves]
        if not hit:
            return out
        use = self._closed_form(func, args, kwargs, out)
        if use is not None and all(any(t is v for v in _role_tensors(func, args, kwargs).values()) for t in hit):
            self.uses.append(use)
        elif any(isinstance(t, Tensor) for t in tree_leaves(out)):  # shape/dtype reads carry no gradient
            what = getattr(func, "__name__", str(func))
            for t in hit:
                self.other.setdefault(self.leaves[id(t)], f"used by {what}")
        return out

    def _closed_form(self, func, args, kwargs, out) -> Optional[_Use]:
        roles = _role_tensors(func, args, kwargs)
        if not roles or not isinstance(out, Tensor):
            return None
        names = {r: self.leaves[id(t)] for r, t in roles.items() if isinstance(t, Tensor) and id(t) in self.leaves}
        inp = _arg(args, kwargs, 0, "input")
        if not isinstance(inp, Tensor) or id(inp) in self.leaves:
            return None
        if func is F.linear:
            return _Use("linear", names, inp.detach(), out, {})
        if func is F.embedding:
            if _arg(args, kwargs, 3, "max_norm") is not None or _arg(args, kwargs, 5, "scale_grad_by_freq", False):
                return None
            return _Use("embedding", names, inp, out, {"padding_idx": _arg(args, kwargs, 2, "padding_idx"),
                                                       "rows": _arg(args, kwargs, 1, "weight").shape[0]})
        if func is F.layer_norm:
            shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
            with torch.no_grad():
                xhat = F.layer_norm(inp.detach(), shape, None, None, _arg(args, kwargs, 4, "eps", 1e-5))
            return _Use("layer_norm", names, xhat, out, {"shape": shape})
        if func is F.conv2d:
            stride, padding, dilation, groups = (_arg(args, kwargs, i, n, d) for i, n, d in
                                                 ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1),
                                                  (6, "groups", 1)))
            if groups != 1 or isinstance(padding, str) or inp.dim() != 4:
                return None
            w = _arg(args, kwargs, 1, "weight")
            return _Use("conv2d", names, inp.detach(), out,
                        {"kernel": tuple(w.shape[2:]), "stride": stride, "padding": padding, "dilation": dilation})
        return None


def _tensor_args(args, kwargs):
    """The tensors among an op's arguments. Most arguments are tensors or plain values: only
    containers are flattened (pytree flattening of every call cost the watched forward a third of
    a plain one on the README MLP)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple, dict)):
            yield from (t for t in tree_leaves(a) if isinstance(t, Tensor))


def _role_tensors(func, args, kwargs) -> Dict[str, Any]:
    """The parameter slots of the ops with a closed form (empty for any other op)."""
    if func is F.linear or func is F.conv2d:
        return {"weight": _arg(args, kwargs, 1, "weight"), "bias": _arg(args, kwargs, 2, "bias")}
    if func is F.embedding:
        return {"weight": _arg(args, kwargs, 1, "weight")}
    if func is F.layer_norm:
        return {"weight": _arg(args, kwargs, 2, "weight"), "bias": _arg(args, kwargs, 3, "bias")}
    return {}


def _sq_norms(use: _Use, delta: Tensor, B: int) -> Dict[str, Tensor]:
    """role -> [B] squared per-sample gradient norms (float64) of one closed-form use."""
    out: Dict[str, Tensor] = {}
    d = delta
    if use.kind == "linear":
        a = use.inp.reshape(B, -1, use.inp.shape[-1])
        d = d.reshape(B, -1, d.shape[-1])
        if "weight" in use.names:
            T, n_in, n_out = a.shape[1], a.shape[2], d.shape[2]
            if T == 1:
                sq = a.square().sum((1, 2)).double() * d.square().sum((1, 2)).double()
            elif T * T * (n_in + n_out) <= T * n_in * n_out:
                sq = ((a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum((1, 2)).double()
            else:
                sq = (d.transpose(1, 2) @ a).square().sum((1, 2)).double()
            out["weight"] = sq
        if "bias" in use.names:
            out["bias"] = d.sum(1).square().sum(1).double()
    elif use.kind == "embedding":
        idx = use.inp.reshape(B, -1)
        d = d.reshape(B, idx.shape[1], -1)
        if use.extra["padding_idx"] is not None:
            pad = use.extra["padding_idx"]
            pad = pad + use.extra["rows"] if pad < 0 else pad  # as F.embedding reads a negative index
            d = d * (idx != pad).unsqueeze(-1)
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(d.dtype)
        out["weight"] = (same * (d @ d.transpose(1, 2))).sum((1, 2)).double()
    elif use.kind == "layer_norm":
        d = d.reshape(B, -1, *use.extra["shape"])
        xhat = use.inp.reshape(d.shape)
        if "weight" in use.names:
            out["weight"] = (d * xhat).sum(1).reshape(B, -1).square().sum(1).double()
        if "bias" in use.names:
            out["bias"] = d.sum(1).reshape(B, -1).square().sum(1).double()
    elif use.kind == "conv2d":
        e = use.extra
        d = d.reshape(B, d.shape[1], -1)
        if "weight" in use.names:
            U = F.unfold(use.inp, e["kernel"], dilation=e["dilation"], padding=e["padding"], stride=e["stride"])
            out["weight"] = (d @ U.transpose(1, 2)).square().sum((1, 2)).double()
        if "bias" in use.names:
            out["bias"] = d.sum(2).square().sum(1).double()
    return out


@functools.lru_cache(maxsize=8)
def _sample_weights(B: int, device) -> Tensor:
    # fixed per (B, device), so drawn once; callers only read it
    g = torch.Generator().manual_seed(0)
    e = torch.randint(-8, 9, (B,), generator=g).double()
    s = torch.randint(0, 2, (B,), generator=g).double() * 2 - 1
    return (s * torch.exp2(e)).to(device)


def per_sample_grad_norms(
    loss_fn: Callable[[Any, Any], Tensor],
    params: Any,
    batch: Any,
    *,
    chunk_size: Optional[int] = 64,
    op: str = "per_sample_grad_norms",
) -> GradNorms:
    r"""Per-sample gradient norms :math:`\|\nabla_\theta \ell(\theta, x_i)\|`, ``[B]`` float64.

    Parameters used once by ``F.linear``, ``F.conv2d``, ``F.embedding`` or ``F.layer_norm`` (the
    ops of ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``) take the closed form of
    the module doc: one forward and a backward that stops at those layers' outputs, plus a partial
    backward that checks that the output rows are the samples. Every other parameter takes the
    exact fallback, ``torch.func.vmap`` of ``grad`` with respect to those parameters only,
    ``chunk_size`` samples at a time; ``methods`` says which parameter took which path.

    Args:
        loss_fn: ``loss_fn(params, batch) -> [B]`` per-sample losses (the engine's batch convention).
        params: dict of tensors, or a flat tensor (then the fallback: a flat vector reaches the
            layers through views, which the closed forms do not follow).
    """
    fw = WatchedForward(op, loss_fn, params, batch)
    deltas = None
    if fw.outputs:
        deltas = torch.autograd.grad(fw.losses.sum(), fw.outputs, allow_unused=True, retain_graph=True)
    return fw.norms(deltas, chunk_size=chunk_size, op=op)


class WatchedForward:
    """One forward of ``loss_fn`` on the batch, with a graph, that knows where each parameter was used.

    Holds the per-sample ``losses`` (differentiable in ``leaves``, the parameters as detached leaves
    that require grad), the closed-form layer uses and their ``outputs``, and, per parameter that
    must take the vmap fallback, why. :meth:`norms` turns the gradients of ``losses.sum()`` at
    ``outputs`` into :class:`GradNorms`: a caller that runs that backward for its own ends (the
    mean gradient, kept for Hessian-vector products) passes its ``outputs`` gradients in, and the
    norms cost no pass of their own.
    """

    def __init__(self, op: str, loss_fn: Callable[[Any, Any], Tensor], params: Any, batch: Any):
        if not isinstance(params, (Tensor, Mapping)):
            raise TypeError(f"{op}: params must be a dict of tensors or a tensor, got {type(params).__name__}")
        flat = isinstance(params, Tensor)
        self.pdict = {"theta": params} if flat else dict(params)
        self.lf = (lambda p, b: loss_fn(p["theta"], b)) if flat else loss_fn
        self.leaves = {name: v.detach().requires_grad_(v.is_floating_point()) for name, v in self.pdict.items()}
        watch = _Watch({id(v): name for name, v in self.leaves.items()})
        with torch.enable_grad(), watch:
            self.losses, self.samples = per_sample_losses(op, self.lf, self.leaves, batch)
        B = self.samples.size
        self.other = watch.other
        count: Dict[str, int] = {}
        for use in watch.uses:
            for name in use.names.values():
                count[name] = count.get(name, 0) + 1
        for name, n in count.items():
            if n > 1:
                self.other.setdefault(name, f"shared by {n} layers")
        uses = [u for u in watch.uses if u.out.dim() >= 1 and u.out.shape[0] == B]
        for u in watch.uses:
            if u not in uses:
                for name in u.names.values():
                    self.other.setdefault(name, f"its {u.kind} output has no leading batch dim of size {B}")
        # a use whose parameters all take the fallback needs no backward; the others keep their
        # closed-form roles (a layer's bias keeps its closed form when its weight is tied)
        self.uses = [u for u in uses if not all(n in self.other for n in u.names.values())]
        self.methods: Dict[str, str] = {}
        self.coupled = False  # set by norms(): did a layer's output rows fail to be the samples?
        if self.uses and B and not self.losses.requires_grad:  # no parameter reaches the losses differentiably
            for u in self.uses:
                for name in u.names.values():
                    self.methods.setdefault(name, "unused")
            self.uses = []
        elif not B:
            for u in self.uses:
                for name in u.names.values():
                    if name not in self.other:
                        self.methods[name] = f"ghost ({u.kind})"
            self.uses = []

    @property
    def outputs(self) -> List[Tensor]:
        """The closed-form layers' outputs, whose gradients :meth:`norms` needs (empty: none)."""
        return [u.out for u in self.uses]

    def norms(self, deltas: Optional[Sequence[Optional[Tensor]]], *, chunk_size: Optional[int], op: str) -> GradNorms:
        """:class:`GradNorms` from ``deltas``, the gradients of ``losses.sum()`` at :attr:`outputs`
        (None where there are none). Runs the row check (a partial backward of the per-sample
        weighted losses; the graph is kept) and the vmap fallback."""
        B = self.samples.size
        losses, methods, other = self.losses, dict(self.methods), dict(self.other)
        sq = torch.zeros(B, dtype=torch.float64, device=losses.device)
        if self.uses:
            w = _sample_weights(B, losses.device)
            checks = torch.autograd.grad((losses * w.to(losses.dtype)).sum(), self.outputs, allow_unused=True,
                                         retain_graph=True)
            # row i of every output gradient must scale by exactly w_i: all layers' verdicts with
            # one host sync
            verdicts = []
            for d, c in zip(deltas, checks):
                if d is None:
                    continue
                scaled = d.detach() * w.to(d.dtype).reshape(-1, *([1] * (d.dim() - 1)))
                tol = 16 * torch.finfo(d.dtype).eps * scaled.reshape(B, -1).abs().amax(1)
                verdicts.append(((c - scaled).reshape(B, -1).abs().amax(1) <= tol).all())
            rows_ok = iter(torch.stack(verdicts).tolist() if verdicts else [])
            for u, d in zip(self.uses, deltas):
                if d is None:
                    for name in u.names.values():
                        methods.setdefault(name, "unused")
                    continue
                if not next(rows_ok):
                    for name in u.names.values():
                        other.setdefault(name, f"row i of its {u.kind} output is not sample i's alone")
                    continue
                for role, v in _sq_norms(u, d.detach(), B).items():
                    if u.names[role] not in other:
                        sq = sq + v
                        methods[u.names[role]] = f"ghost ({u.kind})"
        fallback = [n for n in self.pdict if n in other]
        for n in self.pdict:
            if n not in methods and n not in fallback:
                methods[n] = "unused"  # no op saw it: its gradient is zero
        self.coupled = any(u.names.get(r) in other and other[u.names[r]].startswith("row i of its")
                           for u in self.uses for r in u.names)
        if fallback and B and not self.coupled:
            try:
                part_sq, path = self._vmap_sq(fallback, chunk_size, op)
                sq = sq + part_sq
            except CoupledSamplesError:
                # batch statistics that no row check saw (no closed-form layer upstream of them):
                # the per-sample map refused them
                self.coupled = True
                for n in fallback:
                    other[n] = f"{other[n]}; batch statistics couple the samples"
            else:
                for n in fallback:
                    methods[n] = f"{path} ({other[n]})"
        if fallback and B and self.coupled:
            # a layer's output rows are not the samples: the batch may couple its samples (batch
            # statistics), and then a sample evaluated alone has another loss; the rows of the
            # whole batch's Jacobian, from the kept graph, are right either way
            leaves = [self.leaves[n] for n in fallback if self.leaves[n].requires_grad]
            sq += _jacobian_row_sq(op, losses, leaves, chunk_size) if leaves else 0.0
            for n in fallback:
                methods[n] = f"Jacobian rows of the batch ({other[n]})"
        if fallback and not B:
            for n in fallback:
                methods[n] = f"vmap ({other[n]})"
        return GradNorms(sq.sqrt(), methods, losses.detach())

    def _vmap_sq(self, names: List[str], chunk_size: Optional[int], op: str) -> Tuple[Tensor, str]:
        """``[B]`` float64 squared norms of the per-sample gradients of ``names``, each sample
        alone (vmap of grad, chunk by chunk), and the path :func:`map_samples` took."""
        held = {n: v.detach() for n, v in self.pdict.items()}
        sub = {n: held[n] for n in names}
        one = single_sample_loss(self.lf, self.samples)

        def grad_sub(s, *sample):
            return tf.grad(lambda q: one({**held, **q}, *sample))(s)

        sq = torch.zeros(self.samples.size, dtype=torch.float64, device=self.losses.device)
        path = "vmap"
        for part_start, part in _chunks(self.samples, chunk_size):
            g, path = map_samples(op, grad_sub, sub, part)
            sq[part_start:part_start + part.size] = sum(
                torch.linalg.vector_norm(v.reshape(part.size, -1), dim=1).double() ** 2 for v in g.values())
        return sq, path


def jacobian_rows(op: str, losses: Tensor, leaves: List[Tensor], chunk_size: Optional[int]):
    """Yields ``(start, grads)``: the rows ``start:start + c`` of d losses / d leaves, each of
    ``grads`` ``[c, *leaf.shape]`` (None for a leaf the losses do not reach). Backwards of the kept
    graph with rows of the identity as cotangents, ``chunk_size`` rows batched at a time
    (``is_grads_batched``), or one by one where vmap cannot batch the backward."""
    B = losses.shape[0]
    eye = torch.eye(B, dtype=losses.dtype, device=losses.device)
    step = B if chunk_size is None else max(1, chunk_size)
    for s in range(0, B, step):
        rows = eye[s:s + step]
        try:
            gs = torch.autograd.grad(losses, leaves, grad_outputs=rows, is_grads_batched=True, retain_graph=True,
                                     allow_unused=True)
        except (RuntimeError, NotImplementedError) as e:
            reason = _known_failure(e, _VMAP_UNSUPPORTED)
            warnings.warn(f"{op}: vmap cannot batch the backward of this model ({reason}); taking the Jacobian's "
                          "rows one at a time instead (exact, slower)", PerSamplePathWarning, stacklevel=4)
            per_row = [torch.autograd.grad(losses, leaves, grad_outputs=r, retain_graph=True, allow_unused=True)
                       for r in rows]
            gs = [None if rs[0] is None else torch.stack(rs) for rs in zip(*per_row)]
        yield s, gs


def _jacobian_row_sq(op: str, losses: Tensor, leaves: List[Tensor], chunk_size: Optional[int]) -> Tensor:
    """``[B]`` float64 squared norms of the rows of d losses / d leaves (:func:`jacobian_rows`)."""
    out = torch.zeros(losses.shape[0], dtype=torch.float64, device=losses.device)
    for s, gs in jacobian_rows(op, losses, leaves, chunk_size):
        for g in gs:
            if g is not None:
                out[s:s + g.shape[0]] += g.reshape(g.shape[0], -1).double().square().sum(1)
    return out


def _chunks(samples, chunk_size) -> List[Tuple[int, Any]]:
    out, start = [], 0
    for part in samples.chunks(chunk_size):
        out.append((start, part))
        start += part.size
    return out
