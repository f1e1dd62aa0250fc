"""Training speed of the demo's recipe, three figures in one run:

1. the **compute floor**: model, loss and optimizer on one in-memory batch (no data loading), in
   each memory format and precision this CPU offers (float32 NCHW, float32 channels_last, bf16
   autocast in both); the fastest is the floor; and channels_last with torch.compile
   (model.compile), its compile time apart;
2. a **bare loop**: a plain PyTorch loop over the real loader (workers decoding and augmenting
   images on the same cores), the model in the trainer's memory format;
3. the **trainer**: `softtriple train`'s own epochs (sampler, loader, progress, logging), whole
   ones: the first (which starts the loader's workers) and the next (persistent workers), with
   the images decoded once (the default) and, for comparison, decoded from their files per item,
   and with one loader worker or none (augmenting the decoded images in the main process).

Each as images per second, with the ratios to the floor, interleaved where they can be (the
floor's variants), on a quiet machine (benchmarks/conditions.py).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_speed.py [--steps N]

Needs the built-in glyphs data set (softtriple data prepare glyphs). Writes
benchmarks/results/train_speed.json; docs/PERFORMANCE.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from conditions import Conditions
from steps import step_times

from softtriple.atomic import write_json
from softtriple.data import ImageDataset, train_transform
from softtriple.training import Trainer, load_config
from softtriple.training.data import load_table

RESULTS = Path(__file__).parent / "results" / "train_speed.json"
SETTINGS = ["model.backbone=efficientnet_lite0", "model.embedding_dim=64",
            "data.root=glyphs", "data.image_size=64", "data.flip=false", "data.batch_size=32",
            "data.workers=2", "data.max_classes=300", "schedule.epochs=1",
            "evaluation.before_training=false", "evaluation.every=0", "run.progress=false",
            "run.report=false", "loss.args={centers_per_class: 4}"]
VARIANTS = {  # name: (channels_last, autocast dtype)
    "float32 NCHW": (False, None), "float32 channels_last": (True, None),
    "bf16 NCHW": (False, torch.bfloat16), "bf16 channels_last": (True, torch.bfloat16)}


def floor(trainer: Trainer, repeats: int) -> dict[str, dict[str, Any]]:
    """ms per step of each variant on one in-memory batch of the real loader, the variants'
    steps interleaved, median after two warm-up rounds."""
    images, labels, _ = next(iter(trainer.loaders.train))
    model, loss_fn, optimizer = trainer.model, trainer.loss, trainer.optimizer
    model.train()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(repeats + 2):
        for name, (channels_last, dtype) in VARIANTS.items():
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model.to(memory_format=fmt)
            x = images.contiguous(memory_format=fmt)
            start = time.perf_counter()
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                embeddings = model(x)
            loss_fn(embeddings.float(), labels).backward()
            optimizer.step()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    batch = len(labels)
    return {name: {"ms_per_step": 1000 * statistics.median(t),
                   "images_per_second": batch / statistics.median(t)}
            for name, t in times.items()}


def compiled_floor(trainer: Trainer, repeats: int) -> dict[str, float]:
    """The channels_last floor with the network torch.compile'd (model.compile): the first
    step's seconds (compiling forward and backward, from an empty inductor cache) and the median
    ms per step after it."""
    images, labels, _ = next(iter(trainer.loaders.train))
    model, loss_fn, optimizer = trainer.model, trainer.loss, trainer.optimizer
    model.to(memory_format=torch.channels_last).train()
    model.compile()
    times = step_times(model, loss_fn, optimizer,
                       images.contiguous(memory_format=torch.channels_last), labels, repeats)
    step = statistics.median(times[2:])
    return {"compile_seconds": times[0], "ms_per_step": 1000 * step,
            "images_per_second": len(labels) / step}


def bare_loop(trainer: Trainer, steps: int) -> float:
    """Images per second of a plain loop over the trainer's model (in its memory format), loss
    and loader, timed like the trainer's epoch: from the loader's start."""
    model, loss_fn, optimizer = trainer.model, trainer.loss, trainer.optimizer
    fmt = torch.channels_last if trainer.config.model.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    model.train()
    seen, start = 0, time.perf_counter()
    for i, (images, labels, _) in enumerate(trainer.loaders.train):
        if i == steps:
            break
        optimizer.zero_grad()
        loss_fn(model(images.contiguous(memory_format=fmt)), labels).backward()
        optimizer.step()
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def trainer_epochs(out: str, epochs: int, *extra: str) -> list[float]:
    """Images per second of each of ``epochs`` whole epochs of the trainer's own loop (sampler,
    loader, progress, logging), timed from the loader's start: the first epoch starts the
    workers, later ones reuse them (persistent workers)."""
    config = load_config(None, [*SETTINGS, *extra, f"run.out={out}"])
    trainer = Trainer(config)
    speeds = []
    for epoch in range(epochs):
        trainer.epoch, steps = epoch, trainer.step
        start = time.perf_counter()
        trainer._train_epoch()
        speeds.append((trainer.step - steps) * config.data.batch_size
                      / (time.perf_counter() - start))
    return speeds


def decode_seconds() -> float:
    """Seconds to decode the training split once (what data.decode_once_mib adds to a run's
    start)."""
    config = load_config(None, SETTINGS)
    table = load_table(config.data).split("train")
    start = time.perf_counter()
    ImageDataset(table, table.encoded_labels()[0], train_transform(64, flip=False), seed=0,
                 decode_once=config.data.decode_once_mib * 2**20)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="bare-loop steps")
    parser.add_argument("--epochs", type=int, default=2, help="trainer epochs (whole ones)")
    parser.add_argument("--repeats", type=int, default=8, help="floor steps per variant")
    parser.add_argument("--noisy", action="store_true", help="run on a busy machine anyway")
    args = parser.parse_args()
    # compile cold, as a user's first run does: an empty inductor cache of this run's own
    cache = tempfile.TemporaryDirectory()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    conditions = Conditions.start(allow_noisy=args.noisy)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [*SETTINGS, f"run.out={tmp}/bare"])
        variants = floor(Trainer(config), args.repeats)
        compiled = compiled_floor(Trainer(config), args.repeats)
        bare_loop(Trainer(config), 3)  # warm the process up (threads, allocator) for both
        bare = bare_loop(Trainer(config), args.steps)
        decoded = trainer_epochs(f"{tmp}/decoded", args.epochs)
        files = trainer_epochs(f"{tmp}/files", args.epochs, "data.decode_once_mib=0")
        one_worker = trainer_epochs(f"{tmp}/one", args.epochs, "data.workers=1")
        no_worker = trainer_epochs(f"{tmp}/none", args.epochs, "data.workers=0")
        compiled_run = trainer_epochs(f"{tmp}/compiled", args.epochs, "model.compile=true")
        decoding = decode_seconds()
    fastest = max(variants, key=lambda name: variants[name]["images_per_second"])
    best = variants[fastest]["images_per_second"]
    nchw = variants["float32 NCHW"]["images_per_second"]
    ours = decoded[-1]  # the steady state: an epoch after the first
    report = {"conditions": conditions.finish(),
              "floor": {"variants": variants, "fastest": fastest, "images_per_second": best,
                        "channels_last_compiled": compiled},
              "images_per_second": {
                  "bare_loop": bare, "trainer": ours,
                  "trainer_epochs": decoded, "trainer_epochs_decoding_files": files,
                  "trainer_epochs_one_worker": one_worker,
                  "trainer_epochs_no_worker": no_worker,
                  "trainer_epochs_compiled": compiled_run},
              "decode_once_seconds": decoding,
              "trainer_over_bare": ours / bare, "trainer_over_floor": ours / best,
              "first_epoch_over_floor": decoded[0] / best,
              "decoding_files_over_floor": files[-1] / best,
              "one_worker_over_floor": one_worker[-1] / best,
              "no_worker_over_floor": no_worker[-1] / best,
              "no_worker_over_nchw_floor": no_worker[-1] / nchw,
              "compiled_over_floor": compiled_run[-1] / best,
              "compiled_over_nchw_floor": compiled_run[-1] / nchw,
              "bare_over_floor": bare / best, "trainer_over_nchw_floor": ours / nchw,
              "channels_last": config.model.channels_last, "bare_loop_steps": args.steps,
              "epochs": args.epochs, "settings": SETTINGS,
              "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/train_speed.py"}
    for name, v in variants.items():
        print(f"floor {name:<24} {v['ms_per_step']:6.0f} ms/step {v['images_per_second']:6.1f} "
              f"img/s")
    print(f"floor channels_last + torch.compile {compiled['ms_per_step']:6.0f} ms/step after "
          f"{compiled['compile_seconds']:.0f} s compiling")
    print(f"bare loop {bare:.1f} img/s; trainer epochs {', '.join(f'{v:.1f}' for v in decoded)}"
          f" img/s (decoding files: {', '.join(f'{v:.1f}' for v in files)}); decoding once "
          f"{decoding:.1f} s; one worker: {', '.join(f'{v:.1f}' for v in one_worker)}; none: "
          f"{', '.join(f'{v:.1f}' for v in no_worker)}")
    print(f"trainer with model.compile: {', '.join(f'{v:.1f}' for v in compiled_run)} img/s "
          f"(its first epoch compiles)")
    print(f"trainer / floor ({fastest}) {ours / best:.2f}, trainer / float32 NCHW floor "
          f"{ours / nchw:.2f}")
    write_json(RESULTS, report)


if __name__ == "__main__":
    main()
