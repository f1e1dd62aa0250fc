"""A run's metrics as training writes them: the history of records (kept on every rank, saved
in the checkpoint), RUN/metrics.jsonl and TensorBoard events (rank 0)."""

from __future__ import annotations

from typing import Any

from softtriple import distributed as dist
from softtriple.experiment.run_folder import RunDir


class MetricsLog:
    """Records (one dict per epoch or evaluation) appended to ``history``, metrics.jsonl and
    TensorBoard; ``open`` starts the files, ``close`` flushes the events."""

    def __init__(self, run: RunDir, history: list[dict[str, Any]] | None = None) -> None:
        self.run = run
        self.history = list(history or [])
        self.writer: Any = None

    def open(self, resumed_at: int | None) -> None:
        """Rank 0: on resume (at step ``resumed_at``), metrics.jsonl as of the checkpoint (no
        rows past it) and TensorBoard's events past that step dropped (its own purge_step), so
        the curves show each step once."""
        if not dist.is_main():
            return
        if resumed_at is not None:
            self.run.write_metrics(self.history)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run.tensorboard), purge_step=resumed_at)
        except ImportError:  # tensorboard is a dependency; tolerate its absence
            self.writer = None

    def log(self, record: dict[str, Any]) -> None:
        """``record`` (with its "step") in the history, metrics.jsonl and TensorBoard."""
        self.history.append(record)
        if not dist.is_main():
            return
        self.run.append_metrics(record)
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, float) and key != "epoch":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
