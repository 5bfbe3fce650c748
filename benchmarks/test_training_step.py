"""A training step of a converted model against the same model unconverted (CPU, batch 128).

Models: an MLP (784-256-256-10, ReLU) and a small CNN (two 3x3 convs with
ReLU and max-pooling, then a linear head) on 32x32x3 inputs. One step is
``zero_grad(set_to_none) -> forward -> cross-entropy -> backward -> SGD step``
(momentum 0.9). The DCS penalty is applied by the optimizer through
``symfast.param_groups`` (coupled weight decay 2 alpha); the plain model gets
the same kind of decay on its weights, so both steps do the same work apart
from the parametrization.

Implementations, in the same pytest-benchmark group per model:

* ``plain``    - the unconverted torch model;
* ``symfast``  - ``symfast.convert(model, structure=...)`` (fused ops);
* ``eager``    - the converted model with theta computed by the pure-PyTorch
  reference (``symfast.reference.dcs``, ``symfast.reference.dcs_group``);
* ``compiled`` - ``torch.compile(fullgraph=True)`` of that eager-reference model
  (elementwise only).

Each case records in ``extra_info``: ``peak_bytes``, the peak of tensor memory
allocated during one step above what was live before it (torch.profiler memory
events); ``saved_bytes``, the bytes of new storages autograd saves for backward
in one forward (``saved_tensors_hooks``; parameters saved as they are cost
nothing and are not counted); and for converted models ``dcs_saved_bytes`` and
``factor_bytes``: what computing all thetas saves for backward, against the
size of the factors. The assertion ``dcs_saved_bytes <= factor_bytes`` is the
memory target; symfast and the eager reference both save only the factors.

The profiler sees allocations made through torch's CPU allocator. symfast's
CPU kernels take outputs of 1 MiB or more from their own block cache
(``symfast.cpu_cache_info``), which the profiler does not see, so every theta
and gradient here is below 1 MiB (784x256 float32 = 784 KiB) and the case
checks that the cache handled no request during the measured step.

On CUDA (collected only where a GPU is visible): ``test_training_step_cuda``,
a ResNet18 for 32x32 inputs (``symfast.train.ResNet18``, 11.2M parameters, batch
norm left as it is) at batch 128 on random 3x32x32 inputs, ``plain`` against
``symfast`` (elementwise and group) and ``eager`` (elementwise). ``peak_bytes``
there is ``torch.cuda.max_memory_allocated()`` during one step above what was
allocated before it (the CPU cases' meaning), and ``cuda_max_memory_allocated``
the absolute peak (weights, optimizer state and batch included).

``test_phase_split`` splits the MLP's overhead into forward, backward and
optimizer step (per phase: median converted minus median plain, over
interleaved steps).

Run ``python benchmarks/test_training_step.py`` for the overhead/memory table
(it also writes ``benchmarks/results/training_step-<machine>.json``, or the
path given by ``--out PATH``; other arguments go to pytest, e.g. ``-k resnet18``
for the GPU cases only), or ``pytest benchmarks/test_training_step.py``.
Timings on a shared machine are noisy: read medians, and the recorded
``foreign_cpu_fraction``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import symfast
from symfast.conversion import convert, param_groups
import symfast.nn.structures as structures
from symfast import reference

from bench_utils import run_pedantic, sync

BATCH = 128
ALPHA = 5e-4
MIN_PAIRS = 150  # per paired-overhead case
MODELS = ("mlp", "cnn")
CASES = [
    ("plain", None),
    ("symfast", "elementwise"),
    ("eager", "elementwise"),
    ("compiled", "elementwise"),
    ("symfast", "group"),
    ("eager", "group"),
]


# The GPU cases: a real network, on CUDA only (see the module docstring).
CUDA_MODELS = ("resnet18",)
CUDA_CASES = [
    ("plain", None),
    ("symfast", "elementwise"),
    ("eager", "elementwise"),
    ("symfast", "group"),
]


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "resnet18":
        from symfast.models import ResNet18

        return ResNet18(num_classes=10)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )


def make_batch(kind: str):
    g = torch.Generator().manual_seed(1)
    shape = (BATCH, 1, 28, 28) if kind == "mlp" else (BATCH, 3, 32, 32)
    return torch.randn(shape, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def build(kind: str, impl: str, structure, monkeypatch=None, fused: bool = False, device: str = "cpu"):
    model = make_model(kind).to(device)
    if impl == "plain":
        groups = [{"params": [p for p in model.parameters() if p.dim() > 1], "weight_decay": 2 * ALPHA},
                  {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    else:
        convert(model, structure=structure, alpha=ALPHA, warn=False)
        groups = param_groups(model)
        if impl in ("eager", "compiled"):
            assert monkeypatch is not None
            monkeypatch.setattr(structures, "dcs", reference.dcs)
            monkeypatch.setattr(structures, "dcs_group", reference.dcs_group)
    # fused=False is torch's default on CPU (a loop over tensors); fused=True is
    # its one-kernel-per-tensor step (torch >= 2.4), the fast choice for both models.
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9, **({"fused": True} if fused else {}))
    run = torch.compile(model, fullgraph=True) if impl == "compiled" else model
    return model, run, opt


def train_step(model, run, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(run(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


# ---------------------------------------------------------------- memory
def peak_bytes(fn) -> int:
    """Peak of tensor memory allocated while fn runs, above what was live before (profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def saved_bytes(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn runs, except ``exclude``'s."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def dcs_memory(model) -> dict:
    """What computing every theta saves for backward, against the bytes of the factors."""
    parametrizations = [m for m in model.modules() if isinstance(m, structures.Structure)]
    factors = [p for s in parametrizations for p in s.parameters()]
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for s in parametrizations:
            s()
    factor_storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in factors}
    return {
        "dcs_saved_bytes": sum(saved.values()),
        "dcs_saved_new_bytes": sum(b for ptr, b in saved.items() if ptr not in factor_storages),
        "factor_bytes": sum(factor_storages.values()),
    }


def record_saved_memory(benchmark, model, run, impl, x, y) -> None:
    """What one forward saves for backward; for converted models also what the DCS ops save, which must be only
    the factors (the memory target)."""
    params = list(model.parameters())
    benchmark.extra_info["saved_bytes"] = saved_bytes(lambda: F.cross_entropy(run(x), y), exclude=params)
    if impl != "plain":
        mem = dcs_memory(model)
        benchmark.extra_info.update(mem)
        assert mem["dcs_saved_bytes"] <= mem["factor_bytes"], mem
        assert mem["dcs_saved_new_bytes"] == 0, mem


# ------------------------------------------------------------- benchmark
@pytest.mark.parametrize("impl,structure", CASES, ids=[f"{i}-{s}" if s else i for i, s in CASES])
@pytest.mark.parametrize("kind", MODELS)
def test_training_step(benchmark, kind, impl, structure, monkeypatch):
    model, run, opt = build(kind, impl, structure, monkeypatch)
    x, y = make_batch(kind)
    benchmark.group = f"training step {kind} batch={BATCH} cpu"
    benchmark.extra_info.update(model=kind, impl=impl, structure=structure or "none", batch=BATCH,
                                threads=torch.get_num_threads())

    for _ in range(2):  # warm up (compiles), then measure memory on a warm step
        train_step(model, run, opt, x, y)
    opt.zero_grad(set_to_none=True)
    cache = symfast.cpu_cache_info()
    benchmark.extra_info["peak_bytes"] = peak_bytes(lambda: train_step(model, run, opt, x, y))
    after = symfast.cpu_cache_info()
    assert (after["hits"], after["misses"]) == (cache["hits"], cache["misses"]), (
        "symfast's output cache served this step: the profiler would not see those blocks")
    record_saved_memory(benchmark, model, run, impl, x, y)

    run_pedantic(benchmark, lambda: train_step(model, run, opt, x, y), "cpu")


def cuda_peak_bytes(fn) -> tuple:
    """(peak above what was allocated before, absolute peak) of torch.cuda.max_memory_allocated while fn runs."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak - before, peak


if torch.cuda.is_available():  # defined only with a GPU: the CPU run collects the same cases as before

    @pytest.mark.parametrize("impl,structure", CUDA_CASES, ids=[f"{i}-{s}" if s else i for i, s in CUDA_CASES])
    @pytest.mark.parametrize("kind", CUDA_MODELS)
    def test_training_step_cuda(benchmark, kind, impl, structure, monkeypatch):
        device = "cuda"
        model, run, opt = build(kind, impl, structure, monkeypatch, device=device)
        x, y = (t.to(device) for t in make_batch(kind))
        benchmark.group = f"training step {kind} batch={BATCH} {device}"
        benchmark.extra_info.update(model=kind, impl=impl, structure=structure or "none", batch=BATCH,
                                    device=device, device_name=torch.cuda.get_device_name(0),
                                    n_params=sum(p.numel() for p in model.parameters()))

        for _ in range(3):  # warm up (cuDNN picks its algorithms, the allocator fills its pools)
            train_step(model, run, opt, x, y)
        opt.zero_grad(set_to_none=True)
        above, peak = cuda_peak_bytes(lambda: train_step(model, run, opt, x, y))
        benchmark.extra_info.update(peak_bytes=above, cuda_max_memory_allocated=peak)
        record_saved_memory(benchmark, model, run, impl, x, y)

        loss = run_pedantic(benchmark, lambda: train_step(model, run, opt, x, y), device)
        sync(device)
        assert torch.isfinite(loss).item()


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-fused"])
@pytest.mark.parametrize("structure", ["elementwise", "group"])
@pytest.mark.parametrize("kind", MODELS)
def test_overhead_paired(benchmark, kind, structure, optimizer):
    """Step-time overhead measured in interleaved pairs: plain step, converted step, plain, converted, ...

    On a shared machine the load changes from second to second; timing the two
    models back to back and taking the median of the per-pair ratios cancels
    most of it. The timed function is one pair; ``extra_info["overhead"]`` is
    median(converted / plain) - 1 over all pairs (target: <= 0.15).
    """
    import time

    fused = optimizer == "sgd-fused"
    plain = build(kind, "plain", None, fused=fused)
    converted = build(kind, "symfast", structure, fused=fused)
    x, y = make_batch(kind)
    ratios = []

    def pair():
        t0 = time.perf_counter()
        train_step(*plain, x, y)
        t1 = time.perf_counter()
        train_step(*converted, x, y)
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))

    benchmark.group = f"paired overhead {kind} {optimizer} batch={BATCH} cpu"
    # At least MIN_PAIRS pairs: a CNN pair takes ~50 ms, and the time budget
    # alone gave ~30 pairs, too few for a median that moves less than the target's margin.
    run_pedantic(benchmark, pair, "cpu", min_rounds=MIN_PAIRS)
    ratios.sort()
    overhead = ratios[len(ratios) // 2] - 1
    benchmark.extra_info.update(model=kind, impl="paired", structure=structure, optimizer=optimizer, batch=BATCH,
                                threads=torch.get_num_threads(), overhead=overhead, pairs=len(ratios),
                                overhead_q25=ratios[len(ratios) // 4] - 1,
                                overhead_q75=ratios[3 * len(ratios) // 4] - 1)


PHASES = ("forward", "backward", "optimizer")


def timed_phases(model, run, opt, x, y):
    """Seconds of (zero_grad + forward + loss, backward, optimizer step) of one training step."""
    import time

    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(run(x), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-fused"])
@pytest.mark.parametrize("structure", ["elementwise", "group"])
def test_phase_split(benchmark, structure, optimizer):
    """Where the MLP's overhead goes: per phase, the median converted time minus
    the median plain time over interleaved steps, in ``extra_info`` (seconds)."""
    import statistics

    fused = optimizer == "sgd-fused"
    plain = build("mlp", "plain", None, fused=fused)
    converted = build("mlp", "symfast", structure, fused=fused)
    x, y = make_batch("mlp")
    samples = {"plain": [], "symfast": []}

    def pair():
        samples["plain"].append(timed_phases(*plain, x, y))
        samples["symfast"].append(timed_phases(*converted, x, y))

    benchmark.group = f"phase split mlp {optimizer} batch={BATCH} cpu"
    run_pedantic(benchmark, pair, "cpu", min_rounds=MIN_PAIRS)
    med = {impl: [statistics.median(s[k] for s in rows) for k in range(len(PHASES))]
           for impl, rows in samples.items()}
    step = statistics.median(sum(s) for s in samples["plain"])
    benchmark.extra_info.update(model="mlp", impl="phases", structure=structure, optimizer=optimizer,
                                pairs=len(samples["plain"]), plain_step=step,
                                **{f"plain_{p}": med["plain"][k] for k, p in enumerate(PHASES)},
                                **{f"extra_{p}": med["symfast"][k] - med["plain"][k] for k, p in enumerate(PHASES)})
    assert all(t > 0 for t in med["plain"] + med["symfast"])


# ------------------------------------------------------------------ report
def _table(data: dict) -> str:
    rows, paired, phases = {}, [], []
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if info.get("impl") == "paired":
            paired.append(info)
            continue
        if info.get("impl") == "phases":
            phases.append(info)
            continue
        key = (info["model"], info["impl"], info["structure"])
        rows[key] = (b["stats"]["median"], info)
    # GPU rows add the device and the absolute peak (torch.cuda.max_memory_allocated);
    # a CPU-only table keeps its columns.
    gpu = any(info.get("device", "cpu") != "cpu" for _, info in rows.values())
    lines = ["| model | " + ("device | " if gpu else "") + "impl | structure | median step (ms) | vs plain | "
             "peak memory (MiB) | vs plain | " + ("max allocated (MiB) | " if gpu else "")
             + "saved for backward (MiB) | DCS saved / factors |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else "")]
    for (model, impl, structure), (median, info) in sorted(rows.items()):
        if (model, "plain", "none") not in rows:  # the baseline was deselected: no ratios
            base_t, base = float("nan"), {"peak_bytes": float("nan")}
        else:
            base_t, base = rows[(model, "plain", "none")]
        dcs = (f"{info['dcs_saved_bytes'] / info['factor_bytes']:.2f}" if "factor_bytes" in info else "-")
        dev = f"{info.get('device', 'cpu')} | " if gpu else ""
        peak_abs = info.get("cuda_max_memory_allocated")
        absolute = (f"{peak_abs / 2**20:.1f} | " if peak_abs is not None else "- | ") if gpu else ""
        lines.append(
            f"| {model} | {dev}{impl} | {structure} | {median * 1e3:.2f} | {median / base_t:.2f}x | "
            f"{info['peak_bytes'] / 2**20:.2f} | {info['peak_bytes'] / base['peak_bytes']:.2f}x | {absolute}"
            f"{info['saved_bytes'] / 2**20:.2f} | {dcs} |"
        )
    if paired:
        lines += ["", "| model | structure | optimizer | step-time overhead, median of interleaved pairs (IQR) | pairs |",
                  "|---|---|---|---|---|"]
        for info in sorted(paired, key=lambda i: (i["model"], i["structure"], i["optimizer"])):
            lines.append(f"| {info['model']} | {info['structure']} | {info['optimizer']} | {info['overhead']:+.1%} "
                         f"({info['overhead_q25']:+.1%} .. {info['overhead_q75']:+.1%}) | {info['pairs']} |")
    if phases:
        lines += ["", "| model | structure | optimizer | plain step (us) | "
                  + " | ".join(f"extra {p} (us, % of plain step)" for p in PHASES) + " |",
                  "|---|---|---|---|" + "---|" * len(PHASES)]
        for info in sorted(phases, key=lambda i: (i["structure"], i["optimizer"])):
            step = info["plain_step"]
            cells = " | ".join(f"{info['extra_' + p] * 1e6:+.0f} ({info['extra_' + p] / step:+.1%})" for p in PHASES)
            lines.append(f"| {info['model']} | {info['structure']} | {info['optimizer']} | {step * 1e6:.0f} | {cells} |")
    machine = data.get("machine_info", {}).get("symfast", {})
    lines.append("")
    if gpu:
        lines.append(f"GPU: {machine.get('cuda_device', '?')}, CUDA {machine.get('cuda_version', '?')}")
    lines.append(f"machine: {machine.get('cpu_model', '?')}, {machine.get('cores', '?')} cores, torch "
                 f"{machine.get('torch', torch.__version__)}, threads {machine.get('torch_threads', '?')}, "
                 f"foreign CPU load during the run: {machine.get('foreign_cpu_fraction', '?')}")
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse
    import subprocess
    import tempfile

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", type=Path, default=None)
    opts, argv = parser.parse_known_args(argv or [])
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={raw}", *argv]
        subprocess.run(cmd, cwd=here.parent, check=True)
        data = json.loads(raw.read_text())
    print(_table(data))
    sys.path.insert(0, str(here))
    from report import machine_slug

    slug = machine_slug(data["machine_info"].get("symfast", {}))
    out = opts.out or here / "results" / f"training_step-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"name": b["name"], "median_s": b["stats"]["median"], **b["extra_info"]} for b in data["benchmarks"]]
    out.write_text(json.dumps({"machine": data["machine_info"].get("symfast"), "datetime": data.get("datetime"),
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
