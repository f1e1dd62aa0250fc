"""k-means for NMI and AMI, with the protocol of the SoftTriple paper's official evaluation.

The paper's NMI comes from scikit-learn's ``KMeans(n_clusters=number of test classes)`` with its
2019 defaults: k-means++ seeding, the best of 10 starts by inertia, at most 300 Lloyd iterations.
That is the default here (``backend="sklearn"``, ``starts=10``): every install has scikit-learn,
and the same embeddings and seed give the same clusters everywhere, faiss installed or not.

``backend="faiss"`` is an explicit, faster option for large data (Stanford Online Products):
the same protocol (k-means++ seeding written here, ``starts`` starts, the best by inertia), with
faiss running the Lloyd iterations. Its numbers are close to, not bitwise equal to, the default's.
Fewer ``starts`` or ``iterations`` are cheaper and are *not* the paper's protocol; every result
records the settings that produced it (``describe``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from softtriple.evaluation.knn import check_k

KMEANS_BACKENDS = ("sklearn", "faiss")


@dataclass
class KMeansSettings:
    """How NMI/AMI cluster the embeddings. The defaults are the official protocol."""

    backend: str = "sklearn"  # sklearn (default, every install) or faiss (faster, explicit)
    starts: int = 10  # k-means++ starts; the one with the lowest inertia is kept
    iterations: int = 300  # Lloyd iterations per start, at most
    init: str = "k-means++"  # or "random" (cheap at SOP size; not the paper's protocol)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the setting that is out of range."""
        if self.backend not in KMEANS_BACKENDS:
            raise ValueError(f"unknown k-means backend {self.backend!r}; valid: "
                             f"{', '.join(KMEANS_BACKENDS)}")
        if self.init not in ("k-means++", "random"):
            raise ValueError(f"unknown k-means init {self.init!r}; valid: k-means++, random")
        if self.starts < 1 or self.iterations < 1:
            raise ValueError(f"k-means starts and iterations must be >= 1; got {self.starts} "
                             f"and {self.iterations}")

    def describe(self) -> str:
        """One line for results files, e.g. 'sklearn k-means++, best of 10 starts, 300 iter'."""
        official = (self.starts, self.iterations, self.init) == (10, 300, "k-means++")
        protocol = "" if official else " (not the paper's)"
        return (f"{self.backend} {self.init}, best of {self.starts} starts, {self.iterations} "
                f"iterations{protocol}")


def kmeans_plus_plus(x: np.ndarray, n_clusters: int, rng: np.random.Generator,
                     block: int = 65_536) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur and Vassilvitskii 2007; the greedy form scikit-learn
    uses): (n_clusters, d) rows of ``x`` (N, d). Each step draws 2 + log(k) candidates with
    probability proportional to the squared distance to the nearest seed so far and keeps the one
    that lowers the total most. Distances update in blocks of ``block`` rows; memory O(N)."""
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n = data.shape[0]
    trials = 2 + int(np.log(n_clusters))
    norms = (data * data).sum(1)  # (N,)

    def sq_dist(rows: Tensor) -> Tensor:  # (N, m): squared distances of every x to rows (m, d)
        out = torch.empty(n, rows.shape[0])
        for start in range(0, n, block):
            part = slice(start, start + block)
            out[part] = (norms[part, None] - 2 * data[part] @ rows.T
                         + (rows * rows).sum(1)[None, :]).clamp_min_(0)
        return out

    chosen = [int(rng.integers(n))]
    nearest = sq_dist(data[chosen])[:, 0]  # (N,)
    for _ in range(1, n_clusters):
        weights = np.cumsum(nearest.double().numpy())
        if weights[-1] <= 0:  # every point sits on a seed: take any not yet chosen
            chosen.append(int(rng.choice(np.setdiff1d(np.arange(n), chosen))))
            nearest = torch.minimum(nearest, sq_dist(data[chosen[-1:]])[:, 0])
            continue
        picks = np.minimum(np.searchsorted(weights, rng.random(trials) * weights[-1]), n - 1)
        candidates = torch.minimum(nearest[:, None], sq_dist(data[picks]))  # (N, trials)
        best = int(candidates.sum(0).argmin())
        chosen.append(int(picks[best]))
        nearest = candidates[:, best].contiguous()
    return x[np.array(chosen)]


def _faiss_kmeans(x: np.ndarray, n_clusters: int, settings: KMeansSettings,
                  seed: int) -> np.ndarray:
    try:
        import faiss
    except ImportError as error:
        raise ValueError("evaluation.kmeans.backend is faiss but faiss is not installed; "
                         "pip install 'softtriple[faiss]' or use the sklearn backend") from error
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray] | None = None
    for start in range(settings.starts):
        km = faiss.Kmeans(x.shape[1], n_clusters, niter=settings.iterations, seed=seed + start,
                          verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=10_000_000)
        if settings.init == "k-means++":
            km.train(x, init_centroids=np.ascontiguousarray(kmeans_plus_plus(x, n_clusters, rng)))
        else:  # faiss's own start: random points
            km.train(x)
        inertia, assign = km.index.search(x, 1)
        total = float(inertia.sum())
        if best is None or total < best[0]:
            best = (total, assign[:, 0].astype(np.int64))
    assert best is not None
    return best[1]


def cluster_rows(x: np.ndarray, n_clusters: int, seed: int = 0,
                 settings: KMeansSettings = KMeansSettings()) -> np.ndarray:  # noqa: B008
    """Cluster ids (N,) int64 of the rows of ``x`` (N, d) as they are (``metrics.kmeans``
    L2-normalizes embeddings first)."""
    settings.check()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_clusters = check_k(n_clusters, x.shape[0], "n_clusters", "embeddings to cluster")
    if settings.backend == "faiss":
        return _faiss_kmeans(x, n_clusters, settings, seed)
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters, init=settings.init, n_init=settings.starts,
                   max_iter=settings.iterations, random_state=seed)
    return model.fit_predict(x).astype(np.int64)
