"""Normalized SoftMax with a margin: the paper's "SoftMax norm" baseline (one center per class)."""

from __future__ import annotations

import math

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


def margin_cross_entropy(similarity: Tensor, labels: Tensor, la: float, margin: float) -> Tensor:
    """Cross-entropy on the logits ``la * (S - delta * [c == y])``, averaged over the batch.

    Args:
        similarity: (B, C) class similarities S_{i,c}, each in [-1, 1].
        labels: (B,) int64 class indices y_i.
        la: the scale lambda.
        margin: the margin delta, subtracted from the true class only.
    """
    logits = similarity * la  # (B, C)
    if margin != 0:
        logits = logits.scatter_add(
            1, labels[:, None], logits.new_full((labels.shape[0], 1), -la * margin))
    return F.cross_entropy(logits, labels)


def init_centers(num_rows: int, embedding_dim: int) -> Tensor:
    """(num_rows, d) weights initialized like ``nn.Linear`` (Kaiming-uniform, a = sqrt(5));
    ValueError when they would not fit in memory."""
    check_fits("the loss's centers or proxies", num_rows, embedding_dim)
    weight = torch.empty(num_rows, embedding_dim)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


class SoftMaxNormLoss(ProxyLoss):
    """Normalized SoftMax with a margin ("SoftMax norm", Qian et al. 2019, eq. 4 with K = 1).

    One center w_c per class; logits ``la * (x_i . w_c - delta [c == y_i])`` on L2-normalized
    embeddings and centers, then cross-entropy.

    Args:
        num_classes: C, the number of training classes.
        embedding_dim: d, the embedding width.
        la: lambda, the scale of the logits.
        margin: delta, the margin subtracted from the true class's similarity.

    Shapes:
        embeddings: (B, d) float; labels: (B,) int64 in [0, C); returns a scalar.
    """

    settings = ("la", "margin")

    def __init__(self, num_classes: int, embedding_dim: int, la: float = 20.0,
                 margin: float = 0.01) -> None:
        super().__init__(num_classes, embedding_dim)
        check_scale("la", la)
        check_positive("margin", margin, allow_zero=True)
        self.la, self.margin = float(la), float(margin)
        self.centers = nn.Parameter(init_centers(num_classes, embedding_dim))  # (C, d)

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x, w = self.unit_rows(embeddings, labels, self.centers)  # (B, d), (C, d)
        return margin_cross_entropy(x @ w.T, labels, self.la, self.margin)
