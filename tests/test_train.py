"""symfast.train: exact resume, DDP parity with one process, export/metrics, and the magnitude-pruning baseline."""

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from conftest import gloo_group, spawn_workers
from symfast.cli import main
from symfast.convert import convert
from symfast.train import evaluate, fit, lm_data, prune_like, stdlib_files
from symfast.train.loop import dcs_sparsity


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: intra-op threads only add spinning, which on a shared 2-core machine
    # can slow a run tenfold. One thread keeps the file fast and its timing steady.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n=64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
    return TensorDataset(x[: n - 16], y[: n - 16]), TensorDataset(x[n - 16:], y[n - 16:])


def _model(structure="elementwise"):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    return convert(m, structure=structure, alpha=1e-3, warn=False)


FIT = dict(steps=12, batch_size=8, lr=1e-2, eval_every=4, progress=False)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_is_bitwise_identical(tmp_path, optimizer):
    train, val = _data()
    straight = _model()
    r1 = fit(straight, train, val, optimizer=optimizer, **FIT)

    ck = tmp_path / "ck.pt"
    first = _model()
    r2 = fit(first, train, val, optimizer=optimizer, checkpoint=ck, stop_after=5, **FIT)
    assert r2.stopped_early and len(r2.history) == 5
    resumed = _model()  # a fresh process would rebuild the model from scratch
    torch.manual_seed(123)  # and its global RNG would differ: the checkpoint restores it
    r3 = fit(resumed, train, val, optimizer=optimizer, checkpoint=ck, resume=True, **FIT)
    assert r3.resumed_from == 5
    assert r3.history == r1.history
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    # A different run (another seed) does differ: the comparison above can fail.
    other = _model()
    fit(other, train, val, optimizer=optimizer, seed=1, **FIT)
    assert not torch.equal(other[0].weight, straight[0].weight)


def _ddp_worker(rank, init_file, out):
    torch.set_num_threads(1)
    with gloo_group(rank, init_file, 2):
        train, val = _data()
        model = _model("group")
        r = fit(model, train, val, **FIT)
        fsdp_model = _model("group")
        rf = fit(fsdp_model, train, val, parallel="fsdp", **FIT)
        fsdp_state = {n: p.full_tensor() for n, p in fsdp_model.state_dict().items()}
        if rank == 0:
            torch.save({"history": r.history, "state": model.state_dict(), "fsdp_history": rf.history,
                        "fsdp_state": fsdp_state}, out)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
def test_ddp_and_fsdp2_two_processes_match_one_process(tmp_path):
    train, val = _data()
    single = _model("group")
    r = fit(single, train, val, **FIT)
    out = tmp_path / "ddp.pt"
    spawn_workers(_ddp_worker, (str(tmp_path / "init"), str(out)), nprocs=2)
    got = torch.load(out, weights_only=False)
    losses = [h["loss"] for h in r.history]
    assert np.allclose([h["loss"] for h in got["history"]], losses, rtol=1e-5, atol=1e-6)
    assert np.allclose([h["val_loss"] for h in got["history"] if "val_loss" in h],
                       [h["val_loss"] for h in r.history if "val_loss" in h], rtol=1e-5, atol=1e-6)
    for n, a in single.state_dict().items():
        torch.testing.assert_close(got["state"][n], a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["fsdp_state"][n], a, rtol=1e-5, atol=1e-6)  # FSDP2 too
    assert np.allclose([h["loss"] for h in got["fsdp_history"]], losses, rtol=1e-5, atol=1e-6)
    # Each rank saw half of each batch: had it trained on its half alone, the losses would differ.
    half = _model("group")
    rh = fit(half, TensorDataset(*train[:]), val, **{**FIT, "batch_size": 4})
    assert not np.allclose([h["loss"] for h in rh.history], losses, rtol=1e-3)


def test_prune_like_is_global_magnitude_pruning():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Conv1d(7, 4, 1), nn.Linear(3, 2))
    names = ["0", "2", "3"]
    w = np.concatenate([m.get_submodule(n).weight.detach().abs().numpy().ravel() for n in names])
    zeros = 17
    cut = np.sort(w)[zeros - 1]  # independent: the 17 smallest magnitudes over all layers together
    prune_like(m, names, zeros)
    got = np.concatenate([m.get_submodule(n).weight.detach().numpy().ravel() for n in names])
    assert (got == 0).sum() == zeros
    assert np.array_equal(got == 0, w <= cut)
    assert (m[0].bias != 0).all()  # biases untouched


def test_lm_data_splits_by_file():
    files = stdlib_files()
    train, val, info = lm_data(context=16, max_bytes=200_000)
    assert info["train_files"] > info["val_files"] >= 1
    used = files[: info["train_files"] + info["val_files"]]
    val_files = [f for i, f in enumerate(used) if i % 10 == 9]
    assert len(val_files) == info["val_files"]
    first = val_files[0].read_bytes()
    assert bytes(val.data[: len(first)].tolist()) == first  # validation starts with a held-out file ...
    assert first not in bytes(train.data.tolist())          # ... which is not in the training bytes
    x, y = train[5]
    assert x.shape == (16,) and torch.equal(x[1:], y[:-1])


def _run_cli(out, *extra):
    return main(["train", "--task", "digits", "--steps", "20", "--width", "4", "--eval-every", "5",
                 "--no-progress", "--out", str(out), *extra])


def test_cli_train_resume_export_and_baseline(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run_cli(a) == 0
    assert _run_cli(b, "--stop-after", "7") == 0
    assert not (b / "metrics.json").exists()
    assert _run_cli(b, "--resume") == 0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert mb["resumed_from"] == 7
    for k in ("task", "structure", "alpha", "steps", "sparsity", "val_loss", "val_accuracy", "params_before",
              "params_after", "magnitude_pruning_val_loss", "magnitude_pruning_val_accuracy"):
        assert k in ma, k
        assert ma[k] == mb[k], k  # the resumed run ends exactly where the uninterrupted one does
    assert ma["history"] == mb["history"]
    assert (a / "training.png").stat().st_size > 10_000

    # The export: plain torch modules, with the reported sparsity and validation loss.
    exported = torch.load(a / "exported.pt", weights_only=False)
    from symfast.nn import DCSLayer

    assert not any(isinstance(m, DCSLayer) for m in exported.modules())
    ws = [exported.get_submodule(n).weight for n in ma["converted"]]
    zero_frac = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    assert zero_frac == pytest.approx(ma["sparsity"], abs=1e-12)
    from symfast.train import digits_data

    _, val, _ = digits_data(seed=0)
    ev = evaluate(exported, val)
    assert ev["loss"] == pytest.approx(ma["val_loss"], rel=1e-6)
    assert ev["accuracy"] == pytest.approx(ma["val_accuracy"])
    # The baseline kept its mask through fine-tuning: the same number of zeros as DCS.
    assert ma["magnitude_pruning_sparsity"] == pytest.approx(ma["sparsity"], abs=1e-12)
    assert 0 < ma["magnitude_pruning_val_accuracy"] <= 1


def test_dcs_sparsity_counts_thresholded_zeros():
    m = _model()
    assert dcs_sparsity(m) == 0.0
    assert dcs_sparsity(m, threshold=1e9) == 1.0
    assert dcs_sparsity(nn.Linear(2, 2)) is None


def test_group_export_is_physically_smaller_and_timed(tmp_path):
    from symfast.train import TrainConfig, run

    m = run(TrainConfig(task="lm", quick=True, structure="group", alpha=1e-2, eval_samples=64), tmp_path,
            progress=False)
    assert m["sparsity"] > 0.1
    assert m["params_after"] < m["params_before"]  # dead MLP units were removed, not just zeroed
    exported = torch.load(tmp_path / "exported.pt", weights_only=False)
    hidden = [b.mlp[0].out_features for b in exported.blocks]
    assert min(hidden) < 4 * 64
    assert m["inference"]["dense_ms"] > 0 and m["inference"]["exported_ms"] > 0
    assert m["inference"]["speedup"] == pytest.approx(m["inference"]["dense_ms"] / m["inference"]["exported_ms"])
