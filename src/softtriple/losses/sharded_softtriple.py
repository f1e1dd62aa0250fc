"""SoftTriple (and SoftMax-norm, K = 1) with its centers sharded over processes by class, for
catalogues too large to replicate (in the spirit of Partial FC; model parallelism for the loss).

Rank r of W owns the contiguous block of classes ``distributed.block(C, W, r)`` and only their
centers (and their optimizer state). One step:

1. the embeddings of every rank are all-gathered (``_GatherRows``, whose backward sums each
   rank's gradient of them back to their owner);
2. each rank computes its block's class similarities S (B, C_r) with the single-process fused
   kernel, the logits lambda (S - delta [c = y]), their row maximum m_r and
   sum_c exp(logit - m) over its block;
3. the softmax over all C classes is finished with a distributed log-sum-exp: an all-reduce of
   the maximum, then of the sums (and of the true class's logit, which one rank owns);
4. the regularizer is each block's share, all-reduced.

Every rank returns the same loss L, the single-process loss of the global batch. Each rank's
backward differentiates its own block's part: the sums over ranks pass the gradient through
unchanged (every rank knows dL/dsum), so each block of centers receives exactly dL/dw; the
embeddings' all-gather sums the blocks' parts back to their owner (dL/de); and the owner scales
that by W, so that DDP's mean over ranks gives the model dL/dtheta (wrap only the model in DDP,
never this loss). Nothing of the centers' size is copied for this. Memory per rank: C K d / W
centers (and three times that of gradient and Adam state) plus chunks of the (W b) x C / W
similarities.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn

from softtriple.distributed import block, check_equal_batches, size_and_rank
from softtriple.losses._checks import check_batch
from softtriple.losses._fused import center_regularizer_fused
from softtriple.losses._precision import float32_forward
from softtriple.losses.softtriple import (
    check_arguments,
    class_similarity,
    effective_center_counts,
)

INIT_CHUNK = 1024  # classes per seeded draw, so the initial centers do not depend on W


def init_center_block(start: int, stop: int, centers_per_class: int, embedding_dim: int,
                      seed: int) -> Tensor:
    """Centers (stop - start, K, d) of classes [start, stop), drawn like ``nn.Linear``'s weights
    (uniform in +-1/sqrt(d)) from a generator per chunk of INIT_CHUNK classes seeded by
    (seed, chunk): the same values whichever block boundaries the processes have."""
    bound = embedding_dim ** -0.5
    out = torch.empty(stop - start, centers_per_class, embedding_dim)
    rows = torch.empty(INIT_CHUNK, centers_per_class, embedding_dim)
    for chunk in range(start // INIT_CHUNK, (stop - 1) // INIT_CHUNK + 1):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        rows.uniform_(-bound, bound, generator=generator)
        lo, hi = max(start, chunk * INIT_CHUNK), min(stop, (chunk + 1) * INIT_CHUNK)
        out[lo - start:hi - start] = rows[lo - chunk * INIT_CHUNK:hi - chunk * INIT_CHUNK]
    return out


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is the identity: every rank computes the same loss of the
    sum, so each rank's own gradient of the sum is already dL/d(its part); torch's differentiable
    all_reduce would sum the W equal copies instead."""

    @staticmethod
    def forward(ctx: object, tensor: Tensor, group: tdist.ProcessGroup) -> Tensor:
        out = tensor.clone()
        tdist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GatherRows(torch.autograd.Function):
    """all_gather of every rank's (b, d) rows into (W b, d), in rank order; its backward is the
    sum over ranks of the gradient of this rank's rows (an all_reduce, then this rank's block).
    Public collectives only, so any torch the package supports and any backend (gloo, nccl) runs
    it; the functional collectives' differentiable all_gather is a private module whose names
    changed between releases (``all_gather_single`` is not in torch 2.6)."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, group: tdist.ProcessGroup) -> Tensor:
        parts = [torch.empty_like(rows) for _ in range(tdist.get_world_size(group))]
        tdist.all_gather(parts, rows.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.rows = group, tdist.get_rank(group), rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        total = grad.contiguous().clone()
        tdist.all_reduce(total, group=ctx.group)
        return total[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


class ShardedSoftTripleLoss(nn.Module):
    """SoftTripleLoss with the classes' centers split over the ranks of ``group`` (default: the
    whole job; one process holds them all). Same arguments and loss as ``SoftTripleLoss``
    (``centers_per_class=1, tau=0`` is SoftMax-norm), plus:

    Args:
        seed: seeds the centers' initial values (``init_center_block``), the same for any W.
        group: the process group the classes are sharded over.

    Shapes:
        embeddings: (b, d) this rank's embeddings, the same b on every rank; labels: (b,) int64
        in [0, C). Returns the scalar loss of the global batch (W b examples), on every rank.
        centers: nn.Parameter (C_r, K, d), classes ``start`` to ``stop`` - 1.
    """

    needs_global_batch: bool = False  # it gathers the embeddings itself
    chunk: int = 1024

    def __init__(self, num_classes: int, embedding_dim: int, centers_per_class: int = 10,
                 la: float = 20.0, gamma: float = 0.1, tau: float = 0.2, margin: float = 0.01,
                 compiled: bool = False, seed: int = 0,
                 group: tdist.ProcessGroup | None = None) -> None:
        super().__init__()
        check_arguments(num_classes, embedding_dim, centers_per_class, la, gamma, tau, margin)
        self.group = group
        self.world, self.rank = size_and_rank(group)
        if num_classes < self.world:
            raise ValueError(f"cannot shard {num_classes} classes over {self.world} processes; "
                             f"use fewer processes or replicated centers")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.centers_per_class = centers_per_class
        self.la, self.gamma, self.tau, self.margin = float(la), float(gamma), float(tau), \
            float(margin)
        self.compiled = bool(compiled)
        self.start, self.stop = block(num_classes, self.world, self.rank)
        self.centers = nn.Parameter(init_center_block(self.start, self.stop, centers_per_class,
                                                      embedding_dim, seed))

    def _group(self) -> tdist.ProcessGroup:
        group = self.group or tdist.group.WORLD
        assert group is not None
        return group

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        """The sum over the ranks of ``tensor``; its gradient is this rank's own part."""
        if self.world == 1:
            return tensor
        return _SumOverRanks.apply(tensor, self._group())  # type: ignore[no-any-return]

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        check_batch(embeddings, labels, self.embedding_dim, self.num_classes)
        centers: Tensor = self.centers
        if self.world > 1:
            group = self._group()
            check_equal_batches(embeddings.shape[0], embeddings.device, group)
            own = embeddings.view_as(embeddings)  # a fresh node for this step's hook
            world = self.world
            own.register_hook(lambda grad: grad * world)  # DDP's mean divides by W
            embeddings = _GatherRows.apply(own, group)
            gathered = [torch.empty_like(labels) for _ in range(self.world)]
            tdist.all_gather(gathered, labels.contiguous(), group=group)
            labels = torch.cat(gathered)
        dtype = torch.promote_types(embeddings.dtype, centers.dtype)
        x = F.normalize(embeddings.to(dtype), dim=1)  # (B, d), B = W b
        similarity = class_similarity(x, centers.to(dtype), self.gamma, self.chunk,
                                      self.compiled)  # (B, C_r)
        logits = similarity * self.la
        owned = (labels >= self.start) & (labels < self.stop)  # (B,)
        column = (labels - self.start).clamp(0, self.stop - self.start - 1)[:, None]
        if self.margin != 0:
            logits = logits.scatter_add(1, column, (-self.la * self.margin) * owned[:, None].to(
                logits.dtype))
        shift = logits.detach().amax(dim=1)  # (B,): m, the all-reduced row maximum
        if self.world > 1:
            tdist.all_reduce(shift, op=tdist.ReduceOp.MAX, group=self._group())
        sums = self._sum_over_ranks(torch.exp(logits - shift[:, None]).sum(dim=1))  # (B,)
        true_logit = self._sum_over_ranks(logits.gather(1, column)[:, 0] * owned)  # (B,)
        loss = (shift + torch.log(sums) - true_logit).mean()
        if self.tau > 0 and self.centers_per_class > 1:
            share = (self.stop - self.start) / self.num_classes  # the regularizer is a mean
            loss = loss + self.tau * self._sum_over_ranks(center_regularizer_fused(centers) * share)
        return loss

    @torch.no_grad()
    def effective_centers(self, threshold: float = 0.9) -> Tensor:
        """Centers left per class (C_r,) of this rank's block after merging (see SoftTriple)."""
        return effective_center_counts(self.centers, threshold)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, classes={self.start}..{self.stop - 1} of "
                f"{self.world} processes, embedding_dim={self.embedding_dim}, "
                f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
                f"tau={self.tau}, margin={self.margin}")
