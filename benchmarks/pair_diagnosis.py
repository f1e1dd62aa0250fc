"""Why do pair losses stall when fine-tuned with the demo's recipe? Step-by-step signals of the
first training steps, each loss on its own batches from the same seeded run:

- the loss, and for pair losses the share of pairs their miner keeps (multi-similarity's mined
  positive and negative pairs; semi-hard triplet's pairs with a non-zero hinge);
- the gradient reaching the network: dL/d(embedding) per example (2-norm), the gradient 2-norm
  of the backbone, of the embedding layer and of the loss's own parameters;
- the update each group receives: |w_after - w_before| / |w_before| (Adam with the recipe's
  eps = 0.01 turns gradients far below eps into steps of lr g / eps).

    .venv/bin/python benchmarks/pair_diagnosis.py [--steps 100] [--set KEY=VALUE ...]

Needs the built-in glyphs (softtriple data prepare glyphs). Writes
benchmarks/results/pair_diagnosis.json; docs/RESULTS.md quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from conditions import Conditions

from softtriple.atomic import write_json
from softtriple.experiment import load_config
from softtriple.losses._pairs import class_masks, euclidean_distances
from softtriple.losses.multi_similarity import mine_pairs
from softtriple.training import Trainer

RESULTS = Path(__file__).parent / "results" / "pair_diagnosis.json"
CONFIG = Path(__file__).parents[1] / "configs" / "glyphs.yaml"
COMMON = ["evaluation.every=0", "evaluation.before_training=false", "run.report=false",
          "run.progress=false", "data.workers=0"]
VARIANTS = {  # the fine-tune suites' settings (configs/compare/*_finetune.yaml)
    "SoftTriple": ["loss.args={centers_per_class: 4, la: 20.0, gamma: 0.1, tau: 0.2, "
                   "margin: 0.01}"],
    "multi-similarity": ["loss.name=multi_similarity", "data.sampler=class_balanced",
                         "data.images_per_class=4"],
    "triplet semi-hard": ["loss.name=triplet", "loss.args={margin: 0.2}",
                          "data.sampler=class_balanced", "data.images_per_class=4"],
}


def mined_share(name: str, loss: torch.nn.Module, e: torch.Tensor,
                labels: torch.Tensor) -> dict[str, float]:
    """The share of pairs the loss learns from on this batch."""
    e = F.normalize(e.detach().float(), dim=1)
    positive, negative = class_masks(labels)
    if name == "multi-similarity":
        sim = e @ e.T
        pos, neg = mine_pairs(sim, positive, negative, loss.epsilon)
        return {"positive_pairs_kept": float(pos.sum() / positive.sum()),
                "negative_pairs_kept": float(neg.sum() / negative.sum()),
                "mean_positive_similarity": float(sim[positive].mean()),
                "mean_negative_similarity": float(sim[negative].mean())}
    if name == "triplet semi-hard":
        dist = euclidean_distances(e, squared=True)
        a, p = positive.nonzero(as_tuple=True)
        d_an = torch.where(negative[a], dist[a], float("inf"))
        farther = negative[a] & (dist[a] > dist[a, p][:, None])
        semi = torch.where(farther, dist[a], float("inf")).amin(dim=1)
        chosen = torch.where(farther.any(dim=1), semi, torch.where(
            negative[a], dist[a], float("-inf")).amax(dim=1))
        active = (dist[a, p] - chosen + loss.margin) > 0
        return {"pairs_with_loss": float(active.float().mean()),
                "mean_ap_distance": float(dist[a, p].mean()),
                "mean_nearest_negative": float(d_an.amin(dim=1).mean())}
    return {}


def norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t)
                                                       for t in tensors]))) if tensors else 0.0


def diagnose(name: str, settings: list[str], steps: int, out: Path) -> dict[str, Any]:
    config = load_config(CONFIG, [*COMMON, *settings, f"run.out={out}"])
    trainer = Trainer(config)
    model, loss_fn, optimizer = trainer.model, trainer.loss, trainer.optimizer
    groups = {"backbone": list(model.backbone.parameters()),
              "embedding layer": list(model.embedding.parameters()),
              "loss": list(loss_fn.parameters())}
    model.train()
    torch.manual_seed(config.run.seed * 100_003)
    trainer.loaders.train.batch_sampler.set_epoch(0)  # type: ignore[union-attr]
    rows = []
    for i, (images, labels, _) in enumerate(trainer.loaders.train):
        if i >= steps:
            break
        images = images.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        embeddings = model(images)
        embeddings.retain_grad()
        loss = loss_fn(embeddings, labels)
        loss.backward()
        before = {g: [p.detach().clone() for p in ps] for g, ps in groups.items()}
        optimizer.step()
        row: dict[str, Any] = {"step": i, "loss": float(loss.detach()),
                               "embedding_grad_per_example": float(
                                   embeddings.grad.norm(dim=1).mean()),
                               **mined_share(name, loss_fn, embeddings, labels)}
        for group, params in groups.items():
            if not params:
                continue
            row[f"{group} grad"] = norm([p.grad for p in params if p.grad is not None])
            row[f"{group} update/weight"] = norm(
                [p.detach() - b for p, b in zip(params, before[group], strict=True)]) / norm(
                    before[group])
        rows.append(row)
    trainer.release()
    summary = {}
    for key in rows[0]:
        if key != "step":
            first, last = rows[: steps // 5], rows[-(steps // 5):]
            summary[key] = {"first": statistics.mean(r[key] for r in first),
                            "last": statistics.mean(r[key] for r in last)}
    print(name, {k: {kk: round(vv, 5) for kk, vv in v.items()} for k, v in summary.items()},
          flush=True)
    return {"settings": settings, "summary": summary, "steps": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every variant, e.g. optimizer.eps=1e-8")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    conditions = Conditions.start(allow_noisy=True)
    report: dict[str, Any] = {"command": " ".join([".venv/bin/python", *sys.argv]),
                              "extra_settings": args.set, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in VARIANTS.items():
            report["variants"][name] = diagnose(name, [*settings, *args.set], args.steps,
                                                Path(tmp) / name.replace(" ", "_"))
    report["conditions"] = conditions.finish()
    write_json(args.json, report)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
