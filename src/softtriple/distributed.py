"""Multi-process work with torch.distributed, started by torchrun (gloo on CPU, nccl on GPU): the
one module that knows the process group, and the one reader of torchrun's WORLD_SIZE and
LOCAL_RANK. Every layer asks it (losses, evaluation, search, the trainer): this process's world
size and rank, the contiguous block of N rows (classes, items) a rank owns, the gathers and the
checks of equal batches. One process, or torch.distributed not started: a world of 1.

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
import torch.distributed as tdist
from torch import Tensor


def size_and_rank(group: tdist.ProcessGroup | None = None) -> tuple[int, int]:
    """(world size, rank) in ``group`` (the default group when None); (1, 0) in one process."""
    if not tdist.is_available() or not tdist.is_initialized():
        return 1, 0
    return tdist.get_world_size(group), tdist.get_rank(group)


def block(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank's rows of n: contiguous blocks whose sizes differ by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def local_rank() -> int:
    """This process's GPU number on its machine (torchrun's LOCAL_RANK; 0 in one process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return size_and_rank()[0]


def rank() -> int:
    return size_and_rank()[1]


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> None:
    """Join the process group when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend)


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank); [obj] in one process."""
    if not tdist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any) -> list[Any]:
    """Rank 0: every rank's ``obj`` in rank order; other ranks: []; in one process [obj]."""
    if not tdist.is_initialized():
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    tdist.gather_object(obj, out, dst=0)
    return out or []


def stream_to_main(obj: Any) -> Iterator[Any]:
    """Rank 0: an iterator over every rank's ``obj`` in rank order, each received only when the
    iterator reaches it (so rank 0 holds one at a time; it must consume them all). Other
    ranks: send ``obj`` to rank 0 (blocking until it is received); an empty iterator."""
    if not tdist.is_initialized():
        return iter([obj])
    if rank() != 0:
        tdist.send_object_list([obj], dst=0)
        return iter(())

    def receive() -> Iterator[Any]:
        yield obj
        for source in range(1, world_size()):
            box: list[Any] = [None]
            tdist.recv_object_list(box, src=source)
            yield box[0]

    return receive()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def mean(value: float) -> float:
    """The mean of ``value`` over the ranks (``value`` itself in one process)."""
    if not tdist.is_initialized():
        return value
    return sum(gather(value)) / world_size()


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
    if world_size() == 1:
        return embeddings, labels
    world, me = size_and_rank()
    check_equal_batches(int(embeddings.shape[0]), embeddings.device)
    if embeddings.dtype in (torch.float16, torch.bfloat16):
        embeddings = embeddings.float()  # the losses compute in float32 anyway
    parts = [torch.empty_like(embeddings) for _ in range(world)]
    tdist.all_gather(parts, embeddings.detach().contiguous())
    label_parts = [torch.empty_like(labels) for _ in range(world)]
    tdist.all_gather(label_parts, labels.contiguous())
    if embeddings.requires_grad:
        own = embeddings.view_as(embeddings)  # a fresh node for the hook, never the caller's
        own.register_hook(lambda grad: grad * world)
        parts[me] = own
    return torch.cat(parts), torch.cat(label_parts)

def check_equal_batches(size: int, device: torch.device,
                        group: tdist.ProcessGroup | None = None) -> None:
    """ValueError unless every rank of ``group`` passes a batch of ``size`` rows (one small
    all-reduce); an all-gather of unequal batches would fail deep inside torch."""
    bounds = torch.tensor([size, -size], device=device)
    tdist.all_reduce(bounds, op=tdist.ReduceOp.MAX, group=group)
    if int(bounds[0]) != -int(bounds[1]):
        raise ValueError(f"every process must pass a batch of the same size; they range from "
                         f"{-int(bounds[1])} to {int(bounds[0])} (use a sampler that drops the "
                         f"last, short batch)")
