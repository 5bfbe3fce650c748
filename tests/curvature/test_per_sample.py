"""symfast.curvature.per_sample: the batch convention, and the engine's paths (each announced).

Oracles: per-sample gradients from a plain loop over torch.autograd.grad, and closed forms.
"""

import warnings

import pytest
import torch
import torch.func as tf

import symfast
from autograd_functions import Cube, OnceCube, OnceCubeJvp
from symfast.curvature.checks import CoupledSamplesError
from symfast.curvature.per_sample import (
    PerSamplePathWarning,
    autograd_functions_of,
    has_jvp,
    hvp,
    is_once_differentiable,
    map_samples,
    per_sample_losses,
    single_sample_loss,
    split_batch,
    vjp_of_grad,
)

DT = torch.float64


def _loop_grads(loss_fn, w, batch_of, B):
    grads = []
    for i in range(B):
        p = w.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(loss_fn(p, batch_of(i)).sum(), p)[0])
    return torch.stack(grads)


def test_leaves_with_leading_B_are_split_and_the_rest_shared():
    torch.manual_seed(0)
    x, table, scale = torch.randn(5, 3, dtype=DT), torch.randn(4, 3, dtype=DT), torch.tensor(2.0, dtype=DT)
    batch = {"x": x, "table": table, "scale": scale, "name": "shared"}
    samples = split_batch("op", batch)
    assert samples.size == 5
    assert [d for d in samples.dims] == [0 if leaf is x else None for leaf in samples.leaves]

    def loss_fn(p, b):
        assert b["name"] == "shared" and b["table"].shape == (4, 3)
        return b["scale"] * torch.tanh(b["x"] @ p) * (b["table"] @ p).sum()

    w = torch.randn(3, dtype=DT)
    losses, samples = per_sample_losses("op", loss_fn, w, batch)
    g, path = map_samples("op", tf.grad(single_sample_loss(loss_fn, samples)), w, samples)
    assert path == "vmap"
    expected = _loop_grads(loss_fn, w, lambda i: {**batch, "x": x[i:i + 1]}, 5)
    torch.testing.assert_close(g, expected)
    # the metric on the same engine: max over samples of |grad l_i|
    gm = symfast.metrics.gradient_magnitude(lambda p, b: loss_fn(p["w"], b), {"w": w}, batch, chunk_size=2)
    torch.testing.assert_close(gm["w"], expected.abs().amax(0))


def test_chunks_cover_the_batch():
    samples = split_batch("op", (torch.arange(7.0), torch.zeros(3)))
    parts = samples.chunks(3)
    assert [p.size for p in parts] == [3, 3, 1]
    assert torch.equal(torch.cat([p.leaves[0] for p in parts]), torch.arange(7.0))
    assert all(p.leaves[1].shape == (3,) for p in parts)  # shared: never sliced


def test_a_model_vmap_cannot_batch_loops_over_samples_and_says_so():
    torch.manual_seed(1)
    x, w = torch.randn(6, 4, dtype=DT), torch.randn(4, dtype=DT)

    def loss_fn(p, xb):  # data-dependent control flow: vmap refuses it
        return (xb @ p) ** 2 if (xb.sum() > 0).item() else (xb @ p) ** 3

    _, samples = per_sample_losses("op", loss_fn, w, x)
    with pytest.warns(PerSamplePathWarning, match="vmap cannot batch this model"):
        g, path = map_samples("op", tf.grad(single_sample_loss(loss_fn, samples)), w, samples)
    assert path.startswith("loop (vmap failed: vmap:")
    torch.testing.assert_close(g, _loop_grads(loss_fn, w, lambda i: x[i:i + 1], 6))


def test_other_errors_are_not_retried():
    x, w = torch.randn(3, 2, dtype=DT), torch.randn(2, dtype=DT)

    def loss_fn(p, xb):
        if xb.dim() == 2 and xb.shape[0] == 1:
            raise RuntimeError("a bug in the user's loss")
        return xb @ p

    _, samples = per_sample_losses("op", loss_fn, w, x)
    with pytest.raises(RuntimeError, match="a bug in the user's loss"):
        map_samples("op", tf.grad(single_sample_loss(loss_fn, samples)), w, samples)


def test_hvp_without_a_forward_rule_runs_reverse_over_reverse_and_says_so():
    torch.manual_seed(2)
    w, v = torch.randn(5, dtype=DT), torch.randn(5, dtype=DT)
    Hv, path = hvp(lambda p: (p ** 3).sum(), w, v)
    assert path == "jvp(grad)"
    torch.testing.assert_close(Hv, 6 * w * v)
    with pytest.warns(PerSamplePathWarning, match="no forward-mode rule"):
        Hv, path = hvp(lambda p: Cube.apply(p).sum(), w, v)
    assert path == "vjp(grad)"
    torch.testing.assert_close(Hv, 6 * w * v)


class _OnceCube(OnceCube):
    """OnceCube with torch's generated vmap rule."""

    generate_vmap_rule = True


def test_reverse_over_reverse_refuses_a_once_differentiable_function_instead_of_returning_zero():
    # torch.func's vjp(grad) through it gives 0 for the cube's part of H, silently.
    torch.manual_seed(3)
    w, v, x = torch.randn(5, dtype=DT), torch.randn(5, dtype=DT), torch.randn(4, 5, dtype=DT)
    match = r"cannot differentiate autograd.Function '_OnceCube': its backward is marked @once_differentiable"
    with pytest.raises(symfast.UnsupportedOpError, match=match):
        hvp(lambda p: _OnceCube.apply(p).sum() + (p * p).sum(), w, v)
    with pytest.raises(symfast.UnsupportedOpError, match=match):  # per sample, as stationary_report calls it
        tf.vmap(lambda xi: hvp(lambda p: _OnceCube.apply(p * xi).sum(), w, v)[0])(x)
    with pytest.raises(symfast.UnsupportedOpError, match=match):
        vjp_of_grad(lambda p: (p * p).sum() + _OnceCube.apply(p).sum(), w)
    # the guard names only what is wrong: a twice-differentiable backward keeps the exact path
    g, pullback = vjp_of_grad(lambda p: Cube.apply(p).sum(), w)
    torch.testing.assert_close(g, 3 * w ** 2)
    torch.testing.assert_close(pullback(v)[0], 6 * w * v)


def test_forward_over_reverse_refuses_a_once_differentiable_function_with_a_jvp():
    # torch.func's jvp(grad) runs the decorated backward under no_grad and loses the part of H
    # that flows through the Function's input once something upstream of it depends on the
    # parameters (here W1): the refusal is needed, not a precaution
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)
    p = {"W1": 0.5 * torch.randn(5, 3, generator=g, dtype=DT), "w2": torch.randn(5, generator=g, dtype=DT)}
    v = {k: torch.randn(t.shape, generator=g, dtype=DT) for k, t in p.items()}

    def loss(cube):
        return lambda q: ((cube(x @ q["W1"].T) @ q["w2"] - y) ** 2).sum()

    exact = tf.jvp(tf.grad(loss(lambda z: z ** 3)), (p,), (v,))[1]
    raw = tf.jvp(tf.grad(loss(OnceCubeJvp.apply)), (p,), (v,))[1]
    assert (raw["W1"] - exact["W1"]).abs().max() > 0.1 * exact["W1"].abs().max()  # what torch.func gives
    match = r"cannot differentiate autograd.Function 'OnceCubeJvp': its backward is marked @once_differentiable"
    with pytest.raises(symfast.UnsupportedOpError, match=match):
        hvp(loss(OnceCubeJvp.apply), p, v)
    Hv, path = hvp(loss(lambda z: z ** 3), p, v)  # the plain ops stay on the exact path
    assert path == "jvp(grad)"
    torch.testing.assert_close(Hv, exact)


def test_autograd_functions_are_found_on_the_graph_and_classified():
    def f(p):
        return _OnceCube.apply(p["w"]).sum() + Cube.apply(p["w"]).sum()

    w = torch.randn(3, dtype=DT)
    found = autograd_functions_of(f, {"w": w})
    assert set(found) == {_OnceCube, Cube}
    inside = []  # inside a transform (no fresh leaves can be made there), through torch.func.vjp

    def per_sample(x):
        inside.extend(autograd_functions_of(lambda p: _OnceCube.apply(p["w"] * x).sum(), {"w": w}))
        return x.sum()

    tf.vmap(per_sample)(torch.randn(2, 3, dtype=DT))  # _Cube has no vmap rule
    assert set(inside) == {_OnceCube}
    assert is_once_differentiable(_OnceCube) and not is_once_differentiable(Cube)
    assert not has_jvp(_OnceCube) and not has_jvp(Cube)


def _bn_loss(training):
    """Conv -> batch norm without running statistics (batch statistics in training mode) -> linear."""
    def loss_fn(p, xb):
        h = torch.nn.functional.conv2d(xb, p["k"], padding=1)
        h = torch.nn.functional.batch_norm(h, None if training else mean, None if training else var,
                                           p["g"], None, training=training)
        return torch.tanh(h).flatten(1) @ p["v"]

    g = torch.Generator().manual_seed(5)
    params = {"k": torch.randn(2, 1, 3, 3, generator=g, dtype=DT), "g": torch.rand(2, generator=g, dtype=DT) + 0.5,
              "v": torch.randn(32, generator=g, dtype=DT)}
    mean, var = torch.randn(2, generator=g, dtype=DT) * 0.1, torch.rand(2, generator=g, dtype=DT) + 0.5
    return loss_fn, params, torch.randn(6, 1, 4, 4, generator=g, dtype=DT)


def test_samples_coupled_by_batch_statistics_are_refused_by_the_per_sample_map():
    # Each sample alone would be normalized by its own statistics: a silently different loss.
    loss_fn, params, x = _bn_loss(training=True)
    _, samples = per_sample_losses("op", loss_fn, params, x)
    match = r"op: F.batch_norm with batch statistics \(training mode\) couples the samples .* loss_fn\(params, batch\)\[i\]"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerSamplePathWarning)  # refused on the vmap path, no loop either
        with pytest.raises(CoupledSamplesError, match=match):
            map_samples("op", tf.grad(single_sample_loss(loss_fn, samples)), params, samples)
        with pytest.raises(CoupledSamplesError, match="gradient_magnitude: F.batch_norm with batch statistics"):
            symfast.metrics.gradient_magnitude(loss_fn, params, x)
    # the whole-batch convention, which the curvature API follows: row i of the loss vector's Jacobian
    jac = tf.jacrev(lambda p: loss_fn(p, x))(params)
    dirs = {k: torch.randn((2,) + v.shape, generator=torch.Generator().manual_seed(6), dtype=DT)
            for k, v in params.items()}
    expected = sum(torch.einsum("bp,kp->bk", jac[k].reshape(6, -1), dirs[k].reshape(2, -1)) for k in params)
    for method in ("fast", "forward"):
        g = symfast.per_sample_directional_derivatives(loss_fn, params, dirs, x, method=method)
        torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


def test_eval_mode_batch_norm_maps_over_samples():
    loss_fn, params, x = _bn_loss(training=False)
    _, samples = per_sample_losses("op", loss_fn, params, x)
    g, path = map_samples("op", tf.grad(single_sample_loss(loss_fn, samples)), params, samples)
    assert path == "vmap"
    jac = tf.jacrev(lambda p: loss_fn(p, x))(params)  # samples do not interact: the same rows
    for k in params:
        torch.testing.assert_close(g[k], jac[k])


@pytest.mark.parametrize("bad, error, match", [
    (lambda p, b: (b @ p).sum(), ValueError, r"shape \[B\] = \[4\], got shape \(\) \(a scalar"),
    (lambda p, b: (b @ p)[:3], ValueError, r"one loss per sample, shape \[B\] = \[4\]"),
    (lambda p, b: (b @ p).long(), TypeError, "must return floating losses"),
    ("not callable", TypeError, "loss_fn must be callable"),
])
def test_bad_loss_fn_is_named(bad, error, match):
    with pytest.raises(error, match=match):
        per_sample_losses("op", bad, torch.randn(2, dtype=DT), torch.randn(4, 2, dtype=DT))


def test_a_batch_without_tensors_is_refused():
    with pytest.raises(ValueError, match="batch must contain at least one tensor with a leading batch dimension"):
        split_batch("op", ("a", 3))
