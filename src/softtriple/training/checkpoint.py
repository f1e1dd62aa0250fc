"""Checkpoints: written atomically (write, then rename), read with ``weights_only=True`` only."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch

from softtriple import faults
from softtriple.atomic import atomic_path
from softtriple.run import RunDir


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or does not fit."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save to ``path`` through a temporary file and an atomic rename. Serialized in
    memory first, so that a full disk surfaces as the file write's own OSError (DiskFullError
    naming the file), not as torch's stream-writer message."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
        faults.point("checkpoint-write")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state saved by save_checkpoint, or CheckpointError naming the file and the fix."""
    file = Path(path)
    if file.is_dir():
        file = RunDir(file).checkpoint
    if not file.is_file():
        raise CheckpointError(f"checkpoint {file} not found; pass a run folder or a .pt file "
                              f"written by softtriple train")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles: we say it once
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, wrong format, pickled objects: several types
        raise CheckpointError(f"checkpoint {file} is truncated or corrupt "
                              f"({error.__class__.__name__}); use an earlier copy or retrain"
                              ) from error
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{file} is not a softtriple checkpoint (no model or config)")
    return state
