"""`symfast repro theorem4` and `symfast repro lyapunov`: their quantitative signatures at reduced scale.

Every verdict is recomputed from the record's metrics by the criterion it states; the mathematical
ingredients are checked against independent oracles (closed forms, plain autograd).
"""

from __future__ import annotations

import math

import pytest
import torch

import symfast
from symfast import cli, experiments
from symfast.collapse import approx_critical_learning_rate, critical_learning_rate
from symfast.experiments import lyapunov, theorem4
from repro_checks import check_record




def test_listed(capsys):
    for name in ("theorem4", "lyapunov"):
        assert callable(experiments.get(name).load().run)
    assert cli.main(["repro", "--list"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    for name in ("theorem4", "lyapunov"):
        assert experiments.get(name).title in lines[name]


# ------------------------------------------------------------------ lyapunov
def test_lyapunov_root_closed_form():
    """Two-point curvatures h in {-t - s, -t + s}: Lambda = 0 at lr* = 2t / (s^2 - t^2); eq. 9 gives 2t / (s^2 + t^2)."""
    t, s = 0.3, 1.0
    h = torch.tensor([-t - s, -t + s], dtype=torch.float64)
    assert critical_learning_rate(h).item() == pytest.approx(2 * t / (s * s - t * t), rel=1e-12)
    assert approx_critical_learning_rate(h).item() == pytest.approx(2 * t / (s * s + t * t), rel=1e-12)


def test_lyapunov_curvatures_and_sgd_step():
    g = torch.Generator().manual_seed(0)
    x, y = lyapunov.make_data(0.25, 1.0, 16, g)
    h = lyapunov.curvatures(x, y)
    torch.testing.assert_close(h, torch.stack([-x * y, x * y], 1), rtol=0, atol=1e-14)
    # One SGD step of the closed form equals autograd on 1/2 (x w u - y)^2 with plain tensors.
    w0, u0, lr = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.7, dtype=torch.float64), 0.4
    wp, up = w0.clone().requires_grad_(), u0.clone().requires_grad_()
    gw, gu = torch.autograd.grad(0.5 * (x[3] * wp * up - y[3]) ** 2, (wp, up))
    r = (x[3] * symfast.dcs(w0.view(1), u0.view(1)) - y[3]) * x[3]
    torch.testing.assert_close((w0 - lr * r * u0).squeeze(), (w0 - lr * gw).detach())
    torch.testing.assert_close((u0 - lr * r * w0).squeeze(), (u0 - lr * gu).detach())


def test_lyapunov_threshold_signature(tmp_path):
    cfg = {"settings": [[0.25, 1.0]], "chains": 100, "n_lrs": 11, "max_steps": 8000}
    rec = lyapunov.run(tmp_path, progress=False, config=cfg)
    check_record(rec, tmp_path)
    v = rec["metrics"]["settings"]["theta0.25_sigma1"]
    # Below the exact root no chain collapses, well above it all do; the 50% point is within 10% of lr*.
    lrs, frac = v["lrs"], v["collapse_fraction"]
    assert all(f <= 0.05 for lr, f in zip(lrs, frac) if lr < 0.85 * v["lr_exact"])
    assert all(f >= 0.9 for lr, f in zip(lrs, frac) if 1.15 * v["lr_exact"] < lr < v["singularity_lr_n1"])
    assert abs(v["ratio_observed_to_exact"] - 1) < 0.1
    assert v["mean_h_n1"] < 0  # a strict saddle: GD alone escapes it
    assert v["eq9_rel_error"] < 0.05 and v["lr_exact"] < v["singularity_lr_n1"]
    assert rec["verdict"] == "reproduced"


# ------------------------------------------------------------------ theorem4
SMALL_T4 = {"points": 3, "gammas": [0.0, 0.1, 0.3, 0.6, 1.0], "inner_steps": 2000, "perturb_steps": 600,
            "starts": 6, "min_steps": 4000}


def test_theorem4_loss_has_the_mirror_and_control_breaks_it():
    cfg = theorem4.make_config()
    prob = theorem4.make_problem(cfg, torch.Generator().manual_seed(1))
    O = prob["O"]
    th = torch.randn(4, cfg["D"], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    R = th - 2 * (th @ O) @ O.T
    torch.testing.assert_close(theorem4.losses(R, prob, prob["batch"], 0.3), theorem4.losses(th, prob, prob["batch"], 0.3))
    broken = theorem4.losses(R, prob, prob["batch"], eps=0.1) - theorem4.losses(th, prob, prob["batch"], eps=0.1)
    assert broken.abs().max() > 1e-3


def test_theorem4_signature(tmp_path):
    rec = theorem4.run(tmp_path, progress=False, config=SMALL_T4)
    check_record(rec, tmp_path)
    m = rec["metrics"]
    assert m["part1"]["max_rel_grad_condition"] <= 1e-12 and m["part1"]["control_min_rel_grad_condition"] > 1e-3
    assert m["part2"]["max_rel_block"] <= 1e-12 and m["part2"]["control_min_rel_block"] > 1e-3
    assert m["part2"]["max_eigen_residual"] <= 1e-10
    assert m["part3"]["fraction_correct"] == 1.0 and m["part3"]["points_with_positive_gamma0"] > 0
    assert m["part3_gd"]["agreement"] == 1.0 and m["part3_gd"]["n_decided"] >= 4
    p4 = m["part4"]
    assert p4["fraction_off_mirror"][0] > 0 and p4["fraction_off_mirror"][-1] == 0
    assert math.isfinite(p4["gamma1_observed"]) and p4["max_condition_above_gamma1"] <= 1e-6
    assert rec["verdict"] == "reproduced"


def test_lyapunov_deterministic_per_seed(tmp_path):
    cfg = {"settings": [[0.25, 1.0]], "chains": 20, "n_lrs": 4, "max_steps": 1000}
    a = lyapunov.run(tmp_path / "a", progress=False, config=cfg)
    b = lyapunov.run(tmp_path / "b", progress=False, config=cfg)
    c = lyapunov.run(tmp_path / "c", progress=False, seed=1, config=cfg)
    assert a["metrics"] == b["metrics"] and a["metrics"] != c["metrics"]
