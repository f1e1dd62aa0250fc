"""The exact search's products in the precision it proves its answer in, whatever the caller set.

A training loop sets reduced precision for its own speed, process-wide or around its code:
``torch.autocast`` (bf16 / fp16 products and results), TF32 for float32 products on CUDA
(``torch.set_float32_matmul_precision("high")``, ``torch.backends.cuda.matmul.allow_tf32``:
10-bit mantissas), oneDNN's bf16 for float32 products on a CPU, and cuBLAS's bf16 products
reduced in bf16 (torch's default). Each of them reaches a search called from inside it: under
CPU autocast the float32 engine returned bf16 similarities and the bf16 engine re-ranked in bf16
(half the rows' neighbour lists changed), so "exact" was not. ``float32_products`` holds, for
its duration, float32 products in float32 (IEEE), bf16 products accumulated in float32 (the bf16
engine's bound assumes it) and autocast off on the rows' device, then gives the caller's settings
back as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _set(owner: Any, name: str, value: object, saved: list[tuple[Any, str, object]]) -> None:
    """owner.name = value where torch has the setting (fp32_precision came with torch 2.9),
    remembering the old value first."""
    if owner is None or not hasattr(owner, name):
        return
    saved.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


@contextlib.contextmanager
def float32_products(device: torch.device) -> Iterator[None]:
    """Within: products as written on ``device`` (see the module docstring); after: the
    caller's settings again. Only torch's per-backend settings are written (the legacy
    ``allow_tf32`` is not: torch refuses to read a mix of the two kinds of setting)."""
    saved: list[tuple[Any, str, object]] = []
    try:
        if device.type == "cuda":
            matmul = torch.backends.cuda.matmul
            if hasattr(matmul, "fp32_precision"):
                _set(matmul, "fp32_precision", "ieee", saved)
            else:  # torch < 2.9: the legacy switch is the only one
                _set(matmul, "allow_tf32", False, saved)
            _set(matmul, "allow_bf16_reduced_precision_reduction", False, saved)
        elif device.type == "cpu":
            _set(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "ieee", saved)
        if torch.amp.is_autocast_available(device.type):
            with torch.autocast(device.type, enabled=False):
                yield
        else:
            yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
