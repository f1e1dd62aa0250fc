"""``fashion-mnist``: Zalando's Fashion-MNIST from Debian's dataset-fashion-mnist package,
classes 0-4 train, 5-9 test (train and test images of the original release together)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from softtriple.data.builtin.base import Builtin
from softtriple.data.table import DataError

PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt-get install dataset-fashion-mnist"


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find(pattern: str) -> Path:
    for base in (PACKAGE_DIR,):
        hits = sorted(base.rglob(pattern)) if base.is_dir() else []
        if hits:
            return hits[0]
    raise DataError(f"Fashion-MNIST file {pattern} not found (Debian package "
                    f"dataset-fashion-mnist missing?); install it with: {INSTALL}")


def build(folder: Path) -> dict[str, Any]:
    images, labels = [], []
    for split in ("train", "t10k"):
        images.append(_idx(_find(f"{split}-images-idx3-ubyte.gz")))
        labels.append(_idx(_find(f"{split}-labels-idx1-ubyte.gz")))
    x, y = np.concatenate(images), np.concatenate(labels)
    for index, (pixels, label) in enumerate(zip(x, y, strict=True)):
        out = folder / str(int(label)) / f"{index:05d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - pixels, mode="L").save(out)
    return {"sources": [{"package": "dataset-fashion-mnist (Debian)", "files": str(PACKAGE_DIR),
                         "licence": "MIT (Zalando Research)"}],
            "classes": 10, "images": len(y)}


BUILTIN = Builtin("fashion-mnist", "Fashion-MNIST (Debian dataset-fashion-mnist); classes 0-4 "
                  "train, 5-9 test", build)
