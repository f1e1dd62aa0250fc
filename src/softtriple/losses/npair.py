"""Multi-class N-pair loss (Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss
Objective", NIPS 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from softtriple.losses._checks import check_products_finite
from softtriple.losses._pairs import PairLoss, degenerate


def first_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(anchor, positive) indices: for each class with two or more items, in order of first
    appearance, its first and second occurrence in the batch."""
    anchors, positives = [], []
    seen: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        if label not in seen:
            seen[label] = i
        elif seen[label] >= 0:
            anchors.append(seen[label])
            positives.append(i)
            seen[label] = -1  # this class has its pair
    return (torch.tensor(anchors, dtype=torch.long, device=labels.device),
            torch.tensor(positives, dtype=torch.long, device=labels.device))


class NPairLoss(PairLoss):
    """Multi-class N-pair loss with its l2 embedding regularizer (paper eq. 6 and section 3.2).

    From N pairs (f_i, f_i^+) of N distinct classes:

        loss = 1/N sum_i log(1 + sum_{j != i} exp(f_i . f_j^+ - f_i . f_i^+))
               + l2_reg / 4 * (mean_i |f_i|^2 + mean_i |f_i^+|^2),

    on unnormalized embeddings (the regularizer keeps their norm small; 0.002 as in the paper's
    reference implementation). The pairs are each class's first two items in the batch, so feed it
    batches of two images per class (the class-balanced sampler); classes with one item are unused.

    Args:
        l2_reg: lambda of the embedding-norm regularizer (0 turns it off).
    """

    l2_reg: float

    def __init__(self, l2_reg: float = 0.002) -> None:
        super().__init__(l2_reg=l2_reg)

    def batch_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        anchor_idx, positive_idx = first_pairs(labels)
        if len(anchor_idx) < 2:
            return degenerate(embeddings, "NPairLoss",
                              "it needs two or more classes with two items each")
        anchors, positives = embeddings[anchor_idx], embeddings[positive_idx]  # (N, d) each
        logits = anchors @ positives.T  # (N, N): f_i . f_j^+
        check_products_finite(logits, "NPairLoss")
        target = torch.arange(len(anchors), device=embeddings.device)
        loss = F.cross_entropy(logits, target)  # = log(1 + sum_{j!=i} exp(l_ij - l_ii))
        if self.l2_reg > 0:
            norms = (anchors * anchors).sum(dim=1).mean() + (positives * positives).sum(
                dim=1).mean()
            loss = loss + 0.25 * self.l2_reg * norms
        return loss
