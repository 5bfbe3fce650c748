"""`symfast repro theorems123`: parts 1 and 2 of Theorems 1-3 on small tanh networks.

Part 1 is checked here against an independent path (plain autograd on one sample at a time, no vmap); the
record's structure and its verdict are recomputed from its own metrics."""

import pytest
import torch

from symfast.experiments import theorems123
from repro_checks import check_record

TINY = {"steps": 300, "weight_decays": [0.0, 0.1], "part1_samples": 8, "points": 16}


@pytest.fixture(scope="module")
def thm(tmp_path_factory):
    out = tmp_path_factory.mktemp("thm")
    return out, theorems123.run(out, progress=False, config=TINY)


def test_theorems123_record_and_part1(thm):
    out, rec = thm
    check_record(rec, out)
    m = rec["metrics"]
    for name in theorems123.THEOREMS:
        # on the condition nothing leaves it; the broken twins leave it clearly
        assert m[name]["part1_leaving_gradient"] <= 1e-12 < 1e-3 <= m[name]["broken_leaving_gradient"]
        rows = m[name]["per_gamma"]
        assert [r["gamma"] for r in rows] == TINY["weight_decays"]
        assert m[name]["part2_structured_gammas"] == sum(
            r["distance"] < theorems123.ON_CONDITION and r["loss_fraction_of_zero_predictor"] <= 0.9
            for r in rows[1:])
    assert sorted(c["key"] for c in rec["checks"] if c["control"]) == sorted(
        f"{n}.broken_leaving_gradient" for n in theorems123.THEOREMS)


@pytest.mark.parametrize("name", theorems123.THEOREMS)
def test_theorems123_part1_against_plain_autograd(name):
    """The symmetric condition's leaving gradient is 0 sample by sample, by torch.autograd on each sample."""
    cfg = theorems123.make_config(**TINY)
    g = torch.Generator().manual_seed(3)
    p, leaving = theorems123.onto_condition(name, theorems123.init_params(name, cfg, g), g)
    X, y = theorems123.data(cfg, g, 5)
    for x, t in zip(X, y):
        q = {k: v.clone().requires_grad_() for k, v in p.items()}
        loss = (theorems123._forward(name, q, x[None], False)[0] - t) ** 2 + 0.1 * sum(
            (v ** 2).sum() for v in q.values())
        grads = dict(zip(q, torch.autograd.grad(loss, list(q.values()))))
        batched = {k: v[None] for k, v in grads.items()}
        assert leaving(batched).abs().max() <= 1e-13 * max(v.abs().max() for v in grads.values())


def test_theorems123_part2_counts_only_fitting_models():
    """A network collapsed to 0 sits on every condition; it is not counted as the structure."""
    def row(gamma, distance, loss, finite=True):
        return {"gamma": gamma, "distance": distance, "loss_fraction_of_zero_predictor": loss, "finite": finite}

    assert theorems123.structured_gammas([row(0.0, 0.0, 0.1), row(0.1, 1e-9, 0.5), row(1.0, 0.0, 1.0),
                                          row(0.3, 1e-3, 0.5), row(0.5, 0.0, 0.2, finite=False)]) == 1
