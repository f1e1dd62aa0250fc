"""Images decoded once: each image of a table opened, decoded and passed through the fixed
(non-random) head of its transform (``ToImage``, and for the test pipeline ``Resize`` and
``CenterCrop``) a single time, and kept as uint8 (C, H, W) in one shared buffer. Data loader
workers then only run the random tail (crop, flip) and the normalization, and their output is
bitwise the output of the whole transform on the file: the head is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

FIXED = (v2.ToImage, v2.Resize, v2.CenterCrop)  # no random draw, output still uint8


def split_fixed_head(transform: v2.Compose) -> tuple[v2.Compose, v2.Compose]:
    """(head, tail) of a Compose: the head is its leading run of FIXED steps, so that
    ``tail(head(image))`` equals ``transform(image)`` and ``head`` can be applied once. An empty
    part is an Identity (the test transform is all head)."""
    steps = list(transform.transforms)
    cut = 0
    while cut < len(steps) and type(steps[cut]) in FIXED:
        cut += 1
    return v2.Compose(steps[:cut] or [v2.Identity()]), v2.Compose(steps[cut:] or [v2.Identity()])


def decoded_bytes(paths: Sequence[Path], head: v2.Compose) -> int:
    """The bytes that ``head`` of every image would take as uint8 RGB, from the file headers
    only (no pixel is decoded): what DecodedImages of ``paths`` would hold."""
    total = 0
    for path in paths:
        with Image.open(path) as image:
            width, height = image.size
        for step in head.transforms:
            if isinstance(step, v2.Resize) and step.size is not None and len(step.size) == 1:
                side = step.size[0]  # the shorter side, the longer one in proportion
                height, width = ((side, round(side * width / height)) if height <= width
                                 else (round(side * height / width), side))
            elif isinstance(step, v2.Resize | v2.CenterCrop) and step.size is not None:
                height, width = step.size
        total += 3 * height * width
    return total


class DecodedImages:
    """``head(load(path))`` of every path as uint8 (C, H, W) tensors, in one flat shared-memory
    buffer (worker processes read it without a copy).

    Args:
        paths: the N image files.
        load: path -> PIL image (RGB), raising a one-line error for a bad file.
        head: the fixed head of the transform (split_fixed_head).
    """

    def __init__(self, paths: Sequence[Path], load: Callable[[Path], Image.Image],
                 head: v2.Compose) -> None:
        parts = []
        for path in paths:
            image = head(load(path))
            parts.append(torch.as_tensor(image).contiguous())
        self.shapes = torch.tensor([list(p.shape) for p in parts], dtype=torch.int64) \
            if parts else torch.zeros((0, 3), dtype=torch.int64)
        sizes = torch.tensor([p.numel() for p in parts], dtype=torch.int64)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        self.buffer = torch.cat([p.reshape(-1) for p in parts]) if parts \
            else torch.zeros(0, dtype=torch.uint8)
        self.buffer.share_memory_()

    @property
    def nbytes(self) -> int:
        return int(self.buffer.numel())

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image ``index`` as a uint8 (C, H, W) tv_tensors.Image (a view of the buffer)."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        shape = self.shapes[index].tolist()
        return v2.functional.to_image(self.buffer[start:end].view(*shape))


__all__ = ["FIXED", "DecodedImages", "decoded_bytes", "split_fixed_head"]
