"""Proxy-Anchor (Kim et al., "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtriple.losses._checks import (
    check_fits,
    check_positive,
    check_scale,
)
from softtriple.losses._precision import float32_forward
from softtriple.losses._proxies import ProxyLoss


def _log1p_sum_exp(logits: Tensor, mask: Tensor) -> Tensor:
    """log(1 + sum over masked rows of exp(logits)) per column, stably: (B, C) -> (C,)."""
    masked = logits.masked_fill(~mask, float("-inf"))
    zero = torch.zeros(1, logits.shape[1], dtype=logits.dtype, device=logits.device)
    return torch.logsumexp(torch.cat([zero, masked]), dim=0)


class ProxyAnchorLoss(ProxyLoss):
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
    settings = ("alpha", "margin")

    def __init__(self, num_classes: int, embedding_dim: int, alpha: float = 32.0,
                 margin: float = 0.1) -> None:
        super().__init__(num_classes, embedding_dim, min_classes=1)
        check_scale("alpha", alpha)
        check_fits("the loss's proxies", num_classes, embedding_dim)
        check_positive("margin", margin, allow_zero=True)
        self.alpha, self.margin = float(alpha), float(margin)
        proxies = torch.empty(num_classes, embedding_dim)
        nn.init.kaiming_normal_(proxies, mode="fan_out")
        self.proxies = nn.Parameter(proxies)  # (C, d)

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x, p = self.unit_rows(embeddings, labels, self.proxies)  # (B, d), (C, d)
        cos = x @ p.T  # (B, C)
        positive = F.one_hot(labels, self.num_classes).bool()  # (B, C)
        pos_term = _log1p_sum_exp(-self.alpha * (cos - self.margin), positive)  # (C,)
        neg_term = _log1p_sum_exp(self.alpha * (cos + self.margin), ~positive)  # (C,)
        present = positive.any(0)  # (C,) the proxies in P+
        return pos_term[present].sum() / present.sum() + neg_term.sum() / self.num_classes
