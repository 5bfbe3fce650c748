r"""Trace once, replay: the jet program as a cached ``torch.fx`` graph of aten ops.

On a small model the fast path's cost is Python: every op of the forward pass goes through
:class:`~symfast.curvature.jets.JetMode` (a ``TorchFunctionMode``), its pytree flattening and its
side table of jets. For a given *program* — the same ``loss_fn`` in the same state, parameters and
directions of the same names, shapes, dtypes and devices, a batch of the same structure and
leaf shapes, the same global modes — that work is the same on every call. :class:`ReplayCache`
traces the program once with ``make_fx(tracing_mode="real")`` (the graph calls aten ops directly:
no mode, no pytree, no side table), keeps the ``GraphModule`` and replays it on later calls.

What may be replayed
--------------------
A graph is a faithful copy of a call only if nothing the call computed depended on tensor
*values* through Python. Three things can break that, and each sends the call to the eager
program (the same numbers, at the eager cost):

* **Values read into Python while tracing** (``.item()``, ``if tensor:``, ``torch.equal``,
  ``.tolist()``) and **data-dependent shapes** (``nonzero``, ``masked_select``, boolean-mask
  indexing, ``unique``): a graph bakes in the traced batch's branch, constant or shape. Each such
  read becomes a *guard* in the graph, as torch.compile guards a compiled frame: a node, at the
  place of the read, that recomputes the value (or takes the output's shape) from the replayed
  tensors and compares it with the traced one. Every guard runs before the graph returns; one that
  fails abandons the replay and the call runs eagerly (the same numbers, at the eager cost). A key
  keeps up to ``MAX_VARIANTS`` graphs, one per set of guard values met (the branches of a program,
  e.g. a padding mask that is all ones or not), tried most recently used first; another variant is
  traced, by the same rent-or-buy rule as a new key, only once every existing one has replayed at
  least once. When every variant's guards fail on more than ``MAX_GUARD_MISSES`` of the last
  ``GUARD_WINDOW`` calls (a value that differs on every call: a loss read with ``.item()``) the
  key is computed eagerly for good, with one :class:`~symfast.curvature.per_sample.PerSamplePathWarning`
  that names the read. Reads no guard can check (``.numpy()``, ``__array__``: an array that may
  alias the tensor) mark the key eager at once, with the same warning.
* **State the loss_fn reads outside its arguments** (a module's ``training`` flags, its frozen
  parameters and buffers, hyper-parameters such as ``eps`` or ``negative_slope``, hooks). The
  cache key includes a *state token*: ``loss_fn.replay_state()``, a hashable value that must
  change whenever such state changes. :func:`symfast.curvature.functional_loss` attaches one
  (:func:`module_state` of the module and the loss). A frozen tensor updated *in place* needs no
  new token: the graph holds the tensor itself, not a copy of its values.
* **An arbitrary loss_fn without a token.** Nothing tells the cache what such a function reads
  (globals, closures, attributes of objects it captured), so it is never replayed: it runs
  eagerly, as before. Declare its state with :func:`replayable` (``state=lambda: ()`` for a pure
  function of its arguments) to opt in.

A failure while tracing is settled by running the program eagerly on the same call. If the eager
run succeeds, the tracer was at fault: the key is marked eager, with a warning. If it fails, the
error propagates; errors of the types given in ``remember`` (the jets' "cannot follow this model"
signal) are remembered per key and re-raised without running the program again, since they
depend on the program only.

When to trace
-------------
Tracing costs about as much as 15-20 eager calls (``make_fx`` records every aten op with its
metadata; measured on the benchmark MLP and transformer block), and a replay saves 40-50% of an
eager call on small models. A program is therefore run eagerly the first ``trace_after`` times its
key is seen (default 16: the rent-or-buy rule, so that a program never costs more than about twice
its cost with the best choice made in hindsight), traced on the next call and replayed from then
on. A loop (training, a monitor) pays one trace per key; a few one-off calls pay nothing extra.
:func:`configure` changes ``trace_after`` and ``maxsize`` of the default cache.

The cache
---------
Entries are keyed on ``loss_fn`` weakly (an entry goes when its loss_fn is collected) and on
everything else above; the cache holds at most ``maxsize`` entries, least recently used first
out. :func:`clear_cache` empties the default cache, :func:`cache_info` reports its counters and
the path of the last call (``"replay"``, ``"trace"`` or ``"eager: <reason>"``; a call whose guards
failed says ``"eager: guard failed (<read>: traced <value>, got <value>)"``).
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, get_proxy_mode, get_proxy_slot, make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from .per_sample import PerSamplePathWarning

__all__ = ["ReplayCache", "ReplayInfo", "replayable", "module_state", "jet_derivatives", "configure",
           "clear_cache", "cache_info", "STATE_ATTR"]

Tensor = torch.Tensor
# jet_derivatives(op, loss_fn, params, directions, batch, exact, *, second) -> (losses, g, h)
JetProgram = Callable[..., Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]

STATE_ATTR = "replay_state"
DEFAULT_MAXSIZE = 16
DEFAULT_TRACE_AFTER = 16  # eager calls of a program before it is traced (see the module doc)
MAX_VARIANTS = 4  # graphs per key, one per set of guard values (the branches of a program)
GUARD_WINDOW, MAX_GUARD_MISSES = 8, 4  # more misses than this in the window: the key runs eagerly


# ====================================================== state tokens
def replayable(loss_fn: Callable, state: Optional[Callable[[], Hashable]] = None) -> Callable:
    """``loss_fn`` declared replayable: a wrapper with ``replay_state = state``.

    ``state()`` must return a hashable value that changes whenever anything ``loss_fn`` reads
    outside its arguments changes (``lambda: ()`` for a pure function of ``(params, batch)``).
    Keep the returned function: the cache is keyed on it.
    """
    if not callable(loss_fn):
        raise TypeError(f"replayable: loss_fn must be callable, got {type(loss_fn).__name__}")
    if state is None:
        state = tuple
    elif not callable(state):
        raise TypeError(f"replayable: state must be None or a callable returning a hashable token, "
                        f"got {type(state).__name__}")

    def wrapped(params, batch):
        return loss_fn(params, batch)

    setattr(wrapped, STATE_ATTR, state)
    return wrapped


_SIMPLE = (bool, int, float, str, type(None), torch.dtype, torch.device)
_SIMPLE_TYPES = frozenset(_SIMPLE)


def _simple(v: Any) -> bool:
    # the exact-type test first: the token is built on every call, and most attributes are plain
    return (type(v) in _SIMPLE_TYPES or isinstance(v, _SIMPLE)
            or (isinstance(v, tuple) and all(isinstance(x, _SIMPLE) for x in v)))


def _tensor_id(t: Optional[Tensor]) -> Hashable:
    # identity, not values: a graph holds the tensor itself, so an in-place update is seen on replay
    if t is None:
        return None
    return id(t), t.shape, t.dtype, t.device, t.requires_grad


def module_state(*objs: Any) -> Hashable:
    """A token of what a forward pass of these modules reads besides its inputs.

    Per submodule: its type, ``training`` flag, plain hyper-parameters (numbers, strings, tuples
    of them: ``eps``, ``negative_slope``, ``stride``, ...), hooks, and the identity, shape,
    dtype and device of its parameters and buffers; plus the global module hooks. Non-modules
    (a plain loss function) contribute their identity.
    """
    from torch.nn.modules import module as _module

    items = [tuple(_module._global_forward_hooks), tuple(_module._global_forward_pre_hooks)]
    for obj in objs:
        if not isinstance(obj, torch.nn.Module):
            items.append(id(obj))
            continue
        for m in obj.modules():
            d = m.__dict__
            items.append((
                type(m), m.training,
                tuple([(k, v) for k, v in d.items() if k[:1] != "_" and k != "training" and _simple(v)]),
                tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
                tuple([(k, _tensor_id(v)) for k, v in m._parameters.items()]),
                tuple([(k, _tensor_id(v)) for k, v in m._buffers.items()]),
            ))
    return tuple(items)


# ====================================================== guards on values read while tracing
class _GuardFailed(Exception):
    """A replayed value or shape differs from the traced one: this graph does not describe the call."""


def _same(a: Any, b: Any) -> bool:
    """Equal as the eager program would see them: -0.0 is not 0.0 (1/x tells), NaN is NaN."""
    if isinstance(a, float) and isinstance(b, float):
        if a != a or b != b:
            return a != a and b != b
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if type(a) is not type(b):  # True == 1, but a program may test isinstance
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _tolist(t: Tensor) -> Any:
    return t.tolist()


def _true_counts(*masks: Tensor) -> Tuple[int, ...]:
    return tuple(int(m.count_nonzero()) for m in masks)


class _Guard(torch.nn.Module):
    """What a guard node checks: recomputes a value read into Python while tracing and compares it
    with the traced value (``fn`` is None: compares its inputs' shapes). A submodule of the graph, so
    that the graph holds it; :func:`_check` calls it."""

    def __init__(self, what: str, fn: Optional[Callable], template: list, spec: Any, expected: Any):
        super().__init__()
        self.what, self.fn, self.template, self.spec, self.expected = what, fn, template, spec, expected

    def check(self, *tensors: Tensor) -> None:
        if self.fn is None:
            got: Any = tuple(tuple(t.shape) for t in tensors)
        else:
            it = iter(tensors)
            args, kwargs = tree_unflatten([next(it) if t is None else t for t in self.template], self.spec)
            got = self.fn(*args, **kwargs)
        if not _same(got, self.expected):
            raise _GuardFailed(f"{self.what}: traced {_short(self.expected)}, got {_short(got)}")


@torch.fx.node.has_side_effect  # dead-code elimination keeps it although nothing uses its output
def _check(guard: _Guard, *tensors: Tensor) -> None:
    guard.check(*tensors)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


class _Guards:
    """Adds :class:`_Guard` nodes to the graph being traced, at the place of each read."""

    def __init__(self, record: Dict[str, str]):
        self.record = record
        self.count = 0
        self.tracer = None

    def _slot(self, t: Tensor) -> Any:
        return get_proxy_slot(t, self._tracer(), None)

    def _tracer(self):
        if self.tracer is None:  # make_fx's mode: entered before the program runs, current during it
            self.tracer = get_proxy_mode().tracer
        return self.tracer

    def _node_arg(self, t: Tensor) -> Any:
        slot = self._slot(t)
        return t if slot is None else slot.proxy  # untracked: a constant the graph holds itself

    def add(self, what: str, fn: Optional[Callable], args: tuple, kwargs: dict, expected: Any) -> None:
        """A guard that ``fn(*args, **kwargs)`` (its inputs' shapes if ``fn`` is None) is ``expected``."""
        tracer = self._tracer()
        leaves, spec = tree_flatten((args, kwargs))
        template = [None if isinstance(x, Tensor) else x for x in leaves]
        inputs = tuple(self._node_arg(x) for x in leaves if isinstance(x, Tensor))
        name = f"_replay_guard{self.count}"
        self.count += 1
        tracer.root.add_module(name, _Guard(what, fn, template, spec, expected))
        with disable_proxy_modes_tracing():
            guard = tracer.create_proxy("get_attr", name, (), {})
            tracer.create_proxy("call_function", _check, (guard, *inputs), {})

    def shapes(self, what: str, outs: Sequence[Tensor]) -> None:
        if any(self._slot(t) is None for t in outs):
            # made from constants only: the graph would hold its values, not recompute them
            self.record.setdefault("found", f"{what} of constant tensors")
            return
        self.add(what, None, tuple(outs), {}, tuple(tuple(t.shape) for t in outs))


_BOOL_INDEXED = ("aten::index_put", "aten::index_put_", "aten::_index_put_impl_")


def _bool_masks(indices: Any) -> list:
    return [i for i in (indices or ()) if isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8)]


class _ValueReads(TorchDispatchMode):
    """Turns every aten-level read of tensor values into a guard.

    A value read (``_local_scalar_dense`` under ``.item()``, ``bool(t)``, ``int(t)``; ``equal``) is
    computed on the real tensors with the tracer switched off, so the graph gets no stray node for it
    and the tracer does not refuse it, and guarded. A data-dependent shape (``nonzero``, boolean
    ``index``, ``unique``) is traced as usual and its output shape guarded. A boolean-mask
    assignment keeps its shape but needs as many values as the mask has True elements (unless it
    assigns one value): their counts are guarded.
    """

    def __init__(self, guards: _Guards):
        super().__init__()
        self.guards = guards

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.data_dependent_output in func.tags or func is torch.ops.aten.is_nonzero.default:
            with disable_proxy_modes_tracing():
                value = func(*args, **kwargs)
            self.guards.add(f"value read into Python by {func}", func, args, kwargs, value)
            return value
        if (func._schema.name in _BOOL_INDEXED and len(args) > 2 and _bool_masks(args[1])
                and not (isinstance(args[2], Tensor) and args[2].numel() == 1)):  # one value fits any count
            masks = _bool_masks(args[1])
            with disable_proxy_modes_tracing():
                counts = _true_counts(*masks)
            self.guards.add(f"{func} (True elements of its boolean mask)", _true_counts, tuple(masks), {}, counts)
        out = func(*args, **kwargs)
        if torch.Tag.dynamic_output_shape in func.tags and (
                func._schema.name != "aten::index" or _bool_masks(args[1] if len(args) > 1 else ())):
            # (integer indices make no data-dependent shape: no guard for them)
            outs, _ = tree_flatten(out)
            self.guards.shapes(f"shape of {func}", [t for t in outs if isinstance(t, Tensor)])
        return out


class _PyValueReads(TorchFunctionMode):
    """The Python-level reads that bypass the dispatcher: ``.tolist()`` is guarded; ``.numpy()`` and
    ``__array__`` hand out an array that may alias the tensor, which no guard can follow."""

    def __init__(self, guards: _Guards):
        super().__init__()
        self.guards = guards

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "tolist" and args and isinstance(args[0], Tensor) and not kwargs:
            with disable_proxy_modes_tracing():
                value = func(*args)
            self.guards.add("Tensor.tolist", _tolist, (args[0],), {}, value)
            return value
        if name in ("numpy", "__array__"):
            self.guards.record.setdefault("found", f"Tensor.{name}")
        return func(*args, **kwargs)


def _write_before_guard(graph: torch.fx.Graph) -> str:
    """The first in-place op that writes to a graph input or constant (a buffer updated in train
    mode), through views, ahead of a guard; "" if none. Such a write cannot be undone when the guard
    fails and the call runs eagerly."""
    written = ""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is _check:
            if written:
                return written
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        for i, arg in enumerate(schema.arguments):
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            if arg.alias_info is None or not arg.alias_info.is_write or not isinstance(value, torch.fx.Node):
                continue
            base = value
            while (base.op == "call_function" and isinstance(base.target, torch._ops.OpOverload) and base.args
                   and isinstance(base.args[0], torch.fx.Node) and base.target._schema.returns
                   and base.target._schema.returns[0].alias_info is not None):
                base = base.args[0]  # a view: the write lands in what it views
            if base.op in ("placeholder", "get_attr") and not written:
                written = f"{node.target} on {base.target}"
    return ""


@contextlib.contextmanager
def _one_fake_mode():
    """One FakeTensorMode for the trace's node metadata.

    Without a tracing context, ``make_fx`` builds a fresh FakeTensorMode (which records a stack
    trace) for every node's metadata; sharing one makes tracing about 40% faster.
    """
    if TracingContext.try_get() is not None:
        yield
        return
    with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))):
        yield


# ====================================================== the cache
@dataclass
class ReplayInfo:
    """Counters of a :class:`ReplayCache` and the path of its last call."""

    traces: int
    replays: int
    eager: int
    size: int
    maxsize: int
    last_path: str
    trace_after: int
    guard_misses: int = 0  # calls whose guards failed in every variant (run eagerly)


@dataclass
class _Variant:
    graph: torch.fx.GraphModule
    replayed: bool = False  # its guards held on a call after its trace


@dataclass
class _Entry:
    variants: List[_Variant] = field(default_factory=list)
    eager_reason: str = ""
    error: Optional[BaseException] = None
    seen: int = 0  # eager calls before the first trace, or since the last one whose guards all failed
    misses: Deque[bool] = field(default_factory=lambda: deque(maxlen=GUARD_WINDOW))


def _tensor_sig(t: Tensor) -> Hashable:
    # strides: the trace resolves reshape into view or copy from the traced input's layout
    return (type(t), tuple(t.shape), t.stride(), t.dtype, t.device, t.layout, t.requires_grad)


def _global_modes() -> Hashable:
    cuda = torch.is_autocast_enabled("cuda") if torch.cuda.is_available() else False
    return (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), cuda, torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled())


class ReplayCache:
    """Traces a jet program once per key and replays it (see the module doc).

    ``cache(program, op, loss_fn, params, directions, batch, exact, second=..., remember=...)``
    returns what ``program(op, loss_fn, params, directions, batch, exact, second=second)``
    returns, a tuple of tensors or None.
    """

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE, *, trace_after: int = DEFAULT_TRACE_AFTER):
        for name, v in (("maxsize", maxsize), ("trace_after", trace_after)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"ReplayCache: {name} must be a non-negative int, got {v!r}")
        self.maxsize = maxsize
        self.trace_after = trace_after
        self._entries: "OrderedDict[Tuple[int, Hashable], _Entry]" = OrderedDict()
        self._owners: Dict[int, weakref.ref] = {}
        self._lock = threading.RLock()
        self.traces = self.replays = self.eager = self.guard_misses = 0
        self.last_path = ""

    # ---------------------------------------------------------- bookkeeping
    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._owners.clear()

    def info(self) -> ReplayInfo:
        with self._lock:
            return ReplayInfo(self.traces, self.replays, self.eager, len(self._entries), self.maxsize, self.last_path,
                              self.trace_after, self.guard_misses)

    def __len__(self) -> int:
        return len(self._entries)

    def _forget(self, owner: int) -> None:
        with self._lock:
            self._owners.pop(owner, None)
            for k in [k for k in self._entries if k[0] == owner]:
                del self._entries[k]

    def _store(self, loss_fn: Callable, key: Hashable, entry: _Entry) -> None:
        if self.maxsize == 0:
            return
        owner = id(loss_fn)
        with self._lock:
            if owner not in self._owners:
                # the callback drops the entries of a collected loss_fn (and so its graphs' constants)
                self._owners[owner] = weakref.ref(loss_fn, lambda _r, owner=owner: self._forget(owner))
            self._entries[(owner, key)] = entry
            self._entries.move_to_end((owner, key))
            while len(self._entries) > self.maxsize:
                (old, _), _ = self._entries.popitem(last=False)
                if not any(k[0] == old for k in self._entries):
                    self._owners.pop(old, None)

    def _lookup(self, loss_fn: Callable, key: Hashable) -> Optional[_Entry]:
        with self._lock:
            owner = id(loss_fn)
            ref = self._owners.get(owner)
            if ref is None or ref() is not loss_fn:
                return None
            entry = self._entries.get((owner, key))
            if entry is not None:
                self._entries.move_to_end((owner, key))
            return entry

    # ---------------------------------------------------------- key
    @staticmethod
    def _key(program, op, loss_fn, params, directions, batch, exact, second):
        """(key, batch leaves, batch spec) or (None, reason): a call that cannot be keyed runs eagerly."""
        token_fn = getattr(loss_fn, STATE_ATTR, None)
        if token_fn is None:
            return None, "loss_fn declares no replay_state (see symfast.curvature.replay.replayable)"
        try:
            weakref.ref(loss_fn)
        except TypeError:
            return None, f"loss_fn ({type(loss_fn).__name__}) cannot be weakly referenced"
        if torch.is_inference_mode_enabled():
            return None, "inference mode is on"
        leaves, spec = tree_flatten(batch)
        consts = []
        for leaf in leaves:
            if isinstance(leaf, Tensor):
                consts.append(_tensor_sig(leaf))
            else:
                consts.append((type(leaf), leaf))  # baked into the graph: its value is part of the key
        exact_sig = (type(exact), getattr(exact, "op", None), getattr(exact, "decompose_norms", None),
                     getattr(exact, "per_sample", None))
        key = (program, op, exact_sig, bool(second),
               tuple((k, _tensor_sig(v)) for k, v in params.items()),
               tuple((k, _tensor_sig(v)) for k, v in directions.items()),
               spec, tuple(consts), token_fn(), _global_modes())
        try:
            hash(key)
        except TypeError as exc:
            return None, f"a non-tensor leaf of the batch or the state token is not hashable ({exc})"
        return key, leaves, spec

    # ---------------------------------------------------------- call
    def __call__(self, program: JetProgram, op: str, loss_fn: Callable, params: Dict[str, Tensor],
                 directions: Dict[str, Tensor], batch: Any, exact: Any, *, second: bool = True,
                 remember: Tuple[type, ...] = ()):
        def eager(reason: str):
            with self._lock:
                self.eager += 1
                self.last_path = f"eager: {reason}"
            return program(op, loss_fn, params, directions, batch, exact, second=second)

        keyed = self._key(program, op, loss_fn, params, directions, batch, exact, second)
        if keyed[0] is None:
            return eager(keyed[1])
        key, leaves, spec = keyed
        flat = [*params.values(), *directions.values(), *(leaf for leaf in leaves if isinstance(leaf, Tensor))]

        entry = self._lookup(loss_fn, key)
        if entry is not None:
            if entry.error is not None:
                self.last_path = f"error: remembered {type(entry.error).__name__}"
                # the remembered exception itself (its class may take other arguments than its args)
                raise entry.error.with_traceback(None)
            if entry.eager_reason:
                return eager(entry.eager_reason)
        else:
            entry = _Entry()
        if entry.variants:
            out, failure = self._replay(entry, flat)
            if failure is None:
                return out
            with self._lock:
                self.guard_misses += 1
            if not (len(entry.variants) < MAX_VARIANTS and all(v.replayed for v in entry.variants)):
                # no room for another variant, or one that never replayed (its values are not
                # recurring): count the miss, and stop replaying a key that misses on most calls
                entry.misses.append(True)
                if sum(entry.misses) > MAX_GUARD_MISSES:
                    reason = (f"its guards failed on {sum(entry.misses)} of the last {len(entry.misses)} calls "
                              f"(last: {failure})")
                    self._mark_eager(loss_fn, key, op, reason)
                    return eager(reason)
                return eager(f"guard failed ({failure})")
            if entry.seen < self.trace_after:
                # another branch of a program whose graphs pay off: traced by the rule of a new key
                entry.seen += 1
                return eager(f"guard failed ({failure}); seen {entry.seen} time(s), traced after {self.trace_after}")
        elif entry.seen < self.trace_after:
            # a program met once may never come back: tracing it would cost more than it saves
            entry.seen += 1
            self._store(loss_fn, key, entry)
            return eager(f"seen {entry.seen} time(s), traced after {self.trace_after}")

        graph, out = self._trace(program, op, loss_fn, params, directions, batch, exact, second, remember, key,
                                 leaves, spec)
        if graph is None:  # settled eagerly: self.last_path and the entry say how
            return out
        entry.variants.append(_Variant(graph))
        entry.seen = 0
        self._store(loss_fn, key, entry)
        self.last_path = "trace"
        return out

    def _replay(self, entry: "_Entry", flat: list):
        """(out, None) from the first variant whose guards hold, or (None, the last failure)."""
        failure = ""
        for i, variant in enumerate(list(entry.variants)):
            try:
                # Below autograd: the graph detaches its inputs and outputs, so no op in it needs
                # autograd's dispatch, which cost each aten op its autograd wrapper and each fused
                # jet op a Python autograd function.
                with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
                    out = variant.graph(*flat)
            except _GuardFailed as exc:
                failure = str(exc)
                continue
            with self._lock:
                variant.replayed = True
                if i and variant in entry.variants:  # most recently used first
                    entry.variants.remove(variant)
                    entry.variants.insert(0, variant)
                entry.misses.append(False)
                self.replays += 1
                self.last_path = "replay"
            return out, None
        return None, failure

    def _trace(self, program, op, loss_fn, params, directions, batch, exact, second, remember, key, leaves, spec):
        """(the program's graph with its guards, or None when it cannot be replayed; the call's output)."""
        names, dnames = list(params), list(directions)
        is_tensor = [isinstance(leaf, Tensor) for leaf in leaves]
        flat = [*params.values(), *directions.values(), *(leaf for leaf in leaves if isinstance(leaf, Tensor))]
        record: Dict[str, str] = {}
        guards = _Guards(record)
        P, D = len(names), len(dnames)

        outs = []

        def traced(*xs):
            it = iter(xs[P + D:])
            b = tree_unflatten([next(it) if t else leaf for leaf, t in zip(leaves, is_tensor)], spec)
            with _PyValueReads(guards), _ValueReads(guards):
                out = program(op, loss_fn, dict(zip(names, xs[:P])), dict(zip(dnames, xs[P:P + D])), b, exact,
                              second=second)
            # real-mode tracing runs the program itself: its outputs are this call's (without the
            # autograd history a replay has not either)
            outs.append(tree_map_only(Tensor, lambda t: t.detach(), out))
            return out

        with self._lock:
            self.traces += 1
        try:
            with _one_fake_mode():
                graph = make_fx(traced, tracing_mode="real")(*flat)
        except Exception as exc:  # noqa: BLE001 - the eager run decides whose failure it is
            # Run eagerly: an error of the program itself is raised again (remembered if its type is
            # in `remember` and no unguardable read was met on the way), and then no graph is cached.
            try:
                out = program(op, loss_fn, params, directions, batch, exact, second=second)
            except remember as eager_exc:
                # no value read on the way: the error belongs to the program, not to one branch of it
                if "found" not in record and guards.count == 0:
                    self._store(loss_fn, key, _Entry(error=eager_exc.with_traceback(None)))
                raise
            with self._lock:
                self.eager += 1
            if "found" in record:
                reason = f"loss_fn reads tensor values into Python ({record['found']})"
            else:
                first = str(exc).splitlines()[0][:120] if str(exc) else ""
                reason = f"tracing failed ({type(exc).__name__}: {first})"
            self._mark_eager(loss_fn, key, op, reason)
            self.last_path = f"eager: {reason}"
            return None, out
        graph.graph.eliminate_dead_code()
        reason = ""
        if "found" in record:
            reason = f"loss_fn reads tensor values into Python ({record['found']})"
        elif _write_before_guard(graph.graph):
            reason = (f"loss_fn writes to a tensor it did not create ({_write_before_guard(graph.graph)}) before "
                      "a value read: a replay abandoned at that read would write twice")
        if reason:
            self._mark_eager(loss_fn, key, op, reason)
            with self._lock:
                self.eager += 1
                self.last_path = f"eager: {reason}"
            return None, outs[0]
        graph.recompile()
        return graph, outs[0]

    def _mark_eager(self, loss_fn: Callable, key: Hashable, op: str, reason: str) -> None:
        # once per key: later calls find the entry and run eagerly without a word
        self._store(loss_fn, key, _Entry(eager_reason=reason))
        warnings.warn(f"{op}: {reason}; this program is computed eagerly on every call (exact, "
                          "without the replay's speed-up)", PerSamplePathWarning, stacklevel=4)


_DEFAULT = ReplayCache()


def jet_derivatives(program: JetProgram, op: str, loss_fn: Callable, params: Dict[str, Tensor],
                    directions: Dict[str, Tensor], batch: Any, exact: Any, *, second: bool = True,
                    remember: Sequence[type] = ()):
    """``program(op, loss_fn, params, directions, batch, exact, second=second)`` through the default cache."""
    return _DEFAULT(program, op, loss_fn, params, directions, batch, exact, second=second, remember=tuple(remember))


def configure(*, maxsize: Optional[int] = None, trace_after: Optional[int] = None) -> None:
    """Sets the default cache's bound (entries beyond it are dropped, least recently used first) and
    how many eager calls of a program come before its trace (0: trace on the first call)."""
    check = ReplayCache(maxsize if maxsize is not None else _DEFAULT.maxsize,
                        trace_after=trace_after if trace_after is not None else _DEFAULT.trace_after)
    with _DEFAULT._lock:
        _DEFAULT.maxsize, _DEFAULT.trace_after = check.maxsize, check.trace_after
        while len(_DEFAULT._entries) > _DEFAULT.maxsize:
            _DEFAULT._entries.popitem(last=False)


def clear_cache() -> None:
    """Drops every traced graph of the default cache."""
    _DEFAULT.clear()


def cache_info() -> ReplayInfo:
    """Counters and last path of the default cache."""
    return _DEFAULT.info()
