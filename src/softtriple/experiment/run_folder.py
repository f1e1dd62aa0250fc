"""The run folder's one owner: where each of its files lives, and reading and writing each
(atomically). The trainer, the report, plots, compare, the CLI and search all ask it.

    RUN/config.yaml            the resolved config
    RUN/metrics.jsonl          one JSON object per epoch and evaluation
    RUN/tensorboard/           TensorBoard events
    RUN/checkpoints/last.pt    the latest checkpoint (every epoch)
    RUN/results.json           the final metrics
    RUN/test_embeddings.npz    the held-out embeddings (an embeddings file, below)
    RUN/plots/, RUN/report.html, RUN/bad_images.txt
    RUN/demo.json              `softtriple demo`'s table: raw pixels, pretrained, trained
    RUN/compare.log            `softtriple compare`'s log of the run's training
    RUN/.lock                  held (flock) by the process training into the folder

An embeddings file (``.npz``: ``embeddings`` (N, d) float32, ``labels`` (N,) int, ``paths``
(N,) str) is written by the trainer and ``embed`` and read by search and the report; a
neighbours file (``.npz``: ``indices`` and ``similarities``, (N, k)) by ``neighbours``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np

from softtriple import distributed as dist
from softtriple.atomic import atomic_path, write_json, write_text
from softtriple.data.table import DataError
from softtriple.experiment.config import ConfigError

EMBEDDINGS_SUFFIX = ".npz"


class OutputError(ValueError):
    """An output path that would overwrite an input or a run folder's own file, or that cannot
    be written."""


class RunInUseError(ValueError):
    """Another process is training into the run folder."""


class RunDir:
    """A run folder at ``root`` (which may not exist yet)."""

    FILES = ("config.yaml", "metrics.jsonl", "tensorboard", "checkpoints", "results.json",
             "test_embeddings.npz", "plots", "report.html", "bad_images.txt", "demo.json")
    # compare.log is not one of them: compare writes it before the run's training starts

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    checkpoint = property(lambda self: self.checkpoints / "last.pt")
    results = property(lambda self: self.root / "results.json")
    embeddings = property(lambda self: self.root / "test_embeddings.npz")
    plots = property(lambda self: self.root / "plots")
    report = property(lambda self: self.root / "report.html")
    bad_images = property(lambda self: self.root / "bad_images.txt")
    demo_summary = property(lambda self: self.root / "demo.json")
    compare_log = property(lambda self: self.root / "compare.log")
    checkpoints = property(lambda self: self.root / "checkpoints")  # last.pt, center blocks

    # ------------------------------------------------------------------ state
    def lock(self) -> IO[str]:
        """Hold the folder for this process: an exclusive flock on RUN/.lock, which the kernel
        releases when the process ends, however it ends (no stale lock after a kill). Close
        the returned file to release it earlier.

        Raises:
            RunInUseError: another process (or another open of this one) holds the folder.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = open(self.root / ".lock", "a+")  # held past this call: closed by the caller
        except (FileExistsError, NotADirectoryError):
            raise OutputError(f"the run folder {self.root} is a file (or lies under one); "
                              f"choose another --out") from None
        except PermissionError:
            raise OutputError(f"cannot create or write the run folder {self.root} (permission "
                              f"denied); choose another --out") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunInUseError(f"run folder {self.root} is in use by another process (pid "
                                f"{holder}); wait for it to finish, stop it, or choose another "
                                f"--out") from None
        except OSError:  # a file system without locks (some network mounts): go on unlocked
            return handle
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def held(self) -> list[str]:
        """The run files present: a run lives here when this is not empty."""
        return [name for name in self.FILES if (self.root / name).exists()]

    @property
    def finished(self) -> bool:
        return self.results.is_file()

    @property
    def checkpointed(self) -> bool:
        return self.checkpoint.is_file()

    def never_checkpointed(self) -> bool:
        """A run started here (config.yaml) but was stopped before its first checkpoint."""
        return self.config.is_file() and not self.checkpoint.exists()

    def clear(self) -> None:
        """Delete the run's own files (nothing else in the folder)."""
        for name in self.held():
            path = self.root / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def remove_leftovers(self) -> None:
        """Temporary files of writes that a kill interrupted."""
        for leftover in [*self.root.glob(".*.tmp*"), *self.root.glob("checkpoints/.*.tmp*")]:
            leftover.unlink()

    def begin(self, config_text: str, bad_images: list[tuple[Path, str]]) -> None:
        """As training starts: the folder, without leftovers of interrupted writes, its
        config.yaml, and bad_images.txt when data.bad_images=skip left images out (said on
        stderr too)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_leftovers()
        self.write_config(config_text)
        if bad_images:
            self.write_bad_images(bad_images)
            print(f"data.bad_images=skip: left out {len(bad_images)} unreadable image(s), "
                  f"listed in {self.bad_images}", file=sys.stderr)

    # ------------------------------------------------------------------ files
    def write_config(self, text: str) -> None:
        write_text(self.config, text)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl (on resume: the history as of the checkpoint)."""
        write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in records))

    def read_metrics(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.metrics.read_text().splitlines()
                if line.strip()]

    def write_results(self, results: dict[str, Any]) -> None:
        write_json(self.results, results)

    def read_results(self) -> dict[str, Any]:
        if not self.results.is_file():
            raise ValueError(f"{self.results} not found: the run has not finished; train it to "
                             f"the end (or resume it) first")
        try:
            return dict(json.loads(self.results.read_text()))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{self.results} is not a results file ({error.__class__.__name__})"
                             f"; it is damaged: train the run again, or resume it") from error

    def write_bad_images(self, bad: list[tuple[Path, str]]) -> None:
        write_text(self.bad_images, "".join(f"{path}\t{why}\n" for path, why in bad))


class TrainingFolder:
    """The run folder a trainer trains into, resolved from ``--out``, ``--resume`` and
    ``--overwrite``, and held by rank 0 (``RunDir.lock``) until ``release``:

    - ``--resume`` of a folder stopped in its first epoch (no checkpoint): start it again there;
    - ``--resume``: the folder that holds the checkpoint (a run folder or its last.pt);
    - else ``--out``, refused when it holds a run unless ``--overwrite`` (which clears it).

    Attributes:
        root: the run folder. resume: the checkpoint to continue from, or None.
    """

    def __init__(self, out: str | Path, resume: str | Path | None, overwrite: bool) -> None:
        self._lock: IO[str] | None = None
        self._made = False
        if dist.is_main():  # one trainer per run folder (the other ranks are its partners)
            target = Path(resume) if resume is not None else Path(out)
            folder = target if target.is_dir() or resume is None else target.parent.parent
            self._made = not folder.exists()
            self._lock = RunDir(folder).lock()
        try:
            self._resolve(Path(out), None if resume is None else Path(resume), overwrite)
        except BaseException:
            self.release()
            raise

    def _resolve(self, out: Path, resume: Path | None, overwrite: bool) -> None:
        if resume is not None and resume.is_dir() and RunDir(resume).never_checkpointed():
            if dist.is_main():  # killed in its first epoch: nothing to keep, start it again
                print(f"{resume} has no checkpoint yet (stopped in its first epoch): starting "
                      f"it from the beginning", file=sys.stderr)
            out, resume, overwrite = resume, None, True
        self.resume = resume
        if resume is not None:
            self.root = resume if resume.is_dir() else resume.parent.parent
            return
        self.root = out
        held = RunDir(out).held()
        if held and not overwrite:
            raise ConfigError(f"run folder {out} already holds a run ({held[0]}); continue it "
                              f"with --resume {out}, start over with --overwrite (deletes it), "
                              f"or choose another --out")
        if held and dist.is_main():
            RunDir(out).clear()
        dist.barrier()

    def release(self) -> None:
        """Let another process train into this folder (the trainer does at its end)."""
        if self._lock is not None:
            folder = Path(self._lock.name).parent
            self._lock.close()
            self._lock = None
            if self._made and [p.name for p in folder.iterdir()] == [".lock"]:
                (folder / ".lock").unlink()  # refused before it began: leave no folder behind
                folder.rmdir()


def run_file_of(path: str | Path) -> tuple[Path, str] | None:
    """(run folder, name) when ``path`` is one of a run folder's own files (config.yaml,
    checkpoints/..., results.json, test_embeddings.npz, ...; see RunDir.FILES) in a folder that
    holds a run, else None."""
    target = Path(path).resolve()
    for root, name in ((target.parent, target.name),
                       (target.parent.parent, f"{target.parent.name}/{target.name}")):
        if name.split("/")[0] in (*RunDir.FILES, "compare.log") and RunDir(root).held():
            return root, name
    return None


def check_output(out: str | Path, reads: Iterable[str | Path] = ()) -> Path:
    """The rule every command's output follows, checked where the output is opened: never a
    file the command reads (``reads``), never a file a run folder owns, never a folder.
    OutputError, one line naming both paths, otherwise ``out`` as a Path."""
    target = Path(out)
    for read in reads:
        if target.resolve() == Path(read).resolve():
            raise OutputError(f"the output {target} is {read}, which this command reads; "
                              f"write to another file")
    owned = run_file_of(target)
    if owned is not None:
        raise OutputError(f"the output {target} is {owned[1]} of the run folder {owned[0]}; "
                          f"write outside it or under another name")
    if target.is_dir():
        raise OutputError(f"the output {target} is a folder; name a file in it")
    folder = next((p for p in target.absolute().parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise OutputError(f"cannot write {target}: {folder} is a file; choose another output "
                          f"path")
    if folder is not None:
        try:  # a real write: permissions alone miss read-only mounts and root's exceptions
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise OutputError(f"cannot write {target}: {folder} is not writable "
                              f"({error.strerror}); choose another output path") from None
    return target


def write_embeddings(path: str | Path, embeddings: np.ndarray | Iterable[np.ndarray],
                     labels: np.ndarray, paths: list[str], names: list[str] | None = None,
                     reads: Iterable[str | Path] = (), run_owned: bool = False) -> Path:
    """Write an embeddings file atomically, with each item's class name when given; a missing
    .npz suffix is added (np.load and search expect it). Returns the path written.

    ``embeddings`` is the (N, d) array or its row blocks in order (e.g. each process's shard as
    it arrives): blocks are streamed into the file, so the whole array is never in memory.
    The output follows ``check_output`` (``reads``: the files the caller reads), except a run's
    own test_embeddings.npz written by its trainer (``run_owned``)."""
    out = Path(path)
    if out.suffix != EMBEDDINGS_SUFFIX:
        out = out.with_name(out.name + EMBEDDINGS_SUFFIX)
    if not run_owned:
        check_output(out, reads)
    blocks = [embeddings] if isinstance(embeddings, np.ndarray) else embeddings
    others: dict[str, np.ndarray] = {"labels": np.asarray(labels),
                                     "paths": np.array([str(p) for p in paths])}
    if names is not None:
        others["names"] = np.array([str(n) for n in names])
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        rows, header = 0, False
        with archive.open("embeddings.npy", "w", force_zip64=True) as member:
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=np.float32)
                if not header:  # the .npy header: the whole array's shape, then raw rows
                    header = True
                    np.lib.format.write_array_header_2_0(member, {
                        "descr": np.lib.format.dtype_to_descr(block.dtype),
                        "fortran_order": False, "shape": (len(others["labels"]),
                                                          block.shape[1])})
                member.write(block.tobytes())
                rows += block.shape[0]
        if rows != len(others["labels"]):
            raise ValueError(f"{rows} embeddings for {len(others['labels'])} labels")
        for name, array in others.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return out


def write_neighbours(path: str | Path, indices: np.ndarray, similarities: np.ndarray,
                     reads: Iterable[str | Path] = ()) -> Path:
    """A neighbours file (``softtriple neighbours``): ``indices`` (N, k) int64 into the gallery
    and ``similarities`` (N, k) float32, best first; written atomically, by ``check_output``'s
    rule (``reads``: the embeddings files searched)."""
    out = check_output(path, reads)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, indices=indices, similarities=similarities)
    return out


def read_embedding_rows(path: str | Path, start: int, stop: int,
                        labels: int | None = None) -> np.ndarray:
    """Rows [start, stop) of an embeddings file's (N, d) array, memory-mapped from the file
    (the .npz member is stored uncompressed), so a process reads only its shard; a compressed
    file falls back to loading the array. DataError as ``read_embeddings``, and when ``labels``
    (the file's label count) is not N."""
    file = Path(path)
    try:
        with zipfile.ZipFile(file) as archive:
            info = archive.getinfo("embeddings.npy")
            stored = info.compress_type == zipfile.ZIP_STORED
        if not stored:
            return read_embeddings(file)[0][start:stop]
        with open(file, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)  # the local file header: name and extra field lengths at 26
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            f.seek(info.header_offset + 30 + name_len + extra_len)
            major, _ = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if fortran or len(shape) != 2 or dtype.hasobject:
            raise ValueError("not a C-ordered 2-D float array")
        if labels is not None:
            check_rows(file, shape, labels, None)
        rows = np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)
        return np.array(rows[start:stop])
    except DataError:
        raise
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise DataError(f"{file} is not an embeddings file from softtriple embed "
                        f"({error.__class__.__name__})") from error


def read_embedding_labels(path: str | Path) -> np.ndarray:
    """The labels (N,) of an embeddings file, without reading its embeddings."""
    if not Path(path).is_file():
        raise DataError(f"embeddings file {path} not found; write one with softtriple embed "
                        f"(or train a run to the end)")
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            labels = data["labels"]
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path} is not an embeddings file from softtriple embed "
                        f"({error.__class__.__name__})") from error
    check_kinds(Path(path), None, labels)
    return labels


def read_class_names(path: str | Path) -> list[str] | None:
    """Each item's class name in an embeddings file, or None when it holds none (files written
    before names were stored)."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            return [str(n) for n in data["names"]] if "names" in data.files else None
    except (KeyError, ValueError, OSError):
        return None


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(embeddings (N, d), labels (N,), paths) of an embeddings file; DataError when the file is
    missing or not one (pickled objects are never loaded)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"embeddings file {file} not found; write one with softtriple embed "
                        f"(or train a run to the end)")
    try:
        with np.load(file, allow_pickle=False) as data:
            embeddings, labels = data["embeddings"], data["labels"]
            paths = [str(p) for p in data["paths"]]
    except (KeyError, IndexError, TypeError, ValueError, OSError, EOFError,
            zipfile.BadZipFile) as error:
        raise DataError(f"{file} is not an embeddings file from softtriple embed "
                        f"({error.__class__.__name__})") from error
    check_rows(file, embeddings.shape, len(labels), len(paths))
    check_kinds(file, embeddings, labels)
    return embeddings, labels, paths


def check_kinds(file: Path, embeddings: np.ndarray | None, labels: np.ndarray) -> None:
    """DataError unless an embeddings file holds float embeddings (no NaN or inf row) and
    integer labels, as softtriple embed writes them: integer embeddings would be scored as
    integers, float labels truncated, text labels fail after the work."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{file} holds labels of type {labels.dtype}, not integers; it was not "
                        f"written by softtriple embed: write it again")
    if embeddings is None:
        return
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise DataError(f"{file} holds embeddings of type {embeddings.dtype}, not floats; it "
                        f"was not written by softtriple embed: write it again")
    bad = int((~np.isfinite(embeddings)).any(axis=1).sum())
    if bad:
        raise DataError(f"{file} has {bad} embedding row(s) with NaN or inf; the model that "
                        f"wrote them diverged: embed with a sound checkpoint")


def check_rows(file: Path, shape: tuple[int, ...], labels: int, paths: int | None) -> None:
    """DataError unless an embeddings file's (N, d) array has one label (and path) per row."""
    if len(shape) != 2 or shape[0] != labels or (paths is not None and paths != shape[0]):
        raise DataError(f"{file} holds embeddings of shape {tuple(shape)} but {labels} labels"
                        + ("" if paths is None else f" and {paths} paths")
                        + "; it is damaged or was not written by softtriple embed: write it "
                          "again")
