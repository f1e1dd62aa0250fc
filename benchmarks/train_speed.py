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

Each as images per second, with the ratios to the floor, on a quiet machine
(benchmarks/conditions.py). Each figure runs in a fresh Python process, as a user's run does
(measured in one process, the trainer ran 10% slower after the floor's and the compiler's work);
the floor's variants are interleaved within theirs; floor and trainer are measured twice,
first and last, and the headline ratios come from the round less favourable to the trainer.

    .venv/bin/python benchmarks/train_speed.py [--steps N]

Needs the built-in glyphs data set (softtriple data prepare glyphs). Writes
benchmarks/results/train_speed.json; docs/PERFORMANCE.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from conditions import Conditions
from steps import step_times

from softtriple.atomic import write_json
from softtriple.data import ImageDataset, train_transform
from softtriple.experiment import load_config
from softtriple.experiment.loaders import load_table
from softtriple.training import Trainer

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


FIGURES = {  # name: what a fresh process measures (a user's `softtriple train` is one)
    "floor": "the floor's variants, interleaved",
    "compiled_floor": "the channels_last floor torch.compile'd, from a cold inductor cache",
    "bare_loop": "a plain loop over the real loader",
    "trainer": "the trainer's epochs (defaults)",
    "trainer_decoding_files": "data.decode_once_mib=0",
    "trainer_one_worker": "data.workers=1",
    "trainer_no_worker": "data.workers=0",
    "trainer_compiled": "model.compile=true (inductor cache warm from compiled_floor)",
    "floor_passive": "the floor under OMP_WAIT_POLICY=PASSIVE (make demo's until now)",
    "trainer_passive": "the trainer under OMP_WAIT_POLICY=PASSIVE",
}
TRAINER_SETTINGS = {"trainer": [], "trainer_decoding_files": ["data.decode_once_mib=0"],
                    "trainer_one_worker": ["data.workers=1"],
                    "trainer_no_worker": ["data.workers=0"],
                    "trainer_compiled": ["model.compile=true"], "trainer_passive": []}
ROUNDS = ("floor", "trainer")  # measured twice, alternating: the first and the last figures


def measure(figure: str, args: argparse.Namespace) -> Any:
    """One figure, in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [*SETTINGS, f"run.out={tmp}/bare"])
        if figure in ("floor", "floor_passive"):
            return floor(Trainer(config), args.repeats)
        if figure == "compiled_floor":
            return compiled_floor(Trainer(config), args.repeats)
        if figure == "bare_loop":
            bare_loop(Trainer(config), 3)  # warm the process up (threads, allocator)
            return bare_loop(Trainer(config), args.steps)
        return trainer_epochs(f"{tmp}/run", args.epochs, *TRAINER_SETTINGS[figure])


def in_fresh_process(figure: str, args: argparse.Namespace) -> Any:
    """``measure(figure)`` in a new Python process, as a user's run would be: no earlier
    figure's threads, allocations, compiled code or loader workers in it, and OpenMP's default
    wait policy (threads spin briefly before they sleep) unless the figure is a _passive one."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if figure.endswith("_passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    command = [sys.executable, __file__, "--figure", figure, "--steps", str(args.steps),
               "--epochs", str(args.epochs), "--repeats", str(args.repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        raise SystemExit(f"{figure} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="bare-loop steps")
    parser.add_argument("--epochs", type=int, default=2, help="trainer epochs (whole ones)")
    parser.add_argument("--repeats", type=int, default=8, help="floor steps per variant")
    parser.add_argument("--noisy", action="store_true", help="run on a busy machine anyway")
    parser.add_argument("--json", type=Path, default=RESULTS,
                        help="where to write results (another CPU's: another file)")
    parser.add_argument("--figure", choices=FIGURES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.figure:  # a child process: one figure, as JSON on the last line
        print(json.dumps(measure(args.figure, args)))
        return
    # compile cold, as a user's first run does: an empty inductor cache of this run's own,
    # which the compiled trainer then finds warm
    cache = tempfile.TemporaryDirectory()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    conditions = Conditions.start(allow_noisy=args.noisy)
    order = [*ROUNDS, *(f for f in FIGURES if f not in ROUNDS), *ROUNDS]
    results: dict[str, list[Any]] = {}
    for figure in order:
        results.setdefault(figure, []).append(in_fresh_process(figure, args))
        print(f"{figure}: {results[figure][-1]}", flush=True)
    decoding = decode_seconds()
    rounds = []
    for variants, epochs in zip(results["floor"], results["trainer"], strict=True):
        best = max(v["images_per_second"] for v in variants.values())
        nchw = variants["float32 NCHW"]["images_per_second"]
        rounds.append({"floor": variants, "trainer_epochs": epochs,
                       "trainer_over_floor": epochs[-1] / best,
                       "trainer_over_nchw_floor": epochs[-1] / nchw})
    # the headline: the round less favourable to the trainer
    first = min(rounds, key=lambda r: r["trainer_over_nchw_floor"])
    variants = first["floor"]
    fastest = max(variants, key=lambda name: variants[name]["images_per_second"])
    best = variants[fastest]["images_per_second"]
    nchw = variants["float32 NCHW"]["images_per_second"]
    ours = first["trainer_epochs"][-1]  # the steady state: an epoch after the first
    compiled = results["compiled_floor"][0]
    bare = results["bare_loop"][0]
    others = {name: results[name][0] for name in TRAINER_SETTINGS if name != "trainer"}
    passive = results["floor_passive"][0]
    report = {"conditions": conditions.finish(),
              "floor": {"variants": variants, "fastest": fastest, "images_per_second": best,
                        "channels_last_compiled": compiled},
              "rounds": rounds, "floor_passive": passive,
              "images_per_second": {
                  "bare_loop": bare, "trainer": ours, "trainer_epochs": first["trainer_epochs"],
                  **{f"{name.replace('trainer', 'trainer_epochs')}": v
                     for name, v in others.items()}},
              "decode_once_seconds": decoding,
              "trainer_over_bare": ours / bare, "trainer_over_floor": ours / best,
              "first_epoch_over_floor": first["trainer_epochs"][0] / best,
              **{f"{name.removeprefix('trainer_')}_over_floor": v[-1] / best
                 for name, v in others.items()},
              "no_worker_over_nchw_floor": others["trainer_no_worker"][-1] / nchw,
              "compiled_over_nchw_floor": others["trainer_compiled"][-1] / nchw,
              "trainer_over_passive_trainer": ours / others["trainer_passive"][-1],
              "floor_over_passive_floor": best / passive[fastest]["images_per_second"],
              "bare_over_floor": bare / best, "trainer_over_nchw_floor": ours / nchw,
              "channels_last": load_config(None, SETTINGS).model.channels_last,
              "bare_loop_steps": args.steps, "epochs": args.epochs, "settings": SETTINGS,
              "command": ".venv/bin/python benchmarks/train_speed.py" + (
                  "" if args.json == RESULTS else f" --json {args.json}")}
    for name, v in variants.items():
        print(f"floor {name:<24} {v['ms_per_step']:6.0f} ms/step {v['images_per_second']:6.1f} "
              f"img/s")
    print(f"floor channels_last + torch.compile {compiled['ms_per_step']:6.0f} ms/step after "
          f"{compiled['compile_seconds']:.0f} s compiling")
    print(f"bare loop {bare:.1f} img/s; decoding once {decoding:.1f} s")
    for name, v in others.items():
        print(f"{name}: {', '.join(f'{x:.1f}' for x in v)} img/s")
    for i, r in enumerate(rounds):
        print(f"round {i + 1}: trainer epochs {', '.join(f'{x:.1f}' for x in r['trainer_epochs'])}"
              f" img/s; / floor {r['trainer_over_floor']:.2f}, / float32 NCHW floor "
              f"{r['trainer_over_nchw_floor']:.2f}")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
