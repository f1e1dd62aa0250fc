"""A torch Dataset over an ImageTable split, with one-line errors for unreadable images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from softtriple.data.decoded import DecodedImages, decoded_bytes, split_fixed_head
from softtriple.data.table import DataError, ImageTable

MAX_ASPECT = 16  # longer side : shorter side an image to embed keeps (inference; see to_rgb)


def to_rgb(image: Image.Image, max_aspect: int | None = None) -> Image.Image:
    """An opened image as RGB, transparency flattened onto white. With ``max_aspect``, first
    cropped to its central region of at most ``max_aspect`` : 1, which is what embedding needs:
    the test transform resizes the shorter side to the model's size and keeps the central
    square, far inside that region (the resize's rounding aside, the same pixels), while a
    40,000,000 x 1 image would otherwise be resized to 64 x 2,560,000,000 pixels first
    (164 GB)."""
    width, height = image.size
    keep = None if max_aspect is None else max_aspect * max(1, min(width, height))
    if keep is not None and width > keep:
        left = (width - keep) // 2
        image = image.crop((left, 0, left + keep, height))
    elif keep is not None and height > keep:
        top = (height - keep) // 2
        image = image.crop((0, top, width, top + keep))
    if image.mode in ("P", "LA", "RGBA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path, max_aspect: int | None = None) -> Image.Image:
    """Open an image as RGB (``to_rgb``), or raise DataError naming the file."""
    try:
        with Image.open(path) as image:
            return to_rgb(image, max_aspect)
    except FileNotFoundError as error:
        raise DataError(f"image {path} is missing; restore it or remove it from the list") \
            from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"image {path} is corrupt or not an image ({error.__class__.__name__}); "
                        f"replace it or remove it from the list") from error


def verify_images(table: ImageTable) -> None:
    """Open every image's header and decode it; raise DataError naming the first bad one."""
    for path in table.paths:
        load_image(path)


class ImageDataset(Dataset):
    """(image tensor, label, index) triples of an ImageTable.

    Args:
        table: the images (one split, usually).
        labels: (N,) int64 labels to return (e.g. ``table.encoded_labels()[0]``).
        transform: PIL image -> tensor (C, H, W).
        seed: with a seed, each image's random augmentation depends on (seed, epoch, index).
        decode_once: up to this many bytes, every image is decoded once, here, through the
            fixed head of a torchvision v2 ``transform`` (ToImage, Resize, CenterCrop) and kept
            as uint8; items then run only its tail, with the same output bit for bit. 0, a
            larger data set or another kind of transform: each item decodes its file.
    """

    def __init__(self, table: ImageTable, labels: np.ndarray,
                 transform: Callable[[Any], Any], seed: int | None = None,
                 decode_once: int = 0) -> None:
        if len(labels) != len(table):
            raise DataError(f"{len(labels)} labels for {len(table)} images")
        self.table, self.labels, self.transform = table, np.asarray(labels), transform
        self.seed = seed
        # shared memory: persistent worker processes see set_epoch's value
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.decoded: DecodedImages | None = None
        if decode_once > 0 and isinstance(transform, v2.Compose):
            head, tail = split_fixed_head(transform)
            # only a head that starts with ToImage gives tensors to keep; its header-only size
            # check comes before any pixel is decoded
            if head.transforms and isinstance(head.transforms[0], v2.ToImage):
                try:
                    fits = decoded_bytes(table.paths, head) <= decode_once
                except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
                    fits = False  # a bad file: its item raises load_image's one-line error
                if fits:
                    self.decoded = DecodedImages(table.paths, load_image, head)
                    self.transform = tail

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """With a seed, each image's random augmentation depends on (seed, epoch, index) only,
        never on which worker process draws it, so any ``data.workers`` gives the same run."""
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = self.decoded[index] if self.decoded is not None \
            else load_image(self.table.paths[index])
        if self.seed is None:
            return self.transform(image), int(self.labels[index]), index
        key = ((self.seed * 1_000_003 + self.epoch) * 2_000_003 + index) % 2**63
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
            # the CPU generator only: torch.manual_seed would also seed every accelerator's
            # (about 0.1 ms an item); the transforms draw from this one
            torch.default_generator.manual_seed(key)
            return self.transform(image), int(self.labels[index]), index
