"""Image checks before training: every image of a table is opened and verified once, so that a
missing, empty or corrupt file is reported up front (all of them at once), not mid-epoch or in
the final evaluation. Results are cached per file (size and modification time) next to the data,
so a second run over the same files pays nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from softtriple.data.table import DataError, ImageTable

CACHE_DIR = ".softtriple-cache"  # next to the data: the image checks, features, baselines
CACHE = Path(CACHE_DIR) / "image-checks.json"
BAD_IMAGE_POLICIES = ("error", "skip")


def _verify(path: Path) -> str:
    """'' when ``path`` opens as an image, else why not."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as image:
            image.verify()  # headers and structure, without decoding every pixel
        return ""
    except FileNotFoundError:
        return "missing"
    except Exception as error:  # PIL raises many types for broken files
        return f"not an image ({error.__class__.__name__})"


def file_version(path: Path, root: Path) -> tuple[str, str]:
    """(path relative to ``root``, 'size|mtime_ns' or 'missing'): what identifies one version
    of an image file in the caches next to the data."""
    stat = path.stat() if path.exists() else None
    try:
        name = str(path.relative_to(root))
    except ValueError:
        name = str(path)
    return name, f"{stat.st_size}|{stat.st_mtime_ns}" if stat else "missing"


def image_keys(table: ImageTable) -> np.ndarray:
    """(N,) str: 'relative path|size|mtime_ns' of each image, its identity in the caches."""
    return np.array(["|".join(file_version(p, table.root)) for p in table.paths], dtype=str)


def cache_file(root: Path, name: str) -> Path:
    """Where the cache file ``name`` of the data under ``root`` lives: ``<root>/.softtriple-cache/
    <name>``, or, when the data's folder is not writable, under ``$XDG_CACHE_HOME/softtriple``
    (or ~/.cache/softtriple), the name prefixed by a hash of ``root``, with a warning."""
    folder = root / CACHE_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder / name
    except OSError:
        pass
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "softtriple"
    home.mkdir(parents=True, exist_ok=True)
    warnings.warn(f"{root} is not writable; caching in {home}", stacklevel=3)
    prefix = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return home / f"{prefix}-{name}"


def bad_images(table: ImageTable, progress: bool = True) -> list[tuple[Path, str]]:
    """(path, reason) of every image of ``table`` that does not open, checked once per file
    version (cached in ``<root>/.softtriple-cache/image-checks.json`` where writable)."""
    cache_path = table.root / CACHE
    try:
        cache: dict[str, list[str]] = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    bad, changed = [], False
    todo = []
    for path in table.paths:
        name, version = file_version(path, table.root)
        entry = cache.get(name)
        if entry is not None and entry[0] == version:
            if entry[1]:
                bad.append((path, entry[1]))
        else:
            todo.append((path, name, version))
    for path, name, version in tqdm(todo, desc="checking images", leave=False,
                                    disable=not progress or len(todo) < 2000):
        reason = _verify(path)
        if version != "missing":
            cache[name] = [version, reason]
            changed = True
        if reason:
            bad.append((path, reason))
    if changed:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".image-checks-", dir=cache_path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a read-only data folder: check again next time
    return bad


def drop_bad_images(table: ImageTable, policy: str,
                    progress: bool = True) -> tuple[ImageTable, list[tuple[Path, str]]]:
    """The table without its bad images (``policy="skip"``), or a DataError naming all of them
    (``"error"``). Returns the table and the bad images."""
    if policy not in BAD_IMAGE_POLICIES:
        raise DataError(f"data.bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}; "
                        f"got {policy!r}")
    bad = bad_images(table, progress)
    if not bad:
        return table, []
    if policy == "error":
        listed = "; ".join(f"{p} ({why})" for p, why in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(f"{len(bad)} unreadable image(s): {listed}{more}; replace or remove "
                        f"them, or set data.bad_images=skip to train without them")
    drop = {p for p, _ in bad}
    keep = np.array([p not in drop for p in table.paths], dtype=bool)
    kept = ImageTable([p for p, k in zip(table.paths, keep, strict=True) if k],
                      table.labels[keep], table.splits[keep], table.root, table.class_names)
    return kept, bad
