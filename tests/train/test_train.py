"""symfast.train: exact resume, DDP parity with one process, export/metrics, and the magnitude-pruning baseline."""

import dataclasses
import io
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from distributed_workers import gloo_group, spawn_workers
from margins import assert_margin
from symfast.cli import main
from symfast.conversion import convert
import symfast.train.task as task
from symfast.train import evaluate, fit, lm_data, prune_like, stdlib_files
from symfast.train.loop import dcs_sparsity


pytestmark = pytest.mark.usefixtures("one_thread")


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


def _full(model):
    """A (possibly FSDP2-sharded) model's state as plain tensors; collective when sharded."""
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
            for n, t in model.state_dict().items()}


def _fsdp_resume_worker(rank, init_file, tmp):
    torch.set_num_threads(1)
    tmp = Path(tmp)
    with gloo_group(rank, init_file, 2):
        train, val = _data()
        straight = _model("group")
        r1 = fit(straight, train, val, parallel="fsdp", **FIT)
        ck = tmp / "fsdp.pt"
        first = _model("group")
        r2 = fit(first, train, val, parallel="fsdp", checkpoint=ck, stop_after=5, **FIT)
        assert r2.stopped_early and len(r2.history) == 5
        if rank == 0:
            shutil.copy(ck, tmp / "fsdp_at_5.pt")  # for the single process to resume
        dist.barrier()
        resumed = _model("group")  # a fresh process: new model, other global RNG state
        torch.manual_seed(123 + rank)
        r3 = fit(resumed, train, val, parallel="fsdp", checkpoint=ck, resume=True, **FIT)
        assert r3.resumed_from == 5
        # A checkpoint written by one process resumes under FSDP2 too.
        from_single = _model("group")
        r4 = fit(from_single, train, val, parallel="fsdp", checkpoint=tmp / "single_at_5.pt", resume=True, **FIT)
        assert r4.resumed_from == 5
        states = [_full(m) for m in (straight, resumed, from_single)]
        if rank == 0:
            torch.save({"straight": r1.history, "resumed": r3.history, "from_single": r4.history,
                        "states": states}, tmp / "fsdp_out.pt")


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
def test_fsdp2_checkpoint_resume_matches_and_is_portable(tmp_path):
    train, val = _data()
    single = _model("group")
    r = fit(single, train, val, **FIT)
    r_stop = fit(_model("group"), train, val, checkpoint=tmp_path / "single_at_5.pt", stop_after=5, **FIT)
    assert r_stop.stopped_early
    spawn_workers(_fsdp_resume_worker, (str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    got = torch.load(tmp_path / "fsdp_out.pt", weights_only=False)
    straight, resumed, from_single = got["states"]

    # FSDP2 stopped at step 5 and resumed = FSDP2 uninterrupted (same sharded arithmetic: tight).
    assert [h["step"] for h in got["resumed"]] == list(range(1, 13))
    for key in ("loss", "val_loss", "sparsity"):
        a = [h[key] for h in got["straight"] if key in h]
        assert np.allclose([h[key] for h in got["resumed"] if key in h], a, rtol=1e-7, atol=1e-9), key
    for n, a in straight.items():
        torch.testing.assert_close(resumed[n], a, rtol=1e-6, atol=1e-7)
    # A single process's checkpoint resumed under FSDP2 ends where one process ends (float rounding).
    losses = [h["loss"] for h in r.history]
    assert np.allclose([h["loss"] for h in got["from_single"]], losses, rtol=1e-5, atol=1e-6)
    for n, a in single.state_dict().items():
        torch.testing.assert_close(from_single[n], a, rtol=1e-5, atol=1e-6)

    # The FSDP2 checkpoint is a single process's checkpoint: plain CPU tensors, optimizer keyed by index ...
    ck = torch.load(tmp_path / "fsdp_at_5.pt", weights_only=False)
    ref = _model("group")
    assert list(ck["model"]) == list(ref.state_dict())
    assert all(type(t) is torch.Tensor and t.device.type == "cpu" for t in ck["model"].values())
    n_params = len(list(ref.parameters()))
    assert sorted(ck["optimizer"]["state"]) == list(range(n_params))
    assert sorted(i for g in ck["optimizer"]["param_groups"] for i in g["params"]) == list(range(n_params))
    # ... so one process resumes it, and ends where the uninterrupted single run ends.
    again = _model("group")
    r5 = fit(again, train, val, checkpoint=tmp_path / "fsdp_at_5.pt", resume=True, **FIT)
    assert r5.resumed_from == 5
    assert np.allclose([h["loss"] for h in r5.history], losses, rtol=1e-5, atol=1e-6)
    for n, a in single.state_dict().items():
        torch.testing.assert_close(again.state_dict()[n], a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(straight[n], a, rtol=1e-5, atol=1e-6)
    # Had the optimizer state not been restored (fresh Adam moments at step 5), the losses would differ.
    fresh = _model("group")
    fresh.load_state_dict(ck["model"])
    r6 = fit(fresh, train, val, **{**FIT, "steps": 12})
    assert not np.allclose([h["loss"] for h in r6.history][5:], losses[5:], rtol=1e-3)


def test_fit_refuses_what_it_cannot_do(tmp_path):
    train, val = _data()
    m = _model()
    with pytest.raises(ValueError, match="optimizer must be a name"):
        fit(m, train, val, parallel="fsdp", optimizer=torch.optim.SGD(m.parameters(), lr=0.1), **FIT)
    ck = tmp_path / "ck.pt"
    fit(_model(), train, val, checkpoint=ck, stop_after=3, **FIT)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.01, now 0.02.*seed: checkpoint 0, now 1"):
        fit(_model(), train, val, checkpoint=ck, resume=True, seed=1, **{**FIT, "lr": 0.02})


def test_clip_grad_bounds_each_step_and_warmup_sets_the_lr_ramp():
    train, val = _data()
    torch.manual_seed(0)
    plain = lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))  # noqa: E731
    lr, clip = 0.5, 1e-3

    def one_step(**kw):
        torch.manual_seed(0)
        m = plain()
        before = torch.cat([p.detach().reshape(-1).clone() for p in m.parameters()])
        opt = torch.optim.SGD(m.parameters(), lr=lr)  # no momentum, no decay: the step is -lr * gradient
        r = fit(m, train, None, steps=1, batch_size=8, lr=lr, optimizer=opt, warmup=0, progress=False, **kw)
        after = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
        return float((after - before).norm()), r

    unclipped, _ = one_step()
    assert unclipped > 10 * lr * clip  # the gradient is well above the bound, so clipping acts
    clipped, _ = one_step(clip_grad=clip)
    assert clipped == pytest.approx(lr * clip, rel=1e-4)  # the global gradient norm was scaled to clip
    r = fit(_model(), train, val, optimizer="sgd", warmup=4, clip_grad=1.0, **FIT)
    assert [h["lr"] for h in r.history[:4]] == pytest.approx([FIT["lr"] * (k + 1) / 4 for k in range(4)])
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip_grad must be None or a finite number > 0"):
            fit(_model(), train, val, clip_grad=bad, **FIT)
    with pytest.raises(ValueError, match="warmup must be None or an integer >= 0, got -1"):
        fit(_model(), train, val, warmup=-1, **FIT)


def test_cli_sgd_with_clipping_and_warmup_reaches_every_arm(tmp_path):
    assert _run_cli(tmp_path, "--optimizer", "sgd", "--lr", "0.05", "--baseline-lr", "0.05", "--clip-grad", "1",
                    "--warmup-steps", "3") == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert (m["config"]["optimizer"], m["config"]["clip_grad"], m["config"]["warmup_steps"]) == ("sgd", 1.0, 3)
    for phase in ("dcs", "one_shot_magnitude"):
        assert [h["lr"] for h in m["history"][phase][:3]] == pytest.approx([0.05 / 3, 0.1 / 3, 0.05]), phase
    assert m["history"]["dcs_finetune"][0]["lr"] == pytest.approx(0.005)  # the masked fine-tune has no warm-up
    ck = torch.load(tmp_path / "checkpoints" / "dcs.pt", weights_only=False)
    assert ck["config"]["clip_grad"] == 1.0 and ck["config"]["warmup"] == 3
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, 18\]"):
        task.TrainConfig(task="digits", steps=20, warmup_steps=19).resolved()
    with pytest.raises(ValueError, match="clip_grad must be a finite number > 0, got 0"):
        task.TrainConfig(task="digits", clip_grad=0.0).resolved()


class _Tiny(nn.Module):
    """An embedding whose weight the output head shares, and a Linear between them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.tok(idx))))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("converted", [False, True])
def test_embedding_lr_scale_scales_the_embeddings_step_and_nothing_else(optimizer, converted):
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randint(10, (32,), generator=g), torch.randint(10, (32,), generator=g))

    def one_step(scale):
        m = _Tiny().double()  # the step is read as a difference of weights: float64 keeps it exact enough
        if converted:  # the DCS twin, tie kept: one parameterization for the embedding and the head
            m = convert(m, alpha=1e-3, warn=False)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        fit(m, data, None, steps=1, batch_size=8, lr=1e-2, optimizer=optimizer, warmup=0, progress=False,
            embedding_lr_scale=scale)
        return {n: p.detach() - before[n] for n, p in m.named_parameters()}

    plain, scaled = one_step(None), one_step(4.0)
    emb = [n for n in plain if n.startswith("tok.")]
    assert emb and len(emb) < len(plain)
    for n in plain:
        assert plain[n].abs().max() > 0, n  # every parameter moved, so the comparison is not vacuous
        want = 4 * plain[n] if n in emb else plain[n]
        torch.testing.assert_close(scaled[n], want, rtol=1e-5, atol=0, msg=n)


def test_embedding_lr_scale_refuses_what_it_cannot_apply(tmp_path):
    train, val = _data()
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="embedding_lr_scale must be None or a finite number > 0"):
            fit(_Tiny(), train, val, embedding_lr_scale=bad, **FIT)
    with pytest.raises(ValueError, match="embedding_lr_scale was given, but the model has no nn.Embedding"):
        fit(_model(), train, val, embedding_lr_scale=2.0, **FIT)
    m = _model()
    with pytest.raises(ValueError, match="embedding_lr_scale applies to an optimizer given by name"):
        fit(m, train, val, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), embedding_lr_scale=2.0, **FIT)
    with pytest.raises(ValueError, match="embedding_lr_scale apply only to task 'lm', not 'digits'"):
        task.TrainConfig(task="digits", embedding_lr_scale=2.0).resolved()
    with pytest.raises(ValueError, match="embedding_lr_scale must be a finite number > 0, got 0"):
        task.TrainConfig(task="lm", embedding_lr_scale=0.0).resolved()


def test_embedding_lr_scale_reaches_every_arm_and_its_checkpoints(tmp_path):
    cfg = task.TrainConfig(task="lm", quick=True, steps=6, width=8, context=8, eval_samples=16, eval_every=3,
                           embedding_lr_scale=5.0, target_sparsity=0.5,
                           baselines=["one_shot_magnitude", "gradual_magnitude_wu"])
    m = task.run(cfg, tmp_path, progress=False)
    assert m["config"]["embedding_lr_scale"] == 5.0
    for phase in ("dcs", "dcs_finetune", "dense", "finetune", "gradual_magnitude_wu", "gradual_magnitude_wu_finetune"):
        groups = torch.load(tmp_path / "checkpoints" / f"{phase}.pt", weights_only=False)["optimizer"]["param_groups"]
        base = min(g["lr"] for g in groups)
        assert base > 0, phase
        assert sorted({round(g["lr"] / base, 9) for g in groups}) == [1.0, 5.0], phase
        # tok and pos (each one weight, or a DCS twin's factors) are in the scaled groups, and nothing else
        assert 2 <= sum(len(g["params"]) for g in groups if g["lr"] > base * 1.5) <= 6, phase
    with pytest.raises(task.ResumeMismatch, match="embedding_lr_scale"):
        task.run(dataclasses.replace(cfg, embedding_lr_scale=2.0), tmp_path, resume=True, progress=False)


def test_each_arm_trains_at_its_own_default_lr_and_baseline_lr_alone_sets_one_shot_too(tmp_path):
    # The digits defaults give the three lr roles (DCS and the w*u control, GMP, one-shot) three different
    # values, so a run that routed an arm to another role's lr would show it.
    assert _run_cli(tmp_path, "--baselines", "one_shot_magnitude,gradual_magnitude,gradual_magnitude_wu") == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    d = task.defaults("digits", "elementwise", quick=False)
    assert len({d["lr"], d["baseline_lr"], d["one_shot_lr"]}) == 3
    assert m["lr"] == d["lr"]
    assert {arm: b["lr"] for arm, b in m["baselines"].items()} == {
        "one_shot_magnitude": d["one_shot_lr"], "gradual_magnitude": d["baseline_lr"], "gradual_magnitude_wu": d["lr"]}
    for arm, b in {**m["baselines"], "dcs": m}.items():  # the lr recorded is the one the arm trained at
        assert max(h["lr"] for h in m["history"][arm]) == pytest.approx(b["lr"]), arm
    only = task.TrainConfig(task="digits", baseline_lr=0.07).resolved()
    assert (only.baseline_lr, only.one_shot_lr, only.lr) == (0.07, 0.07, d["lr"])
    both = task.TrainConfig(task="digits", baseline_lr=0.07, one_shot_lr=0.002).resolved()
    assert (both.baseline_lr, both.one_shot_lr) == (0.07, 0.002)
    assert task.TrainConfig(task="lm").resolved().one_shot_lr == task.defaults("lm", "elementwise", quick=False)["baseline_lr"]


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
    # One baseline keeps these checks of resuming and reporting fast; test_baselines.py runs all four.
    return main(["train", "--task", "digits", "--steps", "20", "--width", "4", "--eval-every", "5",
                 "--no-progress", "--baselines", "one_shot_magnitude", "--out", str(out), *extra])


def test_cli_train_resume_export_and_baseline(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run_cli(a) == 0
    assert _run_cli(b, "--stop-after", "7") == 0
    assert not (b / "metrics.json").exists()
    assert _run_cli(b, "--resume") == 0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert mb["resumed_from"] == 7
    for k in ("task", "structure", "alpha", "steps", "sparsity", "val_loss", "val_accuracy", "params_before",
              "params_after", "baselines", "val_loss_before_finetune"):
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
    one_shot = ma["baselines"]["one_shot_magnitude"]
    assert one_shot["sparsity"] == pytest.approx(ma["sparsity"], abs=1e-12)
    assert 0 < one_shot["val_accuracy"] <= 1


def test_dcs_sparsity_counts_thresholded_zeros():
    m = _model()
    assert dcs_sparsity(m) == 0.0
    assert dcs_sparsity(m, threshold=1e9) == 1.0
    assert dcs_sparsity(nn.Linear(2, 2)) is None


def test_group_export_is_physically_smaller_and_timed(tmp_path):
    from symfast.train import TrainConfig, run

    m = run(TrainConfig(task="lm", quick=True, structure="group", alpha=1e-2, eval_samples=64,
                        baselines=["one_shot_magnitude"]), tmp_path, progress=False)
    assert_margin(m["sparsity"], ">", 0.1, "group DCS sparsity")
    assert m["params_after"] < m["params_before"]  # dead MLP units were removed, not just zeroed
    exported = torch.load(tmp_path / "exported.pt", weights_only=False)
    hidden = [b.mlp[0].out_features for b in exported.blocks]
    assert_margin(min(hidden), "<", 4 * 64, "hidden units kept in the narrowest exported MLP")
    assert m["inference"]["dense_ms"] > 0 and m["inference"]["exported_ms"] > 0
    assert m["inference"]["speedup"] == pytest.approx(m["inference"]["dense_ms"] / m["inference"]["exported_ms"])


# ------------------------------------------------------------- symfast train --quick (the documented run)
METRICS_KEYS = ("task", "structure", "alpha", "steps", "sparsity", "val_loss", "val_accuracy", "params_before",
                "params_after", "baselines")


@pytest.mark.slow  # ~10 s on 2 cores; part of the normal run (nothing deselects "slow")
def test_cli_quick_default_run_reaches_half_sparsity(tmp_path):
    t = time.monotonic()
    assert main(["train", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    seconds = time.monotonic() - t
    m = json.loads((tmp_path / "metrics.json").read_text())
    for k in METRICS_KEYS:
        assert k in m, k
    assert (m["task"], m["structure"], m["steps"]) == ("lm", "elementwise", 200)  # the defaults, quick settings
    assert_margin(m["sparsity"], ">=", 0.5, "train --quick sparsity")
    assert m["val_accuracy"] is None and 0 < m["val_byte_accuracy"] < 1  # lm: byte accuracy, under its own key
    for k in ("val_loss", "dense_val_loss"):
        assert math.isfinite(m[k]) and m[k] > 0, k
    for arm, b in m["baselines"].items():
        assert math.isfinite(b["val_loss"]) and b["val_loss"] > 0, arm
    assert m["params_after"] <= m["params_before"]
    assert seconds < 120, f"--quick took {seconds:.0f} s (about 10 s on 2 idle cores)"


# ------------------------------------------------------------- --resume checks the settings
def test_resume_with_other_settings_is_refused_before_training(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run_cli(b, "--stop-after", "7") == 0
    ck = (b / "checkpoints" / "dcs.pt").read_bytes()
    calls = []
    real_fit = task.fit
    monkeypatch.setattr(task, "fit", lambda *a, **k: calls.append(k) or real_fit(*a, **k))
    capsys.readouterr()
    # A user error: the message and exit status 2, no traceback (the library raises ResumeMismatch, a ValueError).
    assert _run_cli(b, "--resume", "--alpha", "1e-3", "--structure", "group", "--steps", "30") == 2
    msg = capsys.readouterr().err
    for part in ("structure: checkpoint 'elementwise', now 'group'", "alpha: checkpoint 0.0003, now 0.001",
                 "steps: checkpoint 20, now 30", "only eval_every may differ"):
        assert part in msg, (part, msg)
    assert "lr:" not in msg and "seed:" not in msg  # only the differing settings are named
    assert "Traceback" not in msg
    assert calls == [] and (b / "checkpoints" / "dcs.pt").read_bytes() == ck  # nothing was trained
    assert _run_cli(b, "--resume", "--threshold", "0.02") == 2
    assert "threshold: checkpoint 0.01, now 0.02" in capsys.readouterr().err
    with pytest.raises(ValueError, match="threshold: checkpoint 0.01, now 0.02"):
        task.run(task.TrainConfig(task="digits", steps=20, width=4, eval_every=5, threshold=0.02), b, resume=True,
                 progress=False)
    # --eval-every may differ: the run resumes and ends where an uninterrupted run ends.
    assert _run_cli(b, "--resume", "--eval-every", "4") == 0
    assert _run_cli(a) == 0
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert mb["resumed_from"] == 7 and calls
    for k in METRICS_KEYS + ("dense_val_loss",):
        assert ma[k] == mb[k], k


# ------------------------------------------------------------- one --out, two runs: no checkpoint of the other run
def test_run_without_resume_starts_clean_and_resume_reuses_only_this_runs_checkpoints(tmp_path, capsys):
    out, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert _run_cli(out, "--alpha", "3e-3") == 0  # run A, finished
    stale = {n: (ck / n).read_bytes() for n in ("dense.pt", "finetune.pt")}
    capsys.readouterr()
    # Run B, without --resume, into the same --out: A's checkpoints and outputs go, and one line says so.
    assert _run_cli(out, "--stop-after", "7") == 0
    text = capsys.readouterr().out
    assert "removed the earlier run's" in text and "checkpoints/dense.pt" in text and "metrics.json" in text
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "dcs.pt"]
    assert not (out / "metrics.json").exists() and not (out / "exported.pt").exists()
    # Leftovers of another run in B's checkpoints (as an older symfast left them): the resume does not reuse them.
    (ck / "finetune.pt").write_bytes(stale["finetune.pt"])  # recorded with alpha 3e-3
    old = torch.load(io.BytesIO(stale["dense.pt"]), weights_only=False)
    del old["meta"]  # an older symfast recorded no settings
    torch.save(old, ck / "dense.pt")
    assert _run_cli(out, "--resume") == 0
    text = capsys.readouterr().out
    assert f"not reusing {ck / 'dense.pt'}: it records no run settings" in text
    assert f"not reusing {ck / 'finetune.pt'}: it was written by a run with other settings (alpha: 0.003 there, " \
           "0.0003 now)" in text
    assert "dcs.pt" not in text.split("symfast train digits")[0]  # B's own DCS checkpoint is reused silently
    assert _run_cli(tmp_path / "fresh") == 0  # B uninterrupted
    mb, mf = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "fresh"))
    assert mb["resumed_from"] == 7
    assert mb["trained_now"] == {"dcs": 11, "dcs_finetune": 2, "one_shot_magnitude": 18,
                                 "one_shot_magnitude_finetune": 2}
    for k in METRICS_KEYS + ("dense_val_loss",):
        assert mb[k] == mf[k], k  # B's baseline, not A's
    assert mb["history"] == mf["history"]
    assert mb["baselines"]["one_shot_magnitude"]["sparsity"] == mb["sparsity"]  # "same sparsity": DCS's sparsity


def test_baseline_line_says_when_its_sparsity_is_not_the_dcs_models(tmp_path, monkeypatch, capsys):
    real = task.prune_like
    monkeypatch.setattr(task, "prune_like", lambda m, names, zeros: real(m, names, zeros // 2))
    assert _run_cli(tmp_path) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    got = m["baselines"]["one_shot_magnitude"]["sparsity"]
    assert_margin(m["sparsity"] - got, ">", 0, "DCS - halved baseline sparsity")
    line = [ln for ln in capsys.readouterr().out.splitlines() if "one_shot_magnitude:" in ln][0]
    assert "same sparsity" not in line
    assert f"sparsity {got:.3f}, NOT the DCS model's {m['sparsity']:.3f}" in line


# ------------------------------------------------------------- flag values are checked by the parser (exit status 2)
@pytest.mark.parametrize("flags, expected", [
    (["--steps", "1"], "argument --steps: expected an integer >= 2, got '1'"),
    (["--steps", "1.5"], "argument --steps: expected an integer >= 2, got '1.5'"),
    (["--lr-grid", "1e-2,0"], "argument --lr-grid: expected distinct comma-separated finite numbers > 0, got "
                              "'1e-2,0'"),
    (["--lr-grid", "fast"], "argument --lr-grid: expected distinct comma-separated finite numbers > 0, got 'fast'"),
    (["--baseline-lr", "-1"], "argument --baseline-lr: expected a finite number > 0, got '-1'"),
    (["--one-shot-lr", "0"], "argument --one-shot-lr: expected a finite number > 0, got '0'"),
    (["--embedding-lr-scale", "nan"], "argument --embedding-lr-scale: expected a finite number > 0, got 'nan'"),
    (["--baselines", "gmp"], "argument --baselines: expected 'all', 'none' or distinct comma-separated names from "
                             "one_shot_magnitude, gradual_magnitude"),
    (["--target-sparsity", "1"], "argument --target-sparsity: expected a number with 0 < S < 1, got '1'"),
    (["--target-sparsity", "nan"], "argument --target-sparsity: expected a number with 0 < S < 1, got 'nan'"),
    (["--target-sparsity", "0.5", "--alpha", "0"], "argument --alpha: --target-sparsity scales a starting alpha"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["--alpha=-1e-3"], "argument --alpha: expected a finite number >= 0, got '-1e-3'"),
    (["--alpha", "inf"], "argument --alpha: expected a finite number >= 0, got 'inf'"),
    (["--threshold", "-0.1"], "argument --threshold: expected a finite number >= 0, got '-0.1'"),
    (["--width", "0"], "argument --width: expected an integer >= 1, got '0'"),
    (["--depth", "0"], "argument --depth: expected an integer >= 1, got '0'"),
    (["--context", "0"], "argument --context: expected an integer with 1 <= N <= 4096, got '0'"),
    (["--context", "100000"], "argument --context: expected an integer with 1 <= N <= 4096, got '100000'"),
    (["--eval-every", "0"], "argument --eval-every: expected an integer >= 1, got '0'"),
    (["--clip-grad", "0"], "argument --clip-grad: expected a finite number > 0, got '0'"),
    (["--clip-grad", "inf"], "argument --clip-grad: expected a finite number > 0, got 'inf'"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: expected an integer >= 0, got '-1'"),
    (["--steps", "20", "--warmup-steps", "19"], "argument --warmup-steps: expected at most the training phase's 18 "
                                                "steps (--steps 20 less the 2-step fine-tune), got 19"),
    (["--eval-every", "-5"], "argument --eval-every: expected an integer >= 1, got '-5'"),
    (["--stop-after", "0"], "argument --stop-after: expected an integer >= 1, got '0'"),
    (["--seed", "-1"], "argument --seed: expected an integer with 0 <= N < 2**44, got '-1'"),
    (["--seed", str(2 ** 44)], f"argument --seed: expected an integer with 0 <= N < 2**44, got '{2 ** 44}'"),
    (["--width", "30"], "argument --width: --task lm needs a width divisible by its 4 attention heads, got 30"),
    (["--task", "digits", "--depth", "3"], "argument --depth: --depth applies only to --task lm, not to --task digits"),
    (["--task", "digits", "--context", "8", "--depth", "1"], "argument --depth: --depth and --context apply only to "
                                                             "--task lm"),
    (["--task", "digits", "--embedding-lr-scale", "3"], "argument --embedding-lr-scale: --embedding-lr-scale applies "
                                                         "only to --task lm, not to --task digits"),
])
def test_cli_train_rejects_bad_flag_values(tmp_path, capsys, monkeypatch, flags, expected):
    calls = []
    monkeypatch.setattr(task, "run", lambda *a, **k: calls.append(a))
    with pytest.raises(SystemExit) as exc:
        main(["train", "--no-progress", "--out", str(tmp_path), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err and calls == [] and not (tmp_path / "checkpoints").exists()


def test_cli_train_out_must_be_a_directory(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    for out in (f, f / "sub"):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--out", str(out)])
        assert exc.value.code == 2
        assert "argument --out:" in capsys.readouterr().err


def test_non_finite_results_fail_and_write_no_json(tmp_path, monkeypatch, capsys):
    # The library: context 0 gives val loss nan (a mean over no positions): an error, and no metrics.json.
    with pytest.raises(task.NonFiniteMetrics, match="val_loss nan"):
        task.run(task.TrainConfig(task="lm", quick=True, context=0, steps=2, eval_samples=8), tmp_path / "lib",
                 progress=False)
    assert not (tmp_path / "lib" / "metrics.json").exists()
    # The command line: a clear message and a non-zero exit status.
    import symfast.train.loop as loop

    def nan(*a, **k):
        return {"loss": float("nan"), "accuracy": 0.0}

    monkeypatch.setattr(task, "evaluate", nan)  # the final evaluations
    monkeypatch.setattr(loop, "evaluate", nan)  # the validations during training (at the DCS phase's last step, 3)
    assert _run_cli(tmp_path / "cli", "--steps", "4") == 1
    err = capsys.readouterr().err
    assert "results are not finite: val_loss nan" in err and "baselines.one_shot_magnitude.val_loss nan" in err
    assert "the dcs phase's history (from step 3)" in err and "Traceback" not in err
    assert not (tmp_path / "cli" / "metrics.json").exists()


def test_stop_after_reports_the_real_step_and_resume_says_what_it_did(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run_cli(out, "--resume", "--stop-after", "5") == 0
    text = capsys.readouterr().out
    assert f"nothing to resume in {out / 'checkpoints'}" in text and "stopped after step 5 of 20" in text
    assert _run_cli(out, "--resume", "--stop-after", "2") == 0  # resumed at 5: it stops after one more step
    assert "stopped after step 6 of 20" in capsys.readouterr().out
    assert torch.load(out / "checkpoints" / "dcs.pt", weights_only=False)["step"] == 6
    assert _run_cli(out, "--resume") == 0
    assert "nothing was retrained" not in capsys.readouterr().out
    assert _run_cli(out, "--resume") == 0  # a finished run
    assert "had finished: nothing was retrained" in capsys.readouterr().out
    assert set(json.loads((out / "metrics.json").read_text())["trained_now"].values()) == {0}


def test_ctrl_c_says_where_the_run_stopped_and_resume_continues_it(tmp_path, monkeypatch, capsys):
    import symfast.train.loop as loop

    real = loop.lr_at
    state = {"calls": 0}

    def interrupt_at_step_12(step, **kw):
        state["calls"] += 1
        if state["calls"] == 13:  # the DCS phase's step 13, after 12 steps (checkpointed every 5)
            raise KeyboardInterrupt
        return real(step, **kw)

    monkeypatch.setattr(loop, "lr_at", interrupt_at_step_12)
    out = tmp_path / "run"
    assert _run_cli(out) == 130
    err = capsys.readouterr().err
    assert (f"interrupted in the DCS elementwise phase after step 12 of 18 (its checkpoint "
            f"{out / 'checkpoints' / 'dcs.pt'} holds step 10); continue with: symfast train --resume --out {out}") \
        in err
    assert "Traceback" not in err
    monkeypatch.setattr(loop, "lr_at", real)
    assert _run_cli(out, "--resume") == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == 10


def test_cli_train_help_documents_flags_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in ("--steps STEPS training steps", "default: lm 1500, digits 600; with --quick: lm 200, digits 300",
                 "--seed SEED random seed", "--structure {elementwise,group,lowrank} the DCS structure",
                 "default: lm 128, digits 16", "fine-tune it with its mask for the last 10% of the budget",
                 "warm-up 5%,", "--lr-grid LR,LR,...", "--baselines NAMES", "--target-sparsity S",
                 "default: lm 0.02, digits 0.03", "--baseline-lr BASELINE_LR", "default: lm 0.01, digits 0.02",
                 "--one-shot-lr ONE_SHOT_LR", "default: --baseline-lr when given, else lm 0.01, digits 0.005",
                 "start the child with spawn", "torch.set_num_threads(1) before the ops and the fork"):
        assert part in text, part
    assert "%%" not in text and "about a minute" not in text



# ------------------------------------------------------------- the low-rank baseline: truncated SVD
class _Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 7)
        self.lin = nn.Linear(7, 9)
        self.conv = nn.Conv2d(3, 5, 3)


def test_svd_truncate_is_the_best_rank_r_approximation_and_keeps_its_rank():
    torch.manual_seed(0)
    m = _Three()
    before = {n: t.clone() for n, t in m.state_dict().items()}
    ranks = {"emb": 0, "lin": 3, "conv": 2}
    t = task.svd_truncate(m, ranks)
    for n, t0 in m.state_dict().items():
        assert torch.equal(t0, before[n]), n  # the model itself is not changed
    for name, r in ranks.items():
        w = m.get_submodule(name).weight.detach().double().numpy()
        w = w.reshape(w.shape[0], -1)
        u, sv, vt = np.linalg.svd(w, full_matrices=False)  # independent: numpy's SVD
        best = (u[:, :r] * sv[:r]) @ vt[:r]
        theta = t.get_submodule(name).parametrization().detach().numpy().reshape(w.shape)  # float32
        assert np.allclose(theta, best, atol=1e-5), name
        assert np.linalg.matrix_rank(theta) == r, name  # at float32's tolerance
        assert np.linalg.norm(w - theta) == pytest.approx(np.sqrt((sv[r:] ** 2).sum()), rel=1e-5)  # Eckart-Young
    torch.testing.assert_close(t.lin.bias, m.lin.bias)
    # Trained, the layers keep rank <= r (factorized form), and the rank-0 layer stays exactly zero.
    start = t.lin.parametrization().detach().clone()
    opt = torch.optim.Adam(t.parameters(), lr=0.05)
    x = torch.randn(4, 7)
    for _ in range(5):
        opt.zero_grad()
        (t.lin(x).pow(2).sum() + t.emb(torch.arange(12)).sum() + t.conv(torch.randn(2, 3, 5, 5)).sin().sum()).backward()
        opt.step()
    assert torch.linalg.matrix_rank(t.lin.parametrization().detach()) == 3
    assert torch.linalg.matrix_rank(t.conv.parametrization().detach().reshape(5, -1)) == 2
    assert not t.emb.parametrization().detach().any()
    assert not torch.allclose(t.lin.parametrization().detach(), start, atol=1e-3)  # it did train
    with pytest.raises(ValueError, match="rank for 'lin' must be in"):
        task.svd_truncate(m, {"lin": 8})


def _weight_matrix(m):
    """The weight of an exported layer as a float32 matrix (rows = output units), thin pairs multiplied out."""
    if isinstance(m, nn.Sequential):  # Linear(in, r) -> Linear(r, out), conv -> 1x1 conv, Embedding -> Linear
        first, second = m[0], m[1]
        f = first.weight.detach()
        s2 = second.weight.detach().reshape(second.weight.shape[0], -1)
        if isinstance(first, nn.Embedding):
            return f @ s2.t()  # (num, r) @ (r, dim)
        return s2 @ f.reshape(f.shape[0], -1)
    return m.weight.detach().reshape(m.weight.shape[0], -1)


def _lowrank_cli(out, *extra):
    return _run_cli(out, "--structure", "lowrank", "--threshold", "0.3", "--alpha", "1e-3", "--steps", "40",
                    "--lr", "1e-2", "--eval-every", "10", *extra)


def test_lowrank_run_has_the_svd_truncation_baseline_at_the_dcs_ranks(tmp_path, capsys):
    assert _lowrank_cli(tmp_path) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    for k in ("svd_truncation_val_loss", "svd_truncation_val_accuracy", "svd_truncation_params_after"):
        assert math.isfinite(m[k]), k
    assert 0 <= m["svd_truncation_val_accuracy"] <= 1
    assert "SVD truncation:" in capsys.readouterr().out
    intended = {n: r for n, (r, _) in m["ranks"].items()}
    # the truncation truncates something
    assert_margin(max(full - r for r, full in m["ranks"].values()), ">", 0, "directions cut in the most truncated layer")
    # Independently: the exported baseline's weights have exactly the DCS model's ranks ...
    base = torch.load(tmp_path / "svd_truncation.pt", weights_only=False)
    dcs = torch.load(tmp_path / "exported.pt", weights_only=False)
    for name, r in intended.items():
        assert int(torch.linalg.matrix_rank(_weight_matrix(base.get_submodule(name)))) == r, name
        assert int(torch.linalg.matrix_rank(_weight_matrix(dcs.get_submodule(name)))) == r, name
    assert m["svd_truncation_ranks"] == {n: [r, r] for n, r in intended.items()}
    assert m["svd_truncation_params_after"] == m["params_after"] < m["params_before"]
    # ... and it was fine-tuned (10% of the budget) from the truncated dense model.
    assert [h["step"] for h in m["history"]["svd_finetune"]] == [1, 2, 3, 4]
    from symfast.train import digits_data

    _, val, _ = digits_data(seed=0)
    assert evaluate(base, val)["loss"] == pytest.approx(m["svd_truncation_val_loss"], rel=1e-6)
    # Other structures keep the magnitude-pruning baseline only.
    assert _run_cli(tmp_path / "e") == 0
    assert "svd_truncation_val_loss" not in json.loads((tmp_path / "e" / "metrics.json").read_text())


# ------------------------------------------------------------- --parallel fsdp from the command line
def test_cli_parallel_flag_reaches_fit(tmp_path, monkeypatch, capsys):
    seen = []
    real_fit = task.fit
    monkeypatch.setattr(task, "fit", lambda *a, **k: seen.append(k["parallel"]) or real_fit(*a, **k))
    assert _lowrank_cli(tmp_path, "--parallel", "fsdp", "--steps", "10") == 0
    assert seen == ["fsdp"] * 5  # DCS, its fine-tune, dense, magnitude fine-tune, SVD fine-tune
    # In one process the flag has no effect: a warning says so, and the metrics do not claim it was applied.
    assert "--parallel fsdp has no effect in one process" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.json").read_text())["parallel"] is None
    seen.clear()
    assert _run_cli(tmp_path / "d", "--steps", "10") == 0
    assert seen == ["ddp"] * 4
    with pytest.raises(SystemExit):
        main(["train", "--parallel", "zero3"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_fsdp_worker(rank, ports, tmp):
    import torch.distributed.tensor as dtensor

    torch.set_num_threads(1)
    torch.cuda.is_available = lambda: False  # gloo on CPU even where there is a GPU (nccl needs one per rank)
    tmp = Path(tmp)
    seen = []
    real_fit = task.fit

    def spy(model, *a, **k):
        res = real_fit(model, *a, **k)
        seen.append((k["parallel"], all(isinstance(p, dtensor.DTensor) for p in model.parameters())))
        return res

    task.fit = spy
    for port, (out, *extra) in zip(ports, (["fsdp"], ["stopped", "--stop-after", "7"])):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE="2")
        assert _lowrank_cli(tmp / out, "--parallel", "fsdp", *extra) == 0  # inits and ends the process group
    if rank == 0:
        (tmp / "seen.json").write_text(json.dumps(seen))
    os._exit(0)  # no interpreter teardown (see distributed_workers.gloo_group)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
def test_cli_fsdp_two_processes_match_one_and_resume_in_one(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # compare with the workers' CPU runs
    assert _lowrank_cli(tmp_path / "single") == 0
    spawn_workers(_cli_fsdp_worker, ([_free_port(), _free_port()], str(tmp_path)), nprocs=2)
    # Every phase ran sharded: DCS, its fine-tune, dense, magnitude fine-tune, SVD fine-tune; then the stopped
    # run's DCS phase.
    assert json.loads((tmp_path / "seen.json").read_text()) == [["fsdp", True]] * 6
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("single", "fsdp"))
    assert (two["world_size"], two["parallel"]) == (2, "fsdp")
    assert two["ranks"] == one["ranks"]
    for k in ("val_loss", "val_accuracy", "svd_truncation_val_loss", "dense_val_loss"):
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), k
    assert two["baselines"]["one_shot_magnitude"]["val_loss"] == pytest.approx(
        one["baselines"]["one_shot_magnitude"]["val_loss"], rel=1e-4, abs=1e-6)
    # The FSDP2 run stopped at step 7 resumes in one process (its checkpoint holds full states) and
    # ends where the single uninterrupted run ends.
    assert not (tmp_path / "stopped" / "metrics.json").exists()
    assert _lowrank_cli(tmp_path / "stopped", "--resume") == 0
    three = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    assert (three["resumed_from"], three["world_size"]) == (7, 1)
    for k in ("val_loss", "svd_truncation_val_loss"):
        assert three[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), k
