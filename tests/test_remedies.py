"""symfast.remedies: interventions that revive collapsed parameters (random bias, gradient noise)."""

import pytest
import torch
from torch import nn

import symfast
from symfast import remedies
from margins import assert_margin


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _collapsed_dcs_regression(d=6, dead=(1, 4)):
    torch.manual_seed(0)

    class Hadamard(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d))
            self.u = nn.Parameter(torch.randn(d))
            with torch.no_grad():
                for i in dead:
                    self.w[i] = self.u[i] = 0.0

        def forward(self, x):
            return x @ symfast.dcs(self.w, self.u)

    return Hadamard()


def _train(model, steps=30, lr=0.05, seed=0, hook=None, wd=0.0):
    g = _g(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    handle = hook(model, opt) if hook else None
    target = torch.ones(6)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        loss = ((model(x) - x @ target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return handle


def test_collapsed_coordinates_never_move_without_a_remedy():
    m = _collapsed_dcs_regression()
    _train(m)
    assert m.w[1] == 0 and m.u[1] == 0 and m.w[4] == 0  # the stationary condition is absorbing


def test_add_random_bias_revives_dead_coordinates():
    # paper recipe (keep_function=False): the module computes with current + beta, so the dead
    # pairs sit off the mirror and learn again, without weight decay
    m = _collapsed_dcs_regression()
    w0 = m.w.detach().clone()
    names = remedies.add_random_bias(m, std=1e-2, seed=0)
    assert names == ["w", "u"]
    beta = m.parametrizations.w[0].beta
    torch.testing.assert_close(m.w, w0 + beta)
    assert beta.abs().min() > 0 and 2e-3 < beta.std().item() < 5e-2
    _train(m)
    theta = (m.w * m.u).detach()
    assert_margin(theta[[1, 4]].abs().min(), ">", 1e-3, "revived |theta| with the random bias, smaller pair")
    # include selects parameters
    m2 = _collapsed_dcs_regression()
    assert remedies.add_random_bias(m2, include=lambda name, p: name == "u") == ["u"]


def test_add_random_bias_keep_function():
    # keep_function=True: same function; the trained originals are current - beta, so at a collapsed
    # point the gradient still vanishes, and it is weight decay (pulling the originals to 0, i.e. the
    # effective weights to beta, off the mirror) that revives the coordinates (footnote 9)
    x = torch.randn(5, 6)
    for wd, revived in ((0.0, False), (0.1, True)):
        m = _collapsed_dcs_regression()
        before = m(x).detach()
        remedies.add_random_bias(m, std=1e-2, seed=0, keep_function=True)
        torch.testing.assert_close(m(x), before)
        _train(m, steps=100, wd=wd)
        theta = (m.w * m.u).detach()[[1, 4]].abs()
        if revived:
            assert_margin(theta.min(), ">", 0.1, f"wd {wd}: |theta| of the dead pairs, smaller")
        else:
            assert_margin(theta.max(), "<=", 0.1, f"wd {wd}: |theta| of the dead pairs, larger")


def test_add_gradient_noise_revives_and_is_reproducible():
    runs = []
    for _ in range(2):
        m = _collapsed_dcs_regression()
        _train(m, hook=lambda mod, opt: remedies.add_gradient_noise(mod, std=1e-2, seed=1))
        runs.append(torch.cat([m.w.detach(), m.u.detach()]))
        assert m.w[1] != 0 and m.u[4] != 0
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    # on an optimizer: once per step; removing the hook stops the noise
    m = _collapsed_dcs_regression()
    h = _train(m, steps=3, hook=lambda mod, opt: remedies.add_gradient_noise(opt, std=1e-2, seed=1))
    assert m.w[1] != 0
    h.remove()
    m2 = _collapsed_dcs_regression()
    h2 = remedies.add_gradient_noise(m2, std=1e-2)
    h2.remove()
    _train(m2, steps=3)
    assert m2.w[1] == 0
    with pytest.raises(ValueError, match="std must be >= 0"):
        remedies.add_gradient_noise(m2, std=-1.0)
