"""k-means for NMI and AMI, with the protocol of the SoftTriple paper's official evaluation.

The paper's NMI comes from scikit-learn's ``KMeans(n_clusters=number of test classes)`` with its
2019 defaults: k-means++ seeding, the best of 10 starts by inertia, at most 300 Lloyd iterations.
That is the default here for embeddings on the CPU (``backend="auto"``, ``starts=10``): every
install has scikit-learn, and the same embeddings and seed give the same clusters everywhere,
faiss installed or not. Embeddings on a GPU (the trainer's and ``softtriple evaluate``'s, on a GPU
machine) are clustered there by default by the torch backend below, the same protocol: scikit-learn
runs on the host, where the paper's protocol takes over 10 minutes at Stanford Online Products'
size. ``backend="sklearn"`` asks for scikit-learn on any device.

``backend="faiss"`` is an explicit, faster option for large data (Stanford Online Products):
the same protocol (k-means++ seeding written here, ``starts`` starts, the best by inertia), with
faiss running the Lloyd iterations. ``backend="torch"`` runs the same protocol in torch on the
embeddings' own device (a GPU's, where they are on one; no faiss needed): greedy k-means++ as
here, then Lloyd iterations as scikit-learn's (its tolerance, 1e-4 of the rows' mean variance, an
empty cluster moved to the row farthest from its center), each center the mean of its rows summed
in a fixed order, so the same rows and seed give the same clusters on a device, run after run.
Both are close to, not bitwise equal to, the default's numbers.
Fewer ``starts`` or ``iterations`` are cheaper and are *not* the paper's protocol; every result
records the settings that produced it (``describe``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from softtriple.evaluation.float32 import float32_products
from softtriple.evaluation.knn import check_k

KMEANS_BACKENDS = ("auto", "sklearn", "faiss", "torch")


@dataclass
class KMeansSettings:
    """How NMI/AMI cluster the embeddings. The defaults are the official protocol."""

    backend: str = "auto"  # auto: sklearn for embeddings on the CPU, torch for those on a GPU
    # (clustered there); or sklearn (every install, any device: copied to the host), faiss, torch
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

    def resolved(self, device: torch.device) -> KMeansSettings:
        """These settings with ``auto`` made concrete for rows on ``device``: scikit-learn on
        the CPU, torch on any other device (the rows clustered where they are)."""
        if self.backend != "auto":
            return self
        return dataclasses.replace(self, backend="sklearn" if device.type == "cpu" else "torch")

    def describe(self) -> str:
        """One line for results files, e.g. 'sklearn k-means++, best of 10 starts, 300 iter'
        (the backend as given: describe ``resolved`` settings to name the one that ran)."""
        official = (self.starts, self.iterations, self.init) == (10, 300, "k-means++")
        protocol = "" if official else " (not the paper's)"
        starts = "1 start" if self.starts == 1 else f"best of {self.starts} starts"
        return (f"{self.backend} {self.init}, {starts}, {self.iterations} "
                f"iterations{protocol}")


def kmeans_plus_plus(x: np.ndarray | Tensor, n_clusters: int, rng: np.random.Generator,
                     block: int = 65_536, on_device: bool | None = None) -> np.ndarray | Tensor:
    """Greedy k-means++ seeding (Arthur and Vassilvitskii 2007; the greedy form scikit-learn
    uses): (n_clusters, d) rows of ``x`` (N, d), numpy or a float32 tensor on any device (the
    distances computed there). Each step draws 2 + log(k) candidates with probability
    proportional to the squared distance to the nearest seed so far and keeps the one that lowers
    the total most. Distances update in blocks of ``block`` rows; memory O(N).

    ``on_device`` (default: where ``x`` is not on the CPU): the draws' cumulative weights and
    choices stay on the device, the random numbers drawn up front in the host path's order, so
    that no step waits for the device (the host path copies N distances to the host each step:
    11,316 waits and copies a start at SOP's size). The same seeds as the host path where no
    float rounding of the cumulative sums decides; where every row already sits on a seed it
    picks row 0 again (an empty cluster, which Lloyd's iterations move) instead of an unchosen
    row."""
    data = x if isinstance(x, Tensor) else \
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n = data.shape[0]
    trials = 2 + int(np.log(n_clusters))
    norms = (data * data).sum(1)  # (N,)

    def sq_dist(rows: Tensor) -> Tensor:  # (N, m): squared distances of every x to rows (m, d)
        out = torch.empty(n, rows.shape[0], device=data.device)
        for start in range(0, n, block):
            part = slice(start, start + block)
            out[part] = (norms[part, None] - 2 * data[part] @ rows.T
                         + (rows * rows).sum(1)[None, :]).clamp_min_(0)
        return out

    if on_device is None:
        on_device = data.device.type != "cpu"
    if on_device:
        seeds = _seeds_on_device(n_clusters, trials, rng, sq_dist, data)
        return data[seeds] if isinstance(x, Tensor) else x[seeds.numpy()]
    chosen = [int(rng.integers(n))]
    nearest = sq_dist(data[chosen])[:, 0]  # (N,)
    for _ in range(1, n_clusters):
        weights = np.cumsum(nearest.double().cpu().numpy())
        if weights[-1] <= 0:  # every point sits on a seed: take any not yet chosen
            chosen.append(int(rng.choice(np.setdiff1d(np.arange(n), chosen))))
            nearest = torch.minimum(nearest, sq_dist(data[chosen[-1:]])[:, 0])
            continue
        picks = np.minimum(np.searchsorted(weights, rng.random(trials) * weights[-1]), n - 1)
        candidates = torch.minimum(nearest[:, None], sq_dist(data[picks]))  # (N, trials)
        best = int(candidates.sum(0).argmin())
        chosen.append(int(picks[best]))
        nearest = candidates[:, best].contiguous()
    return data[chosen] if isinstance(x, Tensor) else x[np.array(chosen)]


def _seeds_on_device(n_clusters: int, trials: int, rng: np.random.Generator,
                     sq_dist: Callable[[Tensor], Tensor], data: Tensor) -> Tensor:
    """``kmeans_plus_plus``'s seed indices (n_clusters,) with every step on ``data``'s device."""
    n = data.shape[0]
    first = int(rng.integers(n))
    draws = torch.from_numpy(rng.random((n_clusters - 1, trials))).to(data.device)
    chosen = torch.empty(n_clusters, dtype=torch.long, device=data.device)
    chosen[0] = first
    nearest = sq_dist(data[first:first + 1])[:, 0]  # (N,)
    for step in range(1, n_clusters):
        weights = nearest.double().cumsum(0)
        picks = torch.searchsorted(weights, draws[step - 1] * weights[-1]).clamp_max_(n - 1)
        candidates = torch.minimum(nearest[:, None], sq_dist(data[picks]))  # (N, trials)
        best = candidates.sum(0).argmin()
        chosen[step] = picks[best]
        nearest = candidates.index_select(1, best.view(1))[:, 0]
    return chosen


ASSIGN_ELEMENTS = 2**26  # (rows x clusters) distances held at once by the torch backend


def _assign(x: Tensor, norms: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's nearest center (N,) int64 and its squared distance (N,), in blocks of rows:
    |c|^2 - 2 x . c in one product (addmm), whose row minimum is the nearest center's; |x|^2
    added to the N minima only. The product and one pass over the (block, k) distances: at
    SOP's size on a CPU 1.11x the product alone, where |x|^2 - 2 x . c + |c|^2 written out took
    1.41x (three more passes; benchmarks/nmi_protocol.py, docs/PERFORMANCE.md)."""
    block = max(1, ASSIGN_ELEMENTS // centers.shape[0])
    center_norms = (centers * centers).sum(1)
    labels, distances = [], []
    for start in range(0, x.shape[0], block):
        part = slice(start, start + block)
        d = torch.addmm(center_norms, x[part], centers.T, alpha=-2)  # (b, k) less |x|^2
        nearest = d.min(dim=1)
        labels.append(nearest.indices)
        distances.append(nearest.values.add_(norms[part]).clamp_min_(0))
    return torch.cat(labels), torch.cat(distances)


def lloyd_tolerance(x: Tensor) -> float:
    """scikit-learn's tol=1e-4, scaled as it scales it: by the rows' mean variance."""
    return 1e-4 * float(x.var(dim=0, unbiased=False).mean())


def _lloyd(x: Tensor, centers: Tensor, iterations: int,
           tol: float) -> tuple[Tensor, float, int]:
    """scikit-learn's Lloyd iterations from ``centers`` (k, d): until the labels stop changing,
    the centers move less than ``tol`` (summed squared shift), or ``iterations``; an empty
    cluster takes the row farthest from its center. Returns the labels (N,) of the last centers,
    their inertia (the summed squared distances) and the iterations run."""
    k = centers.shape[0]
    norms = (x * x).sum(1)
    labels, distances = _assign(x, norms, centers)
    done = 0
    for _ in range(iterations):
        done += 1
        counts = torch.bincount(labels, minlength=k)
        order = torch.argsort(labels, stable=True)  # each cluster's rows in index order
        sums = torch.segment_reduce(x[order], "sum", lengths=counts, axis=0)  # (k, d)
        moved = sums / counts.clamp_min(1)[:, None].to(sums.dtype)
        empty = torch.nonzero(counts == 0)[:, 0]
        if len(empty):  # scikit-learn's relocation: the rows farthest from their centers
            moved[empty] = x[distances.topk(len(empty)).indices]
        shift = float(((moved - centers) ** 2).sum())
        centers = moved
        new_labels, distances = _assign(x, norms, centers)
        unchanged = torch.equal(new_labels, labels)
        labels = new_labels
        if unchanged or shift <= tol:
            break
    return labels, float(distances.double().sum()), done


def _torch_kmeans(x: Tensor, n_clusters: int, settings: KMeansSettings, seed: int) -> np.ndarray:
    """The protocol on ``x``'s device: ``settings.starts`` starts, the lowest inertia kept."""
    rng = np.random.default_rng(seed)
    tol = lloyd_tolerance(x)
    best: tuple[float, Tensor] | None = None
    for _ in range(settings.starts):
        if settings.init == "k-means++":
            centers = kmeans_plus_plus(x, n_clusters, rng)
        else:  # random rows, as scikit-learn's "random"
            rows = rng.choice(x.shape[0], n_clusters, replace=False)
            centers = x[torch.from_numpy(rows).to(x.device)]
        assert isinstance(centers, Tensor)
        labels, inertia, _ = _lloyd(x, centers.clone(), settings.iterations, tol)
        if best is None or inertia < best[0]:
            best = (inertia, labels)
    assert best is not None
    return best[1].cpu().numpy()


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


def cluster_rows(x: np.ndarray | Tensor, n_clusters: int, seed: int = 0,
                 settings: KMeansSettings = KMeansSettings()) -> np.ndarray:  # noqa: B008
    """Cluster ids (N,) int64 of the rows of ``x`` (N, d) as they are (``metrics.kmeans``
    L2-normalizes embeddings first). The torch backend clusters a tensor on its own device;
    the others copy the rows to the host."""
    settings.check()
    n_clusters = check_k(n_clusters, x.shape[0], "n_clusters", "embeddings to cluster")
    device = x.device if isinstance(x, Tensor) else torch.device("cpu")
    # the distances in float32 (the torch backend's, and k-means++'s for faiss), not in a
    # caller's autocast or TF32
    with float32_products(device):
        return _cluster_rows(x, n_clusters, seed, settings.resolved(device))


def _cluster_rows(x: np.ndarray | Tensor, n_clusters: int, seed: int,
                  settings: KMeansSettings) -> np.ndarray:
    if settings.backend == "torch":
        rows = torch.as_tensor(x).float().contiguous()
        return _torch_kmeans(rows, n_clusters, settings, seed)
    x = np.ascontiguousarray(x.cpu().numpy() if isinstance(x, Tensor) else x, dtype=np.float32)
    if settings.backend == "faiss":
        return _faiss_kmeans(x, n_clusters, settings, seed)
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters, init=settings.init, n_init=settings.starts,
                   max_iter=settings.iterations, random_state=seed)
    return model.fit_predict(x).astype(np.int64)
