"""How many operators one training step of the demo's recipe dispatches, phase by phase (the
network's forward with the loss, its backward, the trainer's one read of the loss and of the
gradients' finiteness (`trainer.read_step`), fused Adam), from torch.profiler on this machine's
CPU. On a GPU each is a host-side dispatch, most of them a
kernel launch, so the count times the host's cost per operator bounds a step when the kernels
are small (the demo's 64 px batches of 32): docs/PERFORMANCE.md, "CUDA graphs". A count, not a
timing: it does not depend on the machine's load or speed, only on the recipe and the library.

    .venv/bin/python benchmarks/step_ops.py [--json FILE]

Writes benchmarks/results/step_ops.json.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Any

import torch
from steps import RecipeStep
from torch.profiler import ProfilerActivity, profile

from softtriple.atomic import write_json
from softtriple.demo import demo_config
from softtriple.training.trainer import read_step

RESULTS = Path(__file__).parent / "results" / "step_ops.json"


def top_level_ops(prof: Any) -> collections.Counter[str]:
    """The aten operators called from Python (not those called inside another aten operator)."""
    return collections.Counter(
        e.name for e in prof.events() if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def count_step(image_size: int) -> dict[str, Any]:
    """Operators per phase of one warm step of the demo's recipe at ``image_size`` on the CPU."""
    recipe = RecipeStep.build(demo_config([f"data.image_size={image_size}", "run.device=cpu"]))
    objective, optimizer, config = recipe.objective, recipe.optimizer, recipe.config
    phases: dict[str, collections.Counter[str]] = {}
    for warm in (True, False):  # the first step allocates Adam's state; count the second
        optimizer.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as forward:
            value = objective(recipe.images, recipe.labels)
        with profile(activities=[ProfilerActivity.CPU]) as backward:
            value.backward()
        with profile(activities=[ProfilerActivity.CPU]) as check:
            read_step(value, objective)  # the trainer's one read: the loss, the gradients' check
        with profile(activities=[ProfilerActivity.CPU]) as adam:
            optimizer.step()
        if not warm:
            phases = {"forward_and_loss": top_level_ops(forward),
                      "backward": top_level_ops(backward),
                      "loss_and_gradient_check": top_level_ops(check), "adam": top_level_ops(adam)}
    return {"image_size": image_size, "batch": config.data.batch_size,
            "backbone": config.model.backbone,
            "operators": {k: sum(v.values()) for k, v in phases.items()},
            "total": sum(sum(v.values()) for v in phases.values()),
            "most_called": {k: dict(v.most_common(5)) for k, v in phases.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = {"command": "benchmarks/step_ops.py", "torch": torch.__version__,
              "demo": count_step(demo_config().data.image_size)}
    print(result)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
