"""RQ2, why: how multi-modal each data set's training classes are before any training, on the
frozen pretrained features the head protocol starts from (EfficientNet-Lite0, 1280-d, its
feature cache; L2-normalized).

For each class with at least 2K images: the share of its within-class variance that k-means with
K clusters explains (1 - within-cluster / within-class sum of squares; scikit-learn, k-means++,
3 starts), against the same measure on a unimodal null of the same size (that many points drawn
from one Gaussian with the class's own per-dimension variance): a class of well-separated modes
explains far more than its null, a blob about as much.

    .venv/bin/python benchmarks/class_modality.py glyphs:300 emoji fonts

Writes benchmarks/results/class_modality.json; docs/RESULTS.md quotes it.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
from data_baseline import builtin_split, pretrained_features
from sklearn.cluster import KMeans

from softtriple.atomic import write_json

RESULTS = Path(__file__).parent / "results" / "class_modality.json"
KS = (2, 4)


def explained(x: np.ndarray, k: int, seed: int = 0) -> float:
    """Share of the within-class sum of squares that k-means with k clusters explains."""
    total = float(((x - x.mean(axis=0)) ** 2).sum())
    inertia = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x).inertia_
    return 1.0 - float(inertia) / total if total > 0 else 0.0


def modality(features: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float] | None:
    """Mean explained share over the classes with >= 2k images, and its unimodal null (None when
    no class has 2k images)."""
    rng = np.random.default_rng(0)
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    real, null = [], []
    for c in np.unique(labels):
        rows = x[labels == c]
        if len(rows) < 2 * k:
            continue
        real.append(explained(rows, k))
        blob = rng.standard_normal(rows.shape) * rows.std(axis=0) + rows.mean(axis=0)
        null.append(explained(blob, k))
    if not real:
        return None
    return {"classes": len(real), "explained": statistics.mean(real),
            "null_explained": statistics.mean(null),
            "ratio": statistics.mean(real) / statistics.mean(null)}


def main() -> None:
    results = {}
    for entry in sys.argv[1:] or ["glyphs:300", "emoji"]:
        found = builtin_split(entry, "train")
        if found is None:
            continue
        name, table = found
        features = pretrained_features(name, table)
        sizes = np.unique(table.labels, return_counts=True)[1]
        results[entry] = {"train_images": len(table), "train_classes": len(sizes),
                          "images_per_class": float(sizes.mean()),
                          **{f"k={k}": modality(features, table.labels, k) for k in KS}}
        print(entry, results[entry], flush=True)
    write_json(RESULTS, {"features": "efficientnet_lite0 pooled, pretrained (ImageNet)",
                         "command": ".venv/bin/python benchmarks/class_modality.py "
                                    + " ".join(sys.argv[1:]), "data_sets": results})
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
