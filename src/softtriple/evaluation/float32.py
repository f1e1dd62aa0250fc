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
import threading
from collections.abc import Iterator
from typing import Any

import torch

_lock = threading.Lock()
_depth = 0  # searches inside float32_products now, in every thread
_saved: list[tuple[Any, str, object]] = []  # the settings the first of them found


class _MatmulPrecision:
    """torch < 2.9's one switch for float32 products, ``torch.set_float32_matmul_precision``, as
    an attribute ``value``: "highest" is IEEE on CUDA and on oneDNN ("high" is TF32 on CUDA,
    "medium" also bf16 in oneDNN's CPU products). ``allow_tf32`` is a view of it that cannot
    tell "high" from "medium": saved and restored through it, a caller's "medium" came back
    "high"."""

    @property
    def value(self) -> str:
        return torch.get_float32_matmul_precision()

    @value.setter
    def value(self, precision: str) -> None:
        torch.set_float32_matmul_precision(precision)


def _settings() -> list[tuple[Any, str, object]]:
    """(owner, name, value to hold) of every process-wide setting written, where this torch has
    it (the per-backend fp32_precision came with torch 2.9; before it, the float32 matmul
    precision is the only switch). Only per-backend settings are written where they exist: torch
    refuses to read a mix of its legacy and per-backend settings."""
    matmul = torch.backends.cuda.matmul
    out: list[tuple[Any, str, object]] = [
        (matmul, "fp32_precision", "ieee") if hasattr(matmul, "fp32_precision")
        else (_MatmulPrecision(), "value", "highest"),
        (matmul, "allow_bf16_reduced_precision_reduction", False)]
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    if mkldnn is not None and hasattr(mkldnn, "fp32_precision"):
        out.append((mkldnn, "fp32_precision", "ieee"))
    return out


@contextlib.contextmanager
def float32_products(device: torch.device) -> Iterator[None]:
    """Within: products as written (see the module docstring), autocast off on ``device``;
    after: the caller's settings again. The process-wide settings are held from the first
    search that enters to the last that leaves, whatever the threads (torch's own ``tf32_off``
    counts the same way), so that one thread's exit cannot restore another's forced values."""
    global _depth
    with _lock:
        if _depth == 0:
            held = _settings()
            _saved[:] = [(owner, name, getattr(owner, name)) for owner, name, _ in held]
            for owner, name, value in held:
                setattr(owner, name, value)
        _depth += 1
    try:
        if torch.amp.is_autocast_available(device.type):
            with torch.autocast(device.type, enabled=False):  # autocast is per thread
                yield
        else:
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for owner, name, value in reversed(_saved):
                    setattr(owner, name, value)
