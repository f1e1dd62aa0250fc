"""ProxyNCA (Movshovitz-Attias et al., "No Fuss Distance Metric Learning using Proxies",
ICCV 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from softtriple.losses._checks import (
    check_scale,
)
from softtriple.losses._precision import float32_forward
from softtriple.losses._proxies import ProxyLoss
from softtriple.losses.softmax_norm import init_centers


class ProxyNCALoss(ProxyLoss):
    """ProxyNCA: one learned proxy p_c per class and NCA over proxies (paper eq. 9):

        loss_i = -log( exp(-s d(x_i, p_{y_i})) / sum_{z != y_i} exp(-s d(x_i, p_z)) ),

    with d the squared Euclidean distance between the L2-normalized x_i and p_z (paper section 4:
    embeddings and proxies of unit norm) and s a scale (1 in the paper). The paper's denominator
    leaves the true proxy out; ``exclude_positive=False`` puts it in (a plain softmax, as
    pytorch-metric-learning's ProxyNCALoss does). Proxies are trained with their own, larger
    learning rate, like SoftTriple's centers.

    Args:
        num_classes: C. embedding_dim: d.
        scale: s, multiplies the distances (the softmax temperature's inverse).
        exclude_positive: the paper's denominator (True) or a full softmax (False).

    Shapes:
        embeddings (B, d) float, labels (B,) int64 in [0, C) -> scalar; proxies (C, d).
    """

    settings = ("scale", "exclude_positive")

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 1.0,
                 exclude_positive: bool = True) -> None:
        super().__init__(num_classes, embedding_dim)
        check_scale("scale", scale)
        self.scale, self.exclude_positive = float(scale), bool(exclude_positive)
        self.proxies = nn.Parameter(init_centers(num_classes, embedding_dim))  # (C, d)

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x, p = self.unit_rows(embeddings, labels, self.proxies)  # (B, d), (C, d)
        dist = (2.0 - 2.0 * (x @ p.T)).clamp_min(0.0)  # (B, C) squared distance of unit vectors
        logits = -self.scale * dist
        positive = logits.gather(1, labels[:, None])[:, 0]  # (B,)
        if self.exclude_positive:
            logits = logits.scatter(1, labels[:, None], float("-inf"))
        return (torch.logsumexp(logits, dim=1) - positive).mean()
