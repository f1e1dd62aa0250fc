"""RQ2, why: how multi-modal each data set's training classes are before any training, on the
frozen pretrained features the head protocol starts from (EfficientNet-Lite0, 1280-d, its
feature cache; L2-normalized), beside what several centers per class gained there.

For each class with at least 2K images: the share of its within-class variance that k-means with
K clusters explains (1 - within-cluster / within-class sum of squares; scikit-learn, k-means++,
3 starts), against the same measure on a unimodal null of the same size (that many points drawn
from one Gaussian with the class's own per-dimension variance): a class of well-separated modes
explains far more than its null, a blob about as much ("explained" / "null_explained", one null
a class, the previous session's measure, kept comparable). That null ignores how the features'
dimensions co-vary, and k-means finds structure in any elongated cloud, so the per-class test
uses a stricter one: K modes are *found* when a class's explained share exceeds the 95th
percentile of 20 nulls drawn from one Gaussian with the class's own mean and full covariance
(its sample covariance: as elongated as the class, with a single mode). A class's best K is the
largest K (2..10, with 2K images) found, 1 when none is.

Beside it, the gains of several centers measured on each data set (SoftTriple minus SoftMax-norm
or minus K = 1, R@1, paired seeds, from benchmarks/results/compare/*.json).

    .venv/bin/python benchmarks/class_modality.py glyphs:300 emoji fonts

Writes benchmarks/results/class_modality.json; docs/RESULTS.md quotes it.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
from data_baseline import builtin_split, pretrained_features
from sklearn.cluster import KMeans

from softtriple.atomic import write_json

RESULTS = Path(__file__).parent / "results" / "class_modality.json"
COMPARE = Path(__file__).parent / "results" / "compare"
KS = tuple(range(2, 11))
NULLS = 20
# (results file, a, b): the gains of several centers per class on each data set
GAINS = {
    "glyphs": [("glyphs_head.json", "SoftTriple", "SoftMax-norm"),
               ("glyphs_head.json", "SoftTriple lr=3e-4", "SoftMax-norm"),
               ("glyphs_finetune.json", "SoftTriple", "SoftMax-norm"),
               ("glyphs_finetune.json", "SoftTriple K=10", "SoftMax-norm")],
    "fonts": [("fonts_head.json", "SoftTriple", "SoftMax-norm"),
              ("fonts_head.json", "SoftTriple lr=3e-4", "SoftMax-norm"),
              ("fonts_finetune.json", "SoftTriple K=4", "SoftMax-norm"),
              ("fonts_finetune.json", "SoftTriple K=10", "SoftMax-norm")],
    "emoji": [("emoji_head.json", "SoftTriple", "SoftMax-norm"),
              ("emoji_centers.json", "SoftTriple", "SoftTriple K=1")],
}


def explained(x: np.ndarray, k: int, seed: int = 0) -> float:
    """Share of the within-class sum of squares that k-means with k clusters explains."""
    total = float(((x - x.mean(axis=0)) ** 2).sum())
    inertia = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x).inertia_
    return 1.0 - float(inertia) / total if total > 0 else 0.0


def blob(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A unimodal null of ``rows``: as many points from one Gaussian with their per-dimension
    mean and variance."""
    return rng.standard_normal(rows.shape) * rows.std(axis=0) + rows.mean(axis=0)


def covariance_blob(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A unimodal null of ``rows`` that keeps their shape: as many points from one Gaussian with
    their mean and sample covariance (n standard normals mixing the centered rows)."""
    n = len(rows)
    centered = rows - rows.mean(axis=0)
    return rows.mean(axis=0) + rng.standard_normal((n, n)) @ centered / np.sqrt(n - 1)


def modality(features: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float] | None:
    """Over the classes with >= 2k images: the mean explained share, its one-null mean, and the
    share of classes whose k modes are found (above the 95th percentile of NULLS covariance
    nulls); None when no class has 2k images."""
    rng, test_rng = np.random.default_rng(0), np.random.default_rng(1)
    real, null, found = [], [], []
    for c in np.unique(labels):
        rows = features[labels == c]
        if len(rows) < 2 * k:
            continue
        share = explained(rows, k)
        real.append(share)
        null.append(explained(blob(rows, rng), k))
        nulls = [explained(covariance_blob(rows, test_rng), k) for _ in range(NULLS)]
        found.append(share > float(np.percentile(nulls, 95)))
    if not real:
        return None
    return {"classes": len(real), "explained": statistics.mean(real),
            "null_explained": statistics.mean(null),
            "ratio": statistics.mean(real) / statistics.mean(null),
            "found_share": float(np.mean(found)), "found": [bool(f) for f in found]}


def best_k(per_k: dict[int, dict], labels: np.ndarray) -> dict[str, float]:
    """Each class's best K (the largest K whose modes are found, 1 when none is): the share of
    classes whose best K > 1, and the mean best K."""
    classes = np.unique(labels)
    sizes = {c: int((labels == c).sum()) for c in classes}
    best = dict.fromkeys(classes, 1)
    for k, result in per_k.items():
        if result is None:
            continue
        eligible = [c for c in classes if sizes[c] >= 2 * k]
        for c, hit in zip(eligible, result["found"], strict=True):
            if hit:
                best[c] = k
    values = np.array(list(best.values()))
    return {"share_best_k_above_1": float((values > 1).mean()), "mean_best_k": float(values.mean())}


def gains(name: str) -> list[dict]:
    """The R@1 gains of several centers measured on ``name`` (paired seeds, 95% interval)."""
    out = []
    for file, a, b in GAINS.get(name, []):
        path = COMPARE / file
        if not path.is_file():
            continue
        for pair in json.loads(path.read_text())["paired"]:
            if (pair["a"], pair["b"], pair["metric"]) == (a, b, "recall@1"):
                out.append({"suite": file.removesuffix(".json"), "a": a, "b": b,
                            "mean": pair["mean"], "ci95": pair["ci95"], "seeds": pair["n"]})
    return out


def main() -> None:
    results = {}
    for entry in sys.argv[1:] or ["glyphs:300", "emoji", "fonts"]:
        found = builtin_split(entry, "train")
        if found is None:
            continue
        name, table = found
        features = pretrained_features(name, table)
        features = features / np.linalg.norm(features, axis=1, keepdims=True)
        sizes = np.unique(table.labels, return_counts=True)[1]
        per_k = {k: modality(features, table.labels, k) for k in KS}
        results[entry] = {
            "train_images": len(table), "train_classes": len(sizes),
            "images_per_class": float(sizes.mean()), **best_k(per_k, table.labels),
            **{f"k={k}": None if r is None else {key: v for key, v in r.items() if key != "found"}
               for k, r in per_k.items()},
            "gains_of_several_centers": gains(name)}
        print(entry, {k: v for k, v in results[entry].items() if not k.startswith("k=")},
              flush=True)
    if not results:
        raise SystemExit("no data set measured: prepare them first (softtriple data prepare "
                         "NAME, from the repository root)")
    write_json(RESULTS, {"features": "efficientnet_lite0 pooled, pretrained (ImageNet)",
                         "nulls_per_class": NULLS,
                         "command": ".venv/bin/python benchmarks/class_modality.py "
                                    + " ".join(sys.argv[1:]), "data_sets": results})
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
