"""Each structure's weight decay solves its convex problem: checked against outside solvers.

The claim (paper section 4.5; symfast.nn.structures): minimizing
``loss(theta) + alpha * sum |factor|^2`` over the factors of an exact structure
reaches the minimizer of ``loss(theta) + convex_penalty(theta)``:

* elementwise  -> lasso, 2 alpha |theta|_1                 vs scikit-learn Lasso
* group (input features) -> group lasso                    vs scikit-learn MultiTaskLasso
* lowrank      -> nuclear norm, 2 alpha |W|_*               vs singular-value soft-thresholding
* mirror       -> 2 alpha |O^T theta|_1 (permutation: theta_a - theta_b)
                                                           vs a proximal gradient method (here)

Each test runs plain full-batch gradient descent on the DCS objective of a
symfast layer (float64, small well-conditioned problems with a clear margin
between active and inactive coordinates) from the layer's own initialization,
and requires the solver's solution and support to 1e-6. The solvers know
nothing of symfast. Also here: param_groups' coupled weight decay is the
penalty (SGD, Adam), and AdamW's decoupled decay measurably is not.
"""

import math

import pytest
import torch
from sklearn.linear_model import Lasso, MultiTaskLasso

from symfast.conversion import param_groups, penalty
from symfast.nn import DCSLinear, permutation_basis

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-6


def _gd(loss_fn, params, lr, max_steps, grad_tol=1e-12):
    """Full-batch gradient descent until the gradient norm is below grad_tol (or max_steps)."""
    for step in range(max_steps):
        grads = torch.autograd.grad(loss_fn(), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * g)
        if step % 100 == 0 and math.sqrt(sum(float(g.pow(2).sum()) for g in grads)) < grad_tol:
            break
    print(f"gradient descent: {step + 1} steps")
    return step


def _regression(n, d, k, seed, outputs=1, noise=0.1):
    """Y = X B^T + noise with the first k features active (|B| in [0.8, 2]), well conditioned (n >> d).

    Small noise keeps the inactive features' correlation with the residual far
    below the threshold 2 alpha, and large active coefficients keep the solution
    away from 0: both margins set how fast gradient descent converges.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    B = torch.zeros(outputs, d, dtype=DT)
    sign = torch.randint(0, 2, (outputs, k), generator=g).to(DT) * 2 - 1
    B[:, :k] = sign * (0.8 + 1.2 * torch.rand(outputs, k, generator=g, dtype=DT))
    Y = X @ B.t() + noise * torch.randn(n, outputs, generator=g, dtype=DT)
    return X, Y


def _assert_same_solution(theta, solution, what):
    err = float((theta - solution).abs().max())
    assert err <= TOL, f"{what}: max |theta - solver| = {err:.3g} > {TOL}"
    support = solution.abs() > 1e-12  # the prox solver's zeros carry rounding (O^T theta ~ 1e-17)
    assert torch.equal(theta.abs() > TOL, support), (
        f"{what}: supports differ: DCS {(theta.abs() > TOL).nonzero().flatten().tolist()} vs solver "
        f"{support.nonzero().flatten().tolist()}"
    )
    assert 0 < int(support.sum()) < support.numel(), f"{what}: the problem must have both zeros and nonzeros"


def test_elementwise_is_lasso():
    n, d, alpha = 80, 12, 0.05
    X, Y = _regression(n, d, 5, seed=0)
    y = Y[:, 0]
    # scikit-learn: (1/2n) |y - X b|^2 + a |b|_1 with a = 2 alpha.
    lasso = Lasso(alpha=2 * alpha, fit_intercept=False, tol=1e-14, max_iter=200_000).fit(X.numpy(), y.numpy())
    solution = torch.from_numpy(lasso.coef_)

    torch.manual_seed(0)
    layer = DCSLinear(d, 1, bias=False, structure="elementwise", alpha=alpha, dtype=DT)
    loss = lambda: 0.5 * (layer(X).squeeze(1) - y).pow(2).mean() + penalty(layer)  # noqa: E731
    _gd(loss, list(layer.parameters()), lr=0.25, max_steps=6_000)
    theta = layer.weight.detach().squeeze(0)
    _assert_same_solution(theta, solution, "elementwise vs Lasso")
    # At the optimum the factors are balanced: the penalty is the L1 penalty.
    assert abs(float(penalty(layer).detach()) - 2 * alpha * float(solution.abs().sum())) < 1e-9


def test_masked_elementwise_is_lasso_on_the_masked_coordinates():
    """With a mask, v is free: the penalty is 2 alpha |m * theta|_1 (reference: proximal gradient here)."""
    n, d, alpha = 80, 10, 0.05
    X, Y = _regression(n, d, 4, seed=6)
    y = Y[:, 0]
    mask = torch.zeros(1, d, dtype=torch.bool)
    mask[0, 2:] = True  # features 0, 1 free; 2, 3 active but penalized; 4.. inactive and penalized
    t = 1 / float(torch.linalg.eigvalsh(X.t() @ X / n).max())
    ref = torch.zeros(d, dtype=DT)
    for _ in range(5_000):
        z = ref + t * X.t() @ (y - X @ ref) / n
        new = torch.where(mask[0], torch.sign(z) * (z.abs() - t * 2 * alpha).clamp_min(0), z)
        done = float((new - ref).abs().max()) < 1e-16
        ref = new
        if done:
            break

    torch.manual_seed(0)
    layer = DCSLinear(d, 1, bias=False, structure="elementwise", mask=mask, alpha=alpha, dtype=DT)
    loss = lambda: 0.5 * (layer(X).squeeze(1) - y).pow(2).mean() + penalty(layer)  # noqa: E731
    _gd(loss, list(layer.parameters()), lr=0.25, max_steps=6_000)
    theta = layer.weight.detach().squeeze(0)
    _assert_same_solution(theta, ref, "masked elementwise vs proximal gradient")
    assert abs(float(penalty(layer).detach()) - 2 * alpha * float(ref[2:].abs().sum())) < 1e-9


def test_group_over_input_features_is_multitask_lasso():
    n, d, tasks, alpha = 80, 10, 3, 0.06
    X, Y = _regression(n, d, 4, seed=1, outputs=tasks)
    # scikit-learn: (1/2n) |Y - X W|_F^2 + a sum_j |W_j|_2 over features j, a = 2 alpha.
    mtl = MultiTaskLasso(alpha=2 * alpha, fit_intercept=False, tol=1e-14, max_iter=200_000)
    solution = torch.from_numpy(mtl.fit(X.numpy(), Y.numpy()).coef_)  # (tasks, features)

    torch.manual_seed(0)
    layer = DCSLinear(d, tasks, bias=False, structure="group", group_dim=1, alpha=alpha, dtype=DT)
    loss = lambda: 0.5 * (layer(X) - Y).pow(2).sum(dim=1).mean() + penalty(layer)  # noqa: E731
    _gd(loss, list(layer.parameters()), lr=0.15, max_steps=6_000)
    theta = layer.weight.detach()
    assert float((theta - solution).abs().max()) <= TOL
    dead = solution.norm(dim=0) == 0
    assert 0 < int(dead.sum()) < d
    assert torch.equal(theta.norm(dim=0) <= TOL, dead)
    assert torch.equal(layer.parametrization.dead_groups(TOL), dead)
    assert abs(float(penalty(layer).detach()) - 2 * alpha * float(solution.norm(dim=0).sum())) < 1e-9


def test_lowrank_is_singular_value_soft_thresholding():
    m, n, alpha = 6, 8, 0.5
    g = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=DT)).Q
    V = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=DT)).Q
    sv = torch.tensor([5.0, 3.0, 2.0, 1.6, 0.5, 0.2], dtype=DT)
    Y = (U * sv) @ V.t()
    # argmin 1/2 |W - Y|_F^2 + lam |W|_*, lam = 2 alpha: soft-threshold the singular values.
    solution = (U * (sv - 2 * alpha).clamp_min(0)) @ V.t()

    torch.manual_seed(0)
    layer = DCSLinear(n, m, bias=False, structure="lowrank", alpha=alpha, dtype=DT)
    loss = lambda: 0.5 * (layer.weight - Y).pow(2).sum() + penalty(layer)  # noqa: E731
    _gd(loss, list(layer.parameters()), lr=0.15, max_steps=3_000)
    theta = layer.weight.detach()
    assert float((theta - solution).abs().max()) <= TOL
    got_sv = torch.linalg.svdvals(theta)
    assert int((got_sv > TOL).sum()) == 4 == int(torch.linalg.matrix_rank(solution))
    assert abs(float(penalty(layer).detach()) - 2 * alpha * float((sv - 2 * alpha).clamp_min(0).sum())) < 1e-9


def _prox_l1_of_projection(theta, project, lift, t):
    """prox of t |O^T theta|_1 for orthonormal O: soft-threshold the coordinates O^T theta."""
    z = project(theta)
    return theta - lift(z) + lift(torch.sign(z) * (z.abs() - t).clamp_min(0))


@pytest.mark.parametrize("kind", ["permutation", "general"])
def test_mirror_is_l1_of_projection(kind):
    n, d, alpha = 80, 8, 0.04
    X, Y = _regression(n, d, 6, seed=3, outputs=2, noise=0.5)
    # Units 0 and 1 nearly copies of each other on half the features: merging
    # them there costs little, elsewhere it does not pay.
    g = torch.Generator().manual_seed(4)
    B = torch.randn(2, d, generator=g, dtype=DT)
    B[1, : d // 2] = B[0, : d // 2] + 0.02 * torch.randn(d // 2, generator=g, dtype=DT)
    Y = X @ B.t() + 0.3 * torch.randn(n, 2, generator=g, dtype=DT)
    if kind == "permutation":
        O, dim = permutation_basis(2, [(0, 1)], dtype=DT), 0  # O^T theta = (theta_0 - theta_1) / sqrt(2)
        project = lambda t: O.t() @ t  # noqa: E731
        lift = lambda c: O @ c  # noqa: E731
    else:
        O, dim = torch.linalg.qr(torch.randn(2 * d, 5, generator=g, dtype=DT)).Q, None
        project = lambda t: O.t() @ t.reshape(-1, 1)  # noqa: E731
        lift = lambda c: (O @ c).reshape(2, d)  # noqa: E731

    # Reference: proximal gradient (ISTA) on 1/(2n) |Y - X theta^T|^2 + 2 alpha |O^T theta|_1.
    lipschitz = float(torch.linalg.eigvalsh(X.t() @ X / n).max())
    t = 1 / lipschitz
    # Strongly convex (X^T X / n is well conditioned): linear convergence, to rounding within a few hundred steps.
    ref = torch.zeros(2, d, dtype=DT)
    for _ in range(5_000):
        grad = -((Y - X @ ref.t()).t() @ X) / n
        new = _prox_l1_of_projection(ref - t * grad, project, lift, t * 2 * alpha)
        done = float((new - ref).abs().max()) < 1e-16
        ref = new
        if done:
            break
    zc = project(ref)

    torch.manual_seed(0)
    layer = DCSLinear(d, 2, bias=False, structure="mirror", mirror=O, mirror_dim=dim, alpha=alpha, dtype=DT)
    loss = lambda: 0.5 * (layer(X) - Y).pow(2).sum(dim=1).mean() + penalty(layer)  # noqa: E731
    _gd(loss, list(layer.parameters()), lr=0.25 if kind == "permutation" else 0.4, max_steps=8_000)
    theta = layer.weight.detach()
    assert float((theta - ref).abs().max()) <= TOL
    z = project(theta)
    _assert_same_solution(z.flatten(), zc.flatten(), f"mirror ({kind}) vs proximal gradient")
    if kind == "permutation":
        merged = (ref[0] - ref[1]).abs() < 1e-12
        assert torch.equal((theta[0] - theta[1]).abs() <= TOL, merged) and merged[: d // 2].any()
    assert abs(float(penalty(layer).detach()) - 2 * alpha * float(zc.abs().sum())) < 1e-9


# ------------------------------------------------------ optimizer groups
def _small_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        DCSLinear(7, 6, structure="elementwise", alpha=0.03, dtype=DT),
        torch.nn.Tanh(),
        DCSLinear(6, 5, structure="group", alpha=0.02, dtype=DT),
        torch.nn.Tanh(),
        DCSLinear(5, 4, structure="lowrank", alpha=0.01, dtype=DT),
        torch.nn.Linear(4, 2, dtype=DT),
    )


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_param_groups_coupled_decay_equals_penalty(opt):
    x = torch.randn(16, 7, dtype=DT)
    a, b = _small_model(0), _small_model(0)
    make = {
        "sgd": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
        "adam": lambda groups: torch.optim.Adam(groups, lr=0.01),
    }[opt]
    opt_a = make(param_groups(a))  # decay from the groups
    opt_b = make([{"params": list(b.parameters()), "weight_decay": 0.0}])  # penalty in the loss
    for _ in range(5):
        opt_a.zero_grad()
        a(x).pow(2).mean().backward()
        opt_a.step()
        opt_b.zero_grad()
        (b(x).pow(2).mean() + penalty(b)).backward()
        opt_b.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14, msg=name)
    # The groups hold every parameter exactly once; the penalized factors carry 2 alpha.
    groups = param_groups(a)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in a.parameters())
    assert {g["weight_decay"] for g in groups} == {0.06, 0.04, 0.02, 0.0}


def _adam_lasso(decoupled, steps=4000):
    n, d, alpha = 100, 20, 0.05
    X, Y = _regression(n, d, 6, seed=5)
    y = Y[:, 0]
    lasso = Lasso(alpha=2 * alpha, fit_intercept=False, tol=1e-14, max_iter=200_000).fit(X.numpy(), y.numpy())
    solution = torch.from_numpy(lasso.coef_)
    torch.manual_seed(0)
    layer = DCSLinear(d, 1, bias=False, structure="elementwise", alpha=alpha, dtype=DT)
    groups = param_groups(layer)
    opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)(groups, lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (layer(X).squeeze(1) - y).pow(2).mean()).backward()
        opt.step()
        sched.step()
    theta = layer.weight.detach().squeeze(0)
    rel = float((theta - solution).norm() / solution.norm())
    same_support = torch.equal(theta.abs() > 1e-4, solution != 0)
    return rel, same_support, float((theta - solution).abs().max())


def test_adamw_is_not_equivalent():
    """Adam with param_groups solves the lasso; AdamW with the same weight_decay does not.

    The figures are quoted in the docstring of symfast.param_groups.
    """
    rel_adam, support_adam, max_adam = _adam_lasso(decoupled=False)
    rel_adamw, support_adamw, _ = _adam_lasso(decoupled=True)
    print(f"\nAdam (coupled): relative L2 error {rel_adam:.2e} (max {max_adam:.2e}), same support {support_adam}; "
          f"AdamW (decoupled): relative L2 error {rel_adamw:.2e}, same support {support_adamw}")
    assert rel_adam < 1e-5 and support_adam
    assert rel_adamw > 100 * rel_adam
