"""Image pipelines (torchvision.transforms.v2): the paper's training and test transforms, with the
size configurable for CPU runs and the flip optional (glyphs and emoji are not mirror-symmetric).

The transforms end in uint8 images (3, S, S); the model scales and normalizes them on its own
device (``normalize_images``, called by ``EmbeddingModel.features``). A loader's workers then
collate, and the main process pins and copies, a quarter of float32's bytes: 19 MB for a batch
of 128 at 224 px against 77 MB (benchmarks/loader_speed.py measures what that saves).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _mode(interpolation: str) -> v2.InterpolationMode:
    try:
        return v2.InterpolationMode(interpolation)
    except ValueError as error:
        valid = ", ".join(m.value for m in v2.InterpolationMode)
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: {valid}") from error


def train_transform(size: int = 224, flip: bool = True,
                    interpolation: str = "bilinear") -> v2.Compose:
    """PIL image -> RandomResizedCrop(size) [+ RandomHorizontalFlip] -> uint8 (3, size, size),
    resizing with the backbone's ``interpolation`` (timm's weights: often bicubic)."""
    steps: list[v2.Transform] = [v2.ToImage(), v2.RandomResizedCrop(
        size, interpolation=_mode(interpolation), antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def eval_transform(size: int = 224, interpolation: str = "bilinear") -> v2.Compose:
    """PIL image -> Resize(size * 256 / 224) -> CenterCrop(size) -> uint8 (3, size, size)."""
    return v2.Compose([v2.ToImage(), v2.Resize(round(size * 256 / 224),
                                               interpolation=_mode(interpolation),
                                               antialias=True),
                       v2.CenterCrop(size)])


def normalize_images(images: Tensor, mean: Sequence[float] | Tensor,
                     std: Sequence[float] | Tensor) -> Tensor:
    """uint8 images (..., 3, H, W) -> float32 (pixel / 255 - mean) / std per channel, on their
    own device and in their memory format: bit for bit torchvision's ToDtype(float32,
    scale=True) then Normalize(mean, std) (the same three operations in the same order).
    ``mean`` and ``std``: 3 numbers, or float32 tensors (3, 1, 1) already on the device (no
    copy from the host: a CUDA graph can capture the call)."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
