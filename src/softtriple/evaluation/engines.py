"""The CPU engine of the exact kNN: torch's BLAS, numpy's, or faiss's exact search, whichever is
fastest here.

torch's wheels multiply float32 matrices with MKL, numpy's and faiss's with OpenBLAS, and which
is fastest depends on the CPU (the measured orders are in docs/PERFORMANCE.md): faiss's exact
search (its product and a heap per query) against a product and a top-k in torch or numpy, and
the bf16 engine (``evaluation.bf16``: a bf16 product, exact float32 re-rank of the rows a bound
cannot rule out). So ``knn(..., backend="auto")`` takes ``$SOFTTRIPLE_KNN_ENGINE`` (``torch``,
``numpy``, ``faiss``, ``bf16``) or, by default, the engine measured fastest on this machine.

The measurement (``knn.measure_engines``: each engine's whole search at about CUB's size, 6,144
rows, about 10 s once on 2 cores) is kept per machine in
``$XDG_CACHE_HOME/softtriple/knn_engine.json`` (``~/.cache`` by default), keyed by the CPU, the
libraries' versions and the probe's shape; delete it to measure again. The engines differ only
in float32 rounding; every one keeps the kNN's tie rule (the lower index wins), so their
neighbours are the same wherever no rounding decides.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from softtriple.atomic import DiskFullError, write_json
from softtriple.machine import cpu_model

Engine = Literal["torch", "numpy", "faiss", "bf16"]
ENGINES: tuple[Engine, ...] = ("torch", "numpy", "faiss", "bf16")
# another engine replaces torch only when its probe is this much faster: the engines' probes
# differ by 2-10% at users' sizes and repeated probes by as much, so a near-tie stays with
# torch (no second thread pool, the path of small searches and the GPU)
TORCH_MARGIN = 0.05


def tile_product(engine: Engine) -> Callable[[Tensor, Tensor], Tensor]:
    """(b, d) x (m, d) -> (b, m) dot products by torch's BLAS or numpy's."""
    if engine == "numpy":
        return lambda a, b: torch.from_numpy(np.matmul(a.detach().numpy(),
                                                       b.detach().numpy().T))
    return lambda a, b: a @ b.T


def faiss_search(queries: np.ndarray, gallery: np.ndarray, k: int,
                 blas: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """faiss's exact inner-product search: (Nq, k) similarities and indices, best first.

    ``blas``: always faiss's blocked BLAS product with a heap per query. Left to itself, faiss
    (1.15) scans the gallery once per query below a query count it decides, which for a few
    hundred queries against a large gallery is several times slower than the product (256 x
    100,000 x 128 on one thread of an Intel Xeon: 0.92 s against 0.08 s; docs/PERFORMANCE.md),
    and no faster where it is chosen for a self-search, so gallery searches ask for the product.
    """
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    if not blas:
        return index.search(queries, k)
    threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        return index.search(queries, k)
    finally:
        faiss.cvar.distance_compute_blas_threshold = threshold


def available() -> tuple[Engine, ...]:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return ("torch", "numpy", "bf16")
    return ENGINES


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "softtriple" / \
        "knn_engine.json"


def machine_key() -> str:
    """The CPU and the versions of the libraries whose BLAS is measured."""
    versions = [f"torch {torch.__version__}", f"numpy {np.__version__}"]
    if "faiss" in available():
        import faiss
        versions.append(f"faiss {faiss.__version__}")
    return f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; " + \
        ", ".join(versions)


def rank(seconds: dict[Engine, float]) -> list[Engine]:
    """The engines fastest first, torch ahead of any engine less than TORCH_MARGIN faster."""
    def key(engine: Engine) -> float:
        return seconds[engine] * (1 - TORCH_MARGIN if engine == "torch" else 1)
    return sorted(seconds, key=key)


def measured_ranking(measure: Callable[[], dict[Engine, float]],
                     probe: tuple[int, ...]) -> list[Engine]:
    """The engines here, fastest first (``rank``), from the per-machine cache of a measurement
    of the same ``probe`` shape, or by ``measure()`` (seconds per engine) now, then cached."""
    path, key = cache_file(), machine_key()
    try:
        cached = json.loads(path.read_text())
        if cached.get("machine") == key and cached.get("probe", []) == list(probe) and \
                set(cached.get("seconds", {})) == set(available()):
            return rank(cached["seconds"])
    except (OSError, ValueError, AttributeError, TypeError):
        pass  # no cache, or an unreadable one: measure
    times = measure()
    ranking = rank(times)
    with contextlib.suppress(OSError, DiskFullError):  # a read-only home: measure next time
        write_json(path, {"machine": key, "probe": list(probe), "engine": ranking[0],
                          "seconds": times})
    return ranking
