"""Slow, loop-based references written straight from each paper's formula (test oracles only)."""

from __future__ import annotations

import torch
from torch import Tensor


def _unit(v: Tensor) -> Tensor:
    return v / torch.sqrt((v * v).sum())


def softtriple_reference(x: Tensor, labels: Tensor, centers: Tensor, la: float, gamma: float,
                         tau: float, margin: float) -> Tensor:
    """SoftTriple per DESIGN.md section 1, one example, class and center at a time."""
    num_classes, k, _ = centers.shape
    w = [[_unit(centers[c, j]) for j in range(k)] for c in range(num_classes)]
    total = x.new_zeros(())
    for i in range(x.shape[0]):
        xi = _unit(x[i])
        logits = []
        for c in range(num_classes):
            s = [torch.dot(xi, w[c][j]) for j in range(k)]
            if gamma == 0:
                big = s[0]
                for v in s[1:]:
                    big = torch.maximum(big, v)
                sim = big
            else:
                top = max(float(v.detach()) for v in s)
                e = [torch.exp((v - top) / gamma) for v in s]
                z = sum(e)
                sim = sum(e[j] / z * s[j] for j in range(k))
            logits.append(la * (sim - (margin if c == int(labels[i]) else 0.0)))
        top = max(float(v.detach()) for v in logits)
        log_z = top + torch.log(sum(torch.exp(v - top) for v in logits))
        total = total + (log_z - logits[int(labels[i])])
    loss = total / x.shape[0]
    if tau > 0 and k > 1:
        reg = x.new_zeros(())
        for c in range(num_classes):
            for t in range(k):
                for s_ in range(t + 1, k):
                    reg = reg + torch.sqrt(2.0 + 1e-5 - 2.0 * torch.dot(w[c][t], w[c][s_]))
        loss = loss + tau * reg / (num_classes * k * (k - 1))
    return loss


def softmax_norm_reference(x: Tensor, labels: Tensor, centers: Tensor, la: float,
                           margin: float) -> Tensor:
    """Normalized SoftMax with margin: one center per class; centers (C, d)."""
    return softtriple_reference(x, labels, centers[:, None, :], la, 1.0, 0.0, margin)


def log_sum_exp(values: list[Tensor]) -> Tensor:
    top = max(float(v.detach()) for v in values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))


__all__ = ["log_sum_exp", "softmax_norm_reference", "softtriple_reference"]
