"""Retrieval and clustering metrics for metric learning: pure functions, arrays in, numbers out.

Queries whose label no other gallery item shares ("lone" queries) cannot score; Recall@K counts
them as misses (as the SoftTriple paper and its official code do), while precision@1, R-precision
and MAP@R leave them out (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020) and
``evaluate`` reports how many were left out.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from softtriple.evaluation.clustering import KMeansSettings, cluster_rows
from softtriple.evaluation.knn import ArrayLike, Backend, as_numpy, as_tensor, knn

RETRIEVAL_METRICS = ("recall", "precision_at_1", "r_precision", "map_at_r")
CLUSTER_METRICS = ("nmi", "ami")
ALL_METRICS = RETRIEVAL_METRICS + CLUSTER_METRICS
DEFAULT_METRICS = (*RETRIEVAL_METRICS, "nmi")


def _labels(labels: ArrayLike, n: int | None, name: str) -> np.ndarray:
    """Labels as a 1-D integer numpy array, (n,) when n is given, or a one-line ValueError."""
    if labels is None:
        raise ValueError(f"{name} is None; give one integer label per embedding")
    array = as_numpy(labels)
    if array.ndim != 1 or (n is not None and array.shape[0] != n):
        raise ValueError(f"{name} must have shape ({'N' if n is None else n},), one per "
                         f"embedding; got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integers; got dtype {array.dtype}")
    return array


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """The Ks of Recall@K as a tuple; ValueError unless a non-empty sequence of integers >= 1."""
    if isinstance(ks, str | bytes) or not isinstance(ks, Sequence) or not ks or any(
            isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of integers >= 1, e.g. (1, 2, 4, 8); "
                         f"got {ks!r}")
    return tuple(int(k) for k in ks)


def _relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray,
                     self_search: bool) -> np.ndarray:
    """R_i: how many gallery items (other than the query itself) share query i's label."""
    values, counts = np.unique(gallery_labels, return_counts=True)
    pos = np.clip(np.searchsorted(values, query_labels), 0, len(values) - 1)
    r = np.where(values[pos] == query_labels, counts[pos], 0)
    return r - 1 if self_search else r


class Neighbours:
    """The ranked gallery labels of each query and the counts every retrieval metric needs.

    ``Neighbours(embeddings, labels, k, ...)`` searches; ``Neighbours.from_index(index, labels,
    ...)`` takes neighbours already found (a sharded search, ``softtriple neighbours``).

    Args:
        embeddings: (N, d) queries. labels: (N,) int.
        gallery, gallery_labels: (M, d) and (M,), or None to search the queries among themselves.
        k: neighbours to find; clipped (with a warning) to the gallery size.
        backend: knn backend (``"auto"``, ``"torch"``, ``"numpy"`` or ``"faiss"``).
    """

    def __init__(self, embeddings: ArrayLike, labels: ArrayLike, k: int,
                 gallery: ArrayLike | None = None, gallery_labels: ArrayLike | None = None,
                 backend: Backend = "auto") -> None:
        # only the shape here: knn validates the embeddings (a second finite check of an (N, d)
        # array costs as much as the metrics)
        queries = torch.as_tensor(embeddings)
        if queries.dim() != 2:
            as_tensor(queries, "embeddings")  # its one-line error
        if (gallery is None) != (gallery_labels is None):
            raise ValueError("pass gallery and gallery_labels together, or neither")
        gallery_rows = None
        if gallery is not None:
            gallery_t = torch.as_tensor(gallery)
            if gallery_t.dim() != 2:
                as_tensor(gallery_t, "gallery")
            gallery_rows = gallery_t.shape[0]
        self._count(labels, queries.shape[0], gallery_labels, gallery_rows, k)
        _, index = knn(queries, self.k, gallery, backend=backend)
        self._rank(index)

    @classmethod
    def from_index(cls, index: Tensor | np.ndarray, labels: ArrayLike,
                   gallery_labels: ArrayLike | None = None) -> Neighbours:
        """Neighbours already found: index (N, k) into the gallery (the queries themselves when
        ``gallery_labels`` is None, none of them its own query)."""
        index = torch.as_tensor(index)
        query_labels = as_numpy(labels)
        if index.dim() != 2 or index.shape[0] != len(query_labels):
            raise ValueError(f"index has shape {tuple(index.shape)}; expected "
                             f"({len(query_labels)}, k)")
        found = cls.__new__(cls)
        gallery_rows = None if gallery_labels is None else len(as_numpy(gallery_labels))
        found._count(query_labels, len(query_labels), gallery_labels, gallery_rows,
                     index.shape[1])
        if found.k != index.shape[1]:
            raise ValueError(f"index has {index.shape[1]} neighbours per query, more than the "
                             f"gallery's {found.k}")
        found._rank(index)
        return found

    def _count(self, labels: ArrayLike, queries: int, gallery_labels: ArrayLike | None,
               gallery_rows: int | None, k: int) -> None:
        """Labels, k clipped to the gallery, and each query's number of relevant items."""
        self.query_labels = _labels(labels, queries, "labels")
        self_search = gallery_labels is None
        if self_search:
            if queries < 2:
                raise ValueError("need at least two embeddings to retrieve one from the other")
            self.gallery_labels = self.query_labels
            size = queries - 1
        else:
            assert gallery_labels is not None and gallery_rows is not None
            self.gallery_labels = _labels(gallery_labels, gallery_rows, "gallery_labels")
            size = gallery_rows
            if size < 1:
                raise ValueError("the gallery is empty")
        if k > size:
            warnings.warn(f"k={k} is larger than the gallery ({size} items); using k={size}",
                          stacklevel=4)
            k = size
        self.k = k
        self.relevant = _relevant_counts(self.query_labels, self.gallery_labels, self_search)

    def _rank(self, index: Tensor) -> None:
        ranked = self.gallery_labels[index.cpu().numpy()]  # (N, k)
        self.matches = ranked == self.query_labels[:, None]  # (N, k) bool

    @property
    def has_positive(self) -> np.ndarray:
        return self.relevant > 0


def required_k(labels: ArrayLike, ks: Sequence[int] = (),
               gallery_labels: ArrayLike | None = None) -> int:
    """The neighbours needed for Recall@ks and MAP@R: max(ks) and the largest R."""
    query = _labels(labels, None, "labels")
    gallery = query if gallery_labels is None else _labels(gallery_labels, None,
                                                           "gallery_labels")
    if len(gallery) == 0 or len(query) == 0:
        raise ValueError(f"the {'queries are' if len(query) == 0 else 'gallery is'} empty; "
                         f"give at least one embedding")
    r = _relevant_counts(query, gallery, gallery_labels is None)
    return max([1, int(r.max(initial=0)), *ks])


def recall_from(nb: Neighbours, ks: Sequence[int]) -> dict[int, float]:
    hits = np.logical_or.accumulate(nb.matches, axis=1)  # hits[:, j]: a match in the top j+1
    return {k: float(hits[:, min(k, nb.k) - 1].mean()) for k in ks}


def precision_at_1_from(nb: Neighbours) -> float:
    keep = nb.has_positive
    return float(nb.matches[keep, 0].mean()) if keep.any() else float("nan")


def _top_r(nb: Neighbours) -> tuple[np.ndarray, np.ndarray]:
    """matches within each query's top R (R clipped to k), and R, for queries with R > 0."""
    keep = nb.has_positive
    r = np.minimum(nb.relevant[keep], nb.k)
    within = np.arange(nb.k)[None, :] < r[:, None]
    return nb.matches[keep] & within, r


def r_precision_from(nb: Neighbours) -> float:
    matches, r = _top_r(nb)
    return float((matches.sum(axis=1) / r).mean()) if len(r) else float("nan")


def map_at_r_from(nb: Neighbours) -> float:
    matches, r = _top_r(nb)
    if not len(r):
        return float("nan")
    precision = np.cumsum(matches, axis=1) / np.arange(1, nb.k + 1)[None, :]  # P(j)
    return float(((precision * matches).sum(axis=1) / r).mean())


def recall_at_k(embeddings: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 2, 4, 8),
                gallery: ArrayLike | None = None, gallery_labels: ArrayLike | None = None,
                backend: Backend = "auto") -> dict[int, float]:
    """Recall@K in the metric-learning sense: the fraction of queries with *at least one* item of
    their own class among their K nearest neighbours (not IR recall, which divides by the number
    of relevant items). Without a gallery every item queries all the others, never itself.

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> recall_at_k(x, np.array([0, 0, 1, 1]), ks=(1,))
    {1: 1.0}
    """
    ks = check_ks(ks)
    nb = Neighbours(embeddings, labels, max(ks), gallery, gallery_labels, backend)
    return recall_from(nb, ks)


def precision_at_1(embeddings: ArrayLike, labels: ArrayLike, gallery: ArrayLike | None = None,
                   gallery_labels: ArrayLike | None = None, backend: Backend = "auto") -> float:
    """Fraction of queries (with at least one positive) whose nearest neighbour shares the label."""
    return precision_at_1_from(Neighbours(embeddings, labels, 1, gallery, gallery_labels, backend))


def r_precision(embeddings: ArrayLike, labels: ArrayLike, gallery: ArrayLike | None = None,
                gallery_labels: ArrayLike | None = None, backend: Backend = "auto") -> float:
    """Mean over queries of (positives among the top R) / R, R = the query's positive count."""
    k = required_k(labels, (), gallery_labels)
    return r_precision_from(Neighbours(embeddings, labels, k, gallery, gallery_labels, backend))


def map_at_r(embeddings: ArrayLike, labels: ArrayLike, gallery: ArrayLike | None = None,
             gallery_labels: ArrayLike | None = None, backend: Backend = "auto") -> float:
    """MAP@R: mean over queries of (1/R) sum_{j<=R} P(j) [item j is a positive]."""
    k = required_k(labels, (), gallery_labels)
    return map_at_r_from(Neighbours(embeddings, labels, k, gallery, gallery_labels, backend))


def mutual_information_scores(labels_true: np.ndarray,
                              labels_pred: np.ndarray) -> tuple[float, float, float]:
    """(MI, H(true), H(pred)) in nats, from the sparse contingency table."""
    _, t = np.unique(labels_true, return_inverse=True)
    _, p = np.unique(labels_pred, return_inverse=True)
    n = len(t)
    pair, joint = np.unique(t.astype(np.int64) * (p.max() + 1) + p, return_counts=True)
    count_t, count_p = np.bincount(t), np.bincount(p)
    nt, np_ = count_t[pair // (p.max() + 1)], count_p[pair % (p.max() + 1)]
    mi = float(np.sum(joint / n * (np.log(joint * n) - np.log(nt.astype(float) * np_))))

    def entropy(counts: np.ndarray) -> float:
        prob = counts / n
        return float(-np.sum(prob * np.log(prob)))

    return max(mi, 0.0), entropy(count_t), entropy(count_p)


def normalized_mutual_info(labels_true: ArrayLike, labels_pred: ArrayLike) -> float:
    """NMI = MI / mean(H(true), H(pred)) (arithmetic mean, scikit-learn's default)."""
    true, pred = as_numpy(labels_true), as_numpy(labels_pred)
    if true.ndim != 1 or true.shape != pred.shape or len(true) == 0:
        raise ValueError(f"labels_true and labels_pred must be two non-empty 1-D arrays of one "
                         f"length; got shapes {true.shape} and {pred.shape}")
    mi, h_true, h_pred = mutual_information_scores(true, pred)
    if h_true == 0 and h_pred == 0:
        return 1.0
    denominator = (h_true + h_pred) / 2
    return float(min(mi / denominator, 1.0)) if denominator > 0 else 0.0


def kmeans(embeddings: ArrayLike, n_clusters: int, seed: int = 0,
           settings: KMeansSettings = KMeansSettings()) -> np.ndarray:  # noqa: B008
    """Cluster ids (N,) of the L2-normalized embeddings; by default the paper's protocol
    (k-means++, best of 10 starts: by scikit-learn for embeddings on the CPU, by torch on their
    GPU; see ``softtriple.evaluation.clustering``)."""
    x = torch.nn.functional.normalize(as_tensor(embeddings, "embeddings").float(), dim=1)
    return cluster_rows(x, n_clusters, seed, settings)


def nmi(embeddings: ArrayLike, labels: ArrayLike, n_clusters: int | None = None,
        seed: int = 0, settings: KMeansSettings = KMeansSettings()) -> float:  # noqa: B008
    """NMI between the labels and a k-means clustering (n_clusters = number of labels)."""
    y = _labels(labels, as_tensor(embeddings, "embeddings").shape[0], "labels")
    clusters = kmeans(embeddings, len(np.unique(y)) if n_clusters is None else n_clusters,
                      seed, settings)
    return normalized_mutual_info(y, clusters)


def retrieval_metrics(nb: Neighbours, ks: Sequence[int],
                      metrics: Sequence[str]) -> dict[str, Any]:
    """The requested retrieval metrics of found neighbours, with the query counts."""
    out: dict[str, Any] = {}
    if "recall" in metrics:
        out.update({f"recall@{k}": v for k, v in recall_from(nb, ks).items()})
    if "precision_at_1" in metrics:
        out["precision_at_1"] = precision_at_1_from(nb)
    if "r_precision" in metrics:
        out["r_precision"] = r_precision_from(nb)
    if "map_at_r" in metrics:
        out["map_at_r"] = map_at_r_from(nb)
    out["queries"] = len(nb.relevant)
    out["lone_queries"] = int((~nb.has_positive).sum())
    return out


def evaluate(embeddings: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 2, 4, 8),
             metrics: Sequence[str] = DEFAULT_METRICS, gallery: ArrayLike | None = None,
             gallery_labels: ArrayLike | None = None, backend: Backend = "auto",
             seed: int = 0,
             kmeans_settings: KMeansSettings = KMeansSettings()) -> dict[str, Any]:  # noqa: B008
    """All requested metrics from one neighbour search (and one k-means for NMI/AMI, whose
    settings ``kmeans_settings`` describe and the result names under ``"kmeans"``).

    Returns:
        ``{"recall@1": ..., "precision_at_1": ..., "r_precision": ..., "map_at_r": ...,
        "nmi": ..., "queries": N, "lone_queries": left out of the R-based metrics}``.
    """
    if "recall" in metrics:
        ks = check_ks(ks)
    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; valid: {', '.join(ALL_METRICS)}")
    out: dict[str, Any] = {}
    if set(metrics) & set(RETRIEVAL_METRICS):
        k = required_k(labels, ks if "recall" in metrics else (), gallery_labels)
        nb = Neighbours(embeddings, labels, k, gallery, gallery_labels, backend)
        out.update(retrieval_metrics(nb, ks, metrics))
    if set(metrics) & set(CLUSTER_METRICS):
        rows = as_tensor(embeddings, "embeddings")
        y = _labels(labels, rows.shape[0], "labels")
        clusters = kmeans(rows, len(np.unique(y)), seed, kmeans_settings)
        out["kmeans"] = kmeans_settings.resolved(rows.device).describe()  # the one that ran
        if "nmi" in metrics:
            out["nmi"] = normalized_mutual_info(y, clusters)
        if "ami" in metrics:
            from sklearn.metrics import adjusted_mutual_info_score
            out["ami"] = float(adjusted_mutual_info_score(y, clusters))
    return out
