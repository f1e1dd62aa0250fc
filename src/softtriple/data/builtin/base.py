"""The built-in data sets' shared base: where they live, what a set is, its checksum."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softtriple.data.checks import CACHE_DIR
from softtriple.data.table import DataError


def default_root() -> Path:
    """$SOFTTRIPLE_DATA, else ./data; DataError when it names something other than a folder."""
    name = os.environ.get("SOFTTRIPLE_DATA")
    root = Path(name or "data").expanduser().resolve()
    if root.exists() and not root.is_dir():
        where = f"SOFTTRIPLE_DATA={name}" if name else "./data"
        raise DataError(f"{where} is a file, not a folder; point SOFTTRIPLE_DATA at the folder "
                        f"that holds (or will hold) the built-in data sets")
    return root


@dataclass(frozen=True)
class Builtin:
    """A built-in data set: how to build it and where its classes split."""

    name: str
    description: str
    build: Callable[[Path], dict[str, Any]]  # writes class folders, returns the manifest body
    train_fraction: float = 0.5


def folder_checksum(folder: Path) -> str:
    """sha256 over the sorted relative paths and bytes of every file under ``folder`` except
    the manifest, the preview and the caches that runs write next to the data (image checks,
    features, the demo's baseline): a cache written into the folder does not make the data set
    look changed (it did, and every demo after the first rebuilt glyphs, 22 s on 2 cores)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name in ("manifest.json", "preview.png") or CACHE_DIR in path.relative_to(
                folder).parts:
            continue
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def debian_version(package: str) -> str:
    """The installed version of a Debian package (recorded in a built set's sources), or
    "unknown" where dpkg cannot tell."""
    if shutil.which("dpkg-query") is None:
        return "unknown"
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                          text=True, check=False)
    return done.stdout.strip() or "unknown"
