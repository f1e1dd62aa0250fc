"""The conditions a benchmark ran under, recorded in every results file, and the quiet-machine rule.

A speed ratio means something only on a quiet machine: under load a peer's thread pool can
collapse and flatter us (PML's CUB-size evaluation took 3.5 s at load average 4.3 on 2 cores and
0.53 s quiet). So every benchmark here:

- records the CPU (model, vendor, the instruction sets that decide BLAS speed), the BLAS each
  library uses with its thread count, the thread settings, and the load average before and after;
- gives torch and faiss the same thread count;
- refuses to write its results when the 1-minute load average at the start exceeds
  ``MAX_LOAD_PER_CORE`` per core, unless asked (``--noisy``), and then marks them ``"noisy": true``.

    conditions = Conditions.start(threads=None, allow_noisy=args.noisy)
    ...                                  # the measurements
    report = {"conditions": conditions.finish(), ...}
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softtriple.machine import cpu_info, cpu_model

MAX_LOAD_PER_CORE = 0.5
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu() -> dict[str, Any]:
    """Model, vendor, cores and the instruction sets that decide BLAS speed."""
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    return {"model": cpu_model(),
            "vendor": info.get("vendor_id", "unknown"), "cores": os.cpu_count(),
            "flags": [f for f in FLAGS if f in flags], "platform": platform.platform()}


def blas() -> dict[str, Any]:
    """The BLAS each library calls, with its version and threads (threadpoolctl's view of the
    loaded libraries, and torch's build configuration)."""
    import torch
    from threadpoolctl import threadpool_info

    def owner(path: str) -> str:  # the package that ships the library: torch, numpy.libs...
        parts = Path(path).parts
        return parts[parts.index("site-packages") + 1] if "site-packages" in parts else path

    libraries = [{"library": pool["prefix"], "shipped_by": owner(pool["filepath"]),
                  "api": pool["internal_api"], "version": pool.get("version"),
                  "threads": pool["num_threads"]} for pool in threadpool_info()]
    config = torch.__config__.show()
    blas_info = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", config)
    torch_blas = (blas_info.group(1) if blas_info else "unknown") + (
        f" {mkl.group(1)}" if mkl else "")
    return {"torch": torch_blas, "loaded": libraries}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "numpy", "faiss", "pytorch_metric_learning", "sklearn"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = str(getattr(module, "__version__", "?"))
    return found


def set_threads(threads: int) -> dict[str, int]:
    """Give torch and faiss (when imported or importable) the same thread count."""
    import torch

    torch.set_num_threads(threads)
    counts = {"torch": torch.get_num_threads()}
    try:
        import faiss
    except ImportError:
        return counts
    faiss.omp_set_num_threads(threads)
    counts["faiss"] = faiss.omp_get_max_threads()
    return counts


class BusyMachine(SystemExit):
    """The machine was not quiet at the start of a benchmark: exits with its one-line message."""


@dataclass
class Conditions:
    """What a benchmark ran under; ``finish()`` turns it into the results file's record."""

    threads: dict[str, int]
    load_before: tuple[float, float, float]
    noisy: bool
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, threads: int | None = None, allow_noisy: bool = False,
              wait: float = 180.0) -> Conditions:
        """Wait up to ``wait`` seconds for a quiet machine (the 1-minute load average decays
        for a minute after a heavy job ends), then set the threads.

        Raises:
            BusyMachine: still busy after ``wait`` seconds and noise not allowed.
        """
        cores = os.cpu_count() or 1
        deadline = time.monotonic() + wait
        load = os.getloadavg()
        while load[0] > MAX_LOAD_PER_CORE * cores and time.monotonic() < deadline:
            if not allow_noisy:
                print(f"load average {load[0]:.2f}: waiting for a quiet machine", flush=True)
            time.sleep(10)
            load = os.getloadavg()
        noisy = load[0] > MAX_LOAD_PER_CORE * cores
        if noisy and not allow_noisy:
            raise BusyMachine(
                f"load average {load[0]:.2f} on {cores} cores (over {MAX_LOAD_PER_CORE} per core) "
                f"after {wait:.0f} s: stop what else runs, or pass --noisy to write results "
                f"marked noisy")
        return cls(set_threads(threads or cores), load, noisy)

    def finish(self) -> dict[str, Any]:
        return {"cpu": cpu(), "blas": blas(), "versions": versions(), "threads": self.threads,
                "env": {key: os.environ.get(key) for key in
                        ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "SOFTTRIPLE_KNN_ENGINE")},
                "load_average_before": list(self.load_before),
                "load_average_after": list(os.getloadavg()),
                "max_load_per_core": MAX_LOAD_PER_CORE, "noisy": self.noisy,
                "seconds": round(time.time() - self.started, 1),
                "date": time.strftime("%Y-%m-%d", time.gmtime(self.started))}
