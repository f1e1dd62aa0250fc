"""Losses compute in float32 under mixed precision.

Under ``torch.autocast`` (bf16 or fp16) the network runs in low precision, but a metric-learning
loss should not: its exponents (scale lambda = 20, 1 / gamma = 10) overflow float16 and its
products of near-unit vectors lose the margin delta = 0.01 in bfloat16's 8-bit mantissa. So every
loss's forward runs with autocast off and its half-precision embeddings cast up to float32, and
its parameters (centers, proxies) stay float32: nothing here ever casts a parameter itself (the
trap of pytorch-metric-learning's issue #309, where a cast turned the proxies to half precision).
Gradients flow back through the cast, in the embeddings' own dtype.

Call ``backward()`` outside the autocast block, as PyTorch advises (the trainer does): autocast
is the state of the thread that runs the backward, so inside it the losses' backward products
run in low precision too (measured on the CPU under bf16: every loss's gradients off by up to
9e-3, the built-in ops' formulas and our own autograd Functions alike).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)
Forward = TypeVar("Forward", bound=Callable[..., Tensor])


def up(x: Tensor) -> Tensor:
    """x in float32 when it is float16 or bfloat16; otherwise x itself (float64 stays)."""
    return x.float() if x.dtype in HALF else x


def no_autocast(device: torch.device) -> Any:
    """A context with autocast off on ``device`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def float32_forward(forward: Forward) -> Forward:
    """Decorate a loss's ``forward(self, embeddings, labels)``: autocast off, embeddings cast up
    to float32 when they are float16 or bfloat16."""

    @functools.wraps(forward)
    def wrapper(self: object, embeddings: Tensor, labels: Tensor) -> Tensor:
        if not isinstance(embeddings, Tensor):  # let the loss's own check say what is wrong
            return forward(self, embeddings, labels)
        with no_autocast(embeddings.device):
            return forward(self, up(embeddings), labels)

    return wrapper  # type: ignore[return-value]
