"""symfast.monitor.CollapseMonitor: what it records is the metrics of the model at that moment."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from symfast import metrics as M
from symfast import monitor


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_collapse_monitor_records_and_plots(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-2)
    g = _g(0)
    with monitor.CollapseMonitor(model, every=2) as mon:
        for i in range(5):
            x, y = torch.randn(32, 6, generator=g), torch.randn(32, 2, generator=g)
            loss = F.mse_loss(model(x), y)
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
        assert [r["step"] for r in mon.history] == [0, 2, 4]
        keys = set(mon.keys())
        for layer in ("0", "2"):
            for k in ("numerical_rank", "effective_rank", "approximate_rank", "stable_rank", "vanishing_fraction",
                      "near_identical_fraction", "dormant_fraction", "block_count", "feature_effective_rank"):
                assert f"{layer}/{k}" in keys
        assert {"sparsity", "dead_fraction", "loss"} <= keys
        # the recorded values are the metrics of the model at that moment
        now = mon.measure()
        assert now["0/effective_rank"] == pytest.approx(M.effective_rank(model[0].weight))
        assert now["sparsity"] == pytest.approx(M.sparsity(model))
        model(torch.randn(16, 6))  # refresh the captured activations
        assert mon.measure()["0/dormant_fraction"] == pytest.approx(M.dormant_units(mon._acts["0"]).double().mean().item())
        fig = mon.plot(path=str(tmp_path / "collapse.png"))
        assert (tmp_path / "collapse.png").stat().st_size > 1000
        assert len([a for a in fig.axes if a.get_visible()]) == len({k.split("/")[-1] for k in keys})
        steps, vals = mon.series("loss")
        assert steps == [0, 2, 4] and len(vals) == 3
    assert mon._handles == []  # hooks removed
    with pytest.raises(KeyError, match="layers \\['nope'\\] are not modules"):
        monitor.CollapseMonitor(model, layers=["nope"])


def test_collapse_monitor_empty_layer_and_bad_layers():
    model = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 3))
    with monitor.CollapseMonitor(model) as mon:
        model(torch.randn(5, 4))
        rec = mon.step()
    assert rec["0/numerical_rank"] == 0 and rec["1/numerical_rank"] == 0
    assert "0/vanishing_fraction" not in rec  # no neurons: no per-neuron fraction
    # a LayerNorm's weight is no matrix: refused at construction, naming the layer
    with pytest.raises(ValueError, match=r"layers entry '1' \(LayerNorm\) must have a weight of >= 2 dims.*got a weight of shape \(3,\)"):
        monitor.CollapseMonitor(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), layers=["1"])
    with pytest.raises(ValueError, match=r"model \(ReLU\) must have parameters"):
        monitor.CollapseMonitor(nn.ReLU())
