"""The CPU engine of the kNN's similarity tiles: torch's BLAS or numpy's, whichever is faster here.

torch's wheels multiply float32 matrices with MKL, numpy's with OpenBLAS. Which is faster depends
on the CPU: on an AMD EPYC (Zen 4) MKL ran at half OpenBLAS's speed (5,924 x 512 times its
transpose: 0.33 s against 0.15-0.17 s), on an Intel Xeon with AVX-512 the other way round. So the
engine is measured once per process, on the first float32 CPU tile, or named by
``$SOFTTRIPLE_MATMUL`` (``torch``, ``numpy`` or ``auto``, the default). Either engine computes the
same products up to float32 rounding; the kNN's tie rule and selection do not depend on it.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Engine = Literal["torch", "numpy"]
ENGINES: tuple[Engine, ...] = ("torch", "numpy")
PROBE = (768, 512)  # rows and width of the probe's product with its own transpose: 0.04 s for
# both engines; with the top-k in it, it ranks them as the kNN's 3,000-row tiles do
SMALL = 2**28  # multiply-adds below which a tile goes to torch unmeasured (about 10 ms)


def _product(engine: Engine) -> Callable[[Tensor, Tensor], Tensor]:
    if engine == "torch":
        return lambda a, b: a @ b.T
    return lambda a, b: torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy().T))


def measure(repeats: int = 2) -> dict[Engine, float]:
    """Median seconds of each engine's (768 x 512) @ (512 x 768) product followed by a top-k
    of its rows, as in the kNN, over ``repeats`` consecutive calls after one warm-up call.

    Not interleaved, and with torch's top-k in the timing: a BLAS whose threads keep spinning
    after its product slows torch's next operations (numpy's OpenBLAS doubled the time of the
    kNN's top-k on an Intel Xeon), and that cost belongs to the engine that causes it.
    """
    x = torch.randn(*PROBE, generator=torch.Generator().manual_seed(0))
    times: dict[Engine, float] = {}
    for engine in ENGINES:
        product = _product(engine)
        calls = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            product(x, x).topk(32, dim=1)
            calls.append(time.perf_counter() - start)
        times[engine] = statistics.median(calls[1:])
    return times


@functools.cache
def cpu_engine() -> Engine:
    """The engine for float32 CPU tiles: $SOFTTRIPLE_MATMUL, or the faster one measured here."""
    setting = os.environ.get("SOFTTRIPLE_MATMUL", "auto")
    if setting in ENGINES:
        return setting  # type: ignore[return-value]
    if setting != "auto":
        raise ValueError(f"SOFTTRIPLE_MATMUL={setting!r}; valid: auto, torch, numpy")
    times = measure()
    return min(times, key=times.__getitem__)


def similarity_tile(rows: Tensor, columns: Tensor) -> Tensor:
    """(b, d) x (m, d) -> (b, m) dot products, by the faster engine for large float32 CPU
    tiles (small ones, and every other device and dtype, by torch)."""
    large = rows.shape[0] * columns.shape[0] * rows.shape[1] >= SMALL
    cpu32 = rows.device.type == "cpu" and rows.dtype == torch.float32
    return _product(cpu_engine() if large and cpu32 else "torch")(rows, columns)
