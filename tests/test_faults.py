"""The fault suite: a real training process (the CLI) is SIGKILLed at named moments (mid-step,
between an epoch's log line and its checkpoint, mid-checkpoint write, mid-evaluation) and at
random moments, resumed each time, possibly with another worker count, and must end with the
same results.json, test embeddings and metrics.jsonl as an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SETTINGS = ["model.backbone=small_cnn", "model.embedding_dim=8", "data.image_size=16",
            "data.batch_size=16", "schedule.epochs=3", "schedule.max_steps_per_epoch=4",
            "schedule.milestones=[2]", "evaluation.metrics=[recall, map_at_r]",
            "run.progress=false", "run.report=false", "loss.args={centers_per_class: 2}"]
TIMING = {"epoch_seconds", "eval_seconds"}


def _train(run: Path, workers: int, kill_at: str | None = None,
           resume: bool = False, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "softtriple", "train"]
    args += ["--resume", str(run)] if resume else [
        *(a for s in [*SETTINGS, *extra] for a in ("--set", s)), "--out", str(run)]
    args += ["--set", f"data.workers={workers}"]
    env = {k: v for k, v in os.environ.items() if k != "SOFTTRIPLE_KILL_AT"}
    env["OMP_NUM_THREADS"] = "1"
    if kill_at:
        env["SOFTTRIPLE_KILL_AT"] = kill_at
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(process: subprocess.Popen[bytes]) -> int:
    _, err = process.communicate(timeout=300)
    assert process.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
    return process.returncode


def _outcome(run: Path) -> tuple[dict, dict[str, np.ndarray], list[dict]]:
    results = json.loads((run / "results.json").read_text())
    results.pop("run")
    with np.load(run / "test_embeddings.npz") as data:
        arrays = {k: data[k] for k in data.files}
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]
    return results, arrays, rows


def _assert_same(run: Path, reference: Path) -> None:
    got, expected = _outcome(run), _outcome(reference)
    assert got[0] == expected[0]
    assert got[1].keys() == expected[1].keys()
    for key in got[1]:
        np.testing.assert_array_equal(got[1][key], expected[1][key])
    assert got[2] == expected[2]
    assert not list(run.rglob(".*.tmp*")), "a temporary file was left behind"


def _wait_for_config(run: Path, process: subprocess.Popen[bytes], before: int) -> None:
    """Return once the piece has (re)written config.yaml (it then trains) or has ended."""
    deadline = time.monotonic() + 120
    config = run / "config.yaml"
    while process.poll() is None and time.monotonic() < deadline and not (
            config.exists() and config.stat().st_mtime_ns != before):
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The uninterrupted run, and how long it trains once config.yaml is written (seconds)."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    process = _train(run, workers=2)
    _wait_for_config(run, process, 0)
    start = time.perf_counter()
    assert _finish(process) == 0
    return run, time.perf_counter() - start


def test_killed_at_every_named_moment_resumes_to_the_same_run(reference, tmp_path):
    """One run killed five times, at each named moment in turn, each piece with a different
    worker count than the one before."""
    run = tmp_path / "run"
    kills = ["step:3", "logged:1", "checkpoint-write:1", "evaluation:2", "step:5"]
    for piece, kill_at in enumerate(kills):
        code = _finish(_train(run, workers=2 * (piece % 2), kill_at=kill_at,
                              resume=(run / "config.yaml").exists()))
        assert code == -signal.SIGKILL, f"{kill_at} was never reached"
    assert _finish(_train(run, workers=2, resume=True)) == 0
    _assert_same(run, reference[0])


def test_killed_at_random_moments_resumes_to_the_same_run(reference, tmp_path):
    """Worker processes on (the named-moment test alternates 0 and 2 workers). Each piece is
    killed at a random moment after it has (re)written config.yaml, i.e. while it trains: the
    first within the first 60% of the reference's training time (so a faster machine still
    kills it), later ones anywhere in it."""
    run, workers = tmp_path / "run", 2
    rng = random.Random(2)
    training = reference[1]
    kills = 0
    for piece in range(3):
        started = (run / "config.yaml").stat().st_mtime_ns if (run / "config.yaml").exists() \
            else 0
        process = _train(run, workers, resume=started > 0)
        _wait_for_config(run, process, started)
        time.sleep(training * rng.uniform(0.05, 0.6 if piece == 0 else 1.0))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        _finish(process)
        if (run / "results.json").exists():
            break
    if not (run / "results.json").exists():
        assert _finish(_train(run, workers, resume=True)) == 0
    assert kills >= 1
    _assert_same(run, reference[0])


def test_sharded_centers_killed_around_their_blocks_resume_to_the_same_run(data_root, tmp_path):
    """Sharded centers write a block per process before last.pt names them: killed with epoch
    2's block written but last.pt not yet renamed, and with the block itself half-written, the
    run resumes from epoch 1's last.pt and blocks to the uninterrupted result."""
    sharded = ("loss.shard_centers=true", "evaluation.before_training=false")
    reference = tmp_path / "reference"
    assert _finish(_train(reference, 0, extra=sharded)) == 0
    run = tmp_path / "run"
    for kill_at in ("checkpoint-write:4", "checkpoint-write:1"):  # last.pt; then the block
        code = _finish(_train(run, 0, kill_at=kill_at, resume=(run / "config.yaml").exists(),
                              extra=sharded))
        assert code == -signal.SIGKILL, f"{kill_at} was never reached"
    assert _finish(_train(run, 0, resume=True)) == 0
    _assert_same(run, reference)
    blocks = [p.name for p in (run / "checkpoints").glob("centers-*.pt")]
    assert blocks == ["centers-000000000-000000005-step12.pt"]  # earlier steps' blocks removed
