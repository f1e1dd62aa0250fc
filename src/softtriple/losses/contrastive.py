"""Contrastive loss (Hadsell, Chopra and LeCun, "Dimensionality Reduction by Learning an
Invariant Mapping", CVPR 2006), with a positive margin as in Musgrave et al., "A Metric Learning
Reality Check" (ECCV 2020), where it was at or near the top under fair tuning."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from softtriple.losses._checks import check_positive
from softtriple.losses._pairs import PairLoss, class_masks, degenerate, euclidean_distances


def mean_of_positive(losses: Tensor) -> Tensor:
    """The mean of the entries > 0 (pairs that still violate their margin), 0 when none do."""
    active = losses > 0
    return losses[active].mean() if bool(active.any()) else losses.sum() * 0.0


class ContrastiveLoss(PairLoss):
    """Pulls same-class pairs within ``pos_margin`` and pushes other-class pairs beyond
    ``neg_margin``, in Euclidean distance D between L2-normalized embeddings:

        loss = mean_{(i,j) positive, D_ij > m+} (D_ij - m+)
             + mean_{(i,j) negative, D_ij < m-} (m- - D_ij)

    over every ordered pair of the batch; each mean runs over the pairs that still violate their
    margin (pytorch-metric-learning's ``AvgNonZeroReducer``), so easy pairs do not dilute it.

    Args:
        pos_margin: m+ >= 0 (default 0). neg_margin: m- > m+ (default 1; D lies in [0, 2]).
    """

    pos_margin: float
    neg_margin: float

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0) -> None:
        super().__init__(pos_margin=pos_margin, neg_margin=neg_margin)
        check_positive("neg_margin", neg_margin)
        if neg_margin <= pos_margin:
            raise ValueError(f"neg_margin must be larger than pos_margin; got neg_margin="
                             f"{neg_margin}, pos_margin={pos_margin}")

    def batch_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        positive, negative = class_masks(labels)  # (B, B) each
        if not bool(positive.any()) and not bool(negative.any()):
            return degenerate(embeddings, "ContrastiveLoss", "the batch has a single example")
        dist = euclidean_distances(F.normalize(embeddings, dim=1))  # (B, B)
        pos = F.relu(dist[positive] - self.pos_margin)
        neg = F.relu(self.neg_margin - dist[negative])
        return mean_of_positive(pos) + mean_of_positive(neg)



