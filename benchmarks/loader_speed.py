"""Loader throughput at the paper's image size (224 px crops of CUB-sized photos): what the
training loader can feed a GPU, with the images sent as uint8 (ours: the model normalizes them
on its device) or as float32 (torchvision's usual pipeline, ToDtype + Normalize in the workers,
which this project's loaders ran until now), and where an image's time goes.

1. **Per image, in one process**: the JPEG decode, the random crop and flip, the float32
   conversion and normalization (the tail the workers no longer run), and the collate of a batch
   into shared memory as a worker does it, float32 against uint8.
2. **The loader alone**: softtriple's ImageDataset in a DataLoader as ``build_loaders`` makes
   them (persistent workers, the training transform, a batch of 128), its images per second
   over ``--steps`` batches after the first (which starts the workers), uint8 against float32,
   each from the files (CUB, Cars and SOP exceed ``data.decode_once_mib``) and decoded once, the
   variants interleaved over ``--rounds``. With a CUDA device each batch is also pinned, copied
   to the device and (uint8) normalized there, timed to the device's synchronize.

The photos: scikit-learn's two sample photographs (china.jpg, flower.jpg, 427 x 640), cropped at
random and scaled to 500 x 375 (a CUB image's usual size), saved as JPEG quality 90.

    .venv/bin/python benchmarks/loader_speed.py [--device cuda] [--workers W] [--json PATH]

Writes benchmarks/results/loader_speed.json (and the path given); docs/PERFORMANCE.md quotes it.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from conditions import Conditions
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from softtriple.atomic import write_json
from softtriple.data import ImageDataset, ImageTable, load_image, normalize_images, train_transform
from softtriple.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from softtriple.experiment.loaders import loader_workers

RESULTS = Path(__file__).parent / "results" / "loader_speed.json"
WIDTH, HEIGHT = 500, 375  # a CUB image's usual size


@functools.cache
def sample_photos() -> tuple[Image.Image, ...]:
    from sklearn.datasets import load_sample_image
    return tuple(Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg"))


def write_photo(path: Path, index: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> None:
    """Photo ``index``: a random crop (seeded by the index) of one of scikit-learn's two sample
    photographs, of the aspect of ``size`` (width, height), scaled to it, JPEG quality 90."""
    source = sample_photos()[index % 2]
    rng = np.random.default_rng(index)
    w = int(rng.integers(300, source.width + 1))
    h = min(source.height, round(w * size[1] / size[0]))
    left = int(rng.integers(0, source.width - w + 1))
    top = int(rng.integers(0, source.height - h + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    source.crop((left, top, left + w, top + h)).resize(size).save(path, quality=90)


def write_photos(paths: list[Path], size: tuple[int, int] = (WIDTH, HEIGHT),
                 processes: int = 1) -> None:
    """Photo i at ``paths[i]``, in ``processes`` processes."""
    jobs = [(path, i, size) for i, path in enumerate(paths)]
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.starmap(write_photo, jobs, chunksize=16)
    else:
        for job in jobs:
            write_photo(*job)


def float_pipeline(size: int) -> v2.Compose:
    """The training transform with torchvision's usual float32 tail, in the workers."""
    return v2.Compose([*train_transform(size).transforms, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])


def ms_per_call(run: Callable[[], Any], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def shared_collate(items: list[torch.Tensor]) -> torch.Tensor:
    """What default_collate does in a loader worker: the batch allocated in shared memory (so
    the main process receives it without a copy) and the items stacked into it."""
    first = items[0]
    storage = first._typed_storage()._new_shared(len(items) * first.numel(), device=first.device)
    out = first.new(storage).resize_(len(items), *first.shape)
    return torch.stack(items, 0, out=out)


def per_image(paths: list[Path], size: int, batch: int) -> dict[str, float]:
    """ms per image of each stage, and per batch of the collates and of the normalization of a
    uint8 batch (what the model now does on its device), in this process."""
    crop = v2.Compose(list(train_transform(size).transforms[1:]))  # after ToImage
    tail = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])
    picture = load_image(paths[0])
    image = v2.functional.to_image(picture)
    crops = [crop(image).as_subclass(torch.Tensor) for _ in range(batch)]
    floats = [tail(c).as_subclass(torch.Tensor) for c in crops]
    stacked = torch.stack(crops)
    decode = statistics.median(ms_per_call(partial(load_image, p), 3) for p in paths[:20])
    return {"decode_ms": decode,
            "to_image_ms": ms_per_call(lambda: v2.functional.to_image(picture), 50),
            "crop_flip_ms": ms_per_call(lambda: crop(image), 50),
            "float_normalize_ms": ms_per_call(lambda: tail(crops[0]), 50),
            "collate_float32_ms_per_batch": ms_per_call(lambda: shared_collate(floats), 10),
            "collate_uint8_ms_per_batch": ms_per_call(lambda: shared_collate(crops), 10),
            "normalize_batch_ms": ms_per_call(
                lambda: normalize_images(stacked, IMAGENET_MEAN, IMAGENET_STD), 10)}


def loader_rate(table: ImageTable, transform: v2.Compose, decode_once: int, batch: int,
                workers: int, steps: int, device: torch.device) -> float:
    """Images per second of a loader over ``steps`` batches after its first; on a CUDA device
    each batch pinned, copied and (uint8) normalized there."""
    dataset = ImageDataset(table, np.zeros(len(table), dtype=np.int64), transform, seed=0,
                           decode_once=decode_once)
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        pin_memory=cuda, persistent_workers=workers > 0, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    seen, start = 0, 0.0
    batches = iter(loader)
    for i in range(steps + 1):
        images = next(batches)[0]
        if cuda:
            images = images.to(device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = normalize_images(images, mean, std)
        if i == 0:  # the workers have started
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        else:
            seen += len(images)
    if cuda:
        torch.cuda.synchronize(device)
    rate = seen / (time.perf_counter() - start)
    del batches, loader
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=-1,
                        help="loader workers (-1: data.workers' default for the device)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=8, help="timed batches per variant")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--noisy", action="store_true", help="run on a busy machine anyway")
    args = parser.parse_args()
    conditions = Conditions.start(threads=None, allow_noisy=args.noisy)
    figures = measure(torch.device(args.device), args.workers, args.batch, args.size,
                      args.steps, args.rounds, conditions.threads["torch"])
    report = {"conditions": conditions.finish(), **figures,
              "command": " ".join(["benchmarks/loader_speed.py", *sys.argv[1:]])}
    write_json(args.json, report)
    print(json.dumps(report, indent=1))


def measure(device: torch.device, workers: int = -1, batch: int = 128, size: int = 224,
            steps: int = 8, rounds: int = 2, threads: int = 1) -> dict[str, Any]:
    """Both figures: the stages of one image (one thread) and each loader variant's images per
    second (its best of ``rounds``), with ``workers`` (-1: data.workers' default)."""
    workers = loader_workers(workers, device.type == "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        count = batch * (steps + 1)
        paths = [Path(tmp) / f"{i:05d}.jpg" for i in range(count)]
        write_photos(paths, processes=len(os.sched_getaffinity(0)))
        table = ImageTable(paths, np.zeros(count, dtype=np.int64), np.array(["train"] * count),
                           Path(tmp))
        torch.set_num_threads(1)
        stages = per_image(paths, size, batch)
        torch.set_num_threads(threads)
        variants = {"uint8 from files": (train_transform(size), 0),
                    "float32 from files": (float_pipeline(size), 0),
                    "uint8 decoded once": (train_transform(size), 2**40),
                    "float32 decoded once": (float_pipeline(size), 2**40)}
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (transform, budget) in variants.items():
                rates[name].append(loader_rate(table, transform, budget, batch, workers, steps,
                                               device))
    rate = {name: max(r) for name, r in rates.items()}  # each variant's best round
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "workers": workers, "batch": batch, "image_size": size,
        "photos": {"count": count, "size": [WIDTH, HEIGHT], "quality": 90},
        "per_image_one_thread": stages, "images_per_second": rate, "rounds": rates,
        "uint8_over_float32": {
            "from files": rate["uint8 from files"] / rate["float32 from files"],
            "decoded once": rate["uint8 decoded once"] / rate["float32 decoded once"]}}


if __name__ == "__main__":
    main()
