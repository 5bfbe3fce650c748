"""CIFAR-10 from the standard "python version" directory, for the paper-scale runs of fig1-right and dcs-cnn.

The directory is the one the official archive ``cifar-10-python.tar.gz`` unpacks to, ``cifar-10-batches-py/``,
holding ``data_batch_1`` ... ``data_batch_5`` (10000 training images each) and ``test_batch`` (10000 test images):
pickles of a dict with ``b'data'`` (uint8 ``[N, 3072]``: the 1024 red, then green, then blue values of each 32x32
image, row-major) and ``b'labels'`` (N ints in 0..9). :func:`find_cifar_dir` accepts that directory or its parent.
Nothing is downloaded. The files are Python pickles: only load files from a source you trust.

Images are kept as uint8 ``[N, 3, 32, 32]`` tensors (150 MB for the training set) and normalized per batch
(:func:`normalize`: the usual per-channel mean and std of the training set), after the usual training augmentation
(:func:`augment`: 4-pixel zero padding, a random 32x32 crop and a random horizontal flip, done with tensor ops on
whatever device the batch is on, without torchvision). :func:`train_epochs` and :func:`accuracy` are the training
and evaluation loops the two experiments share.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "TRAIN_FILES", "TEST_FILE", "DIR_NAME",
    "find_cifar_dir", "read_batch", "load_cifar10", "cifar10_datasets", "normalize", "augment",
    "train_epochs", "accuracy", "pick_device", "check_model_data", "device_desc",
]

DIR_NAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10
_PIXELS = 3 * 32 * 32


def _missing(d: Path) -> list[str]:
    return [f for f in TRAIN_FILES + (TEST_FILE,) if not (d / f).is_file()]


def find_cifar_dir(path: str | Path) -> Path:
    """The ``cifar-10-batches-py`` directory: ``path`` itself or ``path/cifar-10-batches-py``.

    Raises FileNotFoundError (naming ``--data``, what was expected and what was found) when neither holds the six
    files ``data_batch_1..5`` and ``test_batch``.
    """
    if path is None or str(path) == "":
        raise FileNotFoundError("--data: no CIFAR-10 directory given (expected the path of cifar-10-batches-py/)")
    p = Path(path).expanduser()
    expected = (f"the CIFAR-10 python-version directory ({DIR_NAME}/ with {', '.join(TRAIN_FILES)} and {TEST_FILE}) "
                "or its parent")
    if not p.exists():
        raise FileNotFoundError(f"--data {path}: no such file or directory; expected {expected}")
    if not p.is_dir():
        raise FileNotFoundError(f"--data {path}: is a file, not a directory; expected {expected}")
    for d in (p, p / DIR_NAME):
        if d.is_dir() and not _missing(d):
            return d
    d = p / DIR_NAME if (p / DIR_NAME).is_dir() else p
    found = sorted(c.name for c in d.iterdir())[:12]
    shown = ", ".join(found) if found else "nothing (empty directory)"
    raise FileNotFoundError(
        f"--data {path}: expected {expected}; {d} lacks {', '.join(_missing(d))} and holds {shown}"
        + (" ..." if len(found) == 12 else ""))


def read_batch(file: str | Path) -> Tuple[Tensor, Tensor]:
    """One batch file: ``(images uint8 [N, 3, 32, 32], labels int64 [N])``; ValueError naming ``--data`` when the
    file is not a CIFAR-10 batch (not a pickle, no ``b'data'``/``b'labels'``, wrong shape, dtype or labels)."""
    import numpy as np

    file = Path(file)
    what = f"--data: {file} is not a CIFAR-10 python-version batch"
    try:
        with open(file, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: it does not unpickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a pickled dict with b'data' and b'labels', found a {type(d).__name__}")
    keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    missing = [k for k in ("data", "labels") if k not in keys]
    if missing:
        raise ValueError(f"{what}: expected keys b'data' and b'labels', missing {missing}; found keys "
                         f"{sorted(map(repr, d))[:8]}")
    data, labels = keys["data"], keys["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise ValueError(f"{what}: expected b'data' a uint8 array [N, {_PIXELS}], found a {desc}")
    try:
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: b'labels' is not a list of integers ({exc})") from None
    if y.dim() != 1 or y.numel() != data.shape[0]:
        raise ValueError(f"{what}: expected {data.shape[0]} labels (one per image), found shape {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise ValueError(f"{what}: labels must be in 0..9, found {int(y.min())}..{int(y.max())}")
    x = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return x, y


def load_cifar10(path: str | Path) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: uint8 ``[N, 3, 32, 32]`` images and int64 labels (50000 / 10000 for
    the real data set) from the directory ``path`` (see :func:`find_cifar_dir`)."""
    d = find_cifar_dir(path)
    parts = [read_batch(d / f) for f in TRAIN_FILES]
    xtr = torch.cat([p[0] for p in parts])
    ytr = torch.cat([p[1] for p in parts])
    xte, yte = read_batch(d / TEST_FILE)
    return xtr, ytr, xte, yte


def normalize(x: Tensor) -> Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32 in the usual CIFAR-10 normalization ``(x / 255 - mean) / std`` per channel."""
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def augment(x: Tensor, generator: torch.Generator, *, pad: int = 4) -> Tensor:
    """The usual CIFAR training augmentation of a batch ``[B, C, H, W]`` (any dtype, any device): zero padding by
    ``pad`` pixels, a random ``H x W`` crop and a random horizontal flip, per image. The random numbers come from
    ``generator`` (a CPU generator: the same crops and flips on every device)."""
    b, c, h, w = x.shape
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = ox[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def cifar10_datasets(path: str | Path, *, train_subset: Optional[int] = None, seed: int = 0):
    """``(train, test, info)`` as :class:`~torch.utils.data.TensorDataset` of normalized float32 images and labels
    (no augmentation), like :func:`symfast.train.digits_data`; ``train_subset`` keeps a seeded random subset of the
    training images."""
    from torch.utils.data import TensorDataset

    xtr, ytr, xte, yte = load_cifar10(path)
    if train_subset is not None and train_subset < len(ytr):
        keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))[:train_subset]
        xtr, ytr = xtr[keep], ytr[keep]
    info = {"train_images": len(ytr), "test_images": len(yte), "dir": str(find_cifar_dir(path))}
    return TensorDataset(normalize(xtr), ytr), TensorDataset(normalize(xte), yte), info


def pick_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_epochs(net: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, *, epochs: int,
                 batch_size: int, seed: int, augmentation: bool = True, scheduler=None,
                 on_step: Optional[Callable[[int], None]] = None) -> float:
    """SGD over ``epochs`` shuffled passes of uint8 images ``x`` (on the model's device), batches of ``batch_size``
    (the last, smaller one included), augmented (:func:`augment`) and normalized per batch. The shuffles, crops and
    flips come from one CPU generator seeded with ``seed``: the same batches for every model trained with the same
    seed. ``scheduler.step()`` after every step; ``on_step(step)`` after every step. Returns the last batch's loss."""
    g = torch.Generator().manual_seed(int(seed))
    n, step, loss = len(y), 0, torch.zeros(())
    net.train()
    for _ in range(int(epochs)):
        perm = torch.randperm(n, generator=g).to(x.device)
        for i in range(0, n, batch_size):
            idx = perm[i: i + batch_size]
            xb = x[idx]
            if augmentation:
                xb = augment(xb, g)
            loss = torch.nn.functional.cross_entropy(net(normalize(xb)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            if on_step is not None:
                on_step(step)
    return float(loss.detach())


@torch.no_grad()
def accuracy(net: torch.nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy (eval mode: batch norm with its running statistics) on uint8 images ``x``."""
    was = net.training
    net.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((net(normalize(x[i: i + batch_size])).argmax(1) == y[i: i + batch_size]).sum())
    net.train(was)
    return correct / max(1, len(y))


def check_model_data(experiment: str, model, data, *, default_model: str, default_desc: str) -> None:
    """The model/data combination of an experiment's config (``--model`` / ``--data`` on the command line):
    ``model='resnet18'`` needs ``data``; the default model takes no ``data``; any other model is unknown.
    Raises ValueError naming both the config key and the flag."""
    known = (default_model, "resnet18")
    if model not in known:
        raise ValueError(f"{experiment}: unknown model {model!r} (config 'model', flag --model); known: "
                         f"{default_model!r} (the default: {default_desc}) and 'resnet18' (ResNet18 on CIFAR-10, "
                         "with data=PATH / --data PATH)")
    if model == "resnet18" and (data is None or str(data) == ""):
        raise ValueError(f"{experiment}: model 'resnet18' (--model resnet18) trains on CIFAR-10 and needs its "
                         f"directory: data=PATH (--data PATH, the {DIR_NAME}/ directory or its parent)")
    if model != "resnet18" and data is not None:
        raise ValueError(f"{experiment}: data={str(data)!r} (--data) is only for model 'resnet18' (--model resnet18); "
                         f"the model {model!r} ({default_desc}) uses no data path")


def device_desc(device: torch.device) -> str:
    """``'cuda (NVIDIA H100 ...)'`` or ``'cpu'``: the device a run used, for its config."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


def prepare(experiment: str, cfg: dict) -> Tuple[dict, Tuple[Tensor, Tensor, Tensor, Tensor], torch.device]:
    """Loads ``cfg['data']``, keeps the seeded ``train_subset`` and moves the tensors to the device.

    Returns the config (with ``device``, ``train_images_available``, ``train_images`` and ``test_images`` added), ``(xtr, ytr, xte, yte)`` and
    the device. A batch size larger than the training set is a ValueError naming ``--data``.
    """
    device = pick_device()
    cfg = dict(cfg, device=device_desc(device))
    xtr, ytr, xte, yte = load_cifar10(cfg["data"])
    cfg["train_images_available"] = len(ytr)
    subset = cfg.get("train_subset")
    if subset is not None and subset < len(ytr):
        keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(int(cfg["seed"]) + 12345))
        xtr, ytr = xtr[keep[:subset]], ytr[keep[:subset]]
    if cfg["batch_size"] > len(ytr):
        raise ValueError(f"{experiment}: batch_size {cfg['batch_size']} exceeds the {len(ytr)} training images of "
                         f"--data {cfg['data']}")
    cfg["train_images"], cfg["test_images"] = len(ytr), len(yte)
    return cfg, tuple(t.to(device) for t in (xtr, ytr, xte, yte)), device


def steps_per_model(cfg: dict) -> int:
    """Optimizer steps of one model's training: ``epochs`` passes of ``train_images`` in batches (the last
    batch of an epoch may be short), as :func:`train_epochs` takes them; ``cfg`` as :func:`prepare` returns it."""
    return cfg["epochs"] * -(-cfg["train_images"] // cfg["batch_size"])


def base_config(quick: bool, seed: int) -> dict:
    """The config keys shared by the ResNet18 / CIFAR-10 settings of fig1-right and dcs-cnn (App. A.2, A.4)."""
    return {
        "quick": quick,
        "seed": seed,
        "model": "resnet18",
        "data": None,
        "data_dir": None,
        "resnet_width": 1.0,  # multiplier of the stage widths 64, 128, 256, 512
        "train_subset": None,  # None: all 50000 training images
        "eval_points": None,  # accuracy on this many test images; None: all
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "augmentation": True,
    }


def finish_config(cfg: dict, settings: dict, overrides: dict) -> dict:
    """Applies the quick/full ``settings`` and the caller's ``overrides``, then resolves ``data`` (a clear error
    naming ``--data`` when it holds no CIFAR-10)."""
    from .common import apply_overrides

    for source in (settings, overrides):
        apply_overrides(cfg, source)
    cfg["data"] = str(cfg["data"])
    cfg["data_dir"] = str(find_cifar_dir(cfg["data"]))
    return cfg
