"""One training step of a model, its loss and optimizer on a fixed batch, timed: the unit the
training benchmarks (train_speed, backbone_speed) measure."""

from __future__ import annotations

import time

import torch
from torch import nn


def step_times(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``warmup + steps`` steps (zero_grad, forward, loss, backward,
    optimizer step) on the batch (x, y); the first ``warmup`` include start-up (allocator,
    threads, a compile) and belong to no median."""
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times
