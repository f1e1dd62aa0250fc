"""Lifted structured loss (Song et al., "Deep Metric Learning via Lifted Structured Feature
Embedding", CVPR 2016)."""

from __future__ import annotations

import torch
from torch import Tensor

from softtriple.losses._checks import check_products_finite
from softtriple.losses._pairs import PairLoss, class_masks, euclidean_distances


class LiftedStructureLoss(PairLoss):
    """The smooth lifted structured loss (paper eq. 4), over every positive pair (i, j) of a batch:

        J_ij = log( sum_{k in N(i)} exp(alpha - D_ik) + sum_{l in N(j)} exp(alpha - D_jl) ) + D_ij
        loss = 1 / (2 |P|) sum_{(i, j) in P} max(0, J_ij)^2

    with D the Euclidean distance, alpha the margin (1 in the paper), P the unordered positive
    pairs and N(i) the items of another class than i. Embeddings are used as given (the paper does
    not normalize them; our EmbeddingModel already outputs unit vectors).

    Args:
        margin: alpha.
    """

    margin: float

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__(margin=margin)

    def batch_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        dist = euclidean_distances(embeddings)  # (B, B)
        check_products_finite(dist, "LiftedStructureLoss")
        positive, negative = class_masks(labels)
        if (zero := self.nothing_to_learn(embeddings, positive, negative)) is not None:
            return zero
        neg_terms = torch.where(negative, self.margin - dist, float("-inf"))  # (B, B)
        neg_lse = torch.logsumexp(neg_terms, dim=1)  # (B,): log sum_{k in N(i)} exp(alpha - D_ik)
        i, j = torch.triu(positive, diagonal=1).nonzero(as_tuple=True)  # unordered pairs
        j_ij = torch.logaddexp(neg_lse[i], neg_lse[j]) + dist[i, j]  # (|P|,)
        return torch.relu(j_ij).pow(2).sum() / (2 * len(i))

