"""Clustering loss: structured prediction with facility location (Song et al., "Deep Metric
Learning via Facility Location", CVPR 2017)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from softtriple.evaluation.metrics import normalized_mutual_info
from softtriple.losses._pairs import PairLoss, degenerate, euclidean_distances


def facility_score(dist: Tensor, medoids: Tensor) -> Tensor:
    """F(X, S) = -sum_i min_{j in S} D_ij (paper eq. 2); dist (B, B), medoids (|S|,) indices."""
    return -dist[:, medoids].amin(dim=1).sum()


class ClusteringLoss(PairLoss):
    """The facility-location clustering loss (paper eq. 5-6):

        loss = [ max_{|S| = |Y|} ( F(X, S) + gamma * (1 - NMI(g(S), y)) ) - F~(X, y) ]_+

    where F(X, S) = -sum_i min_{j in S} |f_i - f_j| scores medoids S, g(S) assigns every item to
    its nearest medoid, and the oracle score F~(X, y) = sum_k max_{j in class k} F(X_k, {j}) takes
    the best medoid inside each true class. The maximization (loss-augmented inference) is done as
    in the paper: greedy selection of |Y| medoids (Algorithm 1), then a PAM-like refinement that,
    cluster by cluster, swaps the medoid for the member that most improves the objective
    (section 3.2). The medoids are then fixed and the gradient flows through the distances.

    Simplifications: one refinement pass (the paper iterates until no swap helps); embeddings are
    L2-normalized before distances (the paper does not say).

    Args:
        gamma: the margin multiplier gamma on the structured margin 1 - NMI (1 in the paper).
    """

    gamma: float

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__(gamma=gamma)

    def _objective(self, dist: np.ndarray, medoids: list[int], labels: np.ndarray) -> float:
        assign = np.asarray(medoids)[dist[:, medoids].argmin(axis=1)]
        margin = 1.0 - normalized_mutual_info(labels, assign)
        return float(-dist[:, medoids].min(axis=1).sum() + self.gamma * margin)

    def augmented_medoids(self, dist: np.ndarray, labels: np.ndarray) -> list[int]:
        """Greedy loss-augmented inference plus one refinement pass; dist (B, B) numpy."""
        n_clusters = len(np.unique(labels))
        medoids: list[int] = []
        for _ in range(n_clusters):
            candidates = [i for i in range(len(dist)) if i not in medoids]
            scores = [self._objective(dist, [*medoids, i], labels) for i in candidates]
            medoids.append(candidates[int(np.argmax(scores))])
        for c in range(n_clusters):
            members = np.flatnonzero(dist[:, medoids].argmin(axis=1) == c)
            best, best_score = medoids[c], self._objective(dist, medoids, labels)
            for j in members:
                trial = [*medoids[:c], int(j), *medoids[c + 1:]]
                score = self._objective(dist, trial, labels)
                if score > best_score:
                    best, best_score = int(j), score
            medoids[c] = best
        return medoids

    def batch_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if len(torch.unique(labels)) < 2:
            return degenerate(embeddings, "ClusteringLoss", "the batch has only one class")
        dist = euclidean_distances(F.normalize(embeddings, dim=1))  # (B, B)
        y = labels.cpu().numpy()
        d_np = dist.detach().cpu().double().numpy()
        medoids = self.augmented_medoids(d_np, y)
        assign = np.asarray(medoids)[d_np[:, medoids].argmin(axis=1)]
        margin = 1.0 - normalized_mutual_info(y, assign)
        augmented = facility_score(dist, torch.as_tensor(medoids, device=dist.device))
        oracle = dist.new_zeros(())
        for k in np.unique(y):
            members = torch.as_tensor(np.flatnonzero(y == k), device=dist.device)
            within = dist[members][:, members]  # (n_k, n_k)
            oracle = oracle - within.sum(dim=0).min()  # the best medoid inside class k
        return torch.relu(augmented + self.gamma * margin - oracle)
