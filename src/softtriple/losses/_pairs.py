"""Batch structure shared by the pair-based losses: distances and same-class masks."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def euclidean_distances(x: Tensor, squared: bool = False) -> Tensor:
    """(B, B) Euclidean distances between rows of x (B, d), with a finite gradient at 0."""
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)  # (B, B)
    d2 = d2 * (1.0 - torch.eye(len(x), dtype=x.dtype, device=x.device))  # exact 0 on the diagonal
    return d2 if squared else torch.sqrt(d2.clamp_min(1e-12))


def class_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(positive, negative) (B, B) bool masks: same label without the diagonal, other label."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def degenerate(embeddings: Tensor, loss_name: str, reason: str) -> Tensor:
    """Zero loss (connected to the graph, so backward works) with one warning naming the reason."""
    warnings.warn(f"{loss_name}: {reason}; the loss is 0 for this batch", stacklevel=3)
    return embeddings.sum() * 0.0
