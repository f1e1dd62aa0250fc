"""Facts about this machine that results depend on: float sums (and so the last digits of a
trained model's metrics) and which BLAS is fastest differ between CPUs."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    info: dict[str, str] = {}
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    return info


def cpu_model() -> str:
    """The CPU's model name, e.g. 'AMD EPYC 9R14' (else the platform's processor name)."""
    return cpu_info().get("model name") or platform.processor() or platform.machine()
