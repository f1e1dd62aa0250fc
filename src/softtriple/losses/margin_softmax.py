"""Additive-margin softmax losses on normalized class weights: CosFace (Wang et al., "CosFace:
Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018) and ArcFace (Deng et al.,
"ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019) and Sub-center
ArcFace (Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-Scale Noisy Web
Faces", ECCV 2020). Their class weights are proxies, like SoftTriple's centers, trained with the
loss's own learning rate; Sub-center ArcFace keeps K of them per class, as SoftTriple does, and
takes the closest (a hard max where SoftTriple's is smoothed)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softtriple.losses._checks import (
    check_count,
    check_fits,
    check_positive,
    check_scale,
)
from softtriple.losses._precision import float32_forward
from softtriple.losses._proxies import ProxyLoss


class _MarginSoftmax(ProxyLoss):
    """Cross-entropy on s * cos(x, c), the target class's cosine replaced by ``target_logit``,
    where cos(x, c) = max_k cos(x, w_c^k) over the class's K sub-centers (K = 1: the one weight).

    Args:
        num_classes: C. embedding_dim: d. scale: s. margin: m (its unit is the subclass's).
        centers_per_class: K.

    Shapes:
        embeddings (B, d) float, labels (B,) int64 in [0, C) -> scalar; weights (C K, d), class
        c's sub-centers in rows c K .. c K + K - 1 (pytorch-metric-learning's order).
    """

    settings = ("scale", "margin")

    def __init__(self, num_classes: int, embedding_dim: int, scale: float,
                 margin: float, centers_per_class: int = 1) -> None:
        super().__init__(num_classes, embedding_dim)
        check_count("centers_per_class", centers_per_class)
        check_scale("scale", scale)
        check_positive("margin", margin, allow_zero=True)
        check_fits("the loss's class weights", num_classes * centers_per_class, embedding_dim)
        self.centers_per_class = centers_per_class
        self.scale, self.margin = float(scale), float(margin)
        self.weights = nn.Parameter(
            torch.randn(num_classes * centers_per_class, embedding_dim))  # (C K, d)

    def target_logit(self, cos: Tensor) -> Tensor:
        raise NotImplementedError

    @float32_forward
    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x, w = self.unit_rows(embeddings, labels, self.weights)  # (B, d), (C K, d)
        cos = x @ w.T  # (B, C K)
        if self.centers_per_class > 1:  # the closest sub-center of each class
            cos = cos.view(len(cos), self.num_classes, self.centers_per_class).amax(2)  # (B, C)
        target = cos.gather(1, labels[:, None])  # (B, 1)
        logits = cos.scatter(1, labels[:, None], self.target_logit(target))
        return F.cross_entropy(self.scale * logits, labels)

    def extra_repr(self) -> str:
        k = f", centers_per_class={self.centers_per_class}" if self.centers_per_class > 1 else ""
        return f"{super().extra_repr()}{k}"


class CosFaceLoss(_MarginSoftmax):
    """CosFace (large margin cosine loss): the target logit is s (cos(theta_y) - m).

    Args:
        num_classes: C. embedding_dim: d. scale: s (paper: 64). margin: m, in cosine (0.35).
    """

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0,
                 margin: float = 0.35) -> None:
        super().__init__(num_classes, embedding_dim, scale, margin)
        if margin >= 1:  # cosines span [-1, 1]: m >= 1 puts every target below its wrong logits
            raise ValueError(f"margin is subtracted from a cosine and must be below 1 (paper: "
                             f"0.35); got {margin}")

    def target_logit(self, cos: Tensor) -> Tensor:
        return cos - self.margin


class ArcFaceLoss(_MarginSoftmax):
    """ArcFace (additive angular margin): the target logit is s cos(theta_y + m) while
    theta_y + m <= pi, and s (cos(theta_y) - m sin(m)) beyond, which keeps it decreasing in
    theta_y (as the official code and pytorch-metric-learning do).

    cos(theta + m) is computed as cos(theta) cos(m) - sin(theta) sin(m), with sin(theta) =
    sqrt(1 - cos^2) clamped away from 0, so the gradient stays finite where theta is 0 or pi.

    Args:
        num_classes: C. embedding_dim: d. scale: s (paper: 64).
        centers_per_class: K sub-centers a class (1: ArcFace; SubCenterArcFaceLoss's default 3).
        margin: m in degrees (paper: 0.5 rad = 28.6 degrees), 0 or in [RADIANS_BELOW, 90):
            a margin below 2 degrees can only be radians meant (0.5 would be 0.5 degrees, 57
            times smaller than the paper's), so it is refused with its value in degrees.
    """

    RADIANS_BELOW = 2.0

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0,
                 margin: float = 28.6, centers_per_class: int = 1) -> None:
        super().__init__(num_classes, embedding_dim, scale, margin, centers_per_class)
        if margin >= 90:
            raise ValueError(f"margin is in degrees and must be below 90; got {margin}")
        if 0 < margin < self.RADIANS_BELOW:
            raise ValueError(f"margin is in degrees; {margin} reads as radians: give "
                             f"{math.degrees(margin):.1f} (degrees), or 0 for no margin")
        self.radians = math.radians(self.margin)

    def target_logit(self, cos: Tensor) -> Tensor:
        m = self.radians
        sin = torch.sqrt((1.0 - cos * cos).clamp_min(1e-12))
        shifted = cos * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
        return torch.where(cos >= -math.cos(m), shifted, cos - m * math.sin(m))


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace: ArcFace on cos(x, c) = max_k cos(x, w_c^k), K sub-centers a class,
    so that a class's hard or noisy examples gather at a sub-center of their own (the paper's
    K = 3, pytorch-metric-learning's SubCenterArcFaceLoss default). The max is SoftTriple's
    smoothed max at gamma -> 0, without SoftTriple's regularizer that merges centers.

    Args:
        num_classes: C. embedding_dim: d. scale: s (paper: 64). margin: m in degrees (28.6).
        centers_per_class: K (paper: 3).
    """

    def __init__(self, num_classes: int, embedding_dim: int, scale: float = 64.0,
                 margin: float = 28.6, centers_per_class: int = 3) -> None:
        super().__init__(num_classes, embedding_dim, scale, margin, centers_per_class)
