"""`symfast repro adam-collapse`: Adam with coupled weight decay collapses coordinates of theta = w * u onto the
symmetric condition w_i = u_i = 0, like SGD; theta trained without the symmetry gets no zeros.

Signatures with margins (fractions averaged over seeds, never single trajectories); the collapse is also checked
against the lasso, which is what the full-batch dynamics minimize (scikit-learn)."""

import numpy as np
import pytest

from symfast.experiments import adam_collapse, common
from repro_checks import check_record

TINY = {"seeds": 2, "samples": 100, "steps": 2_000, "weight_decays": [0.1, 0.4]}


@pytest.fixture(scope="module")
def ac(tmp_path_factory):
    out = tmp_path_factory.mktemp("adam")
    return out, adam_collapse.run(out, progress=False, config=TINY)


def test_adam_collapse_record_and_signatures(ac):
    out, rec = ac
    check_record(rec, out)
    s = rec["metrics"]["summary"]
    fa = s["adam_collapsed_fraction"]
    # at the largest weight decay a good part of the 20 coordinates is on the condition, at the smallest fewer
    assert fa[-1] >= 0.25 and fa[-1] > fa[0]
    assert s["no_symmetry_zero_fraction"] == [0.0, 0.0]
    # the coordinates Adam collapses are about those the lasso zeroes (the full-batch answer)
    assert np.max(np.abs(np.subtract(fa, s["lasso_zero_fraction"]))) <= 0.25
    assert [c["key"] for c in rec["checks"] if c["control"]] == ["summary.lasso_max_zero_fraction"]


def test_adam_collapse_collapsed_coordinates_are_exactly_small():
    """Collapse is w_i and u_i both tiny, not a tiny product of one large and one small factor."""
    cfg = adam_collapse.make_config(**TINY)
    X, y = adam_collapse.data(cfg, 3)
    wu = adam_collapse.train("adam", True, cfg, 3, X, y)[-1]  # the largest weight decay
    mags = wu.abs().max(0).values.numpy()
    collapsed = mags < adam_collapse.COLLAPSE_TOL
    assert collapsed.any() and (~collapsed).any()
    assert mags[collapsed].max() < 1e-3 * mags[~collapsed].min()  # a wide gap, not a threshold effect


def test_adam_collapse_criteria_can_fail(ac):
    _, rec = ac
    for key, value in (("adam_max_collapsed_fraction", 0.05), ("adam_fraction_increases", False),
                       ("max_fraction_gap_adam_sgd", 0.5), ("no_symmetry_max_zero_fraction", 0.1)):
        bad = {**rec["metrics"], "summary": {**rec["metrics"]["summary"], key: value}}
        assert common.judge(bad, adam_collapse.CRITERIA)[0] == common.NOT_REPRODUCED, key


def test_adam_collapse_rejects_bad_weight_decays():
    with pytest.raises(ValueError, match="weight_decays"):
        adam_collapse.make_config(weight_decays=[0.0, 0.1])
    with pytest.raises(ValueError, match="weight_decays"):
        adam_collapse.make_config(weight_decays=[0.4, 0.1])
