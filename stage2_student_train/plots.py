"""PNG plots written at the end of a run: training curves and the reliability diagram."""

from __future__ import annotations

from pathlib import Path


def plot_run(out: Path, rows: list[dict], reliability: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rows:
        ep = [r["epoch"] for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        axes[0].plot(ep, [r.get("train_loss") for r in rows], marker="o")
        axes[0].set_title("train loss")
        axes[1].plot(ep, [r["top1"] for r in rows], marker="o", label="top-1")
        axes[1].plot(ep, [r["top5"] for r in rows], marker="o", label="top-5")
        axes[1].set_title("val accuracy (%)")
        axes[1].legend()
        axes[2].plot(ep, [r["ece"] for r in rows], marker="o")
        axes[2].set_title("val ECE")
        for a in axes:
            a.set_xlabel("epoch")
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=100)
        plt.close(fig)
    if reliability is not None:
        nb = len(reliability["acc"])
        centers = [(i + 0.5) / nb for i in range(nb)]
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.bar(centers, reliability["acc"], width=1 / nb, edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title("reliability (15 bins)")
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(out / "reliability.png", dpi=100)
        plt.close(fig)
