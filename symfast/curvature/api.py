r"""The public per-sample curvature API: directional derivatives, curvatures and Hessian-vector
products, and ``functional_loss`` for modules. See the package docstring for the math and paths.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .checks import (
    CoupledSamplesError,
    LossFn,
    Params,
    UnsupportedOpError,
    check_chunk,
    check_directions,
    check_losses,
    check_method,
    check_params,
    describe,
)
from .exact import ExactMode, wrap_errors
from . import replay
from .jets import JetFallback, jet_derivatives
from .per_sample import (PerSamplePathWarning, Samples, autograd_functions_of, function_names, has_jvp,
                         refuse_once_differentiable, single_sample_loss, split_batch, watching_functions)

__all__ = [
    "per_sample_directional_derivatives",
    "per_sample_curvatures",
    "per_sample_hvp",
    "functional_loss",
]


Tensor = torch.Tensor


def _direction(directions: Dict[str, Tensor], k: int) -> Dict[str, Tensor]:
    return {name: d[k] for name, d in directions.items()}


def _over_directions(
    fn: Callable[[Dict[str, Tensor]], Tensor], directions: Dict[str, Tensor], K: int, chunk_size: Optional[int]
) -> Tensor:
    """Stacks fn(direction_k) ([B] each) into [B, K]: a loop, or vmap in chunks."""
    if chunk_size is None or chunk_size == 1 or K == 1:
        return torch.stack([fn(_direction(directions, k)) for k in range(K)], dim=1)
    return torch.func.vmap(fn, in_dims=(0,), out_dims=1, chunk_size=chunk_size)(directions)


def _over_batch(op: str, fn: Callable[[Any], Tensor], batch: Any, batch_chunk_size: Optional[int]) -> Tensor:
    """fn on the whole batch, or on chunks of ``batch_chunk_size`` samples (split by the engine's
    batch convention), concatenated."""
    if batch_chunk_size is None:
        return fn(batch)
    samples = split_batch(op, batch)
    return torch.cat([fn(samples.batch(part.leaves)) for part in samples.chunks(batch_chunk_size)])


def _per_sample_loss(op: str, loss_fn: LossFn, batch: Any) -> Tuple[Callable, Samples]:
    """(single(params, *sample_leaves) -> scalar, the batch split per sample) for vmap over samples."""
    samples = split_batch(op, batch)
    return single_sample_loss(lambda p, b: check_losses(op, _call_loss(loss_fn, p, b), 1), samples), samples


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


def _common_checks(op, loss_fn, params, method, chunk_size, batch_chunk_size):
    if not callable(loss_fn):
        raise TypeError(f"{op}: loss_fn must be callable as loss_fn(params, batch), got {describe(loss_fn)}")
    check_method(op, method)
    chunk_size = check_chunk(op, "chunk_size", chunk_size)
    batch_chunk_size = check_chunk(op, "batch_chunk_size", batch_chunk_size)
    return check_params(op, params), chunk_size, batch_chunk_size


def _fast_mode(op: str, batch_chunked: bool) -> ExactMode:
    return ExactMode(op, decompose_norms=True, per_sample="batch_chunk_size" if batch_chunked else "")


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
        method: ``"fast"`` (first-order Taylor mode: one pass of the batch for ``chunk_size``
            directions, all K when None; where it cannot follow the model, a
            :class:`~symfast.curvature.per_sample.PerSamplePathWarning` and ``"forward"``),
            ``"forward"`` (one jvp of the batch loss per direction) or ``"reference"``
            (``vmap`` over samples of ``grad``, then dot with n).
            On every method, results computed under ``torch.no_grad()`` inside ``loss_fn`` are
            constants (as with ``.detach()``), see the module doc.
        chunk_size: directions evaluated together: per pass of the jets (``"fast"``; None: all),
            under ``vmap`` (``"forward"``, ``"reference"``; None: one at a time).
        batch_chunk_size: samples per evaluation (None: the whole batch). Only for
            models whose samples do not interact.

    Returns:
        ``[B, K]`` tensor, dtype of the losses.
    """
    op = "symfast.per_sample_directional_derivatives"
    params, chunk_size, batch_chunk_size = _common_checks(op, loss_fn, params, method, chunk_size, batch_chunk_size)
    directions, K = check_directions(op, "directions", directions, params, leading=True)

    if method == "reference":
        single, samples = _per_sample_loss(op, loss_fn, batch)
        B = samples.size
        with ExactMode(op, decompose_norms=False, per_sample="method='reference' (vmap over samples)"):
            grads = torch.func.vmap(torch.func.grad(single), in_dims=(None, *samples.dims))(params, *samples.leaves)
        # explicit sizes: -1 cannot be inferred from an empty tensor (B = 0 or K = 0)
        out = sum(torch.einsum("bp,kp->bk", grads[k].reshape(B, params[k].numel()),
                               directions[k].reshape(K, params[k].numel())) for k in params)
        return out  # type: ignore[return-value]

    def on(part: Any) -> Tensor:
        along = _along_fn(op, loss_fn, part)
        return _over_directions(lambda n: along(params, n), directions, K, chunk_size)

    try:
        if K == 0:
            with _fast_mode(op, False):
                return _empty_result(op, loss_fn, params, batch)
        if method == "fast":
            try:
                return _fast_jets(op, loss_fn, params, directions, K, batch, chunk_size, batch_chunk_size, False)
            except JetFallback as exc:
                _warn_fallback(op, exc, "forward mode (one jvp of the whole batch loss per direction)")
        with _fast_mode(op, batch_chunk_size is not None):
            return _over_batch(op, on, batch, batch_chunk_size)
    except NotImplementedError as exc:
        raise wrap_errors(op, exc) from exc


def _warn_fallback(op: str, exc: JetFallback, path: str) -> None:
    warnings.warn(
        f"{op}: the Taylor-mode jets cannot follow {exc.op} ({exc.why}); computing with {path} "
        "instead (exact, slower)", PerSamplePathWarning, stacklevel=3)


def _fast_jets(op: str, loss_fn: LossFn, params: Dict[str, Tensor], directions: Dict[str, Tensor], K: int,
               batch: Any, chunk_size: Optional[int], batch_chunk_size: Optional[int], second: bool) -> Tensor:
    """[B, K] of g (second=False) or h by Taylor mode: ``chunk_size`` directions per pass of the batch
    (None: all K in one pass), on chunks of ``batch_chunk_size`` samples."""
    exact = _fast_mode(op, batch_chunk_size is not None)
    step = K if chunk_size is None else chunk_size

    def on(part: Any) -> Tensor:
        outs = []
        for start in range(0, K, step):
            chunk = {name: d[start:start + step] for name, d in directions.items()}
            # traced once per key and replayed (see .replay); a JetFallback is remembered per key
            _, g, h = replay.jet_derivatives(_checked_jets, op, loss_fn, params, chunk, part, exact,
                                             second=second, remember=(JetFallback,))
            outs.append(h if second else g)
        return torch.cat(outs, dim=1)

    return _over_batch(op, on, batch, batch_chunk_size)


def _checked_jets(op: str, loss_fn: LossFn, params: Dict[str, Tensor], directions: Dict[str, Tensor], part: Any,
                  exact: ExactMode, *, second: bool):
    """The jet program the replay traces: ``jet_derivatives`` with the losses' shape checked.

    A module-level function, not a closure, so that the replay's key (which holds the program)
    is the same object on every call."""
    return jet_derivatives(op, lambda p, b: check_losses(op, loss_fn(p, b)), params, directions, part, exact,
                           second=second)


def _empty_result(op, loss_fn, params, batch) -> Tensor:
    losses = check_losses(op, loss_fn(params, batch))
    return losses.new_zeros(losses.shape[0], 0)


def _along_fn(op: str, loss_fn: LossFn, part: Any):
    """(p, n) -> the per-sample losses' derivative at p along n: one jvp."""
    def along(p: Dict[str, Tensor], n: Dict[str, Tensor]) -> Tensor:
        return torch.func.jvp(lambda q: check_losses(op, _call_loss(loss_fn, q, part)), (p,), (n,))[1]

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

    ``method="fast"``: second-order Taylor mode on the whole batch, ``chunk_size``
    directions per pass (None: all K in one pass; memory grows linearly with it),
    falling back to ``"forward"``, with a
    :class:`~symfast.curvature.per_sample.PerSamplePathWarning` naming the op, where the jets
    cannot follow the model (see the module doc). ``method="forward"``: jvp of jvp of
    the batch loss along each direction. ``method="reference"``: ``vmap`` over
    samples of ``jvp(grad(loss))``. Through an ``autograd.Function`` jvp of jvp is
    silently wrong (torch.func does not differentiate the Function's jvp rule), so a
    model that runs one takes the reference recipe instead, with a warning naming it
    (an :class:`UnsupportedOpError` where the Function has no jvp, or a ``@once_differentiable``
    backward, through which no second-order path is exact). No path but the reference forms a
    per-sample parameter-sized tensor. Arguments as in
    :func:`per_sample_directional_derivatives`; results computed under
    ``torch.no_grad()`` inside ``loss_fn`` are constants on every method.

    Returns:
        ``[B, K]`` tensor.
    """
    op = "symfast.per_sample_curvatures"
    params, chunk_size, batch_chunk_size = _common_checks(op, loss_fn, params, method, chunk_size, batch_chunk_size)
    directions, K = check_directions(op, "directions", directions, params, leading=True)

    if method == "reference":
        return _project(_reference_hvps(op, loss_fn, params, batch, directions, K, chunk_size), directions, params,
                        K).T

    if K == 0:
        with _fast_mode(op, False):
            return _empty_result(op, loss_fn, params, batch)
    try:
        fallback = None
        if method == "fast":
            try:
                return _fast_jets(op, loss_fn, params, directions, K, batch, chunk_size, batch_chunk_size, True)
            except JetFallback as exc:
                fallback = exc
        if _functions_need_forward_over_reverse(op, loss_fn, params, batch):
            hv = _reference_hvps(op, loss_fn, params, batch, directions, K, chunk_size)
            return _project(hv, directions, params, K).T
        if fallback is not None:
            _warn_fallback(op, fallback, "nested forward mode (jvp of jvp of the whole batch loss per direction)")
        with _fast_mode(op, batch_chunk_size is not None):
            def on(part):
                second = _second_fn(op, loss_fn, params, part)
                return _over_directions(lambda n: second(n, n), directions, K, chunk_size)

            return _over_batch(op, on, batch, batch_chunk_size)
    except NotImplementedError as exc:
        raise wrap_errors(op, exc) from exc


def _project(hv: Dict[str, Tensor], directions: Dict[str, Tensor], params: Dict[str, Tensor], K: int) -> Tensor:
    """[K, B] of n_k^T (H(x_i) n_k) from the per-sample products hv[name] ([K, B, *shape])."""
    B = next(iter(hv.values())).shape[1]
    return sum((hv[k] * directions[k].unsqueeze(1)).reshape(K, B, params[k].numel()).sum(-1)  # type: ignore
               for k in params)


def _functions_need_forward_over_reverse(op: str, loss_fn: LossFn, params: Dict[str, Tensor], batch: Any) -> bool:
    """Whether nested forward mode must be avoided: the model runs an ``autograd.Function``.

    torch.func's jvp of jvp drops the second derivative of a Function with a ``jvp`` staticmethod
    (the outer jvp does not differentiate the inner rule; see
    :mod:`~symfast.curvature.per_sample`), a silently wrong h. Forward over reverse per sample
    (the reference recipe, ``vmap`` of ``jvp(grad)``) is exact through it, so the caller takes
    that path, announced by a :class:`PerSamplePathWarning` naming the Function(s). A Function
    without ``jvp`` has no forward-mode derivative at all: an ``UnsupportedOpError`` names it.
    The check is one forward pass of the batch that records the graph and keeps no tensor; it
    runs only where nested forward mode would (never on the Taylor-mode fast path).
    """
    with _fast_mode(op, False):
        found = autograd_functions_of(lambda p: check_losses(op, _call_loss(loss_fn, p, batch)), params)
    if not found:
        return False
    refuse_once_differentiable(op, found, "forward over reverse (the exact path through a Function with a jvp)")
    missing = [c for c in found if not has_jvp(c)]
    if missing:
        raise UnsupportedOpError(
            f"{op}: {function_names(missing)} has no jvp staticmethod, so forward mode cannot differentiate it "
            "(and reverse over reverse is not exact through every Function). "
            "Give it a jvp (and setup_context) staticmethod")
    warnings.warn(
        f"{op}: the model runs {function_names(found)}; nested forward mode (jvp of jvp) would drop its second "
        "derivative (torch.func does not differentiate a Function's jvp rule), so this call runs forward over "
        "reverse per sample (vmap over samples of jvp(grad), exact, slower)", PerSamplePathWarning, stacklevel=3)
    return True


def _reference_hvps(op, loss_fn, params, batch, directions, K, chunk_size) -> Dict[str, Tensor]:
    """{name: [K, B, *shape]} = H(x_i) n_k by vmap over samples of jvp(grad)."""
    single, samples = _per_sample_loss(op, loss_fn, batch)
    watched, found = watching_functions(single)  # the Functions on the graph under grad

    def hvp_one(n, *sample):
        return torch.func.jvp(lambda p: torch.func.grad(watched)(p, *sample), (params,), (n,))[1]

    per_sample = torch.func.vmap(hvp_one, in_dims=(None, *samples.dims))
    with ExactMode(op, decompose_norms=False, per_sample="method='reference' (vmap over samples)"):
        if K == 0:  # no direction: nothing to stack
            return {name: p.new_zeros((0, samples.size) + tuple(p.shape)) for name, p in params.items()}
        if chunk_size is None or chunk_size == 1 or K == 1:
            outs = [per_sample(_direction(directions, k), *samples.leaves) for k in range(K)]
            out = {name: torch.stack([o[name] for o in outs]) for name in params}
        else:
            shared = (None,) * len(samples.leaves)
            out = torch.func.vmap(per_sample, in_dims=(0, *shared), chunk_size=chunk_size)(directions,
                                                                                           *samples.leaves)
    refuse_once_differentiable(op, found, "forward over reverse (vmap over samples of jvp(grad))")
    return out


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
        forward mode on the whole batch (no per-sample parameter-sized tensor);
        for a model that runs an ``autograd.Function``, forward over reverse per
        sample, as in :func:`per_sample_curvatures`.
    """
    op = "symfast.per_sample_hvp"
    params, chunk_size, batch_chunk_size = _common_checks(op, loss_fn, params, method, chunk_size, batch_chunk_size)
    direction, _ = check_directions(op, "direction", direction, params, leading=False)
    if onto is not None:
        onto, K = check_directions(op, "onto", onto, params, leading=True)

    if method == "reference":
        hv = _reference_hvps(op, loss_fn, params, batch, {k: v.unsqueeze(0) for k, v in direction.items()}, 1, None)
        hv = {k: v[0] for k, v in hv.items()}
        return hv if onto is None else _project_onto(hv, onto, params, K)

    if onto is not None:
        try:
            if K and _functions_need_forward_over_reverse(op, loss_fn, params, batch):
                hv = _reference_hvps(op, loss_fn, params, batch, {k: v.unsqueeze(0) for k, v in direction.items()},
                                     1, None)
                return _project_onto({k: v[0] for k, v in hv.items()}, onto, params, K)
            with _fast_mode(op, batch_chunk_size is not None):
                if K == 0:
                    return _empty_result(op, loss_fn, params, batch)

                def on(part):
                    second = _second_fn(op, loss_fn, params, part)
                    return _over_directions(lambda m: second(direction, m), onto, K, chunk_size)

                return _over_batch(op, on, batch, batch_chunk_size)
        except NotImplementedError as exc:
            raise wrap_errors(op, exc) from exc

    try:
        return _per_sample_hvp_full(op, loss_fn, params, direction, batch, batch_chunk_size)
    except CoupledSamplesError:
        pass
    except NotImplementedError as exc:
        raise wrap_errors(op, exc) from exc
    if batch_chunk_size is not None:
        raise UnsupportedOpError(
            f"{op}: the model couples the samples of a batch (training-mode batch norm), so the batch "
            "cannot be split: call it without batch_chunk_size"
        )
    return _coupled_hvp_full(op, loss_fn, params, direction, batch)


def _project_onto(hv: Dict[str, Tensor], onto: Dict[str, Tensor], params: Dict[str, Tensor], K: int) -> Tensor:
    """[B, K] of m_k^T (H(x_i) n) from the per-sample products hv[name] ([B, *shape])."""
    B = next(iter(hv.values())).shape[0]
    return sum(  # type: ignore[return-value]
        torch.einsum("bp,kp->bk", hv[k].reshape(B, params[k].numel()), onto[k].reshape(K, params[k].numel()))
        for k in params)


def _per_sample_hvp_full(op, loss_fn, params, direction, batch, batch_chunk_size):
    single, samples = _per_sample_loss(op, loss_fn, batch)

    def tangent(p, *sample):  # n^T grad l(p, x_i), forward mode
        return torch.func.jvp(lambda q: single(q, *sample), (p,), (direction,))[1]

    per_sample = torch.func.vmap(torch.func.grad(tangent), in_dims=(None, *samples.dims))
    with ExactMode(op, decompose_norms=True, per_sample="the per-sample Hessian-vector product (vmap over samples)"):
        parts = [per_sample(params, *part.leaves) for part in samples.chunks(batch_chunk_size)]
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in params}


def _coupled_hvp_full(op, loss_fn, params, direction, batch):
    """Row i of the Jacobian of the [B] vector n^T grad l_i(theta) of the full batch: O(B) reverse passes."""
    with ExactMode(op, decompose_norms=True):
        def tangent(p):
            return torch.func.jvp(lambda q: check_losses(op, _call_loss(loss_fn, q, batch)), (p,), (direction,))[1]

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
        raise TypeError(f"{op}: module must be a torch.nn.Module, got {describe(module)}")
    if not callable(loss):
        raise TypeError(f"{op}: loss must be callable as loss(outputs, targets), got {describe(loss)}")
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
            raise TypeError(f"{op}: batch must be a pair (inputs, targets), got {describe(batch)}")
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
                f"{op}: loss returned {describe(out)}; it must return per-sample losses "
                "(build it with reduction='none')"
            )
        if out.dim() > 1:
            out = out.reshape(out.shape[0], -1).mean(1)
        if gamma:
            out = out + gamma * sum((v * v).sum() for v in p.values())
        return out

    # what loss_fn reads besides its arguments, for the replay cache's key (see .replay)
    setattr(loss_fn, replay.STATE_ATTR, lambda: replay.module_state(module, loss))
    return loss_fn, params
