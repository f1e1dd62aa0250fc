"""Image pipelines (torchvision.transforms.v2): the paper's training and test transforms, with the
size configurable for CPU runs and the flip optional (glyphs and emoji are not mirror-symmetric)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
                    mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD,
                    interpolation: str = "bilinear") -> v2.Compose:
    """RandomResizedCrop(size) [+ RandomHorizontalFlip] -> float tensor -> Normalize(mean, std),
    resizing with the backbone's ``interpolation`` (timm's weights: often bicubic)."""
    steps: list[v2.Transform] = [v2.ToImage(), v2.RandomResizedCrop(
        size, interpolation=_mode(interpolation), antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def eval_transform(size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD,
                   interpolation: str = "bilinear") -> v2.Compose:
    """Resize(size * 256 / 224) -> CenterCrop(size) -> float tensor -> Normalize(mean, std)."""
    return v2.Compose([v2.ToImage(), v2.Resize(round(size * 256 / 224),
                                               interpolation=_mode(interpolation),
                                               antialias=True),
                       v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])
