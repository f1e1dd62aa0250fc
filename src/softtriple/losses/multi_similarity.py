"""Multi-similarity loss and its pair miner (Wang et al., "Multi-Similarity Loss with General Pair
Weighting for Deep Metric Learning", CVPR 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtriple.losses._checks import check_batch, check_positive, check_scale
from softtriple.losses._pairs import class_masks, degenerate
from softtriple.losses._precision import float32_forward


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


class MultiSimilarityLoss(nn.Module):
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

    Shapes:
        embeddings (B, d) float, labels (B,) int64 -> scalar.
    """

    # couples the examples of a batch: under DDP every rank sees the gathered global batch
    needs_global_batch: bool = True

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                 epsilon: float | None = 0.1) -> None:
        super().__init__()
        check_scale("alpha", alpha)
        check_scale("beta", beta)
        if isinstance(base, bool) or not isinstance(base, int | float) or not -1 <= base <= 1:
            raise ValueError(f"base must be a number in [-1, 1] (a cosine similarity); got "
                             f"{base!r}")
        if epsilon is not None:
            check_positive("epsilon", epsilon, allow_zero=True)
        self.alpha, self.beta, self.base = float(alpha), float(beta), float(base)
        self.epsilon = None if epsilon is None else float(epsilon)

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels)
        x = F.normalize(embeddings, dim=1)
        sim = x @ x.T  # (B, B)
        positive, negative = class_masks(labels)
        if not bool(negative.any()):
            return degenerate(embeddings, "MultiSimilarityLoss", "the batch has only one class")
        if not bool(positive.any()):
            return degenerate(embeddings, "MultiSimilarityLoss", "the batch has no positive pair")
        if self.epsilon is not None:
            positive, negative = mine_pairs(sim.detach(), positive, negative, self.epsilon)
        pos = _log1p_sum_exp(-self.alpha * (sim - self.base), positive) / self.alpha  # (B,)
        neg = _log1p_sum_exp(self.beta * (sim - self.base), negative) / self.beta  # (B,)
        return (pos + neg).mean()

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, base={self.base}, "
                f"epsilon={self.epsilon}")
