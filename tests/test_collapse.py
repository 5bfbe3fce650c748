"""symfast.collapse: Lyapunov exponent, critical learning rate, critical weight decay.

Checked against independent things: closed forms (two-point distributions,
the lasso threshold of the rescaled regression), scipy's brentq on a numpy
Lyapunov exponent, simulated SGD on z <- (1 - lr h(x)) z, and real SGD/GD on
the rescaled regression l = (u w x - y)^2 / 2 built with symfast.dcs, whose
per-sample curvatures come from the curvature engine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import symfast
from symfast.collapse import (
    approx_critical_learning_rate,
    critical_learning_rate,
    critical_weight_decay,
    lyapunov_exponent,
    weight_decay_threshold,
)
from symfast.curvature import per_sample_curvatures

scipy_optimize = pytest.importorskip("scipy.optimize")
scipy_stats = pytest.importorskip("scipy.stats")

DT = torch.float64


def np_lyapunov(h: np.ndarray, lr: float) -> float:
    with np.errstate(divide="ignore"):
        return float(np.mean(np.log(np.abs(1.0 - lr * h))))


def normal_sample(mean: float, std: float, n: int) -> torch.Tensor:
    """A deterministic 'sample' of N(mean, std^2): its n quantiles."""
    q = scipy_stats.norm.ppf((np.arange(n) + 0.5) / n)
    return torch.tensor(mean + std * q, dtype=DT)


# ------------------------------------------------------------ Lyapunov
def test_lyapunov_exponent_matches_the_formula_and_shapes():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 3, generator=g, dtype=DT)
    lrs = torch.tensor([0.0, 0.01, 0.3, 2.0, 10.0], dtype=DT)
    out = lyapunov_exponent(h, lrs)
    assert out.shape == (5, 3) and out.dtype == DT
    for i, lr in enumerate(lrs.tolist()):
        for k in range(3):
            assert out[i, k].item() == pytest.approx(np_lyapunov(h[:, k].numpy(), lr), rel=1e-12, abs=1e-15)
    assert lyapunov_exponent(h[:, 0], 0.3).shape == ()
    assert lyapunov_exponent(h[:, 0].float(), 0.3).item() == pytest.approx(out[2, 0].item(), rel=1e-6)
    # a sample with lr*h = 1 zeroes z: Lambda = -inf
    assert lyapunov_exponent(torch.tensor([2.0, -1.0], dtype=DT), 0.5).item() == -math.inf


# ----------------------------------------------------- critical learning rate
@pytest.mark.parametrize(
    "h",
    [
        normal_sample(-0.1, 1.0, 1000),
        normal_sample(-0.05, 1.0, 500),
        torch.tensor([-2.5, 1.5, -2.5, 1.5, 0.3], dtype=DT),
        torch.tensor([-1.0] * 9 + [5.0], dtype=DT),
        -torch.distributions.Exponential(torch.tensor(1.0, dtype=DT)).sample((300,)) + 0.8,
    ],
    ids=["normal-0.1", "normal-0.05", "few-points", "rare-large", "shifted-exponential"],
)
def test_critical_learning_rate_is_the_first_root_of_lambda(h):
    torch.manual_seed(0)
    h_np = h.numpy()
    assert h_np.mean() < 0 < h_np.max()
    lr = critical_learning_rate(h).item()
    upper = 1.0 / h_np.max()
    # Independent oracle: brentq on a numpy Lambda, bracketed in (0, 1/max h).
    lo = 1e-9 * upper
    hi = upper * (1 - 1e-12)
    assert np_lyapunov(h_np, lo) > 0 and np_lyapunov(h_np, hi) < 0
    root = scipy_optimize.brentq(lambda x: np_lyapunov(h_np, x), lo, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps)
    assert lr == pytest.approx(root, rel=1e-9)
    # Lambda > 0 on (0, lr), < 0 just above: it is where collapse begins.
    grid = np.linspace(0, lr, 200)[1:-1]
    assert all(np_lyapunov(h_np, x) > 0 for x in grid)
    assert lyapunov_exponent(h, lr * (1 + 1e-6)).item() < 0


def test_critical_learning_rate_two_point_closed_form():
    # h = -a or +b with equal weight: Lambda < 0 iff (1 + lr a)(1 - lr b) < 1 iff lr > (a - b) / (a b).
    a, b = 2.5, 1.5
    h = torch.tensor([-a, b], dtype=DT)
    assert critical_learning_rate(h).item() == pytest.approx((a - b) / (a * b), rel=1e-14)
    assert approx_critical_learning_rate(h).item() == pytest.approx(2 * (a - b) / (a * a + b * b), rel=1e-14)


def test_critical_learning_rate_edge_cases_and_columns():
    cases = {
        "mean>0: GD already collapses": ([1.0, -0.5, 2.0], 0.0),
        "mean=0, nonzero: Lambda''(0)<0": ([1.0, -1.0, 0.0], 0.0),
        "all <= 0: never": ([-1.0, -0.2, 0.0], math.inf),
        "all zero: Lambda == 0": ([0.0, 0.0, 0.0], math.inf),
        "one sample h<0": ([-3.0], math.inf),
        "one sample h>0": ([3.0], 0.0),
    }
    for name, (vals, expected) in cases.items():
        assert critical_learning_rate(torch.tensor(vals, dtype=DT)).item() == expected, name
    # [B, K]: each column on its own
    cols = torch.tensor([v for v, _ in list(cases.values())[:4]], dtype=DT).T
    assert critical_learning_rate(cols).tolist() == [e for _, e in list(cases.values())[:4]]
    assert approx_critical_learning_rate(torch.zeros(4)).item() == math.inf


def test_root_next_to_the_singularity_is_resolved():
    # Moderately close to 1/h_max = 1: 40 log(1 + lr/10) + log(1 - lr) = 0.
    h = torch.tensor([-0.1] * 40 + [1.0], dtype=DT)
    lr = critical_learning_rate(h).item()
    root = scipy_optimize.brentq(lambda x: 40 * math.log1p(0.1 * x) + math.log1p(-x), 0.5, 1 - 1e-15,
                                 xtol=1e-300, rtol=4 * np.finfo(float).eps)
    assert lr == pytest.approx(root, rel=1e-12)
    # Closer than float64 resolution: 1 - root ~ exp(-2000 log 2) underflows; the answer is 1/h_max.
    h = torch.tensor([-1.0] * 2000 + [1.0], dtype=DT)
    assert critical_learning_rate(h).item() == 1.0
    assert torch.log1p(-math.nextafter(1.0, 0.0) * h).mean().item() > 0


def test_eq9_approximation_error_grows_with_the_signal_to_noise_ratio():
    """Eq. 9 expands Lambda to second order in lr: exact in the noise-dominated limit."""
    rel = []
    for mean in (-0.02, -0.1, -0.3):
        h = normal_sample(mean, 1.0, 20000)
        exact, approx = critical_learning_rate(h).item(), approx_critical_learning_rate(h).item()
        rel.append(abs(approx - exact) / exact)
    assert rel[0] < 0.02, rel
    assert rel[0] < rel[1] < rel[2], rel


# ------------------------------------------------------ simulated dynamics
def _simulate_log_growth(h: torch.Tensor, lr: float, chains: int, steps: int, seed: int) -> torch.Tensor:
    """log|z_T| / T of z <- (1 - lr h(x)) z, x uniform over the samples, z renormalized to stay in range."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.ones(chains, dtype=DT)
    log_scale = torch.zeros(chains, dtype=DT)
    for _ in range(steps):
        i = torch.randint(0, h.shape[0], (chains,), generator=gen)
        z = (1 - lr * h[i]) * z
        m = z.abs()
        log_scale += torch.log(m)
        z = z / m
    return log_scale / steps


def test_simulated_sgd_grows_or_decays_as_lambda_says():
    h = torch.tensor([-3.0, -2.0, -1.0, 0.5, 1.0, 1.5], dtype=DT)
    crit = critical_learning_rate(h).item()
    assert 0 < crit < 1 / h.max().item()
    for factor in (0.6, 1.4):
        lr = factor * crit
        lam = lyapunov_exponent(h, lr).item()
        growth = _simulate_log_growth(h, lr, chains=400, steps=1500, seed=int(factor * 10))
        se = growth.std().item() / math.sqrt(growth.numel())
        assert abs(growth.mean().item() - lam) < 4 * se + 1e-3, (factor, growth.mean().item(), lam)
        assert (lam > 0) == (factor < 1)
        # per chain: almost every chain ends on the side of zero that Lambda predicts
        agree = (growth > 0).double().mean().item() if lam > 0 else (growth < 0).double().mean().item()
        assert agree > 0.95, (factor, agree)


# --------------------------------------------------- a real model: u * w
# l(u, w; x, y) = (dcs(w, u) x - y)^2 / 2 with scalar u, w: the rescaled regression of
# Fig. 1 (left). At u = w = 0 the per-sample Hessian is [[0, -xy], [-xy, 0]] (eq. 6), its
# eigenvectors n+ = (1, 1)/sqrt2 and n- = (1, -1)/sqrt2 for every sample, with curvatures
# -xy and +xy: the two directions evolve independently, the commutation approximation
# is exact, and the origin attracts SGD iff both Lyapunov exponents are negative.
X = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=DT)
Y = X * torch.tensor([2.5, -1.5, 2.5, -1.5], dtype=DT)  # x*y in {2.5, -1.5}: E[xy] = 0.5 > 0


def rescaled_loss(p, batch):
    x, y = batch
    theta = symfast.dcs(p["w"], p["u"])
    return 0.5 * (theta * x - y) ** 2


def _mirror_directions():
    s = 1 / math.sqrt(2)
    return {"u": torch.tensor([[s], [s]], dtype=DT), "w": torch.tensor([[s], [-s]], dtype=DT)}


def _sgd_rescaled(lr, gamma, chains=1000, steps=2000, seed=1):
    gen = torch.Generator().manual_seed(seed)
    u = 1e-3 * torch.randn(chains, generator=gen, dtype=DT)
    w = 1e-3 * torch.randn(chains, generator=gen, dtype=DT)
    for _ in range(steps):
        i = torch.randint(0, X.shape[0], (chains,), generator=gen)
        r = u * w * X[i] - Y[i]
        u, w = u - lr * (r * w * X[i] + 2 * gamma * u), w - lr * (r * u * X[i] + 2 * gamma * w)
    return u, w


def test_real_model_curvatures_predict_sgd_collapse():
    params = {"u": torch.zeros(1, dtype=DT), "w": torch.zeros(1, dtype=DT)}
    h = per_sample_curvatures(rescaled_loss, params, _mirror_directions(), (X, Y))
    torch.testing.assert_close(h, torch.stack([-X * Y, X * Y], 1), rtol=1e-14, atol=1e-14)

    crit = critical_learning_rate(h)
    assert crit[1].item() == 0.0  # n-: E[h] > 0, stable for every small lr
    lr_star = crit[0].item()  # n+: the direction GD escapes along
    assert lr_star == pytest.approx((2.5 - 1.5) / (2.5 * 1.5), rel=1e-12)
    for factor in (0.5, 1.6):
        lr = factor * lr_star
        lam = lyapunov_exponent(h, lr)
        u, w = _sgd_rescaled(lr, 0.0)
        collapsed = ((u.abs() + w.abs()) < 1e-8).double().mean().item()
        if factor < 1:
            assert lam[0] > 0 and collapsed == 0.0, (factor, lam, collapsed)
        else:
            assert (lam < 0).all() and collapsed == 1.0, (factor, lam, collapsed)


def test_critical_weight_decay_is_the_lasso_threshold_of_the_rescaled_regression():
    """GD on E[(u w x - y)^2]/2 + gamma (u^2 + w^2) keeps u = w = 0 iff gamma > E[xy]/2
    (the L1-equivalent problem min (v x - y)^2/2 + 2 gamma |v| has v = 0 iff 2 gamma >= E[xy])."""
    params = {"u": torch.zeros(1, dtype=DT), "w": torch.zeros(1, dtype=DT)}
    h0 = per_sample_curvatures(rescaled_loss, params, _mirror_directions(), (X, Y))  # no regularizer
    gamma_star = critical_weight_decay(h0)
    exy = (X * Y).mean().item()
    torch.testing.assert_close(gamma_star, torch.tensor([exy / 2, 0.0], dtype=DT))
    assert critical_weight_decay(h0, convention="sgd")[0].item() == pytest.approx(exy)
    # the [B, K, K] block form: lambda_min of E[O^T H O] = -E[xy] as well
    blocks = torch.stack([torch.tensor([[-xy, 0.0], [0.0, xy]], dtype=DT) for xy in (X * Y).tolist()])
    assert critical_weight_decay(blocks).item() == pytest.approx(exy / 2)

    def gd(gamma, steps=3000, lr=0.1):
        u = w = torch.tensor(1e-3, dtype=DT)
        u = u.clone()
        w = w.clone() * 0.5
        for _ in range(steps):
            r = u * w * X - Y
            u, w = u - lr * ((r * w * X).mean() + 2 * gamma * u), w - lr * ((r * u * X).mean() + 2 * gamma * w)
        return abs(u.item()) + abs(w.item())

    g = gamma_star[0].item()
    assert gd(1.2 * g) < 1e-12  # collapses
    assert gd(0.8 * g) > 1e-2  # escapes to the sparse-but-nonzero lasso solution


def test_weight_decay_threshold_eq20_and_its_local_limit():
    # Rescaling symmetry with O = I on (u, w): theta_bar = 0, gamma_0 = (l0(0) - l0(u, w)) / (u^2 + w^2).
    params = {"u": torch.tensor([0.8], dtype=DT), "w": torch.tensor([0.6], dtype=DT)}
    O = {"u": torch.tensor([[1.0], [0.0]], dtype=DT), "w": torch.tensor([[0.0], [1.0]], dtype=DT)}
    l0 = rescaled_loss(params, (X, Y)).mean()
    l00 = rescaled_loss({"u": torch.zeros(1, dtype=DT), "w": torch.zeros(1, dtype=DT)}, (X, Y)).mean()
    g0 = weight_decay_threshold(rescaled_loss, params, O, (X, Y))
    assert g0.item() == pytest.approx(max(0.0, (l00 - l0).item() / (0.8**2 + 0.6**2)), rel=1e-14)
    assert g0.item() > 0
    norm2 = 0.8**2 + 0.6**2
    for gamma, origin_wins in ((1.01 * g0.item(), True), (0.99 * g0.item(), False)):
        assert (l00 < l0 + gamma * norm2).item() == origin_wins
    per_sample = weight_decay_threshold(rescaled_loss, params, O, (X, Y), reduction="none")
    assert per_sample.shape == (4,) and (per_sample >= 0).all()

    # Off the mirror by s along n+: gamma_0 -> -n+^T E[H] n+ / 2 = E[xy] / 2 as s -> 0.
    n_plus = {k: v[:1] for k, v in _mirror_directions().items()}
    s = 1e-4
    near = {"u": n_plus["u"][0] * s, "w": n_plus["w"][0] * s}
    assert weight_decay_threshold(rescaled_loss, near, n_plus, (X, Y)).item() == pytest.approx(
        (X * Y).mean().item() / 2, rel=1e-6)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"h is empty \(shape \(0,\)\)"):
        critical_learning_rate(torch.empty(0))
    with pytest.raises(ValueError, match=r"h must have shape \[B\] or \[B, K\].*got \(2, 2, 2\)"):
        lyapunov_exponent(torch.zeros(2, 2, 2), 0.1)
    with pytest.raises(ValueError, match="h must be finite"):
        approx_critical_learning_rate(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="lr must be finite"):
        lyapunov_exponent(torch.ones(3), math.inf)
    with pytest.raises(ValueError, match="convention must be 'eq1' or 'sgd'"):
        critical_weight_decay(torch.ones(3), convention="torch")
    with pytest.raises(ValueError, match=r"square \[B, K, K\]"):
        critical_weight_decay(torch.ones(3, 2, 3))
    params = {"u": torch.tensor([0.8], dtype=DT), "w": torch.tensor([0.6], dtype=DT)}
    with pytest.raises(ValueError, match="orthonormal"):
        ones = {"u": torch.ones(2, 1, dtype=DT), "w": torch.ones(2, 1, dtype=DT)}
        weight_decay_threshold(rescaled_loss, params, ones, (X, Y))
    with pytest.raises(ValueError, match="already satisfy"):
        weight_decay_threshold(rescaled_loss, {"u": torch.zeros(1, dtype=DT), "w": torch.zeros(1, dtype=DT)},
                               {k: v[:1] for k, v in _mirror_directions().items()}, (X, Y))
    with pytest.raises(ValueError, match=r"directions is missing keys \['w'\]"):
        weight_decay_threshold(rescaled_loss, params, {"u": torch.ones(1, 1, dtype=DT)}, (X, Y))
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        weight_decay_threshold(lambda p, b: rescaled_loss(p, b).mean(), params,
                               {k: v[:1] for k, v in _mirror_directions().items()}, (X, Y))


# ------------------------------------------------------------------ argument errors and edge values
def test_critical_weight_decay_errors_name_curvature_and_zero_is_positive():
    with pytest.raises(ValueError, match=r"curvature blocks \[B, K, K\] need K >= 1.*got shape \(3, 0, 0\)"):
        critical_weight_decay(torch.zeros(3, 0, 0))
    with pytest.raises(ValueError, match=r"curvature must have shape \[B\], \[B, K\] or \[B, K, K\].*got \(2, 2, 2, 2\)"):
        critical_weight_decay(torch.zeros(2, 2, 2, 2))
    for shape in ((4,), (4, 2), (4, 2, 2)):
        for dtype in (torch.complex128, torch.bool):
            with pytest.raises(TypeError, match=rf"curvature must be a real .*got dtype {dtype}"):
                critical_weight_decay(torch.zeros(shape, dtype=dtype))
        # no negative curvature: threshold +0.0, not -0.0 (the sign bit of 0 * -0.5)
        for convention in ("eq1", "sgd"):
            out = critical_weight_decay(torch.zeros(shape, dtype=torch.float64), convention=convention)
            assert not torch.signbit(out).any(), (shape, convention, out)


@pytest.mark.parametrize("scale", [1e-300, 1e-170, 1.0, 1e170, 1e300])
def test_approx_critical_learning_rate_is_scale_invariant(scale):
    # eq. (9) is homogeneous of degree -1 in h: lambda*(s h) = lambda*(h) / s (closed form, python floats)
    h = [1.0, -3.0, 0.5, -2.0]
    m1, m2 = sum(h) / 4, sum(v * v for v in h) / 4
    expected = -2 * m1 / m2  # 0.5849...
    out = approx_critical_learning_rate(torch.tensor(h, dtype=torch.float64) * scale)
    assert math.isfinite(out.item()) and out.item() * scale == pytest.approx(expected, rel=1e-12)
