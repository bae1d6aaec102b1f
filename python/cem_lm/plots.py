"""Loss-curve plots; without matplotlib they are skipped with a notice, never a crash."""

from __future__ import annotations

import sys
from pathlib import Path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: matplotlib is not installed; skipping plots", file=sys.stderr)
        return None
    return plt


def plot_run(history: dict, path: Path, title: str) -> bool:
    """Train loss (per step) and val loss (per eval) of one run, in bits per byte."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["train_step"], history["train_bpb"], lw=0.8, alpha=0.6, label="train")
    ax.plot(history["val_step"], history["val_bpb"], marker="o", label="val")
    ax.set(xlabel="step", ylabel="bits per byte", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_val_curves(panels: dict[str, dict], path: Path, title: str) -> bool:
    """panels: group -> {variant: (steps, mean val bpb, std over seeds)}; one panel per group,
    one line and a ±std band per variant. The y-range leaves out the first, steep evaluations."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (group, curves) in zip(axes[0], panels.items()):
        tails = []
        for i, (name, (steps, mean, std)) in enumerate(curves.items()):
            color = cmap(i % 10)
            # A marker too: a grid with one evaluation per run has no line to draw.
            ax.plot(steps, mean, "-" if i < 10 else "--", color=color, label=name, lw=1.2, marker=".")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.12)
            tails += mean[len(mean) // 3 :]
        if tails and max(tails) > min(tails):
            low, high = min(tails), max(tails)
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.set(xlabel="step", ylabel="val bits per byte", title=group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_test_bpb(rows: list[tuple[str, float, float]], path: Path, title: str) -> bool:
    """rows: (variant, mean test bpb, std): one point with a ±std bar per variant (dots, not bars,
    because the differences are small next to the values)."""
    plt = _pyplot()
    if plt is None:
        return False
    names, means, stds = zip(*rows)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    ax.errorbar(means, range(len(rows)), xerr=stds, fmt="o", color="tab:blue", capsize=3)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="test bits per byte (mean ± std over seeds; lower is better)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
