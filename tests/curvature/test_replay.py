"""symfast.curvature.replay: a traced jet program replays the eager one exactly, and only when it may.

Oracles: the eager program (the same computation without the cache), the torch.func reference
path, and nested torch.func.jvp written out here. Every "retraces" test also checks the numbers,
so a stale graph cannot pass.
"""

from __future__ import annotations

import gc
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn

from symfast.curvature import functional_loss, per_sample_curvatures, replay
from symfast.curvature.jets import JetFallback
from symfast.curvature.per_sample import PerSamplePathWarning

DT = torch.float64


def _randn(*shape, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _dirs(params, K, seed=1):
    return {k: _randn(K, *v.shape, seed=seed + i, dtype=v.dtype) for i, (k, v) in enumerate(params.items())}


def _exact(x, y):
    # what the replayed value must be: the same program run eagerly (rounding identical)
    torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.fixture
def cache(monkeypatch):
    """A fresh default cache that traces on the first call (fewer calls per test)."""
    fresh = replay.ReplayCache(trace_after=0)
    monkeypatch.setattr(replay, "_DEFAULT", fresh)
    return fresh


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)).to(DT)


def _batch(B=5, seed=3):
    return _randn(B, 6, seed=seed), torch.arange(B) % 3


def _eager(loss_fn, params, dirs, batch, **kw):
    """The same call without the cache: a loss_fn without a state token is never replayed."""
    return per_sample_curvatures(lambda p, b: loss_fn(p, b), params, dirs, batch, **kw)


# ============================================================ replay == eager
def test_replay_equals_eager_and_reference_and_is_traced_once():
    replay.clear_cache()
    loss_fn, params = functional_loss(_model(), nn.CrossEntropyLoss(reduction="none"))
    dirs, batch = _dirs(params, 2), _batch()
    eager = _eager(loss_fn, params, dirs, batch)
    outs, paths = [], []
    before = replay.cache_info().traces
    n = replay.DEFAULT_TRACE_AFTER
    for _ in range(n + 2):  # default: eager the first n times, traced on the next call, replayed after
        outs.append(per_sample_curvatures(loss_fn, params, dirs, batch))
        paths.append(replay.cache_info().last_path)
    assert [p.split(",")[0] for p in paths[:n]] == [f"eager: seen {i + 1} time(s)" for i in range(n)]
    assert paths[n:] == ["trace", "replay"]
    assert replay.cache_info().traces == before + 1
    for out in outs:
        _exact(out, eager)
    ref = per_sample_curvatures(loss_fn, params, dirs, batch, method="reference")
    torch.testing.assert_close(outs[-1], ref, rtol=1e-9, atol=1e-12)
    replay.clear_cache()
    assert replay.cache_info().size == 0


def test_configure_bounds_the_default_cache(monkeypatch):
    monkeypatch.setattr(replay, "_DEFAULT", replay.ReplayCache())
    fn = replay.replayable(_pure)
    p = {"w": _randn(3, 2), "v": _randn(3, seed=5)}
    for B in (2, 3, 4):
        replay.jet_derivatives(_jvp_program, "op", fn, p, _dirs(p, 1), (_randn(B, 3), 1.0), None, second=False)
    assert replay.cache_info().size == 3  # three keys seen once (not traced yet)
    replay.configure(maxsize=1, trace_after=0)
    info = replay.cache_info()
    assert (info.size, info.maxsize) == (1, 1)
    replay.jet_derivatives(_jvp_program, "op", fn, p, _dirs(p, 1), (_randn(5, 3), 1.0), None, second=False)
    assert replay.cache_info().last_path == "trace"
    with pytest.raises(ValueError, match="maxsize must be a non-negative int, got -1"):
        replay.configure(maxsize=-1)


def _jvp_program(op, loss_fn, params, directions, batch, exact, *, second=True):
    """(losses, g, h) by nested torch.func.jvp, one direction at a time: the engine's signature."""
    K = next(iter(directions.values())).shape[0]
    gs, hs = [], []
    for k in range(K):
        n = {name: d[k] for name, d in directions.items()}

        def along(p):
            return torch.func.jvp(lambda q: loss_fn(q, batch), (p,), (n,))[1]

        gs.append(along(params))
        hs.append(torch.func.jvp(along, (params,), (n,))[1] if second else None)
    return loss_fn(params, batch), torch.stack(gs, 1), torch.stack(hs, 1) if second else None


def _pure(p, b):
    x, scale = b
    return scale * torch.tanh(x @ p["w"]).pow(2).sum(1) + (x @ p["v"]).exp()


def test_all_three_outputs_replayed_and_keys_change_with_shape_K_dtype_constants():
    cache = replay.ReplayCache(trace_after=0)
    fn = replay.replayable(_pure)

    def call(B=4, K=2, dtype=DT, scale=0.5, second=True):
        p = {"w": _randn(3, 2, dtype=dtype), "v": _randn(3, seed=5, dtype=dtype)}
        d = _dirs(p, K)
        b = (_randn(B, 3, seed=7, dtype=dtype), scale)
        got = cache(_jvp_program, "op", fn, p, d, b, None, second=second)
        want = _jvp_program("op", _pure, p, d, b, None, second=second)
        for g, w in zip(got, want):
            if w is None:
                assert g is None
            else:
                _exact(g, w)
        return cache.info()

    assert call().traces == 1
    info = call()
    assert (info.traces, info.replays, info.last_path) == (1, 1, "replay")
    for change, kw in [("batch size", dict(B=6)), ("K", dict(K=3)), ("dtype", dict(dtype=torch.float32)),
                       ("a constant leaf of the batch", dict(scale=2.0)), ("second", dict(second=False))]:
        before = cache.info().traces
        assert call(**kw).traces == before + 1, change
        assert call(**kw).last_path == "replay", change


def _check_call(cache, fn, p, d, x, second=True):
    """One call through the cache; its outputs must be the eager program's, rounding included."""
    got = cache(_jvp_program, "op", fn, p, d, x, None, second=second)
    for g, w in zip(got, _jvp_program("op", fn, p, d, x, None, second=second)):
        _exact(g, w)
    return cache.info()


def _branchy(p, x):
    out = torch.tanh(x @ p["w"]).sum(1)
    return out * 2 if (x > 0).all() else out.pow(2)


def test_a_branch_on_a_batch_value_is_guarded_and_each_branch_gets_its_graph():
    cache = replay.ReplayCache(trace_after=0)
    fn = replay.replayable(_branchy)
    p = {"w": _randn(3, 2)}
    d = _dirs(p, 1)
    pos, neg = _randn(4, 3).abs() + 0.1, _randn(4, 3, seed=9)  # the two branches, same shapes: one key
    assert not (neg > 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)
        paths = [_check_call(cache, fn, p, d, x).last_path for x in (pos, neg, pos, neg, neg, pos, neg)]
    # the second batch fails the first graph's guard before the first graph has ever replayed: eager,
    # no second trace yet; after a replay, the next miss traces the other branch
    assert paths[0] == "trace"
    assert re.fullmatch(r"eager: guard failed \(value read into Python by aten\._local_scalar_dense\.default: "
                        r"traced True, got False\)", paths[1])
    assert paths[2:] == ["replay", "trace", "replay", "replay", "replay"]
    info = cache.info()
    assert (info.traces, info.replays, info.guard_misses, info.eager) == (2, 4, 2, 1)


def test_a_value_that_differs_on_every_call_costs_one_trace_then_runs_eagerly():
    cache = replay.ReplayCache(trace_after=0)

    def rescaled(p, x):  # a Python float read from the batch: a different graph constant for every batch
        return torch.tanh(x @ p["w"]).sum(1) / x.abs().max().item()

    fn = replay.replayable(rescaled)
    p = {"w": _randn(3, 2)}
    d = _dirs(p, 1)
    xs = [_randn(4, 3, seed=s) for s in range(10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)
        paths = [_check_call(cache, fn, p, d, x).last_path for x in xs[:5]]
    assert paths[0] == "trace" and all(q.startswith("eager: guard failed") for q in paths[1:])
    with pytest.warns(PerSamplePathWarning, match=r"guards failed on 5 of the last 5 calls \(last: value read "
                                                  r"into Python by aten\._local_scalar_dense"):
        _check_call(cache, fn, p, d, xs[5])
    for x in xs[6:] + xs[:1]:  # the traced batch too: the key is eager for good
        assert _check_call(cache, fn, p, d, x).last_path.startswith("eager: its guards failed on 5 of the last")
    assert cache.info().traces == 1 and cache.info().replays == 0


def test_guards_compare_values_as_python_sees_them():
    """-0.0 and 0.0 compare equal but 1/x tells them apart: a guard on 0.0 fails on -0.0. A NaN read
    again as NaN holds (NaN != NaN would make such a key miss on every call)."""
    cache = replay.ReplayCache(trace_after=0)

    def fn(p, x):
        v = x[0, 0].item()
        scale = 2.0 if math.copysign(1.0, v) > 0 else 3.0  # what the program does with the value
        return torch.tanh(x[:, 1:] @ p["w"]).sum(1) * scale + (0.0 if v == v else 1.0)

    loss = replay.replayable(fn)
    p = {"w": _randn(2, 2)}
    d = _dirs(p, 1)
    x = _randn(4, 3)
    pos, neg, nan = x.clone(), x.clone(), x.clone()
    pos[0, 0], neg[0, 0], nan[0, 0] = 0.0, -0.0, float("nan")
    paths = [_check_call(cache, loss, p, d, b).last_path for b in (pos, neg, pos, nan, nan)]
    assert paths[0] == "trace" and paths[2] == "replay" and paths[4] == "replay"
    assert paths[1] == "eager: guard failed (value read into Python by aten._local_scalar_dense.default: " \
                       "traced 0.0, got -0.0)"
    assert paths[3] == "trace"  # another variant for NaN, which replays on the next call


_FLAG = torch.ones(())
_READS = {
    # a value of a captured tensor (a constant to the tracer: the guard reads the tensor itself)
    "item": lambda h, x: h * (2.0 if _FLAG.item() > 0 else 3.0),
    "bool": lambda h, x: h * 2.0 if _FLAG else h * 3.0,
    "tolist": lambda h, x: h * (2.0 if _FLAG.reshape(1).tolist()[0] > 0 else 3.0),
    # data-dependent shapes inside the jets and on the batch
    "boolean mask": lambda h, x: h + h[x[:, :2] > 0].sum(),
    "nonzero": lambda h, x: h * torch.nonzero(x[:, 0] > 0).shape[0],
    "masked assignment": lambda h, x: h * _leaky(x).sum(1, keepdim=True),
}


def _leaky(x):
    x = x.clone()
    x[x < 0] = x[x < 0] * 0.5
    return x


@pytest.mark.parametrize("read", list(_READS))
def test_value_reads_of_constants_and_masks_are_guarded(read, monkeypatch):
    cache = replay.ReplayCache(trace_after=1)
    monkeypatch.setattr(replay, "_DEFAULT", cache)

    def fn(p, b):
        x, y = b
        return _READS[read](torch.tanh(x @ p["w"]), x).sum(1) + 0 * y

    loss_fn = replay.replayable(fn)
    p = {"w": _randn(6, 2)}
    d = _dirs(p, 1)
    x, y = _batch()
    flag_read = read in ("item", "bool", "tolist")
    other = x if flag_read else x.abs() + 0.1  # same shapes, other signs: other masks and counts

    def check(x, path, flag=1.0):
        _FLAG.fill_(flag)  # in place: the graph holds the tensor itself, its guard sees the new value
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", PerSamplePathWarning)
                got = per_sample_curvatures(loss_fn, p, d, (x, y))
            assert re.fullmatch(path, cache.info().last_path), cache.info().last_path
            _exact(got, _eager(fn, p, d, (x, y)))
        finally:
            _FLAG.fill_(1.0)

    flag = -1.0 if flag_read else 1.0
    check(x, r"eager: seen 1 time\(s\), traced after 1")
    check(x, "trace")
    check(x, "replay")
    check(other, r"eager: guard failed \(.* traced .*, got .*\); seen 1 time\(s\), traced after 1", flag)
    check(x, "replay")
    check(other, "trace", flag)  # every graph of the key replayed: the other branch gets one
    check(other, "replay", flag)
    check(x, "replay")
    info = cache.info()
    assert (info.traces, info.replays, info.guard_misses) == (2, 4, 2)


def test_a_read_no_guard_can_follow_runs_eagerly(cache):
    def fn(p, x):
        return torch.tanh(x @ p["w"]).sum(1) * float(_FLAG.numpy())

    loss_fn = replay.replayable(fn)
    p = {"w": _randn(3, 2)}
    d, x = _dirs(p, 1), _randn(4, 3)
    with pytest.warns(PerSamplePathWarning, match=r"reads tensor values into Python \(Tensor\.numpy\)"):
        first = per_sample_curvatures(loss_fn, p, d, x)
    _exact(first, _eager(fn, p, d, x))
    _FLAG.fill_(-1.0)
    try:
        got = per_sample_curvatures(loss_fn, p, d, x)
        assert cache.info().last_path.startswith("eager: loss_fn reads tensor values")
        _exact(got, _eager(fn, p, d, x))
    finally:
        _FLAG.fill_(1.0)
    assert cache.info().traces == 1


def test_undeclared_loss_fn_runs_eagerly(cache):
    p = {"w": _randn(3, 2)}
    per_sample_curvatures(lambda q, b: torch.tanh(b @ q["w"]).sum(1), p, _dirs(p, 1), _randn(4, 3))
    info = cache.info()
    assert info.traces == 0 and "declares no replay_state" in info.last_path


# ============================================================ module state
def test_module_state_train_eval_and_hyperparameters_retrace(cache):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.1), nn.Linear(8, 3)).to(DT)
    model[1].running_mean.normal_()
    loss_fn, params = functional_loss(model, nn.CrossEntropyLoss(reduction="none"))
    dirs, batch = _dirs(params, 1), _batch(6)

    def check():
        got = per_sample_curvatures(loss_fn, params, dirs, batch)
        info = cache.info()  # before the eager call below overwrites its path
        _exact(got, _eager(loss_fn, params, dirs, batch))
        return got, info

    model.eval()
    check()
    h_eval, info = check()
    assert info.last_path == "replay"
    model.train()
    h_train, info = check()
    assert info.traces == 2
    assert not torch.allclose(h_train, h_eval)  # the two modes give different numbers: a stale graph would show
    model.eval()
    _, info = check()
    assert info.last_path == "replay" and info.traces == 2  # the eval graph is still cached
    model[2].negative_slope = 0.3
    _, info = check()
    assert info.traces == 3


def test_frozen_parameter_reassigned_retraces_and_updated_in_place_replays(cache):
    model = _model()
    loss_fn, params = functional_loss(model, nn.CrossEntropyLoss(reduction="none"), parameters=["3.weight"])
    dirs, batch = _dirs(params, 2), _batch()

    def check():
        got = per_sample_curvatures(loss_fn, params, dirs, batch)
        info = cache.info()  # before the eager call below overwrites its path
        _exact(got, _eager(loss_fn, params, dirs, batch))
        return got, info

    h0, _ = check()
    old = model[0].weight  # kept alive: its id cannot be reused by the new tensor
    model[0].weight = nn.Parameter(2 * old.detach())
    h1, info = check()
    assert info.traces == 2 and not torch.allclose(h0, h1)
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    h2, info = check()
    assert info.last_path == "replay" and info.traces == 2
    _exact(h2, h0)
    del old


# ============================================================ the cache itself
def test_cache_is_bounded_weak_and_clearable():
    cache = replay.ReplayCache(maxsize=2, trace_after=0)
    fn = replay.replayable(_pure)
    p = {"w": _randn(3, 2), "v": _randn(3, seed=5)}
    d = _dirs(p, 1)

    def call(B):
        cache(_jvp_program, "op", fn, p, d, (_randn(B, 3), 1.0), None, second=False)

    for B in (2, 3, 4):
        call(B)
    assert len(cache) == 2 and cache.info().traces == 3
    call(4)  # most recent: kept
    assert cache.info().traces == 3
    call(2)  # least recently used: evicted, traced again
    assert cache.info().traces == 4 and len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    call(3)
    assert len(cache) == 1
    del fn
    gc.collect()
    assert len(cache) == 0  # an entry goes with its loss_fn


def test_jet_fallback_is_remembered_per_key():
    calls = []

    def refusing(op, loss_fn, params, directions, batch, exact, *, second=True):
        calls.append(1)
        raise JetFallback("add_", "in-place op on a jet")

    cache = replay.ReplayCache(trace_after=0)
    fn = replay.replayable(_pure)
    p = {"w": _randn(3, 2), "v": _randn(3, seed=5)}
    args = (refusing, "op", fn, p, _dirs(p, 1), (_randn(2, 3), 1.0), None)
    for _ in range(3):
        with pytest.raises(JetFallback, match="in-place op"):
            cache(*args, remember=(JetFallback,))
    assert len(calls) == 2  # traced, confirmed by one eager run, then never run again


def test_a_failure_of_the_tracer_alone_runs_eagerly():
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    def traced_badly(op, loss_fn, params, directions, batch, exact, *, second=True):
        if get_proxy_mode() is not None:
            raise JetFallback("sin", "only while tracing")
        return _jvp_program(op, loss_fn, params, directions, batch, exact, second=second)

    cache = replay.ReplayCache(trace_after=0)
    fn = replay.replayable(_pure)
    p = {"w": _randn(3, 2), "v": _randn(3, seed=5)}
    args = ("op", fn, p, _dirs(p, 1), (_randn(2, 3), 1.0), None)
    with pytest.warns(PerSamplePathWarning, match="tracing failed"):
        first = cache(traced_badly, *args, remember=(JetFallback,))
    again = cache(traced_badly, *args, remember=(JetFallback,))
    assert cache.info().last_path.startswith("eager: tracing failed") and cache.info().traces == 1
    for a, b, w in zip(first, again, _jvp_program(*args)):
        _exact(a, w)
        _exact(b, w)


def test_model_the_jets_cannot_follow_falls_back_with_the_same_numbers(cache):
    def fn(p, x):
        h = torch.tanh(x @ p["w"])
        h.mul_(2.0)  # in place on an activation: the jets refuse, the engine runs forward mode
        return h.pow(2).sum(1)

    loss_fn = replay.replayable(fn)
    p = {"w": _randn(3, 2)}
    d, x = _dirs(p, 1), _randn(4, 3)
    want = per_sample_curvatures(fn, p, d, x, method="forward")
    for _ in range(3):
        _exact(per_sample_curvatures(loss_fn, p, d, x), want)
    assert cache.info().last_path == "error: remembered JetFallback" and cache.info().traces == 1


def test_a_write_to_a_captured_tensor_ahead_of_a_guard_runs_eagerly(cache):
    """A failed guard abandons the replay where it stands; a tensor the program updates in place
    before the read (a call counter, running statistics) would then be written again by the eager
    call."""
    calls = torch.zeros((), dtype=torch.int64)

    def fn(p, x):
        calls.add_(1)
        out = torch.tanh(x @ p["w"]).sum(1)
        return out * 2 if (x > 0).all() else out  # a value read after the write

    loss_fn = replay.replayable(fn)
    p = {"w": _randn(3, 2)}
    d = _dirs(p, 1)
    pos, neg = _randn(4, 3).abs() + 0.1, _randn(4, 3, seed=9)
    counts = [int(calls)]
    with pytest.warns(PerSamplePathWarning, match=r"writes to a tensor it did not create \(aten\.add_\.Tensor on "):
        first = per_sample_curvatures(loss_fn, p, d, pos)  # the trace is the eager run of this call
    counts.append(int(calls))
    for x in (neg, pos, neg):
        got = per_sample_curvatures(loss_fn, p, d, x)
        assert cache.info().last_path.startswith("eager: loss_fn writes to a tensor it did not create")
        counts.append(int(calls))
        _exact(got, _eager(fn, p, d, x))
        calls.sub_(1)  # the eager check's own call
    assert counts == [counts[0] + i for i in range(5)]  # one write per call, the traced one too
    _exact(first, _eager(fn, p, d, pos))
