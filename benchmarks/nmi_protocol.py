"""Issue 16: NMI of one set of embeddings under different k-means protocols, and what each costs.

Clustered random unit embeddings with the CUB-2011 test shape at the paper's 64-d (5,924 x 64,
100 classes: class means on the sphere, Gaussian noise, normalized), three seeds. Compared:
the old default (faiss, random start, one run of 20 iterations), scikit-learn's k-means++ with
one start, the new default (scikit-learn, k-means++, best of 10 starts: the official protocol),
the faiss backend with the same protocol (our k-means++ seeding, 10 starts, best by inertia) and
the torch backend with it too (on the rows' device: here the CPU, the code a GPU runs).

Then the torch backend's assignment step (each row's nearest center, once per Lloyd iteration)
at Stanford Online Products' size (60,502 x 512 rows, 11,316 centers), against the product of
rows and centers alone (its floor) and against the distances written out as
|x|^2 - 2 x . c + |c|^2 (three more passes over the (N, k) distances; the code before
2026-12-07's last session): median of 3 warm calls each (``assign_times``; benchmarks/gpu.py's
kmeans part times the same on a GPU).

    .venv/bin/python benchmarks/nmi_protocol.py [--json FILE] [--noisy]

Writes benchmarks/results/nmi_protocol.json (or FILE) with the machine's conditions (CPU, BLAS,
threads, load; refused on a busy machine unless --noisy); docs/PERFORMANCE.md quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conditions import Conditions
from steps import device_sync

from softtriple.atomic import write_json
from softtriple.evaluation import KMeansSettings, clustering, normalized_mutual_info
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


SOP_ASSIGN = (60_502, 512, 11_316)  # rows, width, centers


def written_out_assign(x: torch.Tensor, norms: torch.Tensor,
                       centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment with the distances written out, |x|^2 - 2 x . c + |c|^2, in the same
    blocks as ``clustering._assign``: the reference its one-product form is timed against."""
    block = max(1, clustering.ASSIGN_ELEMENTS // centers.shape[0])
    center_norms = (centers * centers).sum(1)
    labels, distances = [], []
    for start in range(0, x.shape[0], block):
        part = slice(start, start + block)
        d = norms[part, None] - 2 * x[part] @ centers.T + center_norms[None, :]
        nearest = d.min(dim=1)
        labels.append(nearest.indices)
        distances.append(nearest.values.clamp_min(0))
    return torch.cat(labels), torch.cat(distances)


def assign_times(device: torch.device, size: tuple[int, int, int] = SOP_ASSIGN,
                 reps: int = 3) -> dict[str, Any]:
    """Median seconds of ``clustering._assign`` (the torch backend's), the written-out
    distances and the product alone, on ``device``, at ``size`` (rows, width, centers: unit
    rows, centers drawn from them), and whether the two assignments agree."""
    n, d, k = size
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)
    centers = x[torch.randperm(n, generator=g)[:k].to(device)]
    norms = (x * x).sum(1)
    block = max(1, clustering.ASSIGN_ELEMENTS // k)
    sync = device_sync(device)

    def product() -> None:
        for start in range(0, n, block):
            x[start:start + block] @ centers.T

    steps: dict[str, Callable[[], Any]] = {
        "assign": lambda: clustering._assign(x, norms, centers),
        "written_out": lambda: written_out_assign(x, norms, centers), "product": product}
    out: dict[str, Any] = {"rows": n, "width": d, "centers": k, "device": str(device)}
    for name, step in steps.items():
        step()  # warm
        seconds = []
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            step()
            sync()
            seconds.append(time.perf_counter() - start)
        out[f"{name}_seconds"] = statistics.median(seconds)
    for name in ("assign", "written_out"):
        out[f"{name}_over_product"] = out[f"{name}_seconds"] / out["product_seconds"]
    ours, written = clustering._assign(x, norms, centers), written_out_assign(x, norms, centers)
    out["same_labels_fraction"] = float((ours[0] == written[0]).float().mean())
    return out


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
    assign = assign_times(torch.device("cpu"))
    print(f"torch backend's assignment at SOP's size: {assign['assign_over_product']:.2f}x the "
          f"product alone ({assign['assign_seconds']:.2f} s), written out "
          f"{assign['written_out_over_product']:.2f}x; same labels "
          f"{assign['same_labels_fraction']:.4f}")
    write_json(args.json, {"conditions": conditions.finish(), "shape": [N, D],
                           "classes": CLASSES, "noise": NOISE, "rows": rows,
                           "assign_sop": assign})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
