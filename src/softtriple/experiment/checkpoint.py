"""Checkpoints: written atomically (write, then rename), read with ``weights_only=True`` only."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from softtriple import faults
from softtriple.atomic import atomic_path
from softtriple.experiment.run_folder import RunDir


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
        raise refused_or_corrupt(f"checkpoint {file}", error, "use an earlier copy or retrain"
                                 ) from error
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{file} is not a softtriple checkpoint (no model or config)")
    return state


def mismatch_detail(error: BaseException, limit: int = 400) -> str:
    """torch's load_state_dict error on one line: its header is only "Error(s) in loading
    state_dict for X:", the detail (missing, unexpected and misshapen keys) follows on its
    own lines; they are joined here, cut at ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = "; ".join([lines[0].rstrip(":"), *lines[1:]]) if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def refused_or_corrupt(what: str, error: Exception, fix: str) -> CheckpointError:
    """The one line for a file torch.load(weights_only=True) could not read: a pickled object
    it refused (unpickling it could run any code), or a file truncated or corrupt."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(error))  # "unsupported GLOBAL posix.mkdir"
    if refused:
        return CheckpointError(f"{what} holds a pickled Python object ({refused.group(1)}) that "
                               f"is refused: unpickling it could run any code, and softtriple "
                               f"loads only tensors and plain data; {fix}")
    return CheckpointError(f"{what} is truncated or corrupt ({error.__class__.__name__}); {fix}")


BLOCK_NAME = re.compile(r"centers-(\d+)-(\d+)-step(\d+)\.pt")


def center_block_name(start: int, stop: int, step: int) -> str:
    """File name (in checkpoints/) of the sharded centers of classes [start, stop) at ``step``."""
    return f"centers-{start:09d}-{stop:09d}-step{step}.pt"


def read_center_rows(folder: str | Path, names: list[str], start: int,
                     stop: int) -> dict[str, Any]:
    """Classes [start, stop) of sharded centers saved as the blocks ``names`` in ``folder``,
    whatever the process count that wrote them: ``centers`` (stop - start, K, d) and, when
    saved, Adam's ``exp_avg``, ``exp_avg_sq`` and ``step``. Only the blocks that overlap the
    range are read (memory-mapped), so a rank reads about its own share."""
    pieces: dict[str, list[Any]] = {}
    covered = start
    ranges = []
    for name in names:
        match = BLOCK_NAME.fullmatch(name)
        if match is None:
            raise CheckpointError(f"{name} is not a center block's name; the checkpoint is "
                                  f"not one softtriple wrote")
        ranges.append((int(match.group(1)), int(match.group(2)), name))
    for lo, hi, name in sorted(ranges):
        if hi <= start or lo >= stop:
            continue
        if max(start, lo) > covered:  # classes covered..lo - 1 are in no block
            break
        file = Path(folder) / name
        try:
            block = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except FileNotFoundError as error:
            raise CheckpointError(f"center block {file} is missing; use an earlier copy of the "
                                  f"run or retrain") from error
        except Exception as error:
            raise refused_or_corrupt(f"center block {file}", error, "use an earlier copy of the "
                                     "run or retrain") from error
        rows = slice(max(start, lo) - lo, min(stop, hi) - lo)
        for key in ("centers", "exp_avg", "exp_avg_sq"):
            if key in block:
                pieces.setdefault(key, []).append(block[key][rows].clone())
        if "step" in block:
            pieces["step"] = [block["step"]]
        covered = max(covered, min(stop, hi))
    if covered < stop or "centers" not in pieces:
        raise CheckpointError(f"the center blocks in {folder} do not cover classes {start} to "
                              f"{stop - 1}; the checkpoint is incomplete, use an earlier copy")
    out: dict[str, Any] = {key: torch.cat(parts) for key, parts in pieces.items()
                           if key != "step"}
    if "step" in pieces:
        out["step"] = pieces["step"][0]
    return out
