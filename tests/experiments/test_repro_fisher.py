"""`symfast repro fisher`: at a symmetric solution the empirical Fisher has exactly the mirror's null directions.

The null directions are checked here on an independent path: plain autograd on one sample at a time and numpy's
eigendecomposition; the record's structure and verdict are recomputed from its own metrics."""

import numpy as np
import pytest
import torch

from symfast.experiments import common, fisher
from repro_checks import check_record

TINY = {"d": 2, "hidden": 3, "samples": 48, "points": 2}


@pytest.fixture(scope="module")
def fr(tmp_path_factory):
    out = tmp_path_factory.mktemp("fisher")
    return out, fisher.run(out, progress=False, config=TINY)


def test_fisher_record_and_null_directions(fr):
    out, rec = fr
    check_record(rec, out)
    s = rec["metrics"]["summary"]
    k = 2 * (TINY["d"] + 2)
    assert s["k"] == k and s["parameters"] == TINY["hidden"] * (TINY["d"] + 2)
    assert s["symmetric_null_counts"] == [k] * TINY["points"] and s["generic_null_counts"] == [0] * TINY["points"]
    # a clear gap: the null eigenvalues are at rounding level, the next ones orders of magnitude above the threshold
    assert s["symmetric_max_kth_relative"] < 1e-14 and s["symmetric_min_next_relative"] > 1e-10
    assert s["symmetric_max_subspace_error"] < 1e-7 and abs(s["near_slope_error"]) < 0.05
    assert rec["verdict"] == common.REPRODUCED
    assert [c["key"] for c in rec["checks"] if c["control"]] == ["summary.control_max_error"]


def test_fisher_null_space_by_plain_autograd_and_numpy():
    """Per-sample gradients one sample at a time (torch.autograd), the Fisher's eigenvectors by numpy: exactly the
    k directions of O are null at the symmetric point."""
    cfg = fisher.make_config(**TINY)
    g = torch.Generator().manual_seed(5)
    X, y = fisher.data(cfg, g)
    p0 = fisher.random_point(cfg, g)
    ms = fisher.mirrors(p0)
    O = torch.cat([m.basis for m in ms], 1).numpy()
    p = fisher.onto_conditions(p0, ms)
    rows = []
    for x, t in zip(X, y):
        q = {k: v.clone().requires_grad_() for k, v in p.items()}
        gr = torch.autograd.grad(fisher._loss(q, x[None], t[None])[0], list(q.values()))
        rows.append(torch.cat([v.reshape(-1) for v in gr]).numpy())
    G = np.array(rows)
    assert np.abs(G @ O).max() <= 1e-14 * np.abs(G).max()  # O^T grad l = 0 for every sample
    ev, V = np.linalg.eigh(G.T @ G / len(G))
    k = O.shape[1]
    assert ev[k - 1] <= 1e-14 * ev[-1] < 1e-9 * ev[-1] <= ev[k]
    np.testing.assert_allclose(np.linalg.svd(O.T @ V[:, :k], compute_uv=False), 1.0, atol=1e-8)  # span im O


def test_fisher_criteria_can_fail(fr):
    _, rec = fr
    for key, value in (("symmetric_max_null_count_error", 1), ("generic_max_null_count", 1),
                       ("near_slope_error", 0.5)):
        bad = {**rec["metrics"], "summary": {**rec["metrics"]["summary"], key: value}}
        assert common.judge(bad, fisher.CRITERIA)[0] == common.NOT_REPRODUCED, key


def test_fisher_rejects_bad_config():
    with pytest.raises(ValueError, match="hidden must be >= 3"):
        fisher.make_config(hidden=2)
    with pytest.raises(ValueError, match="points must be >= 1"):
        fisher.make_config(points=0)
