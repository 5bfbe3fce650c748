r"""``symfast train --sweep``: the sparsity / loss Pareto front of DCS and its baselines, over seeds.

One :func:`~symfast.train.task.run` per (target sparsity, seed): DCS steered to the target by
``--target-sparsity``, and in the same run every baseline at the sparsity the DCS model reached
(each run already trains them, so the sweep adds no baseline run of its own). The runs live in
``OUT/target<S>-seed<N>/``; a run whose ``metrics.json`` holds the sweep's settings is read, not
trained again, and one interrupted with its checkpoints is resumed, so rerunning an interrupted
sweep continues where it stopped.

``OUT/pareto.json`` (:func:`summarize`) holds, per arm and target, each seed's sparsity, val loss
and accuracy with their mean and spread, and the paired same-seed differences DCS - baseline
(paired because both arms of one run share the seed's initialization, batches and data split, so
the differences vary less than the arms do); ``OUT/pareto.png`` (:func:`~symfast.train.plots.plot_pareto`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from .checkpoints import RESUME_MAY_DIFFER, config_dict
from .plots import plot_pareto
from .task import TrainConfig, run

__all__ = ["DEFAULT_TARGETS", "sweep", "summarize", "run_dir", "SWEEP_STRUCTURES"]

#: ``--targets`` when not given: from where magnitude pruning is easy to where it usually collapses.
DEFAULT_TARGETS = (0.5, 0.75, 0.9, 0.95)
#: Structures whose result is a sparsity (lowrank zeroes nothing: its front is ranks, not zeros).
SWEEP_STRUCTURES = ("elementwise", "group")
#: The metrics of each arm in ``pareto.json`` (an accuracy is there when the task has it).
METRICS = ("sparsity", "val_loss", "val_accuracy", "val_byte_accuracy")


def run_dir(out: Path, target: float, seed: int) -> Path:
    return Path(out) / f"target{target:g}-seed{seed}"


def _spread(values: Dict[str, float]) -> Dict[str, Any]:
    """``{"per_seed", "mean", "std", "min", "max", "n"}``; ``std`` is the sample standard deviation (``None``
    with one seed)."""
    v = list(values.values())
    return {"per_seed": values, "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
            "min": min(v), "max": max(v), "n": len(v)}


def _arm_metrics(m: Dict[str, Any], arm: str) -> Dict[str, Optional[float]]:
    d = m if arm == "dcs" else m["baselines"][arm]
    return {k: d.get(k) for k in METRICS}


def summarize(metrics: Dict[float, Dict[int, Dict[str, Any]]], *, dirs: Optional[Dict[float, Dict[int, str]]] = None
              ) -> Dict[str, Any]:
    """``pareto.json`` from the runs' metrics ``{target: {seed: metrics.json}}``.

    ``arms[arm][target][metric]`` (metric: ``sparsity``, ``val_loss`` and the task's accuracy) is
    :func:`_spread` of the seeds' values; ``paired[baseline][target][metric]`` the same of the
    per-seed differences ``DCS - baseline`` (val loss: negative means DCS is better; accuracy:
    positive), with ``dcs_better``: the number of seeds where DCS is better. Targets are keyed by
    ``f"{target:g}"``, seeds by ``str(seed)``.
    """
    targets = sorted(metrics)
    seeds = sorted({s for t in targets for s in metrics[t]})
    first = metrics[targets[0]][seeds[0]]
    baselines = list(first["baselines"])
    arms: Dict[str, Any] = {}
    for arm in ["dcs", *baselines]:
        arms[arm] = {}
        for t in targets:
            per = {s: _arm_metrics(metrics[t][s], arm) for s in sorted(metrics[t])}
            arms[arm][f"{t:g}"] = {k: _spread({str(s): v[k] for s, v in per.items()})
                                   for k in METRICS if all(v[k] is not None for v in per.values())}
    paired: Dict[str, Any] = {}
    for arm in baselines:
        paired[arm] = {}
        for t in targets:
            key, entry = f"{t:g}", {}
            for k in METRICS[1:]:
                if k not in arms[arm][key] or k not in arms["dcs"][key]:
                    continue
                dcs, base = arms["dcs"][key][k]["per_seed"], arms[arm][key][k]["per_seed"]
                diff = _spread({s: dcs[s] - base[s] for s in dcs})
                better = [d < 0 if k == "val_loss" else d > 0 for d in diff["per_seed"].values()]
                entry[k] = {**diff, "dcs_better": sum(better)}
            paired[arm][key] = entry
    return {
        "task": first["task"],
        "structure": first["structure"],
        "targets": targets,
        "seeds": seeds,
        "arms_order": ["dcs", *baselines],
        "config": {k: v for k, v in first["config"].items() if k not in ("seed", "target_sparsity")},
        "runs": dirs,
        "arms": arms,
        "paired": paired,
    }


def _same_settings(saved: Dict[str, Any], cfg: TrainConfig) -> bool:
    now = json.loads(json.dumps(config_dict(cfg)))  # as the run wrote it (tuples become lists)
    return all(saved.get(k) == v for k, v in now.items() if k not in RESUME_MAY_DIFFER)


def sweep(base: TrainConfig, out: str | os.PathLike, *, targets: Sequence[float] = DEFAULT_TARGETS,
          seeds: Sequence[int] = (0, 1, 2), progress: bool = True, device=None,
          note: Callable[[str], None] = print) -> Dict[str, Any]:
    """Runs :func:`~symfast.train.task.run` for every target sparsity and seed (the settings of ``base`` otherwise),
    writes ``out/pareto.json`` and ``out/pareto.png`` and returns the summary (:func:`summarize`).

    A run directory whose ``metrics.json`` was written with the same settings is reused as it is;
    one holding checkpoints of the same settings (an interrupted run) is resumed; anything else
    there is replaced (:func:`run` without ``resume`` starts clean). ``note`` receives one line per
    reused or resumed run.
    """
    targets, seeds = [float(t) for t in targets], [int(s) for s in seeds]
    if not targets or not all(0 < t < 1 for t in targets) or len({f"{t:g}" for t in targets}) != len(targets):
        # distinct as written (6 significant digits): each names its run directory and its pareto.json key
        raise ValueError(f"symfast train --sweep: targets must be distinct numbers in (0, 1), got {targets}")
    if not seeds or not all(s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"symfast train --sweep: seeds must be distinct integers >= 0, at least one, got {seeds}")
    if base.structure not in SWEEP_STRUCTURES:
        raise ValueError(f"symfast train --sweep: structure must be one of {SWEEP_STRUCTURES} (a sweep over target "
                         f"sparsities), got {base.structure!r}")
    if base.target_sparsity is not None:
        raise ValueError("symfast train --sweep: give the targets with targets=..., not target_sparsity")
    out = Path(out)
    jobs = [(t, s) for t in targets for s in seeds]
    metrics: Dict[float, Dict[int, Dict[str, Any]]] = {t: {} for t in targets}
    dirs: Dict[str, Dict[str, str]] = {f"{t:g}": {} for t in targets}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="sweep (target, seed)", dynamic_ncols=True)
    try:
        for t, s in jobs:
            cfg = dataclasses.replace(base, seed=s, target_sparsity=t).resolved()
            d = run_dir(out, t, s)
            if bar is not None:
                bar.set_postfix(target=f"{t:g}", seed=s)
            done = d / "metrics.json"
            m = json.loads(done.read_text()) if done.exists() else None
            if m is not None and _same_settings(m["config"], cfg):
                note(f"symfast train --sweep: {d} is finished with these settings: reused, not trained again")
            else:
                ck = d / "checkpoints" / "config.json"
                resume = m is None and ck.exists() and _same_settings(json.loads(ck.read_text()), cfg)
                if resume:
                    note(f"symfast train --sweep: resuming the interrupted run in {d}")
                m = run(cfg, d, resume=resume, progress=progress, device=device)
            metrics[t][s] = m
            dirs[f"{t:g}"][str(s)] = d.name
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(metrics, dirs=dirs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    plot_pareto(out / "pareto.png", summary)
    return summary
