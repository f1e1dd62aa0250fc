"""Atomic writes: write a temporary file beside the target, then rename it over the target, so a
reader never sees a half-written file and a crash never destroys the previous version."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class DiskFullError(ValueError):
    """The disk filled up during an atomic write; the previous version of the file is intact."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path (same folder and suffix) to write; on success it replaces
    ``path``, on an exception it is removed and ``path`` is left as it was. A full disk raises
    DiskFullError, one line naming the file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = "its previous version is kept" if target.exists() else "nothing was written"
        raise DiskFullError(f"no space left on device while writing {target} ({kept}); free "
                            f"some space and run again (--resume continues a run)") from error
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
