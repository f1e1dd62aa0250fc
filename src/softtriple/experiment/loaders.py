"""From a DataConfig to data loaders: read the table, split, encode labels, build transforms."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from softtriple.data import (
    ClassBalancedBatchSampler,
    DataError,
    ImageDataset,
    ImageTable,
    ShardedBatchSampler,
    eval_transform,
    read_table,
    train_transform,
)
from softtriple.data.checks import drop_bad_images
from softtriple.experiment.config import DataConfig

SAMPLERS = ("random", "class_balanced")
FeatureFn = Callable[[ImageTable], np.ndarray]  # a split's table -> its features (N, C)


class FeatureDataset(torch.utils.data.Dataset):
    """(feature row (C,), label, index) triples: the head protocol's stand-in for images."""

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        self.labels = np.asarray(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.features[index], int(self.labels[index]), index


def load_table(config: DataConfig) -> ImageTable:
    """The ImageTable a DataConfig names, its unreadable images handled by data.bad_images."""
    return load_checked_table(config)[0]


def load_checked_table(config: DataConfig) -> tuple[ImageTable, list[tuple[Path, str]]]:
    """The table and the unreadable images left out of it (data.bad_images=skip; "error"
    raises a DataError naming them all)."""
    return drop_bad_images(read_config_table(config), config.bad_images)


def read_config_table(config: DataConfig) -> ImageTable:
    """The ImageTable a DataConfig names, unchecked; built-in sets are prepared first."""
    table = read_table(config.format, config.root, config.train_fraction)
    if config.max_classes:
        keep = np.zeros(len(table), dtype=bool)
        for split in ("train", "test"):
            in_split = table.splits == split
            first = np.unique(table.labels[in_split])[:config.max_classes]
            keep |= in_split & np.isin(table.labels, first)
        table = ImageTable([p for p, k in zip(table.paths, keep, strict=True) if k],
                           table.labels[keep], table.splits[keep], table.root, table.class_names)
    if config.validation_classes:
        table = validation_split(table, config.validation_classes)
    return table


def validation_split(table: ImageTable, fraction: float) -> ImageTable:
    """The training classes only: the last ``fraction`` of them (sorted) become the evaluation
    ("test") split, so that settings are tuned without ever seeing the test classes (Musgrave
    et al., "A Metric Learning Reality Check", ECCV 2020)."""
    train = table.split("train")
    classes = np.unique(train.labels)
    held = round(len(classes) * fraction)
    if not 1 <= held < len(classes):
        raise DataError(f"data.validation_classes={fraction} holds out {held} of "
                        f"{len(classes)} training classes; choose a fraction that leaves both "
                        f"parts at least one class")
    splits = np.where(np.isin(train.labels, classes[-held:]), "test", "train")
    return ImageTable(train.paths, train.labels, splits, table.root, table.class_names)


@dataclass
class Loaders:
    train: DataLoader
    test: DataLoader
    train_table: ImageTable
    test_table: ImageTable
    num_classes: int
    bad_images: list[tuple[Path, str]]  # left out under data.bad_images=skip


CPU_WORKERS = 2  # data.workers=-1 on a CPU: the demo recipe's own setting (0 and 1 worker were
# within 3% of it on 2 cores: benchmarks/results/train_speed.json)
MAX_WORKERS = 16


def loader_workers(requested: int, accelerator: bool) -> int:
    """The loader's worker processes for ``data.workers``: itself when >= 0; for -1 (auto), 2
    on a CPU and, feeding a GPU, this process's share of the CPU cores it may run on (one
    process per visible GPU) less one for the main process, within [2, 16]."""
    if requested >= 0:
        return requested
    if not accelerator:
        return CPU_WORKERS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    per_gpu = cores // max(1, torch.cuda.device_count())
    return min(MAX_WORKERS, max(CPU_WORKERS, per_gpu - 1))


def build_loaders(config: DataConfig, eval_batch_size: int, seed: int, world: int = 1,
                  rank: int = 0, features: FeatureFn | None = None, pin_memory: bool = False,
                  interpolation: str = "bilinear") -> Loaders:
    """Training loader (this rank's share of each global batch) and test loader (this rank's
    contiguous shard of the test set). With ``features`` (the head protocol) the loaders yield
    each image's cached backbone features in place of the image. ``pin_memory`` (for a CUDA
    device) lets the batches' copies to the device overlap the computation."""
    if config.sampler not in SAMPLERS:
        raise DataError(f"unknown sampler {config.sampler!r}; valid: {', '.join(SAMPLERS)}")
    if config.batch_size % world:
        raise DataError(f"data.batch_size {config.batch_size} is the global batch and must be "
                        f"divisible by the {world} processes")
    table, bad = load_checked_table(config)
    train_table, test_table = table.split("train"), table.split("test")
    if len(train_table) == 0 or len(test_table) == 0:
        raise DataError(f"{table.root}: the train or test split is empty")
    train_labels, classes = train_table.encoded_labels()
    test_labels = test_table.encoded_labels()[0]
    local = config.batch_size // world
    sampler: ShardedBatchSampler
    if config.sampler == "class_balanced":
        per_class = config.images_per_class
        if local % per_class:
            each = f" ({local} per process)" if world > 1 else ""
            raise DataError(f"data.batch_size {config.batch_size}{each} must be a multiple of "
                            f"data.images_per_class {per_class}")
        sampler = ClassBalancedBatchSampler(train_labels, local // per_class, per_class, seed,
                                            world, rank)
    else:
        sampler = ShardedBatchSampler(len(train_table), local, seed, world, rank)
    if len(sampler) == 0:
        raise DataError(f"the training split has {len(train_table)} images, fewer than one batch "
                        f"of {config.batch_size}; lower data.batch_size")
    shard = np.array_split(np.arange(len(test_table)), world)[rank]
    train_set: torch.utils.data.Dataset
    test_set: torch.utils.data.Dataset
    workers = loader_workers(config.workers, accelerator=pin_memory)
    if features is not None:
        train_set = FeatureDataset(features(train_table), train_labels)
        test_set = FeatureDataset(features(test_table)[shard], test_labels[shard])
        workers = 0  # rows of a tensor in memory: worker processes only add start-up time
    else:
        transform = (train_transform(config.image_size, config.flip, interpolation)
                     if config.augment else
                     eval_transform(config.image_size, interpolation))
        budget = config.decode_once_mib * 2**20
        train_set = ImageDataset(train_table, train_labels, transform, seed=seed,
                                 decode_once=budget)
        # this rank's shard only: it decodes (data.decode_once_mib) and embeds no other's images
        test_set = ImageDataset(test_table.rows(shard), test_labels[shard],
                                eval_transform(config.image_size, interpolation),
                                decode_once=budget)
    generator = torch.Generator().manual_seed(seed)
    # persistent workers: augmentation draws depend on (seed, epoch, index) only, and the
    # dataset's epoch lives in shared memory, so a worker kept from the last epoch draws as a
    # fresh one would
    train = DataLoader(train_set, batch_sampler=sampler, generator=generator,
                       num_workers=workers, pin_memory=pin_memory,
                       persistent_workers=workers > 0)
    test = DataLoader(test_set, batch_size=eval_batch_size, shuffle=False,
                      num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0)
    return Loaders(train, test, train_table, test_table, len(classes), bad)
