"""Input validation shared by every loss: one-line ValueErrors instead of crashes inside torch."""

from __future__ import annotations

import math
import os

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


MAX_SCALE = 1e4  # a logit scale (lambda, s, alpha, beta) above this overflows float32 gradients;
# the papers use 2 to 64


def check_positive(name: str, value: float, allow_zero: bool = False,
                   maximum: float | None = None, unit: str = "") -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``) and,
    when given, below ``maximum`` (``unit`` names what the value measures)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number; got {value!r}")
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value}")
    if maximum is not None and value >= maximum:
        raise ValueError(f"{name}={value} is too large: it must be below {maximum:g}{unit}")


def check_scale(name: str, value: float) -> None:
    """A logit scale: > 0 and below MAX_SCALE, above which float32 gradients overflow."""
    check_positive(name, value, maximum=MAX_SCALE,
                   unit=" (a logit scale: larger ones overflow float32; papers use 2 to 64)")


def check_count(name: str, value: int, minimum: int = 1, why: str = "") -> None:
    """Raise ValueError unless ``value`` is an int >= ``minimum`` (``why`` says why)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{why}; got {value!r}")


def check_classes(num_classes: int) -> None:
    """A softmax over classes needs two of them: with one its probability is 1 whatever the
    embedding, and nothing trains."""
    check_count("num_classes", num_classes, 2, " (with one class the softmax is always 1 and "
                "nothing trains)")


def check_fits(what: str, rows: int, dim: int) -> None:
    """ValueError when a (rows, dim) float32 parameter would not fit in this machine's memory,
    before torch tries to allocate it."""
    need = rows * dim * 4
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: let torch decide
        return
    if need > total:
        raise ValueError(f"{what} ({rows:,} x {dim} float32, {need / 2**30:,.0f} GiB) do not fit "
                         f"in this machine's {total / 2**30:,.0f} GiB; lower num_classes, "
                         f"centers_per_class or embedding_dim, or shard the centers over "
                         f"processes (loss.shard_centers under torchrun)")


def check_products_finite(values: Tensor, loss_name: str) -> None:
    """ValueError when products or distances of unnormalized embeddings overflowed (N-pairs and
    lifted structure work on raw embeddings, whose norm nothing bounds but a regularizer)."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{loss_name}: the embeddings are so large that their products "
                         f"overflow float32; keep their norm small (the loss's l2_reg, a lower "
                         f"learning rate) or normalize them")
