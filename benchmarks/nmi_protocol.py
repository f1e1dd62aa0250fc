"""Issue 16: NMI of one set of embeddings under different k-means protocols, and what each costs.

Clustered random unit embeddings with the CUB-2011 test shape at the paper's 64-d (5,924 x 64,
100 classes: class means on the sphere, Gaussian noise, normalized), three seeds. Compared:
the old default (faiss, random start, one run of 20 iterations), scikit-learn's k-means++ with
one start, the new default (scikit-learn, k-means++, best of 10 starts: the official protocol),
the faiss backend with the same protocol (our k-means++ seeding, 10 starts, best by inertia) and
the torch backend with it too (on the rows' device: here the CPU, the code a GPU runs).

    .venv/bin/python benchmarks/nmi_protocol.py [--json FILE] [--noisy]

Writes benchmarks/results/nmi_protocol.json (or FILE) with the machine's conditions (CPU, BLAS,
threads, load; refused on a busy machine unless --noisy); docs/PERFORMANCE.md quotes it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from conditions import Conditions

from softtriple.atomic import write_json
from softtriple.evaluation import KMeansSettings, normalized_mutual_info
from softtriple.evaluation.clustering import cluster_rows

RESULTS = Path(__file__).parent / "results" / "nmi_protocol.json"
N, D, CLASSES, NOISE = 5_924, 64, 100, 0.25


def embeddings(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, N)
    means = rng.standard_normal((CLASSES, D))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    x = means[labels] + NOISE * rng.standard_normal((N, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def old_default(x: np.ndarray, seed: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(D, CLASSES, niter=20, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=10_000_000)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0]


PROTOCOLS = {
    "old default: faiss, random start, 1 run, 20 iterations": old_default,
    "sklearn, k-means++, 1 start":
        lambda x, s: cluster_rows(x, CLASSES, s, KMeansSettings(starts=1)),
    "new default: sklearn, k-means++, best of 10 (official)":
        lambda x, s: cluster_rows(x, CLASSES, s, KMeansSettings()),
    "faiss backend: our k-means++, best of 10":
        lambda x, s: cluster_rows(x, CLASSES, s, KMeansSettings(backend="faiss")),
    "torch backend: our k-means++, best of 10":
        lambda x, s: cluster_rows(x, CLASSES, s, KMeansSettings(backend="torch")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--noisy", action="store_true",
                        help="measure on a busy machine (the results say so)")
    args = parser.parse_args()
    conditions = Conditions.start(threads=None, allow_noisy=args.noisy)
    rows = []
    for name, cluster in PROTOCOLS.items():
        scores, seconds = [], []
        for seed in range(3):
            x, labels = embeddings(seed)
            start = time.perf_counter()
            clusters = cluster(x, seed)
            seconds.append(time.perf_counter() - start)
            scores.append(normalized_mutual_info(labels, clusters))
        rows.append({"protocol": name, "nmi": scores, "seconds": seconds})
        print(f"{name:<58} NMI {' '.join(f'{s:.3f}' for s in scores)}   "
              f"{np.median(seconds):.2f} s")
    write_json(args.json, {"conditions": conditions.finish(), "shape": [N, D],
                           "classes": CLASSES, "noise": NOISE, "rows": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
