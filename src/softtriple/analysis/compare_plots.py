"""Pictures of a comparison suite's summary: bars with error bars per metric, and for a sweep
(variants with ``x``), Recall@1 and effective centers against x."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

BAR_METRICS = ("recall@1", "map_at_r", "nmi", "ami")


def plot_bars(summary: dict[str, Any], out: Path) -> Path | None:
    """One panel per metric: each variant's mean over seeds, error bars one std."""
    metrics = [m for m in BAR_METRICS
               if any(m in v["metrics"] for v in summary["variants"].values())]
    if not metrics:
        return None
    labels = list(summary["variants"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 3.8),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        stats = [summary["variants"][v]["metrics"].get(metric) for v in labels]
        means = [s["mean"] if s else np.nan for s in stats]
        stds = [s["std"] if s else 0.0 for s in stats]
        ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color="#4c72b0")
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        finite = [m for m in means if np.isfinite(m)]
        low = max(0.0, min(finite) - 0.1) if finite else 0.0
        ax.set(title=metric, ylim=(low, min(1.0, max(finite, default=1.0) + 0.05)))
        ax.grid(axis="y", alpha=0.3)
    counts = sorted({len(v["seeds"]) for v in summary["variants"].values() if v["seeds"]})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    fig.suptitle(f"mean ± std over {seeds} seeds", fontsize=10)
    fig.tight_layout()
    path = out / "bars.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweep(summary: dict[str, Any], out: Path) -> Path | None:
    """Recall@1 and effective centers per class against x, one line per group."""
    points = [(v["group"] or "", float(v["x"]), v) for v in summary["variants"].values()
              if v.get("x") is not None]
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    def order(group: str) -> tuple[float, str]:  # "tau=0.2" before "tau=1" before "tau=25"
        try:
            return float(group.rsplit("=", 1)[-1]), group
        except ValueError:
            return float("inf"), group

    for group in sorted({g for g, _, _ in points}, key=order):
        line = sorted((x, v) for g, x, v in points if g == group)
        xs = [x for x, _ in line]
        for ax, metric in zip(axes, ("recall@1", "effective_centers"), strict=True):
            stats = [v["metrics"].get(metric) for _, v in line]
            if not any(stats):
                continue
            ax.errorbar(xs, [s["mean"] if s else np.nan for s in stats],
                        yerr=[s["std"] if s else 0.0 for s in stats], marker="o", capsize=3,
                        label=group or None)
    xs_all = sorted({x for _, x, _ in points})
    axes[0].set(title="Recall@1", xlabel="K (centers per class)", xscale="log", xticks=xs_all)
    axes[1].plot(xs_all, xs_all, ":", color="grey", label="no merging (= K)")
    axes[1].set(title="effective centers per class (cosine > 0.9)",
                xlabel="K (centers per class)", xscale="log", yscale="log", xticks=xs_all,
                yticks=xs_all)
    for ax in axes:
        ax.set_xticklabels([f"{x:g}" for x in xs_all])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[1].set_yticklabels([f"{x:g}" for x in xs_all])
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_summary(summary: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [p for p in (plot_bars(summary, out), plot_sweep(summary, out)) if p is not None]
