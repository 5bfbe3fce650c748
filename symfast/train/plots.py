"""The figure of a ``symfast train`` run: loss against steps, and sparsity (or the ranks kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

__all__ = ["plot_run"]


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
