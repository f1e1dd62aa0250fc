"""The raw-pixel baseline: images as grey pixel vectors, the embedding any learned one must beat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def raw_pixels(paths: list[Path], size: int = 32) -> np.ndarray:
    """(N, size * size) float32: each image resized to size x size grey, ink positive (255 minus
    the grey level), with its own mean removed, so cosine similarity compares shapes."""
    rows = []
    for path in paths:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L").resize((size, size)), dtype=np.float32)
        rows.append((255 - grey).ravel())
    x = np.stack(rows)
    return x - x.mean(axis=1, keepdims=True)
