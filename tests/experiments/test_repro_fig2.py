"""`symfast repro fig2`: along gradient descent towards a symmetric solution the Hessian splits into blocks on im O
and ker O^T. The exact Hessian is checked here against torch.autograd's double backward (a different path from
torch.func.hessian), and the block measures against a hand-made block-diagonal matrix."""

import pytest
import torch

from symfast.experiments import common, fig2
from repro_checks import check_record

TINY = {"steps": 8_000, "snapshots": 24, "seed": 1}


@pytest.fixture(scope="module")
def f2(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig2")
    cfg = dict(TINY)
    seed = cfg.pop("seed")
    return out, fig2.run(out, progress=False, seed=seed, config=cfg)


def test_fig2_record_and_block_structure(f2):
    out, rec = f2
    check_record(rec, out)
    s = rec["metrics"]["summary"]
    assert s["final_distance"] < 1e-8 and s["initial_distance"] > 0.1
    # mixed at the start, split at the end
    assert s["initial_top_mixing"] > 1e-2 and s["final_top_mixing"] < 1e-10
    assert s["initial_off_block"] > 1e-2 and s["final_off_block"] < 1e-8 and s["final_spectrum_split"] < 1e-10
    assert abs(s["off_block_slope"] - 1) < 0.05 and s["off_block_slope_points"] >= 5
    assert rec["verdict"] == common.REPRODUCED
    assert [c["key"] for c in rec["checks"] if c["control"]] == ["summary.exact_symmetric_off_block"]


def test_fig2_hessian_against_double_backward():
    cfg = fig2.make_config(samples=16)
    g = torch.Generator().manual_seed(2)
    X, y, a = fig2.data(cfg, g)
    p = fig2.init(cfg, g, a)
    H = fig2.loss_hessian(p, X, y, 0.1)
    flat = torch.cat([v.reshape(-1) for v in p.values()])

    def loss(v):
        q = fig2.unflatten(v, p)
        return 0.5 * ((fig2._forward(q, X) - y) ** 2).mean() + 0.05 * (v ** 2).sum()

    ref = torch.autograd.functional.hessian(loss, flat)
    torch.testing.assert_close(H, ref, rtol=1e-12, atol=1e-13)


def test_fig2_block_measures_on_known_matrices():
    """A block-diagonal H in the basis [O, Q] is split exactly; a coupling of size e is measured as e."""
    g = torch.Generator().manual_seed(0)
    D, k = 7, 3
    B, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    O, Q = B[:, :k], B[:, k:]
    A1 = torch.diag(torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64))
    A2 = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64))  # 1.0 repeated across the blocks
    H = O @ A1 @ O.T + Q @ A2 @ Q.T
    m = fig2.block_measures(H, O, None)
    assert m["off_block"] < 1e-14 and m["top_mixing"] < 1e-14 and m["spectrum_split"] < 1e-14
    C = torch.zeros(k, D - k, dtype=torch.float64)
    C[0, 0] = 0.05
    Hc = H + O @ C @ Q.T + Q @ C.T @ O.T
    assert fig2.block_measures(Hc, O, None)["off_block"] == pytest.approx(0.05 / torch.linalg.matrix_norm(
        Hc, ord=2).item(), rel=1e-10)


def test_fig2_criteria_can_fail(f2):
    _, rec = f2
    for key, value in (("final_distance", 1e-3), ("final_top_mixing", 0.2), ("off_block_slope_error", 0.5)):
        bad = {**rec["metrics"], "summary": {**rec["metrics"]["summary"], key: value}}
        assert common.judge(bad, fig2.CRITERIA)[0] == common.NOT_REPRODUCED, key
