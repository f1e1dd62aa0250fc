"""Losses for deep metric learning; every one maps ``(embeddings (B, d), labels (B,))`` to a scalar.

``LOSSES`` maps a name to its class; ``build_loss(name, **kwargs)`` builds one and rejects
unknown names and keyword arguments with a ValueError that lists the valid ones.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from softtriple.losses.contrastive import ContrastiveLoss
from softtriple.losses.facility_location import ClusteringLoss
from softtriple.losses.lifted import LiftedStructureLoss
from softtriple.losses.margin_softmax import ArcFaceLoss, CosFaceLoss, SubCenterArcFaceLoss
from softtriple.losses.multi_similarity import MultiSimilarityLoss
from softtriple.losses.npair import NPairLoss
from softtriple.losses.proxy_anchor import ProxyAnchorLoss
from softtriple.losses.proxy_nca import ProxyNCALoss
from softtriple.losses.softmax_norm import SoftMaxNormLoss
from softtriple.losses.softtriple import HardTripleLoss, SoftTripleLoss
from softtriple.losses.triplet import TripletLoss

LOSSES: dict[str, type[nn.Module]] = {
    "softtriple": SoftTripleLoss,
    "hardtriple": HardTripleLoss,
    "softmax_norm": SoftMaxNormLoss,
    "proxy_nca": ProxyNCALoss,
    "proxy_anchor": ProxyAnchorLoss,
    "npair": NPairLoss,
    "lifted": LiftedStructureLoss,
    "triplet": TripletLoss,
    "clustering": ClusteringLoss,
    "contrastive": ContrastiveLoss,
    "multi_similarity": MultiSimilarityLoss,
    "arcface": ArcFaceLoss,
    "cosface": CosFaceLoss,
    "subcenter_arcface": SubCenterArcFaceLoss,
}


def loss_arguments(name: str) -> list[str]:
    """The keyword arguments that ``LOSSES[name]`` accepts."""
    params = inspect.signature(LOSSES[name].__init__).parameters
    return [p for p in params if p != "self"]


PAIR_ADAM_EPS = 1e-8  # Adam's own default


def adam_eps(name: str) -> float:
    """Adam's eps for a run of loss ``name`` when optimizer.eps is not set: the class's
    ``adam_eps`` (0.01, the SoftTriple paper's, for SoftTriple's family and the proxy and
    margin losses), else Adam's 1e-8. The pair losses' gradients reach the network 6-18x smaller
    than SoftTriple's (dL/d(embedding) per example, benchmarks/results/pair_diagnosis.json), far
    below 0.01 per parameter, where Adam's step lr m / (sqrt(v) + eps) shrinks to lr g / eps:
    multi-similarity fine-tuned at eps 0.01 barely moved (docs/RESULTS.md)."""
    return float(getattr(LOSSES[name], "adam_eps", PAIR_ADAM_EPS))


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the loss registered as ``name`` with ``kwargs``.

    Raises:
        ValueError: for an unknown name or keyword argument, listing the valid ones.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}")
    valid = loss_arguments(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)} for loss {name!r}; "
                         f"valid: {', '.join(valid)}")
    return LOSSES[name](**kwargs)


__all__ = [
    "LOSSES",
    "ArcFaceLoss",
    "ClusteringLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "HardTripleLoss",
    "LiftedStructureLoss",
    "MultiSimilarityLoss",
    "NPairLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SoftMaxNormLoss",
    "SoftTripleLoss",
    "SubCenterArcFaceLoss",
    "TripletLoss",
    "adam_eps",
    "build_loss",
    "loss_arguments",
]
