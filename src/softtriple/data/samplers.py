"""Batch samplers: shuffled batches (SoftTriple and the proxy losses need nothing more) and
class-balanced batches of P classes x M images (N-pair, lifted structure, triplet, clustering)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler[list[int]]):
    """Shuffled batches of ``batch_size``; with ``num_replicas`` > 1 each global batch of
    batch_size * num_replicas images is the one a single process draws, and rank r takes its r-th
    contiguous block, so the ranks' blocks concatenated in rank order are that global batch (what
    ``softtriple.distributed.gather_batch`` rebuilds). ``set_epoch`` reshuffles
    deterministically."""

    def __init__(self, size: int, batch_size: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = True) -> None:
        if batch_size < 1 or size < 1:
            raise ValueError(f"need a data set and batch_size >= 1; got {size} items, "
                             f"batch_size {batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[np.ndarray]:
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.size)
        step = self.batch_size * self.num_replicas
        stop = len(order) - len(order) % step if self.drop_last else len(order)
        return [order[i:i + step] for i in range(0, stop, step)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            size = len(batch) // self.num_replicas
            yield batch[self.rank * size:(self.rank + 1) * size].tolist()

    def __len__(self) -> int:
        return len(self._global_batches())


class ClassBalancedBatchSampler(ShardedBatchSampler):
    """Batches of ``classes_per_batch`` classes x ``images_per_class`` images (classes with fewer
    images are sampled with replacement)."""

    def __init__(self, labels: np.ndarray, classes_per_batch: int, images_per_class: int = 2,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        labels = np.asarray(labels)
        super().__init__(len(labels), classes_per_batch * images_per_class, seed, num_replicas,
                         rank)
        self.classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        if classes_per_batch * num_replicas > len(self.classes):
            raise ValueError(f"classes_per_batch x processes = {classes_per_batch * num_replicas}"
                             f" exceeds the {len(self.classes)} training classes")
        self.p, self.m = classes_per_batch, images_per_class

    def _global_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng((self.seed, self.epoch))
        n_batches = max(1, self.size // (self.batch_size * self.num_replicas))
        batches = []
        for _ in range(n_batches):  # the same draws as one process with P * num_replicas
            chosen = rng.choice(len(self.classes), self.p * self.num_replicas, replace=False)
            parts = [rng.choice(self.classes[c], self.m, replace=len(self.classes[c]) < self.m)
                     for c in chosen]
            # class after class, so each rank's contiguous block holds P whole classes
            batches.append(np.concatenate(parts))
        return batches
