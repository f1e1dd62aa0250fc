"""Multi-similarity loss and its pair miner (Wang et al., "Multi-Similarity Loss with General Pair
Weighting for Deep Metric Learning", CVPR 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from softtriple.losses._checks import check_scale
from softtriple.losses._pairs import PairLoss, class_masks


def mine_pairs(sim: Tensor, positive: Tensor, negative: Tensor,
               epsilon: float) -> tuple[Tensor, Tensor]:
    """The paper's pair mining (its eq. 3 and 4): keep positive pairs less similar than the
    anchor's most similar negative plus epsilon, and negative pairs more similar than the anchor's
    least similar positive minus epsilon.

    Args:
        sim: (B, B) cosine similarities. positive, negative: (B, B) bool pair masks.

    Returns:
        the mined (B, B) positive and negative masks.
    """
    hardest_neg = sim.masked_fill(~negative, float("-inf")).amax(dim=1, keepdim=True)  # (B, 1)
    hardest_pos = sim.masked_fill(~positive, float("inf")).amin(dim=1, keepdim=True)  # (B, 1)
    return positive & (sim - epsilon < hardest_neg), negative & (sim + epsilon > hardest_pos)


def _log1p_sum_exp(logits: Tensor, mask: Tensor) -> Tensor:
    """log(1 + sum over masked columns of exp(logits)) per row, stably: (B, B) -> (B,)."""
    masked = logits.masked_fill(~mask, float("-inf"))
    zero = torch.zeros(len(logits), 1, dtype=logits.dtype, device=logits.device)
    return torch.logsumexp(torch.cat([zero, masked], dim=1), dim=1)


class MultiSimilarityLoss(PairLoss):
    """Multi-similarity loss (paper eq. 6), with S the cosine similarity, averaged over the batch:

        loss_i = 1/alpha log(1 + sum_{p in P_i} exp(-alpha (S_ip - lambda)))
               + 1/beta  log(1 + sum_{n in N_i} exp( beta (S_in - lambda)))

    where P_i and N_i are anchor i's positive and negative pairs, mined by ``mine_pairs`` when
    ``epsilon`` is set (the paper's method; an anchor left without pairs contributes 0), or all of
    them with ``epsilon=None`` (pytorch-metric-learning's ``MultiSimilarityLoss`` without its
    miner).

    Args:
        alpha: positive scale (paper: 2). beta: negative scale (paper: 50).
        base: lambda, the similarity margin (paper: 0.5, written 1 in some versions).
        epsilon: the miner's margin (paper: 0.1), or None for no mining.
    """

    alpha: float
    beta: float
    base: float
    epsilon: float | None

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                 epsilon: float | None = 0.1) -> None:
        check_scale("alpha", alpha)
        check_scale("beta", beta)
        if isinstance(base, bool) or not isinstance(base, int | float) or not -1 <= base <= 1:
            raise ValueError(f"base must be a number in [-1, 1] (a cosine similarity); got "
                             f"{base!r}")
        super().__init__(alpha=alpha, beta=beta, epsilon=epsilon)
        self.base = float(base)  # a cosine, in [-1, 1]
        self.settings = ("alpha", "beta", "base", "epsilon")

    def batch_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x = F.normalize(embeddings, dim=1)
        sim = x @ x.T  # (B, B)
        positive, negative = class_masks(labels)
        if (zero := self.nothing_to_learn(embeddings, positive, negative)) is not None:
            return zero
        if self.epsilon is not None:
            positive, negative = mine_pairs(sim.detach(), positive, negative, self.epsilon)
        pos = _log1p_sum_exp(-self.alpha * (sim - self.base), positive) / self.alpha  # (B,)
        neg = _log1p_sum_exp(self.beta * (sim - self.base), negative) / self.beta  # (B,)
        return (pos + neg).mean()
