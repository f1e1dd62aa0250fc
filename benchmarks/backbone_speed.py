"""Training step time of each backbone at CPU size: forward + backward + Adam of the embedding
model (backbone, pooling, a 64-d head) and SoftTripleLoss on an in-memory batch of 32 images of
64 x 64 px, float32, in torch's default NCHW memory format and in channels_last (the trainer's
default), Adam fused as the trainer's, median of 5 steps after 2 warm-up steps, under OpenMP's
default wait policy (as `softtriple train` runs). Random weights (the time does not depend on
them).

    .venv/bin/python benchmarks/backbone_speed.py

Writes benchmarks/results/backbone_speed.json with its conditions; docs/PERFORMANCE.md's backbone
table quotes it.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from conditions import Conditions
from steps import step_times

from softtriple.atomic import write_json
from softtriple.losses import SoftTripleLoss
from softtriple.models import EmbeddingModel, build_backbone

BACKBONES = {  # name: create-model options (a ViT's input size)
    "small_cnn": {}, "efficientnet_lite0": {}, "efficientnet_lite2": {}, "resnet18": {},
    "resnet50": {}, "timm:convnext_atto": {},
    "timm:vit_tiny_patch16_224": {"img_size": 64, "patch_size": 8},
}
RESULTS = Path(__file__).parent / "results" / "backbone_speed.json"
BATCH, SIZE, DIM, CLASSES = 32, 64, 64, 100


def step_seconds(name: str, options: dict, channels_last: bool, steps: int = 5) -> float:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = EmbeddingModel(build_backbone(name, pretrained=False, options=options or None), DIM)
    model.to(memory_format=fmt)
    loss_fn = SoftTripleLoss(CLASSES, DIM, centers_per_class=4)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-4,
                                 fused=True)
    x = torch.randn(BATCH, 3, SIZE, SIZE).contiguous(memory_format=fmt)
    y = torch.arange(BATCH) % CLASSES
    return statistics.median(step_times(model, loss_fn, optimizer, x, y, steps)[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noisy", action="store_true", help="run on a busy machine anyway")
    args = parser.parse_args()
    conditions = Conditions.start(allow_noisy=args.noisy)
    rows = []
    for name, options in BACKBONES.items():
        seconds = step_seconds(name, options, channels_last=False)
        last = step_seconds(name, options, channels_last=True)
        rows.append({"backbone": name, "options": options, "step_s": seconds,
                     "images_per_s": BATCH / seconds, "step_s_channels_last": last,
                     "images_per_s_channels_last": BATCH / last})
        print(f"{name:<28} NCHW {seconds * 1000:6.0f} ms/step {BATCH / seconds:6.1f} images/s; "
              f"channels_last {last * 1000:6.0f} ms/step {BATCH / last:6.1f} images/s",
              flush=True)
    write_json(RESULTS, {"conditions": conditions.finish(), "batch": BATCH, "image_size": SIZE,
                         "command": ".venv/bin/python benchmarks/backbone_speed.py",
                         "rows": rows})
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
