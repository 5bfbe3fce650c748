"""symfast train's baselines and DCS levers: GMP (global, per-layer uniform, on w * u) against its closed form,
budget matching in metrics.json."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from symfast.cli import main
from symfast.conversion import convert
import symfast.train.task as task
from symfast.train.baselines import (Diverged, GradualMagnitude, gmp_schedule, gmp_sparsity, magnitude_masks,
                                      prune_like, svd_truncate)
from symfast.train.task import BASELINES

pytestmark = pytest.mark.usefixtures("one_thread")


def _closed_form(t, s_f, t0, dt, n):
    """Zhu & Gupta (2017), eq. 1, written out independently: the sparsity after the last pruning step <= t."""
    if t < t0:
        return 0.0
    k = min((t - t0) // dt, n)
    return s_f * (1 - (1 - k * dt / (n * dt)) ** 3)


@pytest.mark.parametrize("steps", [2, 18, 180, 1350])
def test_gmp_schedule_is_the_cubic_closed_form_and_ends_inside_the_phase(steps):
    sch = gmp_schedule(steps)
    t0, dt, n = sch["start"], sch["every"], sch["events"]
    assert t0 + n * dt <= steps  # the final mask is reached before the phase ends
    vals = [gmp_sparsity(t, final=0.8, **sch) for t in range(steps + 1)]
    for t, v in enumerate(vals):
        assert v == pytest.approx(_closed_form(t, 0.8, t0, dt, n), abs=1e-12), t
    assert vals[steps] == pytest.approx(0.8) and vals[0] == 0.0
    assert all(b >= a for a, b in zip(vals, vals[1:]))  # monotone: nothing is regrown
    # Cubic: the first increment is the largest (prune fast while redundancy is high).
    incs = [b - a for a, b in zip(vals, vals[1:]) if b > a]
    assert incs[0] == max(incs)


def _layers(scale2=10.0):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    with torch.no_grad():
        m[2].weight.mul_(scale2)  # the second layer's weights are larger: a global threshold spares them
    return m, ["0", "2"]


def _zero_fraction(m, n):
    w = m.get_submodule(n).weight
    return float((w == 0).float().mean())


def test_global_and_uniform_magnitude_masks():
    m, names = _layers()
    scores = {n: m.get_submodule(n).weight.detach().abs() for n in names}
    g = magnitude_masks(scores, 0.5, uniform=False)
    u = magnitude_masks(scores, 0.5, uniform=True)
    total = sum(s.numel() for s in scores.values())
    assert sum(int((~k).sum()) for k in g.values()) == round(0.5 * total)
    for n in names:  # uniform: the same fraction in every layer
        assert int((~u[n]).sum()) == round(0.5 * scores[n].numel())
    # global: one threshold over all layers (compare with numpy), so the small-weight layer loses more
    flat = np.concatenate([scores[n].numpy().ravel() for n in names])
    cut = np.sort(flat)[round(0.5 * total) - 1]
    for n in names:
        assert np.array_equal((~g[n]).numpy(), scores[n].numpy() <= cut)
    assert float((~g["0"]).float().mean()) > 0.5 > float((~g["2"]).float().mean())
    # uniform: within each layer, every pruned magnitude <= every kept one
    for n in names:
        assert scores[n][~u[n]].max() <= scores[n][u[n]].min()


@pytest.mark.parametrize("uniform", [False, True])
def test_gradual_magnitude_follows_the_schedule_and_keeps_pruned_weights_zero(uniform):
    m, names = _layers()
    sch = gmp_schedule(40)
    gmp = GradualMagnitude(m, names, final=0.7, uniform=uniform, **sch)
    g = torch.Generator().manual_seed(1)
    pruned_before = {n: torch.zeros_like(m.get_submodule(n).weight, dtype=torch.bool) for n in names}
    for t in range(1, 41):
        with torch.no_grad():  # an "optimizer step" that would regrow pruned weights
            for n in names:
                m.get_submodule(n).weight.add_(0.05 * torch.randn(m.get_submodule(n).weight.shape, generator=g))
        gmp(t)
        s = gmp_sparsity(t, final=0.7, **sch)
        sizes = {n: m.get_submodule(n).weight.numel() for n in names}
        zeros = {n: int((m.get_submodule(n).weight == 0).sum()) for n in names}
        if uniform:
            assert zeros == {n: round(s * sizes[n]) for n in names}, t
        else:
            assert sum(zeros.values()) == round(s * sum(sizes.values())), t
        for n in names:
            now = m.get_submodule(n).weight == 0
            assert bool(now[pruned_before[n]].all()), (t, n)  # once pruned, stays pruned
            pruned_before[n] = now
    assert _zero_fraction(m, "0") > _zero_fraction(m, "2") or uniform


def test_gradual_magnitude_on_w_times_u_prunes_the_product_and_zeroes_both_factors():
    m, names = _layers()
    wu = convert(m, structure="elementwise", alpha=0.0, warn=False)
    theta = {n: wu.get_submodule(n).parametrization().detach().clone() for n in names}
    gmp = GradualMagnitude(wu, names, final=0.5, start=0, every=1, events=1, uniform=False)
    gmp(1)
    flat = torch.cat([theta[n].abs().reshape(-1) for n in names])
    cut = flat.sort().values[round(0.5 * flat.numel()) - 1]
    for n in names:
        p = wu.get_submodule(n).parametrization
        pruned = theta[n].abs() <= cut
        assert bool((p.w[pruned] == 0).all() and (p.u[pruned] == 0).all())
        assert torch.equal(p()[~pruned], theta[n][~pruned])
    with pytest.raises(ValueError, match="plain layer or an elementwise DCS layer"):
        GradualMagnitude(convert(_layers()[0], structure="group", alpha=0.0, warn=False), names, final=0.5,
                         start=0, every=1, events=1, uniform=False)


# ------------------------------------------------------------- symfast train: all four baselines, same budget
def test_metrics_have_every_baseline_at_the_dcs_budget_and_sparsity(tmp_path, capsys):
    assert main(["train", "--task", "digits", "--steps", "20", "--width", "4", "--eval-every", "10",
                 "--no-progress", "--alpha", "3e-3", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m["baselines"]) == set(BASELINES)
    exported = torch.load(tmp_path / "exported.pt", weights_only=False)
    sizes = [exported.get_submodule(n).weight.numel() for n in m["converted"]]
    numel = sum(sizes)
    assert m["sparsity"] > 0.05  # something to match
    for arm, b in m["baselines"].items():
        assert set(b) >= {"val_loss", "val_accuracy", "sparsity", "steps", "lr"}, arm
        assert b["steps"] == m["steps"] == 20, arm  # the same total budget as DCS
        main_steps = len(m["history"][arm])
        assert main_steps + len(m["history"][f"{arm}_finetune"]) == m["steps"], arm
        assert main_steps == len(m["history"]["dcs"]) and m["finetune_steps"] == len(m["history"]["dcs_finetune"])
        assert math.isfinite(b["val_loss"]) and 0 <= b["val_accuracy"] <= 1, arm
        if arm == "gradual_magnitude_uniform":  # each layer rounds its own count
            assert abs(b["sparsity"] - m["sparsity"]) <= len(sizes) / numel, arm
        else:
            assert b["sparsity"] == pytest.approx(m["sparsity"], abs=0.5 / numel), arm
    assert math.isfinite(m["val_loss_before_finetune"])
    out = capsys.readouterr().out
    assert all(f"{arm}:" in out for arm in BASELINES)


# ------------------------------------------------------------- budget split
def test_tune_split_is_held_out_from_training_with_a_gap_and_budget_split():
    from symfast.train.task import split_budget, tune_split

    data = TensorDataset(torch.arange(100))
    train, tune = tune_split(data, gap=5)
    tr, tu = {int(data[i][0]) for i in train.indices}, {int(data[i][0]) for i in tune.indices}
    assert tu == set(range(90, 100)) and tr == set(range(85))  # disjoint, the last 10%, gap items dropped
    with pytest.raises(ValueError, match="too little training data"):
        tune_split(TensorDataset(torch.arange(10)), gap=9)
    assert split_budget(200, 0.1) == (20, 180) and split_budget(2, 0.1) == (1, 1) and split_budget(3, 0.9) == (2, 1)


# ------------------------------------------------------------- a diverged baseline says so, naming the layer
def test_baselines_refuse_non_finite_weights_naming_the_layer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        m[2].weight[1, 3] = float("nan")
        m[2].weight[0, 0] = float("inf")
    expect = r"layer 2 \(Linear\) has 2 non-finite values \(NaN or inf\) of 12 in weight: the training run diverged"
    with pytest.raises(Diverged, match="symfast.train.prune_like: " + expect):
        prune_like(m, ["0", "2"], 5)
    with pytest.raises(Diverged, match="symfast.train.svd_truncate: " + expect):
        svd_truncate(m, {"0": 1, "2": 1})
    gmp = GradualMagnitude(m, ["0", "2"], final=0.5, start=2, every=1, events=2, uniform=False)
    gmp(1)  # not a pruning step: nothing is scored, nothing checked
    with pytest.raises(Diverged, match="symfast.train.GradualMagnitude: " + expect):
        gmp(2)
    wu = convert(nn.Sequential(nn.Linear(4, 6)), structure="elementwise", alpha=0.0, warn=False)
    with torch.no_grad():
        wu[0].parametrization.u[0, 0] = float("nan")
    with pytest.raises(Diverged, match=r"layer 0 \(DCSLinear\) has 1 non-finite values \(NaN or inf\) of 24 in "
                                       r"parametrization.u: the training run diverged"):
        GradualMagnitude(wu, ["0"], final=0.5, start=0, every=1, events=1, uniform=False)(0)
    assert issubclass(Diverged, ValueError)


@pytest.mark.parametrize("arm, phase", [("one_shot_magnitude", "dense"),
                                        ("gradual_magnitude_wu", "gradual_magnitude_wu"), ("DCS", "DCS elementwise")])
def test_a_diverged_arm_stops_the_run_naming_the_arm_and_layer(tmp_path, monkeypatch, capsys, arm, phase):
    real_fit = task.fit

    def diverging_fit(model, *a, **k):
        r = real_fit(model, *a, **k)
        if k["desc"] == phase:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        return r

    monkeypatch.setattr(task, "fit", diverging_fit)
    baselines = "one_shot_magnitude" if arm == "DCS" else arm
    assert main(["train", "--task", "digits", "--steps", "8", "--width", "2", "--eval-every", "4", "--no-progress",
                 "--baselines", baselines, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    d = task.defaults("digits", "elementwise", quick=False)
    lr = d["one_shot_lr"] if arm == "one_shot_magnitude" else d["lr"]  # the message names the arm's own lr
    assert f"symfast train: the {arm} arm (lr {lr:g}) diverged: symfast.train" in err, err
    assert "non-finite values (NaN or inf)" in err and "the training run diverged" in err and "layer " in err
    assert f"Nothing was written to {tmp_path}" in err and "Traceback" not in err
    assert not (tmp_path / "metrics.json").exists()


# ------------------------------------------------------------- GMP resumed after its last pruning step
def test_gradual_magnitude_resumed_after_pruning_keeps_its_mask(tmp_path):
    from symfast.train import fit

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 8, generator=g), torch.randint(2, (256,), generator=g))

    def go(**kw):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        hook = GradualMagnitude(m, ["0", "2"], final=0.6, uniform=False, **gmp_schedule(40))
        fit(m, data, steps=40, batch_size=32, lr=1e-2, after_step=hook, progress=False,
            checkpoint=tmp_path / "gmp.pt", **kw)
        return m

    whole = go()
    (tmp_path / "gmp.pt").unlink()
    go(stop_after=30)  # past the last pruning step (24): the checkpoint holds the final mask's zeros
    resumed = go(resume=True)
    zeros = sum(int((p == 0).sum()) for n, p in resumed.named_parameters() if n.endswith("weight"))
    assert zeros == round(0.6 * 16 * 8) + round(0.6 * 2 * 16)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
