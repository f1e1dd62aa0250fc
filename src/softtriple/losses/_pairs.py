"""What the pair-based losses share: their base (``PairLoss``), distances and same-class masks."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from softtriple.losses._checks import check_batch, check_positive
from softtriple.losses._precision import float32_forward


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


class PairLoss(nn.Module):
    """Base of the losses on the pairs, triplets or clusters of a batch (lifted structure,
    N-pairs, semi-hard triplet, clustering, contrastive, multi-similarity). They couple the
    examples of a batch, so under DDP every rank sees the gathered global batch
    (``softtriple.distributed.gather_batch``); their settings are finite numbers >= 0 (stored as
    floats and shown by ``repr``), unless a subclass checks its own. ``forward`` checks the
    batch and computes in float32 (``_precision``); a subclass writes ``batch_loss``.

    Args:
        settings: the loss's hyperparameters by name, e.g. ``margin=0.2``.
    """

    needs_global_batch: bool = True

    def __init__(self, **settings: float | None) -> None:
        super().__init__()
        for name, value in settings.items():
            if value is not None:
                check_positive(name, value, allow_zero=True)
            setattr(self, name, None if value is None else float(value))
        self.settings = tuple(settings)

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """embeddings (B, d) float, labels (B,) int64 -> the scalar loss."""
        check_batch(embeddings, labels)
        return self.batch_loss(embeddings, labels)

    def batch_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The loss of a checked batch, in float32 (or float64): (B, d), (B,) -> scalar."""
        raise NotImplementedError

    def nothing_to_learn(self, embeddings: Tensor, positive: Tensor,
                         negative: Tensor) -> Tensor | None:
        """The zero loss (with one warning) of a batch that has no positive pair or only one
        class, given its (B, B) positive and negative masks; None for a batch with both."""
        reason = ("the batch has no positive pair" if not bool(positive.any()) else
                  "the batch has only one class" if not bool(negative.any()) else None)
        return None if reason is None else degenerate(embeddings, type(self).__name__, reason)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)}" for name in self.settings)
