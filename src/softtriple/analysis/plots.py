"""Pictures of a run (matplotlib, Agg backend): training curves, a retrieval gallery, an
embedding map, and what each SoftTriple center learned."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image


def plot_curves(history: list[dict[str, Any]], out: Path) -> Path:
    """Loss, learning rates, and Recall@1 / NMI at each evaluation, against the epoch."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    train = [h for h in history if "train/loss" in h]
    axes[0].plot([h["epoch"] for h in train], [h["train/loss"] for h in train], "o-")
    axes[0].set(title="training loss", xlabel="epoch", ylabel="mean loss")
    for key in sorted({k for h in train for k in h if k.startswith("lr/")}):
        axes[1].plot([h["epoch"] for h in train], [h[key] for h in train], "o-",
                     label=key.removeprefix("lr/"))
    axes[1].set(title="learning rates", xlabel="epoch", yscale="log")
    evals = [h for h in history if "test/recall@1" in h]
    for key, label in (("test/recall@1", "Recall@1"), ("test/nmi", "NMI"),
                       ("test/ami", "AMI"), ("test/map_at_r", "MAP@R")):
        points = [(h["epoch"], h[key]) for h in evals if key in h]
        if points:
            axes[2].plot(*zip(*points, strict=True), "o-", label=label)
    axes[2].set(title="held-out classes", xlabel="epoch", ylim=(0, 1))
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend()
    if axes[2].get_legend_handles_labels()[0]:  # beside the panel: its curves fill 0 to 1
        axes[2].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _thumb(path: str, size: int, frame: str | None) -> np.ndarray:
    with Image.open(path) as image:
        tile = image.convert("RGB").resize((size, size))
    array = np.asarray(tile).copy()
    if frame is not None:
        color = {"green": (0, 170, 0), "red": (220, 0, 0), "blue": (30, 80, 220)}[frame]
        array[:3], array[-3:], array[:, :3], array[:, -3:] = color, color, color, color
    return array


def plot_gallery(embeddings: np.ndarray, labels: np.ndarray, paths: list[str], out: Path,
                 queries: int = 8, k: int = 8, seed: int = 0) -> Path:
    """A fixed sample of queries (blue frame), each with its top k neighbours framed green when
    they share the query's class and red when not."""
    from softtriple.evaluation import knn

    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(labels), min(queries, len(labels)), replace=False))
    _, index = knn(embeddings[chosen], k + 1, gallery=embeddings)
    size = 72
    rows = []
    for q, neighbours in zip(chosen, index.cpu().numpy(), strict=True):
        neighbours = [n for n in neighbours if n != q][:k]
        tiles = [_thumb(paths[q], size, "blue"), np.full((size, 8, 3), 255, np.uint8)]
        tiles += [_thumb(paths[n], size, "green" if labels[n] == labels[q] else "red")
                  for n in neighbours]
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    path = out / "retrieval.png"
    Image.fromarray(grid).save(path)
    return path


def plot_embedding_map(embeddings: np.ndarray, labels: np.ndarray, out: Path,
                       classes: int = 20, seed: int = 0) -> Path:
    """t-SNE (UMAP when installed) of the held-out images of a sample of classes."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(np.unique(labels), min(classes, len(np.unique(labels))), replace=False)
    mask = np.isin(labels, picked)
    x, y = embeddings[mask], labels[mask]
    try:
        import umap  # type: ignore[import-not-found]
        xy = umap.UMAP(random_state=seed).fit_transform(x)
        method = "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE
        xy = TSNE(perplexity=min(30.0, max(2.0, (len(x) - 1) / 3)), init="pca",
                  random_state=seed).fit_transform(x)
        method = "t-SNE"
    fig, ax = plt.subplots(figsize=(6.5, 6))
    colors = plt.get_cmap("tab20")(np.searchsorted(np.sort(picked), y) % 20)
    ax.scatter(xy[:, 0], xy[:, 1], c=colors, s=14)
    ax.set(title=f"{method} of {len(picked)} held-out classes ({len(x)} images)",
           xticks=[], yticks=[])
    fig.tight_layout()
    path = out / "embedding_map.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_effective_centers(counts: np.ndarray, k: int, threshold: float, out: Path) -> Path:
    """Histogram of the effective number of centers per training class."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(counts, bins=[b + 0.5 for b in range(k + 1)], rwidth=0.85)
    ax.set(title=f"effective centers per class (cosine > {threshold}; mean "
                 f"{counts.mean():.2f} of K = {k})", xlabel="centers after merging",
           ylabel="classes", xticks=range(1, k + 1))
    fig.tight_layout()
    path = out / "effective_centers.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_center_images(assignments: list[tuple[str, list[list[str]]]], out: Path,
                       per_center: int = 6) -> Path:
    """For a few training classes, one row per center: the images that center attracts most."""
    size = 56
    rows, names = [], []
    for class_name, centers in assignments:
        for j, images in enumerate(centers):
            tiles = [_thumb(p, size, None) for p in images[:per_center]]
            tiles += [np.full((size, size, 3), 255, np.uint8)] * (per_center - len(tiles))
            rows.append(np.concatenate(tiles, axis=1))
            names.append(f"{class_name} / center {j}")
    fig, ax = plt.subplots(figsize=(per_center * 0.9 + 2.2, len(rows) * 0.8 + 0.6))
    ax.imshow(np.concatenate(rows, axis=0))
    ax.set_yticks([size * (i + 0.5) for i in range(len(rows))], names, fontsize=7)
    ax.set_xticks([])
    ax.set_title("training images each center attracts most (centers with none omitted)")
    fig.tight_layout()
    path = out / "center_images.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
