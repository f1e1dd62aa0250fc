"""Baselines of the built-in data sets over their held-out classes: Recall@1/2/4/8 and MAP@R of
nearest neighbours on raw pixels (images resized to SIZE x SIZE grey, centered, unit-normalized),
and with --features also on the frozen ImageNet-pretrained EfficientNet-Lite0's pooled 1280-d
features (the head protocol's input, from its feature cache; image size as in FEATURE_SIZE).
Any learned embedding should beat both.

    .venv/bin/python benchmarks/data_baseline.py [--features] [NAME[:MAX_CLASSES] ...]

NAME:300 keeps the first 300 test classes, as ``data.max_classes=300`` does (glyphs' CPU
recipes: the demo and the head protocol).

Writes benchmarks/results/data_baseline.json; docs/DATA.md quotes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from softtriple.atomic import write_json
from softtriple.data import ImageTable
from softtriple.data.baseline import raw_pixels
from softtriple.data.builtin import BUILTINS, default_root, prepared
from softtriple.data.formats import read_folder
from softtriple.evaluation import evaluate

SIZE = 32
FEATURE_SIZE = {"glyphs": 64, "emoji": 64, "fonts": 96}  # the head configs' image sizes
RESULTS = Path(__file__).parent / "results" / "data_baseline.json"


def pretrained_features(name: str, table: ImageTable) -> np.ndarray:
    """EfficientNet-Lite0's pooled features of ``table`` (from the feature cache)."""
    from softtriple.experiment import load_config
    from softtriple.experiment.build import build_model
    from softtriple.training.feature_cache import cached_features

    size = FEATURE_SIZE.get(name, 64)
    config = load_config(None, ["model.freeze_backbone=true", f"data.image_size={size}"])
    features, _ = cached_features(build_model(config), table, "efficientnet_lite0", None, size,
                                  128, torch.device("cpu"))
    return features


def builtin_split(entry: str, split: str) -> tuple[str, ImageTable] | None:
    """``NAME[:MAX_CLASSES]``'s split of a prepared built-in data set (its first MAX_CLASSES
    classes, as ``data.max_classes`` keeps them), or None (with a line) when not prepared."""
    name, _, limit = entry.partition(":")
    if prepared(name) is None:
        print(f"{name}: not prepared (softtriple data prepare {name})")
        return None
    table = read_folder(default_root() / name, BUILTINS[name].train_fraction).split(split)
    if limit:
        keep = np.isin(table.labels, np.unique(table.labels)[:int(limit)])
        table = ImageTable([p for p, k in zip(table.paths, keep, strict=True) if k],
                           table.labels[keep], table.splits[keep], table.root)
    return name, table


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--features"]
    with_features = "--features" in sys.argv[1:]
    names = args or [n for n in BUILTINS if prepared(n)]
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for entry in names:
        found = builtin_split(entry, "test")
        if found is None:
            continue
        name, table = found
        metrics = evaluate(raw_pixels(table.paths, SIZE), table.labels,
                           metrics=("recall", "map_at_r", "nmi", "ami"))
        results[entry] = {"test_images": len(table), "test_classes": len(set(table.labels)),
                         "pixels": f"{SIZE}x{SIZE} grey", **metrics}
        print(entry, "pixels", {k: round(v, 4) if isinstance(v, float) else v
                               for k, v in metrics.items()})
        if with_features:
            features = evaluate(pretrained_features(name, table), table.labels,
                                metrics=("recall", "map_at_r", "nmi", "ami"))
            results[entry]["pretrained_features"] = {
                "model": "efficientnet_lite0", "image_size": FEATURE_SIZE.get(name, 64),
                **features}
            print(entry, "features", {k: round(v, 4) if isinstance(v, float) else v
                                     for k, v in features.items()})
    write_json(RESULTS, results)


if __name__ == "__main__":
    main()
