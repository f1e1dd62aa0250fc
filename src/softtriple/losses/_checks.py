"""Input validation shared by every loss: one-line ValueErrors instead of crashes inside torch."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_batch(embeddings: Tensor, labels: Tensor, embedding_dim: int | None = None,
                num_classes: int | None = None) -> None:
    """Raise ValueError unless ``embeddings`` is (B, d) finite float and ``labels`` is (B,) int.

    Args:
        embeddings: (B, d) floating tensor.
        labels: (B,) integer tensor, in [0, num_classes) when ``num_classes`` is given.
        embedding_dim: expected d, or None to accept any width.
        num_classes: the number of classes C, or None when labels are free integers.
    """
    if not isinstance(embeddings, Tensor) or not isinstance(labels, Tensor):
        raise ValueError("embeddings and labels must be torch tensors; "
                         "convert with torch.as_tensor(...)")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must have shape (batch, dim); got {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be a floating tensor; got {embeddings.dtype}")
    if embeddings.shape[0] == 0:
        raise ValueError("empty batch: embeddings has 0 rows; pass at least one example")
    if embedding_dim is not None and embeddings.shape[1] != embedding_dim:
        raise ValueError(f"embeddings have width {embeddings.shape[1]} but the loss was built "
                         f"with embedding_dim={embedding_dim}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must have shape ({embeddings.shape[0]},) to match embeddings; "
                         f"got {tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be a torch.int64 tensor; got {labels.dtype} (use "
                         f"labels.long())")
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError("embeddings contain NaN or inf; check the model output "
                         "(learning rate too high?) before the loss")
    if num_classes is not None:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}); got values in [{lo}, {hi}]; "
                             f"remap labels to 0..num_classes-1 or raise num_classes")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number; got {value!r}")
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value}")


def check_count(name: str, value: int) -> None:
    """Raise ValueError unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
