"""The target-sparsity controller (symfast.train.target): it reaches the target on a small digits problem across
seeds and targets, follows the ramp from below, stays within its clamps, and resumes exactly."""

import pytest
import torch
from torch import nn

from symfast.conversion import convert
from symfast.train import fit
from symfast.train.baselines import gmp_schedule
from symfast.train.data import digits_data
from symfast.train.loop import dcs_sparsity, make_optimizer
from symfast.train.target import SparsityTarget

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, LR, ALPHA, THRESHOLD = 300, 1e-2, 3e-3, 1e-2


def _digits_mlp(seed, alpha=ALPHA):
    """A 64 -> 32 -> 10 MLP on scikit-learn's digits: the digits task's data, a model small enough for a unit test."""
    train, _, _ = digits_data(seed=seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return convert(net, structure="elementwise", alpha=alpha, warn=False), train


class Recorder(SparsityTarget):
    """Records alpha and the measured sparsity at every check."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.trace = []

    def __call__(self, step):
        super().__call__(step)
        if step % self.every == 0:
            self.trace.append((step, self.alpha, self.groups[0]["measured_sparsity"]))


def _train(seed, target, **kw):
    model, train = _digits_mlp(seed)
    opt = make_optimizer(model, "adam", LR)
    ctl = Recorder(model, opt, target=target, steps=STEPS, threshold=THRESHOLD, **kw)
    fit(model, train, steps=STEPS, batch_size=64, lr=LR, optimizer=opt, after_step=ctl, progress=False, seed=seed)
    return dcs_sparsity(model, threshold=THRESHOLD), ctl


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("target", [0.75, 0.95])
def test_controller_reaches_the_target_on_digits(seed, target):
    got, ctl = _train(seed, target)
    assert abs(got - target) < 0.03, (got, ctl.trace)
    # From below: the sparsity passes the target by at most the margin at any check.
    assert max(s for _, _, s in ctl.trace) < target + 0.03


def test_controller_starts_small_and_stays_within_its_cap():
    got, ctl = _train(0, 0.99, cap=3.0)  # out of reach at 3x the reference: the cap must hold
    alphas = [a for _, a, _ in ctl.trace]
    assert alphas[0] == pytest.approx(1e-2 * ALPHA)
    assert max(alphas) == pytest.approx(3.0 * ALPHA)  # it did push, and no further
    assert min(alphas) >= 1e-2 * ALPHA * (1 - 1e-12)
    assert got < 0.99


def test_goal_is_the_cubic_ramp_from_the_initial_sparsity():
    model, _ = _digits_mlp(0)
    ctl = SparsityTarget(model, make_optimizer(model, "adam", LR), target=0.8, steps=200, threshold=THRESHOLD)
    sch = gmp_schedule(200)
    end = sch["start"] + sch["events"] * sch["every"]
    assert ctl.goal(0) == ctl.goal(sch["start"]) == 0.0
    ctl.groups[0]["initial_sparsity"] = 0.3
    assert ctl.goal(sch["start"]) == pytest.approx(0.3) and ctl.goal(end) == ctl.goal(199) == pytest.approx(0.8)
    mid = sch["start"] + (end - sch["start"]) / 2  # the closed form at half the ramp: 0.8 + (0.3 - 0.8) / 8
    assert ctl.goal(mid) == pytest.approx(0.8 - 0.5 / 8)
    vals = [ctl.goal(t) for t in range(200)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_resumed_run_continues_the_controller_exactly(tmp_path):
    def go(stop_after=None, resume=False):
        model, train = _digits_mlp(0)
        opt = make_optimizer(model, "adam", LR)
        ctl = SparsityTarget(model, opt, target=0.9, steps=120, threshold=THRESHOLD)
        fit(model, train, steps=120, batch_size=32, lr=LR, optimizer=opt, after_step=ctl, progress=False,
            checkpoint=tmp_path / "ck.pt", resume=resume, stop_after=stop_after)
        return model, ctl

    whole, ctl_whole = go()
    (tmp_path / "ck.pt").unlink()
    go(stop_after=60)
    resumed, ctl_resumed = go(resume=True)
    assert ctl_resumed.alpha == ctl_whole.alpha > 1e-2 * ALPHA
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_controller_refuses_bad_settings_naming_them():
    model, _ = _digits_mlp(0)
    opt = make_optimizer(model, "adam", LR)
    with pytest.raises(ValueError, match=r"target must be in \(0, 1\), got 1.0"):
        SparsityTarget(model, opt, target=1.0, steps=10, threshold=THRESHOLD)
    with pytest.raises(ValueError, match=r"0 < start <= 1 <= cap.*cap=0.5"):
        SparsityTarget(model, opt, target=0.5, steps=10, threshold=THRESHOLD, cap=0.5)
    zero, _ = _digits_mlp(0, alpha=0.0)
    with pytest.raises(ValueError, match=r"one alpha > 0 .*got weight decays \[0.0\]"):
        SparsityTarget(zero, make_optimizer(zero, "adam", LR), target=0.5, steps=10, threshold=THRESHOLD)
