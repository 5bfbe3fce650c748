"""The figure of a ``symfast train`` run: loss against steps, and sparsity (or the ranks kept)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_run"]


def plot_run(path: Path, sparse_hist, dense_hist, ft_hist, steps: int, title: str, svd_hist=None,
          ranks=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    s = [h["step"] for h in sparse_hist]
    a.plot(s, [h["loss"] for h in sparse_hist], color="C0", alpha=0.35, lw=0.8, label="DCS train")
    a.plot(*zip(*[(h["step"], h["val_loss"]) for h in sparse_hist if "val_loss" in h]), "o-", color="C0",
           label="DCS val")
    a.plot([h["step"] for h in dense_hist], [h["loss"] for h in dense_hist], color="C1", alpha=0.35, lw=0.8,
           label="dense train")
    a.plot(*zip(*[(h["step"], h["val_loss"]) for h in dense_hist if "val_loss" in h]), "s-", color="C1",
           label="dense val")
    if ft_hist:
        a.plot(*zip(*[(steps + h["step"], h["val_loss"]) for h in ft_hist if "val_loss" in h]), "^-", color="C3",
               label="magnitude-pruned, fine-tune val")
    if svd_hist:
        a.plot(*zip(*[(steps + h["step"], h["val_loss"]) for h in svd_hist if "val_loss" in h]), "v-", color="C2",
               label="SVD-truncated, fine-tune val")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_yscale("log")
    a.legend(fontsize=8)
    a.set_title("loss")
    if ranks:  # lowrank: nothing is zero; show the rank each exported layer keeps
        names = list(ranks)
        b.bar(range(len(names)), [r / full for r, full in ranks.values()], color="C0")
        b.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        b.set_ylim(0, 1)
        b.set_ylabel("rank kept / full rank")
        b.set_title("ranks of the exported DCS layers (= SVD baseline's)")
    else:
        pts = [(h["step"], h["sparsity"]) for h in sparse_hist if "sparsity" in h]
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
