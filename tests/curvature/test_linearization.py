"""symfast.curvature.linearization: J v and H v from one kept backward.

Oracles: torch.func (jvp of the per-sample losses, jvp of grad of the mean loss), central finite
differences, and per_sample_grad_norms.
"""

import pytest
import torch
import torch.func as tf
import torch.nn as nn

from autograd_functions import OnceCube
from symfast.curvature import functional_loss
from symfast.curvature.checks import UnsupportedOpError
from symfast.curvature.grad_norms import per_sample_grad_norms
from symfast.curvature.linearization import Linearization, NoDoubleBackward

D64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _model(train_bn=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    model.train(train_bn)
    if not train_bn:  # eval-mode statistics that are not the identity
        model[1].running_mean.normal_(generator=_gen(9))
        model[1].running_var.uniform_(0.5, 2.0, generator=_gen(10))
    return model


def _setup(train_bn=False, B=5):
    model = _model(train_bn)
    loss_fn, params = functional_loss(model, nn.CrossEntropyLoss(reduction="none"))
    batch = (torch.randn(B, 4, generator=_gen(1), dtype=D64), torch.randint(0, 3, (B,), generator=_gen(2)))
    vs = [{n: torch.randn(p.shape, generator=_gen(3 + j), dtype=D64) for n, p in params.items()} for j in range(2)]
    return loss_fn, params, batch, vs


@pytest.mark.parametrize("train_bn", [False, True], ids=["bn-eval", "bn-train"])
def test_directions_match_torch_func_and_finite_differences(train_bn):
    # with batch norm in training mode the samples are coupled: J v is the derivative of
    # loss_fn(params, batch)[i], the whole-batch convention, as torch.func computes it
    loss_fn, params, batch, vs = _setup(train_bn)
    lin = Linearization("t", loss_fn, params, batch)
    jv, hvs = lin.directions(vs)
    mean = lambda p: loss_fn(p, batch).mean()  # noqa: E731
    for j, v in enumerate(vs):
        ref_jv = tf.jvp(lambda p: loss_fn(p, batch), (params,), (v,))[1]
        torch.testing.assert_close(jv[:, j], ref_jv, rtol=1e-10, atol=1e-13)
        ref_hv = tf.jvp(tf.grad(mean), (params,), (v,))[1]
        for n in params:
            torch.testing.assert_close(hvs[j][n], ref_hv[n], rtol=1e-10, atol=1e-13)
        eps = 1e-5  # central differences of the losses: an oracle that shares no autograd code
        plus = loss_fn({n: p + eps * v[n] for n, p in params.items()}, batch)
        minus = loss_fn({n: p - eps * v[n] for n, p in params.items()}, batch)
        torch.testing.assert_close(jv[:, j], (plus - minus) / (2 * eps), rtol=1e-7, atol=1e-9)
    assert jv.abs().min() > 1e-4  # not trivially zero
    torch.testing.assert_close(lin.mean_grad(), tf.grad(mean)(params), rtol=1e-12, atol=1e-14)


def test_norms_losses_and_a_partial_direction():
    loss_fn, params, batch, vs = _setup()
    lin = Linearization("t", loss_fn, params, batch)
    ref = per_sample_grad_norms(loss_fn, params, batch)
    torch.testing.assert_close(lin.grad_norms.norms, ref.norms, rtol=1e-12, atol=0)
    assert lin.grad_norms.methods == ref.methods
    torch.testing.assert_close(lin.losses, loss_fn(params, batch), rtol=0, atol=0)
    # a direction on one parameter only: the others count as zero
    name = "3.weight"
    jv, (hv,) = lin.directions([{name: vs[0][name]}])
    full = {n: (vs[0][n] if n == name else torch.zeros_like(p)) for n, p in params.items()}
    torch.testing.assert_close(jv[:, 0], tf.jvp(lambda p: loss_fn(p, batch), (params,), (full,))[1],
                               rtol=1e-10, atol=1e-13)
    assert set(hv) == set(params) and hv["0.weight"].abs().max() > 0  # H couples the layers
    assert set(lin.mean_grad([name])) == {name}


def test_flat_parameters():
    loss_fn, params, batch, vs = _setup()
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def flat_loss(theta, b):
        return loss_fn({n: t.view(s) for n, t, s in zip(names, theta.split(sizes), shapes)}, b)

    theta = torch.cat([params[n].reshape(-1) for n in names])
    v = torch.cat([vs[0][n].reshape(-1) for n in names])
    lin = Linearization("t", flat_loss, theta, batch)
    jv, (hv,) = lin.directions([v])
    torch.testing.assert_close(jv[:, 0], tf.jvp(lambda t: flat_loss(t, batch), (theta,), (v,))[1],
                               rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(hv, tf.jvp(tf.grad(lambda t: flat_loss(t, batch).mean()), (theta,), (v,))[1],
                               rtol=1e-10, atol=1e-13)


def test_once_differentiable_is_refused_not_silently_zero():
    # a second backward never reaches the parameters through such a Function's backward: H v and
    # J v would lose its part without an error
    w = {"w": torch.randn(3, generator=_gen(4), dtype=D64)}
    x = torch.randn(5, 3, generator=_gen(5), dtype=D64)
    lin = Linearization("t", lambda p, b: (OnceCube.apply(b * p["w"]) + (b * p["w"]) ** 2).sum(1), w, x)
    with pytest.raises(UnsupportedOpError, match=r"autograd.Function 'OnceCube': its backward is marked @once_differentiable"):
        lin.directions([{"w": torch.ones(3, dtype=D64)}])


def test_an_op_without_double_backward_is_named():
    w = {"w": torch.randn(3, 2, generator=_gen(6), dtype=D64)}
    x = torch.randn(5, 4, 2, generator=_gen(7), dtype=D64)
    lin = Linearization("t", lambda p, b: torch.cdist(b, p["w"].unsqueeze(0).expand(5, 3, 2)).sum((1, 2)), w, x)
    with pytest.raises(NoDoubleBackward, match="_cdist_backward"):
        lin.directions([{"w": torch.ones(3, 2, dtype=D64)}])
