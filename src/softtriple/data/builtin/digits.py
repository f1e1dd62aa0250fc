"""``digits``: scikit-learn's bundled 8x8 handwritten digits (UCI), classes 0-4 train, 5-9 test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from softtriple.data.builtin.base import Builtin


def build(folder: Path) -> dict[str, Any]:
    import sklearn
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        out = folder / str(label) / f"{index:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((255 - pixels * 255 / 16).astype(np.uint8), mode="L")
        image.save(out)
    return {"sources": [{"package": "scikit-learn", "version": sklearn.__version__,
                         "files": "sklearn/datasets/data/digits.csv.gz",
                         "licence": "CC BY 4.0 (UCI ML hand-written digits)"}],
            "classes": 10, "images": len(digits.target)}


BUILTIN = Builtin("digits", "scikit-learn's 8x8 handwritten digits; classes 0-4 train, 5-9 test",
                  build)
