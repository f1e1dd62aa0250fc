"""Proxy-Anchor (Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtriple.losses._checks import (
    check_batch,
    check_count,
    check_fits,
    check_positive,
    check_scale,
)
from softtriple.losses._precision import float32_forward


def _log1p_sum_exp(logits: Tensor, mask: Tensor) -> Tensor:
    """log(1 + sum over masked rows of exp(logits)) per column, stably: (B, C) -> (C,)."""
    masked = logits.masked_fill(~mask, float("-inf"))
    zero = torch.zeros(1, logits.shape[1], dtype=logits.dtype, device=logits.device)
    return torch.logsumexp(torch.cat([zero, masked]), dim=0)


class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor: one proxy p per class, used as an anchor against the whole batch (paper
    eq. 4):

        loss = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
             + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))

    with s the cosine similarity, P all proxies, P+ the proxies of the classes present in the
    batch, X_p+ / X_p- the batch's embeddings of p's class / of other classes. Proxies are
    initialized like the official code (Kaiming normal, fan_out) and trained with their own,
    larger learning rate (official: 100x the network's), like SoftTriple's centers.

    Args:
        num_classes: C. embedding_dim: d.
        alpha: the scale (paper: 32). margin: delta (paper: 0.1).

    Shapes:
        embeddings (B, d) float, labels (B,) int64 in [0, C) -> scalar; proxies (C, d).
    """

    # couples the examples of a batch: under DDP every rank sees the gathered global batch
    # (softtriple.distributed.gather_batch)
    needs_global_batch: bool = True
    adam_eps: float = 0.01  # Adam's, when optimizer.eps is unset (losses.adam_eps)

    def __init__(self, num_classes: int, embedding_dim: int, alpha: float = 32.0,
                 margin: float = 0.1) -> None:
        super().__init__()
        check_count("num_classes", num_classes)
        check_count("embedding_dim", embedding_dim)
        check_scale("alpha", alpha)
        check_fits("the loss's proxies", num_classes, embedding_dim)
        check_positive("margin", margin, allow_zero=True)
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.alpha, self.margin = float(alpha), float(margin)
        proxies = torch.empty(num_classes, embedding_dim)
        nn.init.kaiming_normal_(proxies, mode="fan_out")
        self.proxies = nn.Parameter(proxies)  # (C, d)

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels, self.embedding_dim, self.num_classes)
        dtype = torch.promote_types(embeddings.dtype, self.proxies.dtype)
        x = F.normalize(embeddings.to(dtype), dim=1)  # (B, d)
        p = F.normalize(self.proxies.to(dtype), dim=1)  # (C, d)
        cos = x @ p.T  # (B, C)
        positive = F.one_hot(labels, self.num_classes).bool()  # (B, C)
        pos_term = _log1p_sum_exp(-self.alpha * (cos - self.margin), positive)  # (C,)
        neg_term = _log1p_sum_exp(self.alpha * (cos + self.margin), ~positive)  # (C,)
        present = positive.any(0)  # (C,) the proxies in P+
        return pos_term[present].sum() / present.sum() + neg_term.sum() / self.num_classes

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                f"alpha={self.alpha}, margin={self.margin}")
