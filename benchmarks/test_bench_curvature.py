"""Benchmarks of the per-sample curvature engine (symfast.per_sample_curvatures) and of stationary_report.

Each curvature case (model x dtype x threads) times, in the same pytest-benchmark group and the same run:

* ``fwdbwd``  - one forward+backward pass of the batch with the mean loss (the yardstick: what one
  training step's gradient costs);
* ``vmap``    - torch.func's per-sample recipe, ``vmap`` over samples of ``jvp(grad(loss))`` dotted
  with each direction, written out with plain torch.func on the per-sample loss. Where plain
  torch.func cannot run the model (scaled_dot_product_attention has no forward-mode rule),
  ``method="reference"``: the same recipe under the engine's op substitutions (``extra_info``
  ``vmap_impl`` says which). Where neither runs, no baseline;
* ``symfast`` - ``per_sample_curvatures`` (K directions; second-order Taylor mode on the batch,
  traced once and replayed, see symfast.curvature.replay; forward over forward mode where the jets
  cannot follow, e.g. symfast.dcs's custom op). ``extra_info["path"]`` is the replay cache's path
  for the timed call.

``symfast`` runs last in each case and records in ``extra_info``: ``cost_per_direction`` (its
median / (K x fwdbwd median): its cost per direction in forward+backward units) and
``speedup_vs_vmap``, from this run's medians, and the same from interleaved rounds (fwdbwd,
symfast, vmap, fwdbwd, ...), which a burst of load on a shared machine skews less.

Cases (K = 3, float32 and float64): the README MLP 784-256-256-10 (B = 128); a gated model
Linear(64, 128) -> LayerNorm -> GELU -> Linear with weight symfast.dcs(w, u) -> Tanh -> Linear
(B = 128); a small CNN (B = 64, 3x16x16); a pre-norm transformer block (B = 64, T = 16); a tiny HF
Llama (B = 32, T = 16, next-token loss); a small HF ViTModel with a linear head (B = 32, 16x16
images). ``test_stationary_report``: stationary_report on the README MLP (B = 256) for a unit
permutation mirror, against fwdbwd.

Threads: every case runs with ``torch.set_num_threads(t)`` for t in ``SYMFAST_BENCH_THREADS``
(default ``1,2``; ids end in ``-t1`` / ``-t2``). On a busy shared machine prefer t = 1 (two OpenMP
threads stall at every barrier when another process holds a core) and quote the load.

    pytest benchmarks/test_bench_curvature.py -s --benchmark-columns=median,iqr,rounds
    python benchmarks/report.py --bench curvature          # the ratio table and a JSON record
    pytest benchmarks/test_bench_curvature.py --benchmark-disable -q   # every case runs once

Where a GPU is visible every curvature case also runs on CUDA (ids with ``-cuda``).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import symfast
from symfast.curvature import functional_loss, per_sample_curvatures, replay

from bench_utils import DEVICES, run_pedantic, sync

K = 3
INTERLEAVED_ROUNDS = 5
THREADS = [int(t) for t in os.environ.get("SYMFAST_BENCH_THREADS", "1,2").split(",") if t.strip()]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ============================================================ models
def _mlp():
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


class DcsLinear(nn.Module):
    """Linear whose weight is symfast.dcs(w, u) (the gated layer)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.u = nn.Parameter(torch.rand(d_out, d_in) + 0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return F.linear(x, symfast.dcs(self.w, self.u), self.bias)


def _gated():
    return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), DcsLinear(128, 128), nn.Tanh(),
                         nn.Linear(128, 10))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


class TransformerBlock(nn.Module):
    """Pre-norm block (LayerNorm, 4-head attention, LayerNorm, GELU MLP) and a linear head."""

    def __init__(self, d: int = 64, heads: int = 4, classes: int = 10):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


class LlamaLogits(nn.Module):
    """A tiny HF Llama (built from a config, no download) returning next-token logits [B, T, V]."""

    def __init__(self, vocab: int = 64):
        super().__init__()
        import transformers

        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                       max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                                       pad_token_id=None)
        self.model = transformers.LlamaForCausalLM(cfg)

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


class VitClassifier(nn.Module):
    """A small HF ViTModel (from a config) and a linear head on the [CLS] token."""

    def __init__(self, classes: int = 10):
        super().__init__()
        import transformers

        cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.vit = transformers.ViTModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.vit(pixel_values=x).last_hidden_state[:, 0])


def _token_ce(logits, targets):  # per-sample mean next-token cross-entropy, [B, T] -> [B, T]
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], tuple]  # (x, y) on the CPU, float32 where floating
    loss: Callable = None  # None: cross-entropy over classes

    @property
    def id(self) -> str:
        return f"{self.name}-B{self.batch}-K{K}"


CASES = [
    Case("mlp784-256-256-10", 128, _mlp, lambda B, g: (torch.randn(B, 784, generator=g),
                                                       torch.randint(0, 10, (B,), generator=g))),
    Case("gated-dcs", 128, _gated, lambda B, g: (torch.randn(B, 64, generator=g),
                                                 torch.randint(0, 10, (B,), generator=g))),
    Case("cnn-3x16x16", 64, _cnn, lambda B, g: (torch.randn(B, 3, 16, 16, generator=g),
                                                torch.randint(0, 10, (B,), generator=g))),
    Case("transformer-d64-h4-T16", 64, TransformerBlock, lambda B, g: (torch.randn(B, 16, 64, generator=g),
                                                                       torch.randint(0, 10, (B,), generator=g))),
    Case("llama-d64-L2-T16", 32, LlamaLogits, lambda B, g: (torch.randint(0, 64, (B, 16), generator=g),
                                                            torch.randint(0, 64, (B, 16), generator=g)),
         loss=_token_ce),
    Case("vit-16px-d64-L2", 32, VitClassifier, lambda B, g: (torch.randn(B, 3, 16, 16, generator=g),
                                                             torch.randint(0, 10, (B,), generator=g))),
]
IMPLS = ["fwdbwd", "vmap", "symfast"]  # symfast last: it reads the others' medians
_MEDIANS: Dict[str, Dict[str, float]] = {}
_VMAP_BROKEN: Dict[str, str] = {}

PARAMS = [
    pytest.param(c, dt, dev, t, id=f"{c.id}-{dt}-t{t}" + ("" if dev == "cpu" else f"-{dev}"))
    for dev in DEVICES for c in CASES for dt in DTYPES for t in THREADS
]


@pytest.fixture(autouse=True)
def trace_at_once():
    """The replay cache traces a program on its first call here, so the warm-up (untimed) traces and
    the timed rounds measure the steady state (replay, or the path the cache settled on)."""
    before = replay.cache_info()
    replay.configure(trace_after=0)
    yield
    replay.configure(trace_after=before.trace_after, maxsize=before.maxsize)


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    yield lambda t: torch.set_num_threads(t)
    torch.set_num_threads(before)


def _setup(case: Case, dtype: torch.dtype, device: str):
    # drawn on the CPU in the same order for every device and dtype, then moved
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = case.build()
    x, y = case.inputs(case.batch, gen)
    model = model.to(device=device, dtype=dtype).eval()
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    y = y.to(device)
    loss = case.loss or nn.CrossEntropyLoss(reduction="none")
    loss_fn, params = functional_loss(model, loss)
    dirs = {k: torch.randn((K,) + v.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            for k, v in params.items()}
    return model, loss, loss_fn, params, dirs, (x, y)


def _mean_loss(loss, out, y):
    return loss(out, y).mean()


def _torch_func_vmap(model, loss, params, dirs, x, y) -> Callable[[], torch.Tensor]:
    """Plain torch.func: vmap over samples of jvp(grad(per-sample loss)), dotted with each direction."""
    from torch.func import functional_call, grad, jvp, vmap

    def single(p, xi, yi):
        return loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).mean()

    def run():
        cols = []
        for k in range(K):
            n = {name: d[k] for name, d in dirs.items()}
            hv = vmap(lambda xi, yi: jvp(lambda p: grad(single)(p, xi, yi), (params,), (n,))[1])(x, y)
            cols.append(sum((hv[name] * n[name]).reshape(x.shape[0], -1).sum(1) for name in params))
        return torch.stack(cols, 1)

    return run


def _vmap_baseline(model, loss, loss_fn, params, dirs, x, y):
    """(callable, name) of the first vmap recipe that runs on this model, or (None, why)."""
    plain = _torch_func_vmap(model, loss, params, dirs, x, y)
    tries = [("torch.func", plain),
             ("method='reference'", lambda: per_sample_curvatures(loss_fn, params, dirs, (x, y), method="reference"))]
    errors = []
    for name, fn in tries:
        try:
            fn()
            return fn, name
        except Exception as exc:  # noqa: BLE001 - recorded: which recipe failed and why
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")
    return None, "; ".join(errors)


def _interleaved_medians(fns: Dict[str, Callable[[], object]], reset: Callable[[], None], rounds: int,
                         device: str = "cpu"):
    """Medians from rounds that run every implementation back to back (A B C A B C ...)."""
    times: Dict[str, list] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            reset()
            sync(device)
            start = time.perf_counter()
            out = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            del out
    return {k: statistics.median(v) for k, v in times.items()}


def _median(benchmark) -> Optional[float]:
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median  # None under --benchmark-disable


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,dtype_name,device,n_threads", PARAMS)
def test_curvature(benchmark, threads, case: Case, dtype_name: str, device: str, n_threads: int, impl: str):
    threads(n_threads)
    dtype = DTYPES[dtype_name]
    model, loss, loss_fn, params, dirs, (x, y) = _setup(case, dtype, device)
    key = f"{case.id}-{dtype_name}-t{n_threads}-{device}"
    benchmark.group = f"per-sample curvature {key}"
    benchmark.extra_info.update(bench="curvature", case=case.id, model=case.name, device=device, dtype=dtype_name,
                                impl=impl, batch=case.batch, K=K, threads=n_threads,
                                n_params=sum(p.numel() for p in params.values()))

    def fwdbwd():
        out = _mean_loss(loss, model(x), y)
        out.backward()
        return out

    def symfast_call():
        return per_sample_curvatures(loss_fn, params, dirs, (x, y))

    def reset():
        model.zero_grad(set_to_none=True)

    if impl == "vmap":
        fn, name = _vmap_baseline(model, loss, loss_fn, params, dirs, x, y)
        if fn is None:
            _VMAP_BROKEN[key] = name
            pytest.skip(f"no vmap recipe runs on this model: {name}")
        benchmark.extra_info["vmap_impl"] = name
    else:
        fn = fwdbwd if impl == "fwdbwd" else symfast_call
    out = run_pedantic(benchmark, fn, device, setup=reset)
    if impl != "fwdbwd":
        assert out.shape == (case.batch, K) and torch.isfinite(out).all()
    median = _median(benchmark)
    if median is not None:
        _MEDIANS.setdefault(key, {})[impl] = median
        benchmark.extra_info["median_s"] = median
    if impl != "symfast":
        return
    benchmark.extra_info["path"] = replay.cache_info().last_path
    fns = {"fwdbwd": fwdbwd, "symfast": symfast_call}
    vfn = None if key in _VMAP_BROKEN else _vmap_baseline(model, loss, loss_fn, params, dirs, x, y)[0]
    if vfn is not None:
        # the same quantity as the baseline. The paths sum in different orders, and along random
        # directions the curvature of a deep model cancels heavily (tiny Llama, float64: fast,
        # forward and reference agree to ~1e-7 of the largest value), hence the margins
        ref = vfn()
        tol = 1e-6 if dtype == torch.float64 else 2e-3
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
        fns["vmap"] = vfn
    else:
        benchmark.extra_info["vmap_impl"] = f"none ({_VMAP_BROKEN.get(key, '')})"
    m = _MEDIANS.get(key, {})
    line = f"\n{key}:"
    if median is not None and "fwdbwd" in m:
        cost = median / (K * m["fwdbwd"])
        benchmark.extra_info["cost_per_direction"] = round(cost, 3)
        line += f" symfast = {cost:.2f} x fwdbwd per direction"
    if median is not None and "vmap" in m:
        benchmark.extra_info["speedup_vs_vmap"] = round(m["vmap"] / median, 2)
        line += f", speed-up over vmap {m['vmap'] / median:.1f} x"
    if median is None:
        return  # --benchmark-disable: every path ran once, nothing to compare
    im = _interleaved_medians(fns, reset, rounds=INTERLEAVED_ROUNDS, device=device)
    benchmark.extra_info["interleaved_cost_per_direction"] = round(im["symfast"] / (K * im["fwdbwd"]), 3)
    line += f" | interleaved: {im['symfast'] / (K * im['fwdbwd']):.2f} x fwdbwd per direction"
    if "vmap" in im:
        benchmark.extra_info["interleaved_speedup_vs_vmap"] = round(im["vmap"] / im["symfast"], 2)
        line += f", speed-up {im['vmap'] / im['symfast']:.1f} x"
    print(line)


# ============================================================ stationary_report
@pytest.mark.parametrize("impl", ["fwdbwd", "stationary_report"])
@pytest.mark.parametrize("n_threads", THREADS, ids=[f"t{t}" for t in THREADS])
@pytest.mark.parametrize("rank", [None, 1, 4, 8], ids=["unit-permutation", "k1", "k4", "k8"])
def test_stationary_report(benchmark, threads, rank: Optional[int], n_threads: int, impl: str):
    """stationary_report on the README MLP (B = 256) at a point where hidden units 3 and 7 are equal:
    their unit permutation mirror (k = 1041), or its sub-mirror of ``rank`` columns that swaps the two
    units' outgoing weights into the first ``rank`` units of the next layer (part 1 holds for every
    sub-mirror of a mirror whose condition holds: its columns are some of the mirror's columns)."""
    from symfast import symmetry as S

    threads(n_threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = _mlp()
    x, y = torch.randn(256, 784, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    loss = nn.CrossEntropyLoss(reduction="none")
    loss_fn, params = functional_loss(model, loss)
    unit = S.unit_permutation_mirror(params, ["0.weight", "0.bias"], ["2.weight"], 3, 7)
    point = unit.symmetric_solution(params)
    if rank is None:
        mirror = unit
        key = f"stationary-mlp784-B256-t{n_threads}"
    else:
        mirror = S.permutation_mirror(params, ("2.weight", (slice(0, rank), 3)), ("2.weight", (slice(0, rank), 7)))
        key = f"stationary-mlp784-B256-k{rank}-t{n_threads}"
    benchmark.group = f"stationary_report {key}"
    benchmark.extra_info.update(bench="stationary", case=key, impl=impl, batch=256, threads=n_threads,
                                mirror_rank=mirror.rank, device="cpu", dtype="float32")

    def fwdbwd():
        out = loss(model(x), y).mean()
        out.backward()
        return out

    def report():
        return S.stationary_report(loss_fn, point, mirror, (x, y))

    fn = fwdbwd if impl == "fwdbwd" else report
    out = run_pedantic(benchmark, fn, "cpu", setup=lambda: model.zero_grad(set_to_none=True))
    median = _median(benchmark)
    if median is None:
        return
    _MEDIANS.setdefault(key, {})[impl] = median
    benchmark.extra_info["median_s"] = median
    if impl == "stationary_report":
        assert out.on_condition and out.grad_condition.max() <= 1e-5 * out.grad_norm.max()
        if "fwdbwd" in _MEDIANS[key]:
            cost = median / _MEDIANS[key]["fwdbwd"]
            benchmark.extra_info["cost_vs_fwdbwd"] = round(cost, 2)
            benchmark.extra_info["cost_per_direction"] = round(cost / mirror.rank, 3)
            print(f"\n{key}: stationary_report = {cost:.1f} x fwdbwd (k = {mirror.rank}; "
                  f"{cost / mirror.rank:.2f} x fwdbwd per direction)")
