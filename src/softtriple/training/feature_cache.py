"""The feature cache of the head protocol: pooled features of a frozen backbone, computed once per
(backbone, weights, image size, image file) and kept next to the data.

A cache file ``<data root>/.softtriple-cache/features-<model key>.npz`` holds one row per image,
keyed by the image's path relative to the data root, its size and its modification time, so that
every subset of a data set (``data.max_classes``) reuses the same rows, and an image that changes
on disk is embedded again. Features use the test transform (no augmentation): the head protocol
trains on one fixed view of each image, which it states.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from softtriple import distributed as dist
from softtriple.data import ImageDataset, ImageTable, eval_transform
from softtriple.data.checks import cache_file, image_keys
from softtriple.experiment.config import Config, ConfigError
from softtriple.experiment.loaders import loader_workers
from softtriple.models import EmbeddingModel, embed
from softtriple.models.backbones import WHEEL_WEIGHTS


def model_key(backbone: str, weights: str | None, image_size: int) -> str:
    """Names what makes the features: the backbone, its weights file (path, size, mtime) and the
    image size."""
    parts = [backbone, str(image_size)]
    if weights:
        stat = Path(weights).expanduser().stat()
        parts += [str(Path(weights).expanduser().resolve()), str(stat.st_size),
                  str(stat.st_mtime_ns)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@torch.no_grad()
def compute_features(model: EmbeddingModel, table: ImageTable, image_size: int, batch_size: int,
                     device: torch.device, workers: int = 0, progress: bool = True) -> np.ndarray:
    """Pooled backbone features (N, C) float32 of every image of ``table``, test transform."""
    dataset = ImageDataset(table, np.zeros(len(table), dtype=np.int64),
                           eval_transform(image_size, model.interpolation))
    # an own generator: iterating a loader draws a seed, which must not move the global RNG
    # (a run that builds the cache would otherwise initialize its centers differently)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator())
    return embed(model, loader, device, forward=model.features,
                 progress="backbone features" if progress else None)


def cached_features(model: EmbeddingModel, table: ImageTable, backbone: str,
                    weights: str | None, image_size: int, batch_size: int,
                    device: torch.device, workers: int = 0,
                    progress: bool = True) -> tuple[np.ndarray, int]:
    """Features (N, C) of ``table``'s images, from the cache where present; the images not yet
    cached are embedded and added. Returns the features and how many images were embedded."""
    path = cache_file(table.root, f"features-{model_key(backbone, weights, image_size)}.npz")
    keys = image_keys(table)
    cached_keys, cached = np.zeros(0, dtype=str), np.zeros((0, model.feature_dim), np.float32)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                cached_keys, cached = data["keys"], data["features"]
            if cached.ndim != 2 or cached.shape != (len(cached_keys), model.feature_dim) or \
                    cached_keys.ndim != 1 or not np.isfinite(cached).all():
                raise ValueError("short, misshapen or not finite")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            warnings.warn(f"feature cache {path} is unreadable ({error}); rebuilding it",
                          stacklevel=2)
            cached_keys = np.zeros(0, dtype=str)
            cached = np.zeros((0, model.feature_dim), np.float32)
    where = {k: i for i, k in enumerate(cached_keys.tolist())}
    missing = np.array([k not in where for k in keys.tolist()], dtype=bool)
    if missing.any():
        subset = ImageTable([p for p, m in zip(table.paths, missing, strict=True) if m],
                            table.labels[missing], table.splits[missing], table.root)
        new = compute_features(model, subset, image_size, batch_size, device, workers, progress)
        stale = {k.split("|", 1)[0] for k in keys[missing].tolist()}
        keep = np.array([k.split("|", 1)[0] not in stale for k in cached_keys.tolist()],
                        dtype=bool)  # drop the rows of images that changed on disk
        cached_keys = np.concatenate([cached_keys[keep], keys[missing]])
        cached = np.concatenate([cached[keep], new])
        # a private temporary name: parallel runs (compare --jobs) may add to one cache
        fd, tmp = tempfile.mkstemp(prefix=".features-", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, keys=cached_keys, features=cached)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        where = {k: i for i, k in enumerate(cached_keys.tolist())}
    rows = np.array([where[k] for k in keys.tolist()], dtype=np.int64)
    return cached[rows], int(missing.sum())


def feature_source(config: Config, model: EmbeddingModel, device: torch.device
                   ) -> Callable[[ImageTable], np.ndarray] | None:
    """The head protocol's cached backbone features of a table, when data.feature_cache is on
    (the loaders then feed them in place of images); None when it is off."""
    if not config.data.feature_cache:
        return None
    if (config.model.weights is None and config.model.backbone not in WHEEL_WEIGHTS
            and not config.model.pretrained):
        raise ConfigError(f"data.feature_cache needs pretrained features: set model.weights for "
                          f"{config.model.backbone} (a random backbone's features change with "
                          f"the seed), or use {', '.join(WHEEL_WEIGHTS)}")

    def features(table: ImageTable) -> np.ndarray:
        rows, _ = cached_features(
            model, table, config.model.backbone, config.model.weights, config.data.image_size,
            config.evaluation.batch_size, device,
            loader_workers(config.data.workers, device.type == "cuda"),
            config.run.progress and dist.is_main())
        return rows

    return features
