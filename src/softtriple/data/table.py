"""ImageTable: the one shape every data set takes here, (path, label, split) per image."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "test")


class DataError(ValueError):
    """A data set on disk is missing, malformed or inconsistent; the message names the file and
    what to do about it."""


@dataclass
class ImageTable:
    """Images of a metric-learning data set with class-disjoint train and test splits.

    Attributes:
        paths: (N,) absolute image paths.
        labels: (N,) int64 class ids as the data set numbers them (not remapped).
        splits: (N,) "train" or "test".
        root: the folder the table was read from.
        class_names: optional class id -> readable name.
    """

    paths: list[Path]
    labels: np.ndarray
    splits: np.ndarray
    root: Path
    class_names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.splits = np.asarray(self.splits, dtype=object)
        if not len(self.paths) == len(self.labels) == len(self.splits):
            raise DataError("paths, labels and splits differ in length")
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise DataError(f"unknown split name(s) {sorted(unknown)}; use 'train' or 'test'")
        counts = Counter(self.paths)
        duplicates = [str(p) for p, n in counts.items() if n > 1]
        if duplicates:
            raise DataError(f"{len(duplicates)} image path(s) listed twice, e.g. {duplicates[0]}; "
                            f"each image must appear once")

    def __len__(self) -> int:
        return len(self.paths)

    def split(self, name: str) -> ImageTable:
        """The images of one split ("train" or "test")."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use 'train' or 'test'")
        return self.rows(np.flatnonzero(self.splits == name))

    def rows(self, keep: np.ndarray) -> ImageTable:
        """The images at the (K,) positions ``keep``, in that order."""
        return ImageTable([self.paths[i] for i in keep], self.labels[keep], self.splits[keep],
                          self.root, self.class_names)

    def encoded_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels remapped to 0..C-1 in sorted order, the original id of each new label)."""
        classes, encoded = np.unique(self.labels, return_inverse=True)
        return encoded.astype(np.int64), classes

    def item_class_names(self) -> list[str]:
        """Each item's readable class name (its label's number when the data set names none)."""
        return [self.class_names.get(int(label), str(label)) for label in self.labels]

    def check_disjoint(self) -> None:
        """Raise DataError when a class appears in both splits."""
        train = set(self.labels[self.splits == "train"].tolist())
        test = set(self.labels[self.splits == "test"].tolist())
        shared = sorted(train & test)
        if shared:
            raise DataError(f"{len(shared)} class(es) appear in both train and test (e.g. class "
                            f"{shared[0]}); the metric-learning protocol needs disjoint classes")

    def check_files(self) -> None:
        """Raise DataError naming the first listed image that is not on disk."""
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise DataError(f"{len(missing)} listed image(s) are missing, e.g. {missing[0]}; "
                            f"restore them or remove them from the label files")

    def summary(self) -> dict[str, Any]:
        """Per split: images, classes, min/median/max images per class, single-image classes."""
        out: dict[str, Any] = {}
        for name in SPLITS:
            labels = self.labels[self.splits == name]
            per_class = np.array(sorted(Counter(labels.tolist()).values()) or [0])
            out[name] = {
                "images": len(labels),
                "classes": len(np.unique(labels)),
                "min_per_class": int(per_class.min()),
                "median_per_class": float(np.median(per_class)),
                "max_per_class": int(per_class.max()),
                "single_image_classes": int((per_class == 1).sum()) if len(labels) else 0,
            }
        return out
