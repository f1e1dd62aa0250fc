"""Triplet loss with semi-hard negative mining inside the batch (Schroff et al., "FaceNet: A
Unified Embedding for Face Recognition and Clustering", CVPR 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from softtriple.losses._pairs import PairLoss, class_masks, euclidean_distances


class TripletLoss(PairLoss):
    """Triplet loss with online semi-hard mining (paper eq. 1 and section 3.2):

        loss = mean over positive pairs (a, p) of max(0, |f_a - f_p|^2 - |f_a - f_n|^2 + alpha),

    on L2-normalized embeddings (|f| = 1, as in the paper), with every ordered positive pair of the
    batch as (a, p) and n its semi-hard negative: the closest negative that is farther from a than
    p is; when no negative is farther, the farthest negative (the rule of TensorFlow's
    ``triplet_semihard_loss``, the paper's reference implementation).

    pytorch-metric-learning's TripletMarginMiner(type_of_triplets="semihard") differs by
    definition: it keeps every semi-hard triplet, not one per positive pair, and uses
    non-squared distances; the tests check ours against a loop over the paper's definition.

    ``mining="hardest"`` takes instead each pair's closest negative (the batch-hard rule of
    Hermans et al., "In Defense of the Triplet Loss", 2017, per positive pair), which the paper
    warns can collapse a model trained from scratch; semi-hard mining skips every negative that
    is nearer than the positive, the very ones a nearest-neighbour search gets wrong.

    Args:
        margin: alpha (0.2 in the paper).
        mining: "semihard" (the paper's) or "hardest".
    """

    margin: float
    MINING = ("semihard", "hardest")

    def __init__(self, margin: float = 0.2, mining: str = "semihard") -> None:
        super().__init__(margin=margin)
        if mining not in self.MINING:
            raise ValueError(f"mining must be one of {', '.join(self.MINING)}; got {mining!r}")
        self.mining = mining
        self.settings = ("margin", "mining")

    def batch_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        dist = euclidean_distances(F.normalize(embeddings, dim=1), squared=True)  # (B, B)
        positive, negative = class_masks(labels)
        if (zero := self.nothing_to_learn(embeddings, positive, negative)) is not None:
            return zero
        a, p = positive.nonzero(as_tuple=True)  # (P,) ordered pairs
        d_ap = dist[a, p]  # (P,)
        d_an = dist[a]  # (P, B)
        neg = negative[a]  # (P, B)
        with torch.no_grad():  # mining picks an index; the gradient flows through dist below
            if self.mining == "hardest":
                n = torch.where(neg, d_an, float("inf")).argmin(dim=1)  # (P,)
            else:
                farther = neg & (d_an > d_ap[:, None])
                semi_hard = torch.where(farther, d_an, float("inf")).argmin(dim=1)
                farthest = torch.where(neg, d_an, float("-inf")).argmax(dim=1)
                n = torch.where(farther.any(dim=1), semi_hard, farthest)  # (P,)
        return torch.relu(d_ap - dist[a, n] + self.margin).mean()
