"""Multi-process training with torch.distributed, started by torchrun (gloo on CPU, nccl on GPU).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them everything runs in one process.
Data parallelism is DistributedDataParallel's: every rank computes its loss on its own block of
the global batch and DDP averages the gradients. That is the single-process gradient for losses
that are a mean of per-example terms (SoftTriple, SoftMax-norm, ProxyNCA); the others couple the
examples of a batch (pairs, triplets, clusters, Proxy-Anchor's per-proxy means) and see the
whole global batch through ``gather_batch``. See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from softtriple.parallel import size_and_rank


def world_size() -> int:
    return size_and_rank()[0]


def rank() -> int:
    return size_and_rank()[1]


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> None:
    """Join the process group when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank); [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def stream_to_main(obj: Any) -> Iterator[Any]:
    """Rank 0: an iterator over every rank's ``obj`` in rank order, each received only when the
    iterator reaches it (so rank 0 holds one at a time; it must consume them all). Other
    ranks: send ``obj`` to rank 0 (blocking until it is received); an empty iterator."""
    if not dist.is_initialized():
        return iter([obj])
    if dist.get_rank() != 0:
        dist.send_object_list([obj], dst=0)
        return iter(())

    def receive() -> Iterator[Any]:
        yield obj
        for source in range(1, dist.get_world_size()):
            box: list[Any] = [None]
            dist.recv_object_list(box, src=source)
            yield box[0]

    return receive()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean(value: float) -> float:
    """The mean of ``value`` over the ranks (``value`` itself in one process)."""
    if not dist.is_initialized():
        return value
    return sum(gather(value)) / dist.get_world_size()


def gather_batch(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The global batch, every rank's block in rank order (the samplers' blocks are contiguous,
    so this is the batch one process would see); in one process the inputs themselves.

    Only this rank's rows carry gradient (the others are copies), and it is scaled by the
    number of ranks W: each rank's loss is then the single-process loss L of the global batch,
    and DDP's mean over ranks of W * dL/d(own rows) is exactly the single-process gradient. A
    parameter of the loss itself (Proxy-Anchor's proxies) gets dL/dp on every rank, which DDP's
    mean leaves unchanged.

    Args:
        embeddings: (b, d) this rank's embeddings; every rank must pass the same b.
        labels: (b,) int64.

    Returns:
        (W b, d) embeddings and (W b,) labels.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return embeddings, labels
    from softtriple.losses.sharded import check_equal_batches
    world, me = dist.get_world_size(), dist.get_rank()
    check_equal_batches(int(embeddings.shape[0]), embeddings.device)
    if embeddings.dtype in (torch.float16, torch.bfloat16):
        embeddings = embeddings.float()  # the losses compute in float32 anyway
    parts = [torch.empty_like(embeddings) for _ in range(world)]
    dist.all_gather(parts, embeddings.detach().contiguous())
    label_parts = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(label_parts, labels.contiguous())
    if embeddings.requires_grad:
        own = embeddings.view_as(embeddings)  # a fresh node for the hook, never the caller's
        own.register_hook(lambda grad: grad * world)
        parts[me] = own
    return torch.cat(parts), torch.cat(label_parts)
