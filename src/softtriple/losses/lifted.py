"""Lifted structured loss (Song et al., "Deep Metric Learning via Lifted Structured Feature
Embedding", CVPR 2016)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from softtriple.losses._checks import check_batch, check_positive, check_products_finite
from softtriple.losses._pairs import class_masks, degenerate, euclidean_distances
from softtriple.losses._precision import float32_forward


class LiftedStructureLoss(nn.Module):
    """The smooth lifted structured loss (paper eq. 4), over every positive pair (i, j) of a batch:

        J_ij = log( sum_{k in N(i)} exp(alpha - D_ik) + sum_{l in N(j)} exp(alpha - D_jl) ) + D_ij
        loss = 1 / (2 |P|) sum_{(i, j) in P} max(0, J_ij)^2

    with D the Euclidean distance, alpha the margin (1 in the paper), P the unordered positive
    pairs and N(i) the items of another class than i. Embeddings are used as given (the paper does
    not normalize them; our EmbeddingModel already outputs unit vectors).

    Args:
        margin: alpha.

    Shapes:
        embeddings (B, d) float, labels (B,) int64 -> scalar.
    """

    # couples the examples of a batch: under DDP every rank sees the gathered global batch
    # (softtriple.distributed.gather_batch)
    needs_global_batch: bool = True

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        check_positive("margin", margin, allow_zero=True)
        self.margin = float(margin)

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels)
        dist = euclidean_distances(embeddings)  # (B, B)
        check_products_finite(dist, "LiftedStructureLoss")
        positive, negative = class_masks(labels)
        if not bool(positive.any()):
            return degenerate(embeddings, "LiftedStructureLoss", "the batch has no positive pair")
        if not bool(negative.any()):
            return degenerate(embeddings, "LiftedStructureLoss", "the batch has only one class")
        neg_terms = torch.where(negative, self.margin - dist, float("-inf"))  # (B, B)
        neg_lse = torch.logsumexp(neg_terms, dim=1)  # (B,): log sum_{k in N(i)} exp(alpha - D_ik)
        i, j = torch.triu(positive, diagonal=1).nonzero(as_tuple=True)  # unordered pairs
        j_ij = torch.logaddexp(neg_lse[i], neg_lse[j]) + dist[i, j]  # (|P|,)
        return torch.relu(j_ij).pow(2).sum() / (2 * len(i))

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
