"""`symfast repro mf-weight-decay`: W U with weight decay reaches the nuclear-norm solution (low rank); a single
matrix with the same weight decay stays full rank. Checked against closed forms computed here with numpy."""

import numpy as np
import pytest

from symfast.experiments import mf_weight_decay
from repro_checks import check_record

TINY = {"d": 12, "steps": 4_000, "weight_decays": [0.5, 1.0], "snapshots": 4}


@pytest.fixture(scope="module")
def mf(tmp_path_factory):
    out = tmp_path_factory.mktemp("mf")
    return out, mf_weight_decay.run(out, progress=False, config=TINY)


def test_mf_weight_decay_matches_the_closed_forms(mf):
    out, rec = mf
    check_record(rec, out)
    cfg, m = rec["config"], rec["metrics"]
    sa = np.linalg.svd(mf_weight_decay.target(cfg).numpy(), compute_uv=False)
    for p in m["per_gamma"]:
        g = p["gamma"]
        # the weight decay sits midway between two singular values of the target: the predicted rank is unambiguous
        assert np.min(np.abs(sa - g)) == pytest.approx(1 / cfg["d"], rel=1e-9)
        np.testing.assert_allclose(p["factorized_singular_values"], np.maximum(sa - g, 0), atol=1e-8)
        np.testing.assert_allclose(p["single_singular_values"], sa / (1 + g), atol=1e-8)
        assert p["factorized_rank"] == int((sa > g).sum()) < cfg["d"] == p["single_rank"]
    assert rec["verdict"] == "reproduced"
    assert [c["key"] for c in rec["checks"] if c["control"]] == ["summary.factorized_rank_without_weight_decay"]


def test_mf_weight_decay_criteria_can_fail(mf):
    """The verdict turns when the spectrum misses the closed form or the single matrix loses rank."""
    from symfast.experiments import common

    _, rec = mf
    crit = mf_weight_decay._criteria(rec["config"]["d"])
    bad = {**rec["metrics"], "summary": {**rec["metrics"]["summary"], "factorized_max_sv_error": 1e-2}}
    assert common.judge(bad, crit)[0] == common.NOT_REPRODUCED
    bad = {**rec["metrics"], "summary": {**rec["metrics"]["summary"], "single_min_rank": rec["config"]["d"] - 1}}
    assert common.judge(bad, crit)[0] == common.NOT_REPRODUCED


def test_mf_weight_decay_rejects_bad_weight_decay():
    with pytest.raises(ValueError, match="weight_decays"):
        mf_weight_decay.make_config(weight_decays=[0.0])
