"""Built-in data sets, made offline from files that installed packages ship.

``prepare(name, root)`` writes ``root/name/`` as an image folder (one subfolder per class) plus
``manifest.json`` (sources with package names and versions, licences, counts, a checksum) and is
idempotent: a folder whose manifest matches is left as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softtriple.atomic import write_json
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
    the manifest and previews."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name in ("manifest.json", "preview.png"):
            continue
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _registry() -> dict[str, Builtin]:
    from softtriple.data.builtin import digits, emoji, fashion_mnist, fonts, glyphs

    return {b.name: b for b in (digits.BUILTIN, emoji.BUILTIN, fashion_mnist.BUILTIN,
                                fonts.BUILTIN, glyphs.BUILTIN)}


BUILTINS = _registry()


def prepared(name: str, root: Path | None = None) -> dict[str, Any] | None:
    """The manifest of a prepared data set, or None when it is not prepared."""
    path = (root or default_root()) / name / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def prepare(name: str, root: Path | None = None, force: bool = False) -> Path:
    """Build data set ``name`` under ``root`` (default: default_root()); return its folder."""
    if name not in BUILTINS:
        raise DataError(f"unknown built-in data set {name!r}; valid: {', '.join(BUILTINS)}")
    folder = (root or default_root()) / name
    manifest = prepared(name, root)
    if manifest and not force and manifest.get("checksum") == folder_checksum(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    body = BUILTINS[name].build(folder)
    body.update(name=name, train_fraction=BUILTINS[name].train_fraction,
                checksum=folder_checksum(folder))
    from softtriple.data.builtin.preview import make_preview
    make_preview(folder)
    write_json(folder / "manifest.json", body)
    return folder
