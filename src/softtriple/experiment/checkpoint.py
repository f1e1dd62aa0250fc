"""Checkpoints: the format (written atomically: write, then rename; read with
``weights_only=True`` only) and the training state it holds (``TrainingState``: model, loss,
optimizer, scheduler, scaler, sharded center blocks, every random generator), and whether a run
may resume with a given config."""

from __future__ import annotations

import io
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from softtriple import distributed as dist
from softtriple import faults
from softtriple.atomic import atomic_path
from softtriple.experiment.config import Config, ConfigError
from softtriple.experiment.run_folder import RunDir
from softtriple.models.backbones import refused_global

# keys a resumed run may change: data.workers and data.decode_once_mib too, as the data order
# and every augmentation depend on (seed, epoch, sample) only, and decoding once is bitwise
RESUME_FREE = {("run", "out"), ("run", "progress"), ("run", "threads"), ("run", "report"),
               ("data", "workers"), ("data", "decode_once_mib"), ("schedule", "epochs"),
               # when and what the held-out classes are scored by: every epoch re-seeds the
               # training's generators, so evaluating moves no training bit (tested); how NMI
               # clusters (its own random streams; each row names it), so a run clustering with
               # faiss goes on where faiss is not installed, with backend torch or sklearn
               ("evaluation", "every"), ("evaluation", "ks"), ("evaluation", "metrics"),
               ("evaluation", "before_training"), ("evaluation", "kmeans")}


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
    refused = refused_global(error)
    if refused:
        return CheckpointError(f"{what} holds a pickled Python object ({refused}) that "
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


def check_resumable(state: dict[str, Any], config: Config, resume: str | Path) -> None:
    """ConfigError unless the run whose checkpoint is ``state`` can go on under ``config``: the
    same settings but those in RESUME_FREE, and no fewer epochs than it has trained."""
    saved, now = state["config"], config.to_dict()
    changed = [f"{section}.{key}" for section in saved for key in saved[section]
               if (section, key) not in RESUME_FREE
               and saved[section][key] != now.get(section, {}).get(key)]
    if changed:
        raise ConfigError(f"cannot resume {resume}: the config differs in {', '.join(changed)}; "
                          f"resume with the run's own config.yaml")
    if config.schedule.epochs < int(state["epoch"]):
        raise ConfigError(f"cannot resume {resume} with schedule.epochs={config.schedule.epochs}: "
                          f"it has trained {state['epoch']} epochs; a resumed run can extend, "
                          f"never shrink")


def rng_state() -> dict[str, Any]:
    """torch's, numpy's and Python's global random generators, as plain data and tensors."""
    np_state: Any = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "numpy_pos": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": random.getstate()}


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), *rng["numpy_pos"]))
    random.setstate(rng["python"])


@dataclass
class TrainingState:
    """What a training checkpoint saves and restores. With ``sharded`` (a ShardedSoftTripleLoss
    under several processes) each rank's block of centers and their Adam state go to a center
    block file of their own, and last.pt names the blocks."""

    model: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sharded: bool

    def save(self, run: RunDir, progress: dict[str, Any]) -> None:
        """checkpoints/last.pt with ``progress`` (epoch, step, config, history, ...), written by
        rank 0 (each rank's center block first: last.pt names them, so a kill between leaves the
        previous set in use); every rank calls it."""
        blocks: list[str] = []
        if self.sharded:  # every rank: its block, taken out of its optimizer state
            optimizer = self.optimizer.state_dict()
            blocks = dist.gather(self._save_center_block(run, optimizer, int(progress["step"])))
            dist.barrier()
        if not dist.is_main():
            return
        if not self.sharded:  # rank 0 only: the other ranks' state is the same
            optimizer = self.optimizer.state_dict()
        save_checkpoint(run.checkpoint, {
            "model": self.model.state_dict(),
            "loss": {} if self.sharded else self.loss.state_dict(), "center_blocks": blocks,
            "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), **progress, "rng": rng_state()})
        for stale in run.checkpoints.glob("centers-*.pt"):
            if stale.name not in blocks:  # an earlier step's (or process count's) blocks
                stale.unlink()

    def restore(self, run: RunDir, state: dict[str, Any]) -> None:
        """Every part from ``state`` (and this rank's center block), the random generators
        last; CheckpointError naming what does not fit."""
        try:
            self.model.load_state_dict(state["model"])
            if self.sharded:
                self._restore_center_block(run, state)
            else:
                self.loss.load_state_dict(state["loss"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"checkpoint does not fit this model: "
                                  f"{mismatch_detail(error)}") from error
        set_rng_state(state["rng"])

    def _centers_index(self) -> int:
        """The sharded centers' position among the optimizer's parameters (its state key)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return next(i for i, p in enumerate(params) if p is self.loss.centers)

    def _save_center_block(self, run: RunDir, optimizer: dict[str, Any], step: int) -> str:
        """This rank's block of centers and their Adam state (atomically), which it takes out
        of ``optimizer``; returns the block's file name."""
        loss: Any = self.loss
        adam = optimizer["state"].pop(self._centers_index(), {})
        name = center_block_name(loss.start, loss.stop, step)
        save_checkpoint(run.checkpoints / name, {
            "start": loss.start, "stop": loss.stop, "centers": loss.centers.detach(),
            **{k: v for k, v in adam.items() if k in ("step", "exp_avg", "exp_avg_sq")}})
        return name

    def _restore_center_block(self, run: RunDir, state: dict[str, Any]) -> None:
        """This rank's classes of the sharded centers and their Adam state, from the blocks the
        checkpoint names, whatever process count wrote them."""
        loss: Any = self.loss
        rows = read_center_rows(run.checkpoints, state["center_blocks"], loss.start, loss.stop)
        with torch.no_grad():
            loss.centers.copy_(rows["centers"])
        self.optimizer.load_state_dict(state["optimizer"])  # without the centers' state
        if "exp_avg" in rows:
            device = loss.centers.device
            self.optimizer.state[loss.centers] = {
                "step": rows["step"], "exp_avg": rows["exp_avg"].to(device),
                "exp_avg_sq": rows["exp_avg_sq"].to(device)}
