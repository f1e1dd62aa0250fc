"""One training step of a model, its loss and optimizer on a fixed batch, timed: the unit the
training benchmarks (train_speed, backbone_speed) measure."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from softtriple.experiment.config import Config


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before a clock is read: CUDA's synchronize, or
    nothing (CPU work is done when its call returns)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


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


@dataclass
class RecipeStep:
    """A recipe's training step on one in-memory batch: its objective (model and loss), Adam,
    and a random batch of its size, image size and memory format, with labels of
    ``data.images_per_class`` images a class, on the device the recipe trains on; its network
    graphed where the config says model.cuda_graph=true. Calling it runs one step (zero_grad,
    forward, loss, backward, optimizer step)."""

    config: Config
    device: torch.device
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def build(cls, config: Config) -> RecipeStep:
        from softtriple.experiment.build import (
            build_config_loss,
            build_objective,
            build_optimizer,
            build_training_model,
            configure_kernels,
            graph_network,
            resolve_device,
        )
        device = resolve_device(config.run.device)
        # the recipe's kernel settings (cuDNN autotuning, determinism), whatever ran before
        configure_kernels(device, config.run.deterministic, config.run.cudnn_benchmark)
        model = build_training_model(config, device)
        if config.model.cuda_graph:
            graph_network(model, config, device)
        loss = build_config_loss(config, config.data.max_classes).to(device)
        objective = build_objective(config, model, loss, device)
        optimizer = build_optimizer(config, model, loss, device)[0]
        batch, size = config.data.batch_size, config.data.image_size
        memory = torch.channels_last if config.model.channels_last else torch.contiguous_format
        # uint8, as the loader gives them: the model normalizes them in its step
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                               device=device).contiguous(memory_format=memory)
        labels = (torch.arange(batch, device=device) // config.data.images_per_class) \
            % config.data.max_classes
        objective.train()
        return cls(config, device, objective, optimizer, images, labels)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.objective(self.images, self.labels).backward()
        self.optimizer.step()
