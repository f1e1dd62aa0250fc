"""Built-in data sets, made offline from files that installed packages ship.

``prepare(name, root)`` writes ``root/name/`` as an image folder (one subfolder per class) plus
``manifest.json`` (sources with package names and versions, licences, counts, a checksum) and is
idempotent: a folder whose manifest matches is left as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from softtriple.atomic import write_json
from softtriple.data.builtin.base import Builtin, default_root, folder_checksum
from softtriple.data.table import DataError

__all__ = ["BUILTINS", "Builtin", "default_root", "folder_checksum", "prepare", "prepared"]


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
