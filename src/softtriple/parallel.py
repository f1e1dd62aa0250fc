"""The one home of the process-group facts every layer needs (losses, evaluation, training):
this process's world size and rank, and the contiguous block of N rows (classes, items) a rank
owns. One process, or torch.distributed not started: a world of 1."""

from __future__ import annotations

import torch.distributed as tdist


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
