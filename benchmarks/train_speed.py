"""Trainer throughput: images per second of `softtriple train` (Trainer) against a bare PyTorch
loop over the same model, loss, data and transforms, in the same process and run, so that any
overhead of the trainer or its data pipeline shows as a ratio below 1.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_speed.py [--steps N]

Needs the built-in glyphs data set (softtriple data prepare glyphs). Writes
benchmarks/results/train_speed.json; docs/PERFORMANCE.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from softtriple.atomic import write_json
from softtriple.training import Trainer, load_config

RESULTS = Path(__file__).parent / "results" / "train_speed.json"
SETTINGS = ["model.backbone=efficientnet_lite0", "model.embedding_dim=64",
            "data.root=glyphs", "data.image_size=64", "data.flip=false", "data.batch_size=32",
            "data.workers=2", "data.max_classes=300", "schedule.epochs=1",
            "evaluation.before_training=false", "evaluation.every=0", "run.progress=false",
            "run.report=false", "loss.args={centers_per_class: 4}"]


def bare_loop(trainer: Trainer, steps: int) -> float:
    """Images per second of a plain loop over the trainer's own model, loss and loader, timed
    like the trainer's epoch: from the loader's start (worker start-up included)."""
    model, loss_fn, optimizer = trainer.model, trainer.loss, trainer.optimizer
    model.train()
    seen, start = 0, time.perf_counter()
    for i, (images, labels, _) in enumerate(trainer.loaders.train):
        if i == steps:
            break
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def trainer_speed(steps: int, out: str) -> float:
    config = load_config(None, [*SETTINGS, f"schedule.max_steps_per_epoch={steps}",
                                f"run.out={out}"])
    trainer = Trainer(config)
    start = time.perf_counter()
    trainer._train_epoch()  # the trainer's own epoch: sampler, loader, progress, logging
    return steps * config.data.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [*SETTINGS, f"run.out={tmp}/bare"])
        bare_loop(Trainer(config), 3)  # warm the process up (threads, allocator) for both
        bare = bare_loop(Trainer(config), args.steps)
        ours = trainer_speed(args.steps, f"{tmp}/trainer")
    report = {"images_per_second": {"bare_loop": bare, "trainer": ours},
              "trainer_over_bare": ours / bare, "steps": args.steps, "settings": SETTINGS,
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_speed.py"}
    print(f"bare loop {bare:.1f} img/s, trainer {ours:.1f} img/s, ratio {ours / bare:.2f}")
    write_json(RESULTS, report)


if __name__ == "__main__":
    main()
