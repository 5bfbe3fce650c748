"""The figures of ``symfast train``: a run (loss against steps, and sparsity or the ranks kept), and a sweep's
sparsity / loss Pareto front (``--sweep``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

__all__ = ["plot_run", "plot_pareto"]


def plot_run(path: Path, histories: Dict[str, List[Dict[str, Any]]], main_steps: int, title: str,
             ranks=None) -> None:
    """``histories``: ``{phase: fit history}``; a phase named ``X_finetune`` continues the arm ``X`` after
    ``main_steps``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    dcs = histories["dcs"]
    a.plot([h["step"] for h in dcs], [h["loss"] for h in dcs], color="C0", alpha=0.35, lw=0.8, label="DCS train")
    arms = [p for p in histories if not p.endswith("finetune")]
    for i, arm in enumerate(arms):
        ft = histories.get(f"{arm}_finetune", [])
        pts = [(h["step"], h["val_loss"]) for h in histories[arm] if "val_loss" in h]
        pts += [(main_steps + h["step"], h["val_loss"]) for h in ft if "val_loss" in h]
        label = {"dense": "dense (the SVD baseline's start)"}.get(arm, arm)
        a.plot(*zip(*pts), "o-" if arm == "dcs" else ".-", color=f"C{i}", ms=3, label=f"{label} val")
    a.axvline(main_steps, color="0.6", lw=0.8, ls=":")
    a.set_xlabel("step (dotted: the masked fine-tune starts)")
    a.set_ylabel("loss")
    a.set_yscale("log")
    a.legend(fontsize=7)
    a.set_title("loss")
    if ranks:  # lowrank: nothing is zero; show the rank each exported layer keeps
        names = list(ranks)
        b.bar(range(len(names)), [r / full for r, full in ranks.values()], color="C0")
        b.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        b.set_ylim(0, 1)
        b.set_ylabel("rank kept / full rank")
        b.set_title("ranks of the exported DCS layers (= SVD baseline's)")
    else:
        pts = [(h["step"], h["sparsity"]) for h in dcs if "sparsity" in h]
        b.plot(*zip(*pts), "o-", color="C0", label="DCS (zero fraction after threshold)")
        b.set_ylim(0, 1)
        b.set_xlabel("step")
        b.set_ylabel("sparsity of converted weights")
        b.legend(fontsize=8)
        b.set_title("sparsity")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(path: Path, summary: Dict[str, Any]) -> None:
    """``summary``: :func:`symfast.train.sweep.summarize`'s dict. Left: val loss against the measured sparsity,
    one line per arm through its targets, at the seeds' means with their standard deviation as error bars
    (both axes); middle (when the task has one): the accuracy likewise; right: the paired same-seed
    difference of val loss DCS - baseline at each target (below 0: DCS is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [f"{t:g}" for t in summary["targets"]]
    arms = summary["arms_order"]
    acc = next((k for k in ("val_accuracy", "val_byte_accuracy") if k in summary["arms"]["dcs"][targets[0]]), None)
    panels = [("val_loss", "val loss")] + ([(acc, acc.replace("val_", "val ").replace("_", " "))] if acc else [])
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.2 * (len(panels) + 1), 4.2))
    for ax, (key, label) in zip(axes, panels):
        for i, arm in enumerate(arms):
            pts = [summary["arms"][arm][t] for t in targets]
            pts = [p for p in pts if key in p]
            if not pts:
                continue
            ax.errorbar([p["sparsity"]["mean"] for p in pts], [p[key]["mean"] for p in pts],
                        xerr=[p["sparsity"]["std"] or 0.0 for p in pts], yerr=[p[key]["std"] or 0.0 for p in pts],
                        fmt="o-" if arm == "dcs" else ".--", color=f"C{i}", ms=5 if arm == "dcs" else 4,
                        lw=1.6 if arm == "dcs" else 1.0, capsize=2, label=arm)
        ax.set_xlabel("sparsity of the converted weights (mean over seeds)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    ax = axes[-1]
    x = [float(t) for t in targets]
    for i, arm in enumerate(arms[1:], start=1):
        d = [summary["paired"][arm][t].get("val_loss") for t in targets]
        ax.errorbar(x, [v["mean"] for v in d], yerr=[v["std"] or 0.0 for v in d], fmt=".-", color=f"C{i}",
                    capsize=2, label=f"DCS - {arm}")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("target sparsity")
    ax.set_ylabel("val loss, DCS - baseline (same seed)")
    ax.set_title("below 0: DCS better", fontsize=9)
    if len(arms) > 1:
        ax.legend(fontsize=7)
    n = len(summary["seeds"])
    fig.suptitle(f"{summary['task']}, {summary['structure']}: {n} seed{'s' if n > 1 else ''} per target "
                 f"(error bars: standard deviation over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
