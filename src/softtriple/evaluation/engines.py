"""The CPU engine of the exact kNN: torch's BLAS, numpy's, or faiss's exact search, whichever is
fastest here.

torch's wheels multiply float32 matrices with MKL, numpy's and faiss's with OpenBLAS. Which is
fastest depends on the CPU: on an AMD EPYC (Zen 4) MKL ran at half OpenBLAS's speed (5,924 x 512
times its transpose: 0.33 s against 0.15-0.17 s), on an Intel Xeon with AVX-512 the other way
round, and there faiss's exact search (its product and a heap per query) beat both a product and
a top-k in torch. So ``knn(..., backend="auto")`` takes ``$SOFTTRIPLE_KNN_ENGINE`` (``torch``,
``numpy``, ``faiss``) or, by default, the engine measured fastest on this machine.

The measurement (0.5 s, at 2,048 rows: at 768, faiss's per-call overhead hid that it is the
fastest at 5,924) is kept per machine in ``$XDG_CACHE_HOME/softtriple/knn_engine.json``
(``~/.cache`` by default), keyed by the CPU and the libraries' versions; delete it to measure
again. The engines differ only in float32 rounding; every one keeps the kNN's tie rule (the lower
index wins), so their neighbours are the same wherever no rounding decides.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from softtriple.atomic import DiskFullError, write_json

Engine = Literal["torch", "numpy", "faiss"]
ENGINES: tuple[Engine, ...] = ("torch", "numpy", "faiss")
PROBE = (2048, 512)  # rows and width of the probe
SMALL = 2**28  # multiply-adds below which a search goes to torch unmeasured (about 10 ms)


def tile_product(engine: Engine) -> Callable[[Tensor, Tensor], Tensor]:
    """(b, d) x (m, d) -> (b, m) dot products by torch's BLAS or numpy's."""
    if engine == "numpy":
        return lambda a, b: torch.from_numpy(np.matmul(a.detach().numpy(),
                                                       b.detach().numpy().T))
    return lambda a, b: a @ b.T


def faiss_search(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """faiss's exact inner-product search: (Nq, k) similarities and indices, best first."""
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    sims, ids = index.search(queries, k)
    return sims, ids


def available() -> tuple[Engine, ...]:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return ("torch", "numpy")
    return ENGINES


def measure(repeats: int = 2) -> dict[Engine, float]:
    """Median seconds of each engine's 32 nearest neighbours of 2048 x 512 rows among themselves
    (a product and torch's top-k of its rows, or faiss's search), over ``repeats`` consecutive
    calls after one warm-up call.

    Not interleaved, and with torch's top-k in the timing: a BLAS whose threads keep spinning
    after its product slows torch's next operations (numpy's OpenBLAS doubled the time of the
    kNN's top-k on an Intel Xeon), and that cost belongs to the engine that causes it.
    """
    x = torch.randn(*PROBE, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    calls: dict[Engine, Callable[[], object]] = {
        "torch": lambda: tile_product("torch")(x, x).topk(32, dim=1),
        "numpy": lambda: tile_product("numpy")(x, x).topk(32, dim=1),
        "faiss": lambda: faiss_search(xn, xn, 32)}
    times: dict[Engine, float] = {}
    for engine in available():
        seconds = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            calls[engine]()
            seconds.append(time.perf_counter() - start)
        times[engine] = statistics.median(seconds[1:])
    return times


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "softtriple" / \
        "knn_engine.json"


def machine_key() -> str:
    """The CPU and the versions of the libraries whose BLAS is measured."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    versions = [f"torch {torch.__version__}", f"numpy {np.__version__}"]
    if "faiss" in available():
        import faiss
        versions.append(f"faiss {faiss.__version__}")
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; " + \
        ", ".join(versions)


def measured_engine() -> Engine:
    """The fastest engine here, from the per-machine cache or measured now (and cached)."""
    path, key = cache_file(), machine_key()
    try:
        cached = json.loads(path.read_text())
        if cached.get("machine") == key and cached.get("engine") in available():
            return cached["engine"]  # type: ignore[no-any-return]
    except (OSError, ValueError, AttributeError):
        pass  # no cache, or an unreadable one: measure
    times = measure()
    engine = min(times, key=times.__getitem__)
    with contextlib.suppress(OSError, DiskFullError):  # a read-only home: measure next time
        write_json(path, {"machine": key, "engine": engine, "seconds": times,
                          "probe": list(PROBE)})
    return engine


@functools.cache
def cpu_engine() -> Engine:
    """The engine for large float32 CPU searches: $SOFTTRIPLE_KNN_ENGINE, or the fastest one
    measured on this machine."""
    setting = os.environ.get("SOFTTRIPLE_KNN_ENGINE", "auto")
    if setting in ENGINES:
        return setting  # type: ignore[return-value]
    if setting != "auto":
        raise ValueError(f"SOFTTRIPLE_KNN_ENGINE={setting!r}; valid: auto, "
                         f"{', '.join(ENGINES)}")
    return measured_engine()


def choose(queries: Tensor, gallery_rows: int) -> Engine:
    """The engine ``backend="auto"`` uses for this search: the measured one for a large float32
    CPU search, torch for anything else (small, float64, or on a GPU)."""
    large = queries.shape[0] * gallery_rows * queries.shape[1] >= SMALL
    if large and queries.device.type == "cpu" and queries.dtype == torch.float32:
        return cpu_engine()
    return "torch"
