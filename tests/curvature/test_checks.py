"""symfast.curvature.checks: bad input is refused before anything is computed, with a message that
names the argument and says what was expected and what was received.

(Key, shape, K and dtype messages of ``directions`` are pinned in test_curvature.py; here: non-finite
values, devices, ``onto``, and that the refusal comes before the first call of ``loss_fn``.)
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from symfast.curvature import per_sample_curvatures, per_sample_directional_derivatives, per_sample_hvp
from symfast.curvature.checks import check_finite
from symfast.curvature.per_sample import PerSamplePathWarning
from symfast.ops.checks import DeviceMismatchError

DT = torch.float64
B = 4


def _setup():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 2, generator=g, dtype=DT), "b": torch.randn(2, generator=g, dtype=DT)}
    dirs = {k: torch.randn(2, *v.shape, generator=g, dtype=DT) for k, v in params.items()}
    x = torch.randn(B, 3, generator=g, dtype=DT)
    calls = []

    def loss_fn(p, x):
        calls.append(1)
        return torch.tanh(x @ p["w"] + p["b"]).pow(2).sum(1)

    return loss_fn, params, dirs, x, calls


def _poison(t, nan=(), inf=()):
    t = t.clone()
    for i in nan:
        t.view(-1)[i] = float("nan")
    for i in inf:
        t.view(-1)[i] = float("-inf")
    return t


CALLS = {
    "curvatures": lambda f, p, d, x, **kw: per_sample_curvatures(f, p, d, x, **kw),
    "derivatives": lambda f, p, d, x, **kw: per_sample_directional_derivatives(f, p, d, x, **kw),
    "hvp": lambda f, p, d, x, **kw: per_sample_hvp(f, p, {k: v[0] for k, v in d.items()}, x, **kw),
    "hvp-onto": lambda f, p, d, x, **kw: per_sample_hvp(f, p, {k: v[0] for k, v in d.items()}, x, onto=d, **kw),
}


@pytest.mark.parametrize("method", ["fast", "reference"])
@pytest.mark.parametrize("api", list(CALLS))
def test_non_finite_parameter_is_named_with_counts_before_any_call(api, method):
    loss_fn, params, dirs, x, calls = _setup()
    params["w"] = _poison(params["w"], nan=(1, 4), inf=(3,))
    msg = "params['w'] must be finite, got 2 NaN and 1 inf among its 6 entries (first at index (0, 1))"
    with pytest.raises(ValueError, match=re.escape(msg)):
        CALLS[api](loss_fn, params, dirs, x, method=method)
    assert calls == []


def test_non_finite_direction_is_named():
    loss_fn, params, dirs, x, calls = _setup()
    dirs["b"] = _poison(dirs["b"], inf=(3,))
    with pytest.raises(ValueError, match=re.escape("directions['b'] must be finite, got 0 NaN and 1 inf among "
                                                   "its 4 entries (first at index (1, 1))")):
        per_sample_curvatures(loss_fn, params, dirs, x)
    onto = {k: v.clone() for k, v in dirs.items()}
    dirs["b"] = torch.zeros_like(dirs["b"])
    with pytest.raises(ValueError, match=re.escape("onto['b'] must be finite")):
        per_sample_hvp(loss_fn, params, {k: v[0] for k, v in dirs.items()}, x, onto=onto)
    assert calls == []


def test_check_finite_accepts_finite_empty_and_zero_dim_tensors():
    check_finite("op", "params", {"a": torch.zeros(0), "b": torch.ones(()), "c": torch.randn(2, 3)})
    with pytest.raises(ValueError, match=re.escape("params['s'] must be finite, got 1 NaN and 0 inf among its "
                                                   "1 entries (first at index ())")):
        check_finite("op", "params", {"a": torch.ones(2), "s": torch.tensor(float("nan"))})


def test_check_finite_accepts_finite_entries_whose_sum_overflows():
    big = torch.full((4,), 3e38)  # finite float32 entries, sum inf: the screen must not be the verdict
    check_finite("op", "params", {"big": big, "half": torch.full((3,), 6e4, dtype=torch.float16)})
    with pytest.raises(ValueError, match=re.escape("params['big'] must be finite, got 0 NaN and 1 inf")):
        check_finite("op", "params", {"big": torch.cat([big, torch.tensor([float("inf")])])})


@pytest.mark.parametrize("arg", ["directions", "onto"])
def test_direction_on_another_device_is_refused_before_any_call(arg):
    loss_fn, params, dirs, x, calls = _setup()
    bad = {**dirs, "w": dirs["w"].to("meta")}
    msg = re.escape(f"{arg}['w'] must be on cpu like params['w'], got meta")
    with pytest.raises(DeviceMismatchError, match=msg):
        if arg == "directions":
            per_sample_directional_derivatives(loss_fn, params, bad, x)
        else:
            per_sample_hvp(loss_fn, params, {k: v[0] for k, v in dirs.items()}, x, onto=bad)
    assert calls == []


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda d: {"w": d["w"]}, r"directions is missing keys \['b'\]"),
        (lambda d: {**d, "w": d["w"][:, :2]}, r"directions\['w'\] must have shape .* got \(2, 2, 2\)"),
        (lambda d: {**d, "b": d["b"].float()}, r"directions\['b'\] must have dtype torch.float64 .* got torch.float32"),
    ],
)
@pytest.mark.parametrize("api", ["curvatures", "derivatives"])
def test_bad_directions_never_reach_loss_fn(bad, match, api):
    loss_fn, params, dirs, x, calls = _setup()
    with pytest.raises((ValueError, TypeError), match=match):
        CALLS[api](loss_fn, params, bad(dirs), x)
    assert calls == []


def test_scalar_loss_is_the_same_error_on_every_call(monkeypatch):
    # the fast path traces a program it has seen before (here: at once): the loss_fn's own error
    # must come out unchanged, not as a tracing failure
    from symfast.curvature import functional_loss, replay

    monkeypatch.setattr(replay, "_DEFAULT", replay.ReplayCache(trace_after=0))

    model = torch.nn.Linear(3, 2).to(DT)
    loss_fn, params = functional_loss(model, lambda out, y: out.pow(2).mean())
    dirs = {k: torch.ones((1,) + v.shape, dtype=DT) for k, v in params.items()}
    x = torch.ones(B, 3, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)
        for _ in range(3):
            with pytest.raises(ValueError, match=r"it must return per-sample losses"):
                per_sample_curvatures(loss_fn, params, dirs, (x, None))
    assert replay.cache_info().traces == 3  # every call traced, and failed as the eager call would
