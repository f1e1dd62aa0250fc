"""Evaluation of embeddings: exact blocked kNN, Recall@K, precision@1, R-precision, MAP@R, NMI."""

from softtriple.evaluation.clustering import KMEANS_BACKENDS, KMeansSettings
from softtriple.evaluation.knn import knn
from softtriple.evaluation.metrics import (
    ALL_METRICS,
    DEFAULT_METRICS,
    evaluate,
    kmeans,
    map_at_r,
    nmi,
    normalized_mutual_info,
    precision_at_1,
    r_precision,
    recall_at_k,
)

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "KMEANS_BACKENDS",
    "KMeansSettings",
    "evaluate",
    "kmeans",
    "knn",
    "map_at_r",
    "nmi",
    "normalized_mutual_info",
    "precision_at_1",
    "r_precision",
    "recall_at_k",
]
