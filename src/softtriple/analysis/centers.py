"""How a trained SoftTriple run uses its centers (the "why" of RQ2): for every training example,
which of its own class's K centers wins (the largest similarity x . w_y^k), how many examples
each center wins, and how many centers win none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from softtriple.losses import SoftTripleLoss
from softtriple.losses.softtriple import MERGE_THRESHOLD


def center_wins(embeddings: np.ndarray, labels: np.ndarray, centers: torch.Tensor) -> np.ndarray:
    """(C, K) int: how many examples each center wins among its class's centers.

    Args:
        embeddings: (N, d) training embeddings. labels: (N,) int in [0, C).
        centers: (C, K, d) the loss's centers (normalized here).
    """
    w = torch.nn.functional.normalize(centers.detach().float(), dim=2)  # (C, K, d)
    x = torch.nn.functional.normalize(torch.as_tensor(embeddings).float(), dim=1)  # (N, d)
    y = torch.as_tensor(labels).long()
    sims = torch.einsum("nd,nkd->nk", x, w[y])  # (N, K): x_i . w_{y_i}^k
    winner = sims.argmax(dim=1)
    c, k = w.shape[:2]
    wins = torch.bincount(y * k + winner, minlength=c * k).view(c, k)
    return wins.cpu().numpy()


def center_usage(run: str | Path) -> dict[str, Any] | None:
    """The usage summary of a finished SoftTriple run (None for any other loss): centers per
    class K, effective centers (merged at cosine > MERGE_THRESHOLD), the fraction of centers
    that win no training example, the mean number of centers that win at least one example per
    class, and the share of a class's examples its busiest center wins."""
    from softtriple.experiment.build import build_config_loss
    from softtriple.inference import embed_split, load_model

    model, config, state = load_model(run)
    loss = build_config_loss(config, int(state["num_classes"]))
    if not isinstance(loss, SoftTripleLoss) or config.loss.shard_centers:
        return None
    loss.load_state_dict(state["loss"])
    embeddings, labels, _, _ = embed_split(model, config, "train")
    wins = center_wins(embeddings, labels, loss.centers)  # (C, K)
    present = wins.sum(axis=1) > 0
    wins = wins[present]
    return {"run": str(run), "centers_per_class": int(wins.shape[1]),
            "effective_centers": float(
                loss.effective_centers(MERGE_THRESHOLD).float()[present].mean()),
            "centers_winning_none": float((wins == 0).mean()),
            "winning_centers_per_class": float((wins > 0).sum(axis=1).mean()),
            "busiest_center_share": float((wins.max(axis=1) / wins.sum(axis=1)).mean()),
            "examples_per_class": float(wins.sum(axis=1).mean())}
