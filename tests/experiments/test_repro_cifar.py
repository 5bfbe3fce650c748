"""The paper-scale path of fig1-right and dcs-cnn: ``symfast repro NAME --model resnet18 --data PATH``.

No real CIFAR-10 here (no network): a tiny synthetic directory in the real format (pickled dicts with b'data' uint8
[N, 3072] and b'labels', files data_batch_1..5 and test_batch) stands in. The experiments run through the command
line with their quick settings patched down to a tiny ResNet18 and one epoch, so the whole file takes seconds; their
verdicts are not asserted (random images), the records' structure, config and internal consistency are.
"""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import torch

import symfast
from symfast.cli import main
from symfast.experiments import cifar, dcs_cnn, fig1_right
from symfast.models import ResNet18
from repro_checks import check_record

N_TRAIN, N_TEST = 64, 32
TINY_FIG1R = {"resnet_width": 1 / 16, "width": 8, "epochs": 1, "train_subset": None, "eval_points": None,
              "test_points": N_TEST, "batch_size": 32, "weight_decays": [0.0, 1e-3]}
TINY_DCS = {"resnet_width": 1 / 16, "epochs": 1, "train_subset": None, "eval_points": None, "batch_size": 32,
            "alphas": [2.5e-4], "primary_alpha": 2.5e-4}


def _write_batch(path, data, labels, **extra):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"synthetic", b"data": data, b"labels": labels, **extra}, f)


def write_fake_cifar(root, n_train=N_TRAIN, n_test=N_TEST, seed=0):
    """A CIFAR-10 python-version directory of random images under ``root``; returns (dir, train, test) arrays."""
    d = root / cifar.DIR_NAME
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    xtr = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    ytr = rng.integers(0, 10, n_train)
    xte = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yte = rng.integers(0, 10, n_test)
    bounds = np.linspace(0, n_train, 6).astype(int)  # five batches of unequal size
    for i, name in enumerate(cifar.TRAIN_FILES):
        lo, hi = bounds[i], bounds[i + 1]
        _write_batch(d / name, xtr[lo:hi], ytr[lo:hi].tolist())
    _write_batch(d / cifar.TEST_FILE, xte, yte.tolist())
    return d, (xtr, ytr), (xte, yte)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("cifar"))


# ------------------------------------------------------------------- loader
def test_loader_round_trip(fake):
    d, (xtr, ytr), (xte, yte) = fake
    for path in (d, d.parent, str(d)):  # the directory itself or its parent
        assert cifar.find_cifar_dir(path) == d
    Xtr, Ytr, Xte, Yte = cifar.load_cifar10(d.parent)
    assert Xtr.shape == (N_TRAIN, 3, 32, 32) and Xtr.dtype == torch.uint8 and Ytr.dtype == torch.int64
    assert Xte.shape == (N_TEST, 3, 32, 32) and Yte.shape == (N_TEST,)
    # the row layout: 1024 red, then green, then blue values, each image row-major
    i, c, r, col = 5, 2, 7, 30
    assert int(Xtr[i, c, r, col]) == int(xtr[i, c * 1024 + r * 32 + col])
    assert torch.equal(Xtr.reshape(N_TRAIN, -1), torch.from_numpy(xtr))
    assert Ytr.tolist() == ytr.tolist() and Yte.tolist() == yte.tolist()
    assert torch.equal(Xte.reshape(N_TEST, -1), torch.from_numpy(xte))

    train, test, info = cifar.cifar10_datasets(d, train_subset=20, seed=3)
    assert len(train) == 20 and len(test) == N_TEST and info["dir"] == str(d)
    x0, y0 = test[0]
    mean, std = torch.tensor(cifar.CIFAR10_MEAN), torch.tensor(cifar.CIFAR10_STD)
    torch.testing.assert_close(x0, (Xte[0].float() / 255 - mean[:, None, None]) / std[:, None, None])
    assert int(y0) == int(yte[0])
    # the subset is a seeded choice of distinct training images
    xs = train.tensors[0]
    assert len({tuple(v.flatten()[:16].tolist()) for v in xs}) == 20


def test_loader_path_errors(tmp_path, fake):
    with pytest.raises(FileNotFoundError, match=r"--data .*nope: no such file or directory; expected .*data_batch_1"):
        cifar.load_cifar10(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        cifar.find_cifar_dir(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks data_batch_1.*test_batch and holds nothing \(empty"):
        cifar.find_cifar_dir(empty)
    partial = tmp_path / "partial" / cifar.DIR_NAME
    partial.mkdir(parents=True)
    for name in cifar.TRAIN_FILES:
        (partial / name).write_bytes((fake[0] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"lacks test_batch and holds data_batch_1"):
        cifar.find_cifar_dir(partial.parent)
    with pytest.raises(FileNotFoundError, match="--data"):
        cifar.find_cifar_dir(None)


@pytest.mark.parametrize("content, message", [
    (b"not a pickle at all", "does not unpickle"),
    ([1, 2, 3], "expected a pickled dict .* found a list"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, r"missing \['labels'\]"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"uint8 array \[N, 3072\], found a uint8 array of "
     r"shape \(2, 100\)"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "found a float32 array"),
    ({b"data": [[0] * 3072], b"labels": [0]}, "found a list"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "expected 2 labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels must be in 0..9, found 0..10"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "not a list of integers"),
])
def test_loader_malformed_file(tmp_path, fake, content, message):
    d = tmp_path / cifar.DIR_NAME
    d.mkdir()
    for name in cifar.TRAIN_FILES + (cifar.TEST_FILE,):
        (d / name).write_bytes((fake[0] / name).read_bytes())
    bad = d / "data_batch_3"
    bad.write_bytes(content if isinstance(content, bytes) else pickle.dumps(content))
    with pytest.raises(ValueError, match=f"--data: .*data_batch_3 is not a CIFAR-10 python-version batch: .*{message}"):
        cifar.load_cifar10(tmp_path)


def test_augment_is_a_padded_crop_with_flips():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (40, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is recognizable
    out = cifar.augment(x, g)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = shifts = 0
    for i in range(len(x)):
        crops = [(oy, ox, f) for oy in range(9) for ox in range(9) for f in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, oy:oy + 32, ox:ox + 32]))]
        assert crops, f"image {i} is not a crop of the padded image"
        oy, ox, f = crops[0]
        flips += f
        shifts += (oy, ox) != (4, 4)
    assert 5 <= flips <= 35 and shifts >= 30  # random flips and offsets, not a constant transform
    # the same generator state gives the same batch (the same crops for every model of a run)
    torch.testing.assert_close(cifar.augment(x, torch.Generator().manual_seed(0)), out)


# ------------------------------------------------------------------- ResNet18
def test_resnet18_shapes():
    full = ResNet18()
    assert full.widths == (64, 128, 256, 512)
    assert sum(p.numel() for p in full.parameters()) == 11_173_962  # the standard CIFAR ResNet18
    torch.manual_seed(0)
    net = ResNet18(10, width=1 / 16).eval()
    assert net.widths == (4, 8, 16, 32) and net.feature_dim == 32
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
        pre, post = net.penultimate(x)
    assert out.shape == (3, 10)
    assert pre.shape == post.shape == (3, 32) and (pre < 0).any()
    torch.testing.assert_close(post, net.features(x))
    torch.testing.assert_close(net.fc(post), out)
    head = ResNet18(10, width=1 / 16, hidden=8).eval()
    with torch.no_grad():
        pre, post = head.penultimate(x)
        torch.testing.assert_close(post, pre.relu())
        torch.testing.assert_close(head.fc[2](post), head(x))
    assert pre.shape == (3, 8)
    with pytest.raises(ValueError, match="width"):
        ResNet18(width=0)


@pytest.mark.parametrize("hidden", [None, 8])
def test_resnet18_converts_and_keeps_the_function(hidden):
    torch.manual_seed(1)
    net = ResNet18(10, width=1 / 16, hidden=hidden)
    x = torch.randn(4, 3, 32, 32)
    net.train()
    net(x)  # non-trivial batch-norm running statistics
    net.eval()
    with torch.no_grad():
        ref = net(x)
    dcs = symfast.convert(copy.deepcopy(net), structure="elementwise", alpha=1e-4, warn=False).eval()
    rep = dcs.dcs_report
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in net.modules())
    assert n_conv == 20 and n_lin == (1 if hidden is None else 2)
    assert len(rep.converted) == n_conv + n_lin
    assert {t for _, t, _, _ in rep.not_converted} == {"BatchNorm2d"}
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not isinstance(m, symfast.nn.DCSLayer)
                   for m in dcs.modules())
    with torch.no_grad():
        torch.testing.assert_close(dcs(x), ref)
        torch.testing.assert_close(symfast.export(dcs).eval()(x), ref)
        if hidden is not None:
            for a, b in zip(dcs.penultimate(x), net.penultimate(x)):
                torch.testing.assert_close(a, b)
    loss = torch.nn.functional.cross_entropy(dcs.train()(x), torch.arange(4))
    loss.backward()
    assert all(p.grad is not None for p in dcs.parameters())


# ------------------------------------------------------------------- command line
@pytest.fixture()
def tiny(monkeypatch):
    monkeypatch.setitem(fig1_right.CIFAR_SETTINGS, "quick", dict(TINY_FIG1R))
    monkeypatch.setitem(dcs_cnn.CIFAR_SETTINGS, "quick", dict(TINY_DCS))


def _cli(name, data, out):
    rc = main(["repro", name, "--model", "resnet18", "--data", str(data), "--out", str(out), "--no-progress"])
    assert rc == 0
    rec = json.loads((out / name / "result.json").read_text())
    check_record(rec, out / name)
    return rec


def _assert_config(rec, data_arg, fake_dir, tiny_cfg):
    cfg = rec["config"]
    assert cfg["model"] == "resnet18" and cfg["data"] == str(data_arg) and cfg["data_dir"] == str(fake_dir)
    if torch.cuda.is_available():
        assert cfg["device"].startswith("cuda (")  # the GPU, named
    else:
        assert cfg["device"] == "cpu"
    assert cfg["quick"] is True and cfg["train_images"] == N_TRAIN and cfg["test_images"] == N_TEST
    for k, v in tiny_cfg.items():
        assert cfg[k] == v, k
    assert "steps" not in cfg  # not the digits settings


def test_cli_fig1_right_resnet18(tiny, fake, tmp_path):
    rec = _cli("fig1-right", fake[0].parent, tmp_path)
    _assert_config(rec, fake[0].parent, fake[0], TINY_FIG1R)
    m = rec["metrics"]
    assert m["primary"] == "wd_1e-03" and set(m) == {"wd_0", "wd_1e-03", "primary", "beyond_paper"}
    # the same checks (the same stated criterion) as the digits run
    assert [c["key"] for c in rec["checks"]] == [c.key for c in fig1_right._criteria("wd_1e-03")]
    assert rec["criterion"].startswith("reproduced iff")
    for key in ("wd_0", "wd_1e-03"):
        r = m[key]
        assert set(r) == {"test_accuracy", "train_accuracy", "dead_neurons", "final_loss", "pre", "post",
                          "near_identical_fraction", "near_identical_pair_fraction"}
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["dead_neurons"] <= TINY_FIG1R["width"]
        for kind in ("pre", "post"):
            k = r[kind]
            assert set(k) == {"block_count", "block_sizes", "in_block_fraction", "largest_block",
                              "mean_abs_offdiag_corr", "in_block_gain"}
            assert k["in_block_fraction"] == sum(k["block_sizes"]) / TINY_FIG1R["width"]
            assert k["in_block_gain"] == k["in_block_fraction"] - m["wd_0"][kind]["in_block_fraction"]
    assert m["wd_0"]["final_loss"] != m["wd_1e-03"]["final_loss"]  # the weight decay changed the training
    assert "ResNet18" in rec["notes"][0] and "CIFAR-10" in rec["notes"][0]
    assert (tmp_path / "report.md").exists()  # the combined report


def test_cli_dcs_cnn_resnet18(tiny, fake, tmp_path):
    rec = _cli("dcs-cnn", fake[0], tmp_path)
    _assert_config(rec, fake[0], fake[0], TINY_DCS)
    assert rec["title"] == dcs_cnn.TITLE_CIFAR
    m = rec["metrics"]
    assert m["primary"] == "alpha_2p5e-04"
    assert set(m) == {"vanilla", "alpha_2p5e-04", "memory", "memory_cuda", "primary"}
    assert rec["memory_verdict"]["judged_on"] == "memory"
    assert (m["memory_cuda"] is None) == (rec["config"]["device"] == "cpu")
    assert [c["key"] for c in rec["checks"]] == [c.key for c in dcs_cnn._criteria("alpha_2p5e-04")]
    van, d = m["vanilla"], m["alpha_2p5e-04"]
    net = ResNet18(10, width=1 / 16)
    n = sum(p.numel() for p in net.parameters())
    n_bn = sum(p.numel() for mod in net.modules() if isinstance(mod, torch.nn.BatchNorm2d) for p in mod.parameters())
    # every conv and linear parameter is factored in two; batch norm's affine parameters stay single
    assert van["parameters"] == d["parameters"] == van["trainable_tensors_numel"] == n
    assert d["trainable_tensors_numel"] == 2 * n - n_bn
    for key in ("val_accuracy", "zeroed_val_accuracy", "sparsity", "sparsity_loose_threshold"):
        assert 0 <= van[key] <= 1 and 0 <= d[key] <= 1
    assert d["time_ratio"] == d["seconds_per_step"] / van["seconds_per_step"] and d["seconds"] > 0
    mem = m["memory"]
    assert set(mem) >= {"batch_1", "batch_32", "ratio_at_1", "ratio_at_batch", "batch_for_10pct_overhead"}
    assert mem["dcs_extra_bytes_at_1"] == mem["dcs_extra_bytes_at_batch"] > 0
    for b in ("batch_1", "batch_32"):
        v, dd = mem[b]["vanilla"], mem[b]["dcs"]
        assert v["parameters"] == v["gradients"] == v["momentum"] == 4 * n  # float32
        assert dd["parameters"] == dd["gradients"] == dd["momentum"] == 4 * (2 * n - n_bn)
    assert mem["ratio_at_1"] > mem["ratio_at_batch"] > 1.0


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(["repro", *argv, "--no-progress"])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_bad_flag_combinations(capsys, fake, tmp_path):
    out = tmp_path / "out"
    data = str(fake[0])
    err = _cli_error(capsys, ["fig3", "--model", "resnet18", "--data", data, "--out", str(out)])
    assert "argument --model: --model and --data apply only to fig1-right, dcs-cnn, not to fig3" in err
    err = _cli_error(capsys, ["--all", "--data", data, "--out", str(out)])
    assert "argument --data: --data applies only to fig1-right, dcs-cnn" in err and "fig1-left" in err
    err = _cli_error(capsys, ["fig1-right", "--model", "resnet18", "--out", str(out)])
    assert "argument --model" in err and "needs" in err and "--data PATH" in err
    err = _cli_error(capsys, ["dcs-cnn", "--data", data, "--out", str(out)])
    assert "argument --data" in err and "only for model 'resnet18'" in err
    err = _cli_error(capsys, ["fig1-right", "--model", "vgg", "--data", data, "--out", str(out)])
    assert "argument --model: invalid choice for fig1-right: 'vgg' (choose from mlp, resnet18)" in err
    err = _cli_error(capsys, ["dcs-cnn", "--model", "mlp", "--out", str(out)])
    assert "invalid choice for dcs-cnn: 'mlp' (choose from digits_cnn, resnet18)" in err
    err = _cli_error(capsys, ["fig1-right", "--model", "resnet18", "--data", str(tmp_path / "nope"),
                              "--out", str(out)])
    assert "argument --data:" in err and "no such file or directory" in err and "cifar-10-batches-py" in err
    assert not out.exists()  # every check happens before anything runs


@pytest.mark.parametrize("mod, default", [(fig1_right, "mlp"), (dcs_cnn, "digits_cnn")])
def test_config_combinations(mod, default, fake, tmp_path):
    data = str(fake[0])
    with pytest.raises(ValueError, match=r"model 'resnet18' \(--model resnet18\) .* needs .*data=PATH"):
        mod.make_config(model="resnet18")
    with pytest.raises(ValueError, match=r"\(--data\) is only for model 'resnet18'"):
        mod.make_config(data=data)
    with pytest.raises(ValueError, match=rf"--data\) is only for model 'resnet18'.*model '{default}'"):
        mod.make_config(model=default, data=data)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        mod.make_config(model="vgg", data=data)
    with pytest.raises(FileNotFoundError, match="--data"):
        mod.make_config(model="resnet18", data=str(tmp_path))
    with pytest.raises(TypeError, match="unknown config override 'steps'"):
        mod.make_config(model="resnet18", data=data, steps=10)  # a digits setting
    with pytest.raises(TypeError, match="unknown config override"):
        mod.make_config(nonsense=1)
    assert mod.make_config(model=default)["model"] == default  # the default path is untouched
    quick = mod.make_config(model="resnet18", data=data)
    full = mod.make_config(False, model="resnet18", data=data)
    assert quick["batch_size"] == full["batch_size"] == 128 and quick["lr"] == full["lr"] == 0.1
    assert quick["train_subset"] == 10_000 and full["train_subset"] is None
    assert quick["epochs"] < full["epochs"] == (100 if mod is fig1_right else 200)
