"""Figure 1-right / Figure 5 (Sec. 4.7, App. A.2): homogeneous neuron blocks from the permutation symmetry.

Paper: a ResNet18 on CIFAR-10 (SGD, batch 128, lr 0.1, momentum 0.9, 100 epochs, "varying degrees of weight
decay"); the correlation matrix of the 128 penultimate neurons over 2000 unseen test points, rows and columns
sorted by the top eigenvector, shows homogeneous blocks with weight decay (Fig. 5: 1e-3) and rarely without; pre-
and post-activation look alike, so the blocks come from the permutation symmetry of the neurons, not linearity.

CPU-scale version (the default): an MLP 64 -> 256 -> 128 -> 10 (ReLU) on scikit-learn's bundled digits (8x8
images, 1797 points, no download), 1297 train / 500 held-out test points, the same optimizer (SGD, batch 128,
momentum 0.9, constant lr) and several weight decays, all from the same initialization and the same minibatches.
The 128 neurons of the penultimate layer are analysed with :func:`symfast.metrics.homogeneity` on the test points:

* pre-activation (``W2 h + b2``) and post-activation (ReLU of it) correlation matrices, sorted by the top
  eigenvector (the paper's figure);
* ``in_block_fraction``: the fraction of the neurons in a block (a connected component of ``corr >= 0.9`` with at
  least 2 neurons): how much of the layer is organised in homogeneous groups;
* ``near_identical_fraction``: the fraction of the neurons having a near-identical twin in parameter space
  (incoming weights, bias and outgoing weights; relative squared distance < 0.1): Theorem 3's symmetric solution
  ``theta_i = theta_j`` itself, a stricter test than correlated activations.

Dead neurons (zero post-activation on every test point) correlate 0 with the others and belong to no block.

Judged settings. ``--full`` uses App. A.2's optimizer as stated: SGD, lr 0.1, momentum 0.9, batch 128, 39,100
steps (100 epochs of CIFAR-10 at batch 128), judged at Fig. 5's weight decay 1e-3 (integrated decay lr * wd * steps
= 3.9). ``--quick`` runs a tenth of the steps and is judged at weight decay 1e-2, which keeps the integrated decay at
the paper's (4.0); the record lists both differences under ``deviations``. The verdict asks for the paper's claim
only (blocks, pre- and post-activation); the near-identical neurons go beyond the paper and are reported, not judged.

Paper scale (``config={'model': 'resnet18', 'data': PATH}``; ``symfast repro fig1-right --model resnet18 --data
PATH``): :class:`symfast.models.ResNet18` (CIFAR variant) with a fully connected hidden layer of 128 neurons
before the classifier (App. A.2: "the penultimate layer neurons of the fully connected layer with dimension 128"),
trained on CIFAR-10 (:mod:`.cifar`, the python-version directory; random crop + flip) with SGD, batch 128, fixed
lr 0.1, momentum 0.9, each weight decay from the same initialization and the same batches; full: 100 epochs on the
50000 training images and weight decays 0, 5e-4, 1e-3; quick: 5 epochs on a 10000-image subset, weight decays 0 and
1e-3 (the settings are in :data:`CIFAR_SETTINGS`). The judged weight decay is Fig. 5's 1e-3; the 128 neurons are
analysed on the first 2000 test images (the paper's "2000 unseen test points") exactly as above: the same metrics,
criteria and verdict. It runs on the GPU when there is one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from ..metrics import homogeneity
from . import cifar
from .common import apply_overrides, Criterion, deviation, make_record, new_figure, save_figure, torch_threads, verdict_color, write_record

EXPERIMENT = "fig1-right"
TITLE = "Figure 1-right / Figure 5: homogeneous blocks of penultimate neurons from the permutation symmetry"
CLAIM = (
    "Figure 1-right / Figure 5: 'After training, the neurons are grouped into homogeneous blocks when weight decay is "
    "present. [...] such block structures are very rare when there is no weight decay. Also, the patterns are similar "
    "for post-activation values, which further supports the claim that the block structures are due to the symmetry, "
    "not because of linearity.'"
)
CLAIM_SHORT = ("with weight decay the penultimate neurons form homogeneous blocks (pre- and post-activation); "
               "without, rarely")

MIN_BLOCK_GAIN = 0.15  # weight decay: +15 points of the neurons in blocks, pre- and post-activation

#: App. A.2's optimizer, and the steps of 100 CIFAR-10 epochs at batch 128 (391 per epoch).
PAPER = {"lr": 0.1, "momentum": 0.9, "batch_size": 128, "steps": 39_100, "weight_decay": 1e-3}


def _criteria(primary: str) -> list[Criterion]:
    return [
        Criterion(f"{primary}.pre.in_block_gain", ">=", MIN_BLOCK_GAIN,
                  "with weight decay, the fraction of neurons in a block (pre-activation) exceeds that at wd 0 by"),
        Criterion(f"{primary}.post.in_block_gain", ">=", MIN_BLOCK_GAIN,
                  "the same for post-activation (the blocks are not an effect of linearity)"),
    ]


#: ``model`` (``--model``): the default (digits MLP) and the paper's network (ResNet18 on CIFAR-10, with ``data``).
MODEL_CHOICES = ("mlp", "resnet18")
_DEFAULT_DESC = "an MLP on scikit-learn's bundled digits"

#: The paper-scale run's quick and full settings (model='resnet18'); they override :func:`_cifar_config`'s base.
CIFAR_SETTINGS = {
    "quick": {"train_subset": 10_000, "epochs": 5, "eval_points": 2_000, "weight_decays": [0.0, 1e-3]},
    "full": {"train_subset": None, "epochs": 100, "eval_points": None, "weight_decays": [0.0, 5e-4, 1e-3]},
}


def make_config(quick: bool = True, seed: int = 0, **overrides) -> dict:
    model, data = overrides.get("model", MODEL_CHOICES[0]), overrides.get("data")
    cifar.check_model_data(EXPERIMENT, model, data, default_model=MODEL_CHOICES[0], default_desc=_DEFAULT_DESC)
    if model == "resnet18":
        return _cifar_config(quick, seed, overrides)
    cfg = {
        "quick": quick,
        "seed": seed,
        "model": "mlp",
        "data": None,
        "hidden": 256,
        "width": 128,  # App. A.2: the penultimate layer has 128 neurons
        "test_points": 500,
        "batch_size": 128,
        "lr": PAPER["lr"],
        "momentum": PAPER["momentum"],
        # quick: a tenth of the steps, judged at 10x the weight decay (the paper's integrated decay lr * wd * steps)
        "steps": 4_000 if quick else PAPER["steps"],
        "weight_decays": [0.0, 1e-3, 1e-2] if quick else [0.0, PAPER["weight_decay"]],
        "primary_weight_decay": 1e-2 if quick else PAPER["weight_decay"],
        "corr_threshold": 0.9,
        "near_identical": 0.1,
        "data_desc": "scikit-learn load_digits (1797 8x8 images, pixels / 16), a random split of 500 held-out points",
        "optimizer": "torch.optim.SGD, constant lr, momentum 0.9, coupled weight decay, batch 128 drawn with "
        "replacement; the same init and minibatches for every weight decay",
        "neuron_params": "incoming weights, bias and outgoing weights of each penultimate neuron",
    }
    apply_overrides(cfg, overrides)
    if 0.0 not in cfg["weight_decays"] or cfg["primary_weight_decay"] not in cfg["weight_decays"]:
        raise ValueError("weight_decays must contain 0 and primary_weight_decay")
    return cfg


def _cifar_config(quick: bool, seed: int, overrides: dict) -> dict:
    """The paper's setting (App. A.2): ResNet18 with a 128-neuron hidden layer on CIFAR-10."""
    cfg = cifar.base_config(quick, seed)
    cfg.update({
        "width": 128,  # App. A.2: the penultimate (fully connected) layer has 128 neurons
        "epochs": 100,
        "test_points": 2_000,  # App. A.2: "2000 unseen test points"
        "eval_points": None,  # accuracy on this many test (and training) images; None: all
        "weight_decays": [0.0, 1e-3],
        "primary_weight_decay": 1e-3,  # Fig. 5
        "corr_threshold": 0.9,
        "near_identical": 0.1,
        "data_desc": "CIFAR-10 (python version), uint8 images normalized per channel; training: random 32x32 crop "
        "of the 4-pixel zero-padded image and random horizontal flip; the first test_points test images for the "
        "correlations",
        "optimizer": "torch.optim.SGD, fixed lr, momentum, coupled weight decay, batches of batch_size from a "
        "seeded shuffle per epoch; the same init and batches (and crops/flips) for every weight decay",
        "neuron_params": "incoming weights, bias and outgoing weights of each neuron of the hidden FC layer",
    })
    cifar.finish_config(cfg, CIFAR_SETTINGS["quick" if quick else "full"], overrides)
    if 0.0 not in cfg["weight_decays"] or cfg["primary_weight_decay"] not in cfg["weight_decays"]:
        raise ValueError("weight_decays must contain 0 and primary_weight_decay")
    return cfg


def load_digits_split(cfg: dict):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(int(cfg["seed"]) + 12345)
    perm = torch.randperm(len(X), generator=g)
    te, tr = perm[: cfg["test_points"]], perm[cfg["test_points"]:]
    return X[tr], y[tr], X[te], y[te]


def make_mlp(cfg: dict) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(64, cfg["hidden"]), torch.nn.ReLU(),
        torch.nn.Linear(cfg["hidden"], cfg["width"]), torch.nn.ReLU(),  # the penultimate layer
        torch.nn.Linear(cfg["width"], 10),
    )


def wd_key(wd: float) -> str:
    return "wd_0" if wd == 0 else f"wd_{wd:.0e}"


def train_one(cfg: dict, wd: float, data, bar) -> dict:
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(int(cfg["seed"]))
    net = make_mlp(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=wd)
    g = torch.Generator().manual_seed(int(cfg["seed"]) + 1)
    for s in range(cfg["steps"]):
        idx = torch.randint(0, len(Xtr), (cfg["batch_size"],), generator=g)
        loss = torch.nn.functional.cross_entropy(net(Xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (s + 1) % 250 == 0:
            bar.update(250)
    bar.update(cfg["steps"] % 250)
    with torch.no_grad():
        pre = net[2](net[1](net[0](Xte)))
        post = pre.relu()
        logits = net[4](post)
        acc = (logits.argmax(1) == yte).double().mean().item()
        train_acc = (net(Xtr).argmax(1) == ytr).double().mean().item()
        params = torch.cat([net[2].weight, net[2].bias[:, None], net[4].weight.T], 1)
    return _analyse(cfg, pre, post, params, test_accuracy=acc, train_accuracy=train_acc,
                    final_loss=float(loss.detach()))


def _analyse(cfg: dict, pre: torch.Tensor, post: torch.Tensor, params: torch.Tensor, *, test_accuracy: float,
             train_accuracy: float, final_loss: float) -> tuple[dict, dict]:
    """The metrics of one trained network from its penultimate neurons: activations ``pre``/``post`` ``[points,
    n]`` on the held-out points and parameters ``params`` ``[n, ...]`` (incoming, bias, outgoing)."""
    out = {"test_accuracy": test_accuracy, "train_accuracy": train_accuracy,
           "dead_neurons": int((post.abs().sum(0) == 0).sum()), "final_loss": final_loss}
    mats = {}
    for kind, act in (("pre", pre), ("post", post)):
        H = homogeneity(params, activations=act, corr_threshold=cfg["corr_threshold"],
                        near_identical=cfg["near_identical"])
        n = params.shape[0]
        C = H.correlation
        off = C[~torch.eye(n, dtype=torch.bool)]
        out[kind] = {
            "block_count": H.block_count,
            "block_sizes": H.block_sizes,
            "in_block_fraction": sum(H.block_sizes) / n,
            "largest_block": H.block_sizes[0] if H.block_sizes else 0,
            "mean_abs_offdiag_corr": off.abs().mean().item(),
        }
        out["near_identical_fraction"] = H.near_identical_fraction
        out["near_identical_pair_fraction"] = H.near_identical_pair_fraction
        mats[kind] = C.float()
    return out, mats


def run(out_dir: str | Path, *, quick: bool = True, seed: int = 0, progress: bool = True,
        config: Optional[dict] = None) -> dict:
    """Train the network at each weight decay; writes fig1_right.png, result.json and report.md into ``out_dir``.

    The default trains the digits MLP; ``config={'model': 'resnet18', 'data': PATH}`` the paper's ResNet18 on
    CIFAR-10 (:func:`run_cifar`)."""
    cfg = make_config(quick, seed, **(config or {}))
    if cfg["model"] == "resnet18":
        return run_cifar(cfg, out_dir, progress=progress)
    with torch_threads():
        t0 = time.perf_counter()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        data = load_digits_split(cfg)
        metrics, mats = {}, {}
        wds = cfg["weight_decays"]
        with tqdm(total=len(wds) * cfg["steps"], desc="fig1-right", unit="step", disable=not progress,
                  leave=False) as bar:
            for wd in wds:
                metrics[wd_key(wd)], mats[wd] = train_one(cfg, wd, data, bar)
        notes = [
            "CPU scale: an MLP on scikit-learn's digits stands in for the paper's ResNet18 on CIFAR-10 "
            "(that setting: --model resnet18 --data PATH, config model='resnet18', data=PATH).",
            f"Integrated weight decay lr * wd * steps at the judged setting: "
            f"{cfg['lr'] * cfg['primary_weight_decay'] * cfg['steps']:.2f} (the paper's: "
            f"{PAPER['lr'] * PAPER['weight_decay'] * PAPER['steps']:.2f}).",
        ]
        return _judge_and_write(cfg, metrics, mats, out_dir, t0, notes, _deviations(cfg))


def make_resnet(cfg: dict) -> torch.nn.Module:
    """ResNet18 (CIFAR variant, width ``resnet_width``) with a hidden FC layer of ``width`` neurons, seeded."""
    from symfast.models import ResNet18

    torch.manual_seed(int(cfg["seed"]))
    return ResNet18(10, width=cfg["resnet_width"], hidden=cfg["width"])


def _subset(x: torch.Tensor, y: torch.Tensor, n: Optional[int]):
    return (x, y) if n is None else (x[:n], y[:n])


def train_one_cifar(cfg: dict, wd: float, data, device: torch.device, bar) -> tuple[dict, dict]:
    """One ResNet18 at weight decay ``wd`` on CIFAR-10 (uint8 tensors on ``device``); metrics as :func:`train_one`."""
    xtr, ytr, xte, yte = data
    net = make_resnet(cfg).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=wd)
    loss = cifar.train_epochs(net, opt, xtr, ytr, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                              seed=int(cfg["seed"]) + 1, augmentation=cfg["augmentation"],
                              on_step=lambda s: bar.update(1))
    acc = cifar.accuracy(net, *_subset(xte, yte, cfg["eval_points"]))
    train_acc = cifar.accuracy(net, *_subset(xtr, ytr, cfg["eval_points"]))
    net.eval()
    with torch.no_grad():
        pre, post = net.penultimate(cifar.normalize(xte[: cfg["test_points"]]))
        fc1, fc2 = net.fc[0], net.fc[2]
        params = torch.cat([fc1.weight, fc1.bias[:, None], fc2.weight.T], 1)
    return _analyse(cfg, pre.cpu(), post.cpu(), params.cpu(), test_accuracy=acc, train_accuracy=train_acc,
                    final_loss=loss)


def run_cifar(cfg: dict, out_dir: str | Path, *, progress: bool = True) -> dict:
    """The paper's setting: ResNet18 on CIFAR-10 at each weight decay (GPU when available), judged like the MLP."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, data, device = cifar.prepare("fig1-right", cfg)
    if cfg["test_points"] > cfg["test_images"]:
        raise ValueError(f"fig1-right: test_points {cfg['test_points']} exceeds the {cfg['test_images']} test images "
                         f"of --data {cfg['data']}")
    xtr, ytr, xte, yte = data
    n_full = cfg["train_images_available"]
    steps = cifar.steps_per_model(cfg)
    metrics, mats = {}, {}
    wds = cfg["weight_decays"]
    with tqdm(total=len(wds) * steps, desc="fig1-right (ResNet18, CIFAR-10)", unit="step", disable=not progress,
              leave=False) as bar:
        for wd in wds:
            metrics[wd_key(wd)], mats[wd] = train_one_cifar(cfg, wd, data, device, bar)
    sub = f" (a seeded subset of the {n_full})" if len(ytr) < n_full else ""
    notes = [
        f"Paper scale: ResNet18 (CIFAR variant, width x{cfg['resnet_width']:g}) with a fully connected "
        f"hidden layer of {cfg['width']} neurons before the classifier (App. A.2) on CIFAR-10 from "
        f"{cfg['data_dir']}; device {cfg['device']}.",
        f"{cfg['epochs']} epochs (App. A.2: 100) on {len(ytr)} training images{sub}, SGD batch {cfg['batch_size']}, "
        f"fixed lr {cfg['lr']:g}, momentum {cfg['momentum']:g}"
        + (", random crop + flip augmentation (the appendix does not say; standard practice)"
           if cfg["augmentation"] else ", no augmentation")
        + f"; accuracies on {cfg['eval_points'] or 'all'} test / training images, correlations on the first "
        f"{cfg['test_points']} test images.",
        f"The judged weight decay is {cfg['primary_weight_decay']:g} (Fig. 5: 1e-3).",
    ]
    return _judge_and_write(cfg, metrics, mats, out_dir, t0, notes, _deviations(cfg))


def _deviations(cfg: dict) -> list[dict]:
    """Where this run's settings differ from App. A.2 / Fig. 5 (see :func:`symfast.experiments.common.deviation`)."""
    out = []
    if cfg["model"] == "mlp":
        out += [
            deviation("model and data", "ResNet18 with a 128-neuron FC layer, CIFAR-10",
                      "MLP 64-256-128-10 (ReLU), scikit-learn digits (1297 train points)",
                      "CPU scale: no data download and minutes, not GPU-hours; the 128 analysed neurons are kept"),
            deviation("held-out points for the correlations", 2000, cfg["test_points"],
                      "digits has 1797 images in all"),
            deviation("minibatches", "epochs of a shuffled training set", "drawn with replacement",
                      "the steps, not the epochs, are matched: 39,100 steps are 100 CIFAR-10 epochs at batch 128"),
        ]
    else:
        steps = cifar.steps_per_model(cfg)
        if cfg["epochs"] != 100 or cfg["train_images"] != 50_000:
            out.append(deviation("training length", "100 epochs on 50,000 images",
                                 f"{cfg['epochs']} epochs on {cfg['train_images']} images ({steps} steps)",
                                 "quick mode (--full runs the paper's 100 epochs)"))
        if cfg.get("resnet_width", 1) != 1:
            out.append(deviation("ResNet18 width", 1, cfg["resnet_width"], "a narrower network for a test"))
        return out + _optimizer_deviations(cfg, steps=None)
    return out + _optimizer_deviations(cfg, steps=cfg["steps"])


def _optimizer_deviations(cfg: dict, *, steps: Optional[int]) -> list[dict]:
    out = []
    for k in ("lr", "momentum", "batch_size"):
        if cfg[k] != PAPER[k]:
            out.append(deviation(k, PAPER[k], cfg[k], "set by config override"))
    if steps is not None and steps != PAPER["steps"]:
        reason = ("quick mode (--full runs the paper's 39,100)" if cfg["quick"]
                  else "set by config override")
        out.append(deviation("steps", PAPER["steps"], steps, reason))
    if cfg["primary_weight_decay"] != PAPER["weight_decay"]:
        reason = (f"quick mode: weight decay scaled up with the shorter run, integrated decay lr * wd * steps "
                  f"{cfg['lr'] * cfg['primary_weight_decay'] * steps:.1f} (the paper's "
                  f"{PAPER['lr'] * PAPER['weight_decay'] * PAPER['steps']:.1f}); Fig. 5's 1e-3 is reported"
                  if cfg["quick"] and steps is not None else "set by config override")
        out.append(deviation("judged weight decay", PAPER["weight_decay"], cfg["primary_weight_decay"], reason))
    return out


def _judge_and_write(cfg: dict, metrics: dict, mats: dict, out_dir: Path, t0: float, notes: list,
                     deviations: list) -> dict:
    """Gains against weight decay 0, the headline and notes, the record (verdict by :func:`_criteria`), the figure."""
    wds = cfg["weight_decays"]
    base = metrics["wd_0"]
    for wd in wds:
        m = metrics[wd_key(wd)]
        for kind in ("pre", "post"):
            m[kind]["in_block_gain"] = m[kind]["in_block_fraction"] - base[kind]["in_block_fraction"]
    primary = wd_key(cfg["primary_weight_decay"])
    metrics["primary"] = primary
    p = metrics[primary]
    headline = (
        f"neurons in blocks pre/post: wd 0 {base['pre']['in_block_fraction']:.2f}/"
        f"{base['post']['in_block_fraction']:.2f}, wd {cfg['primary_weight_decay']:g} "
        f"{p['pre']['in_block_fraction']:.2f}/{p['post']['in_block_fraction']:.2f}; near-identical "
        f"{base['near_identical_fraction']:.2f} -> {p['near_identical_fraction']:.2f}; test acc "
        f"{base['test_accuracy']:.3f} -> {p['test_accuracy']:.3f}"
    )
    metrics["beyond_paper"] = {
        "what": "near-identical neurons (Theorem 3's theta_i = theta_j in parameter space), a stricter test than "
        "the paper's correlation blocks; reported, not judged",
        **{wd_key(wd): metrics[wd_key(wd)]["near_identical_fraction"] for wd in wds},
    }
    notes = list(notes) + [
        "Beyond the paper (reported, not judged): neurons with a near-identical twin in parameter space, "
        + ", ".join(f"wd {wd:g}: {metrics[wd_key(wd)]['near_identical_fraction']:.2f}" for wd in wds) + ".",
        "Blocks: connected components of corr >= %g with >= 2 neurons, on the held-out points; near-identical: "
        "relative squared distance of the neurons' parameters < %g." % (cfg["corr_threshold"],
                                                                         cfg["near_identical"]),
    ]
    for wd in wds:
        m = metrics[wd_key(wd)]
        notes.append(f"wd {wd:g}: in-block pre {m['pre']['in_block_fraction']:.2f}, post "
                     f"{m['post']['in_block_fraction']:.2f}, blocks {m['pre']['block_count']}/"
                     f"{m['post']['block_count']}, near-identical {m['near_identical_fraction']:.2f}, dead "
                     f"{m['dead_neurons']}, test acc {m['test_accuracy']:.3f}")
    for wd in wds:  # the other weight decays, judged by the same criteria but not counted: say how they fare
        if wd == 0 or wd_key(wd) == primary:
            continue
        m = metrics[wd_key(wd)]
        holds = m["pre"]["in_block_gain"] >= MIN_BLOCK_GAIN and m["post"]["in_block_gain"] >= MIN_BLOCK_GAIN
        notes.append(f"Not judged: at wd {wd:g} the same criteria {'hold' if holds else 'FAIL'} (block gain pre "
                     f"{m['pre']['in_block_gain']:.2f} / post {m['post']['in_block_gain']:.2f} against >= "
                     f"{MIN_BLOCK_GAIN:g})" + (" - 1e-3 is Fig. 5's own weight decay." if wd == 1e-3 else "."))
    rec = make_record(experiment=EXPERIMENT, title=TITLE, claim=CLAIM, claim_short=CLAIM_SHORT,
                      criteria=_criteria(primary), metrics=metrics, config=cfg, headline=headline, notes=notes,
                      deviations=deviations)
    fig = _plot(rec, mats, out_dir)
    return write_record(rec, out_dir, t0=t0, figures=[fig])


def _plot(rec: dict, mats: dict, out_dir: Path) -> str:
    cfg, m = rec["config"], rec["metrics"]
    wds = cfg["weight_decays"]
    k = len(wds)
    fig = new_figure((3.3 * k + 4.6, 7.4))
    gs = fig.add_gridspec(2, k + 1, width_ratios=[1] * k + [1.35])
    im = None
    for j, wd in enumerate(wds):
        mk = m[wd_key(wd)]
        for i, kind in enumerate(("pre", "post")):
            ax = fig.add_subplot(gs[i, j])
            im = ax.imshow(mats[wd][kind].numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
            mm = mk[kind]
            primary = wd_key(wd) == m["primary"]
            dead = f"\n{mk['dead_neurons']} dead neurons (constant 0: the blank band)" if kind == "post" else ""
            ax.set_title(f"wd {wd:g}{' (judged)' if primary else ''}, {kind}-activation\n"
                         f"{mm['block_count']} blocks, {mm['in_block_fraction']:.0%} of neurons in blocks{dead}",
                         fontsize=9, color=verdict_color(rec["verdict"]) if primary else "k")
            ax.set_xlabel("neuron (sorted by top eigenvector)", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{kind}-activation\nneuron (sorted)", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=fig.axes, location="left", shrink=0.6, label="correlation over held-out points")
    ax = fig.add_subplot(gs[:, k])
    xs = list(range(k))
    ax.plot(xs, [m[wd_key(w)]["pre"]["in_block_fraction"] for w in wds], "o-", color="tab:blue",
            label="neurons in a block, pre-activation")
    ax.plot(xs, [m[wd_key(w)]["post"]["in_block_fraction"] for w in wds], "s--", color="tab:orange",
            label="neurons in a block, post-activation")
    ax.plot(xs, [m[wd_key(w)]["near_identical_fraction"] for w in wds], "D-", color="tab:green",
            label="near-identical twin in params (beyond paper, not judged)")
    ax.plot(xs, [m[wd_key(w)]["test_accuracy"] for w in wds], "x:", color="k", label="test accuracy")
    ax.set_xticks(xs, [f"{w:g}" for w in wds])
    ax.set_xlabel("weight decay")
    ax.set_ylabel("fraction")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left")
    ax.set_title(f"homogeneity vs weight decay: {rec['verdict']}", color=verdict_color(rec["verdict"]), fontsize=10)
    if cfg["model"] == "resnet18":
        title = (f"Fig. 1-right / 5: correlation of the {cfg['width']} penultimate neurons of a ResNet18 (width "
                 f"x{cfg['resnet_width']:g}) on CIFAR-10 ({cfg['epochs']} epochs on {cfg['train_images']:,} images, "
                 f"batch {cfg['batch_size']}, lr {cfg['lr']:g}, momentum {cfg['momentum']:g}); "
                 f"{cfg['test_points']} test points")
    else:
        title = (f"Fig. 1-right / 5 at CPU scale: correlation of the {cfg['width']} penultimate neurons of an MLP on "
                 f"digits ({cfg['steps']:,} SGD steps, batch {cfg['batch_size']}, lr {cfg['lr']:g}, momentum "
                 f"{cfg['momentum']:g}); {cfg['test_points']} held-out points")
    fig.suptitle(title, fontsize=10.5)
    return save_figure(fig, out_dir, "fig1_right.png")
