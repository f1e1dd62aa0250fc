"""Training step time of each backbone at CPU size: forward + backward + Adam of the embedding
model (backbone, pooling, a 64-d head) and SoftTripleLoss on an in-memory batch of 32 images of
64 x 64 px, float32, median of 5 steps after 2 warm-up steps. Random weights (the time does not
depend on them).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/backbone_speed.py

Writes benchmarks/results/backbone_speed.json with its conditions; README's backbone table
quotes it.
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


def step_seconds(name: str, options: dict, steps: int = 5) -> float:
    torch.manual_seed(0)
    model = EmbeddingModel(build_backbone(name, pretrained=False, options=options or None), DIM)
    loss_fn = SoftTripleLoss(CLASSES, DIM, centers_per_class=4)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-4)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    y = torch.arange(BATCH) % CLASSES
    return statistics.median(step_times(model, loss_fn, optimizer, x, y, steps)[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noisy", action="store_true", help="run on a busy machine anyway")
    args = parser.parse_args()
    conditions = Conditions.start(allow_noisy=args.noisy)
    rows = []
    for name, options in BACKBONES.items():
        seconds = step_seconds(name, options)
        rows.append({"backbone": name, "options": options, "step_s": seconds,
                     "images_per_s": BATCH / seconds})
        print(f"{name:<28} {seconds * 1000:8.0f} ms/step {BATCH / seconds:7.1f} images/s",
              flush=True)
    write_json(RESULTS, {"conditions": conditions.finish(), "batch": BATCH, "image_size": SIZE,
                         "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python "
                                    "benchmarks/backbone_speed.py", "rows": rows})
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
