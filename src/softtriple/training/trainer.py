"""The trainer: an embedding model and a metric-learning loss, trained on the training classes
and evaluated on the held-out classes, writing everything into one run folder (config.yaml,
metrics.jsonl, tensorboard/, checkpoints/last.pt every epoch, test_embeddings.npz, results.json;
``softtriple.experiment.run_folder``). A loop over epochs that calls the experiment's builders.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from softtriple import distributed as dist
from softtriple import faults
from softtriple.evaluation.sharded_search import sharded_evaluate
from softtriple.experiment.build import (
    PRECISIONS,
    build_config_loss,
    build_objective,
    build_optimizer,
    build_training_model,
    configure_kernels,
    graph_network,
    init_centers_from_data,
    precision_advice,
    resolve_device,
    seed_everything,
)
from softtriple.experiment.checkpoint import TrainingState, check_resumable, load_checkpoint
from softtriple.experiment.config import Config, check_clustering_runs_here, dump_config
from softtriple.experiment.loaders import Loaders, build_loaders
from softtriple.experiment.run_folder import RunDir, TrainingFolder, write_embeddings
from softtriple.models import embed
from softtriple.training.feature_cache import feature_source
from softtriple.training.metrics_log import MetricsLog


class Trainer:
    """Train ``config`` from scratch, or continue the run in ``resume`` exactly where its last
    completed epoch left it."""

    def __init__(self, config: Config, resume: str | Path | None = None,
                 overwrite: bool = False) -> None:
        self.config = config
        check_clustering_runs_here(config.evaluation)
        self.device = resolve_device(config.run.device)
        self.autocast_dtype = PRECISIONS[config.run.precision]
        configure_kernels(self.device, config.run.deterministic, config.run.cudnn_benchmark)
        dist.setup(self.device)
        advice = precision_advice(self.device, config.run.precision)
        if advice is not None and dist.is_main():
            print(advice, file=sys.stderr)
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        self.folder = TrainingFolder(config.run.out, resume, overwrite)
        try:
            self._setup(config)
        except BaseException:
            self.release()
            raise

    def _setup(self, config: Config) -> None:
        self.state = None
        if self.folder.resume is not None:
            self.state = load_checkpoint(self.folder.resume)
            check_resumable(self.state, config, self.folder.resume)
        self.out = self.folder.root
        seed_everything(config.run.seed)
        self.model = build_training_model(config, self.device)
        self.loaders: Loaders = build_loaders(
            config.data, config.evaluation.batch_size,
            config.run.seed, dist.world_size(), dist.rank(),
            feature_source(config, self.model, self.device),
            pin_memory=self.device.type == "cuda", interpolation=self.model.interpolation)
        self.loss = build_config_loss(config, self.loaders.num_classes).to(self.device)
        self.objective = build_objective(config, self.model, self.loss, self.device)
        self.optimizer, self.scheduler, self.scaler = build_optimizer(
            config, self.model, self.loss, self.device)
        self.checkpoint = TrainingState(self.model, self.loss, self.optimizer, self.scheduler,
                                        self.scaler, config.loss.shard_centers)
        self.epoch, self.step = 0, 0
        self.log = MetricsLog(self.run_dir)
        if self.state is not None:
            self.checkpoint.restore(self.run_dir, self.state)
            self.epoch, self.step = int(self.state["epoch"]), int(self.state["step"])
            self.log.history = list(self.state.get("history", []))
        elif config.loss.init_centers == "data":
            init_centers_from_data(config, self.model, self.loss, self.loaders.train.dataset,
                                   self.device)
        if config.model.cuda_graph:  # after the weights are final: the capture keeps them
            graph_network(self.model, config, self.device)
        self.last_embeddings = np.zeros((0, config.model.embedding_dim), dtype=np.float32)

    def release(self) -> None:
        """Let another process train into this run folder (train() does this at its end)."""
        self.folder.release()

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.out)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.log.history

    # ----------------------------------------------------------------- evaluation
    def embed_test(self) -> np.ndarray:
        """Embeddings (N_r, d) of this rank's shard of the held-out classes (all of them in one
        process); the shards are contiguous, in rank order."""
        return embed(self.model, self.loaders.test, self.device, self.autocast_dtype,
                     self.config.model.channels_last)

    def evaluate(self) -> dict[str, Any]:
        """The test metrics, on every rank. Several processes search their shards of the test
        set (``softtriple.evaluation.sharded_search``: exact, equal to one process); only NMI/AMI's
        k-means gathers the embeddings."""
        embeddings = self.embed_test()
        faults.point("evaluation")
        self.last_embeddings = embeddings
        labels = self.loaders.test_table.encoded_labels()[0]
        ev = self.config.evaluation
        # the kNN runs on the run's device: one copy there, none per tile
        local = torch.from_numpy(embeddings).to(self.device)
        metrics = sharded_evaluate(local, labels, ks=ev.ks, metrics=ev.metrics,
                                   seed=self.config.run.seed, kmeans_settings=ev.kmeans)
        return dist.broadcast(metrics)  # type: ignore[no-any-return]

    def _evaluate_and_log(self, **extra: Any) -> dict[str, Any]:
        start = time.perf_counter()
        metrics = self.evaluate()
        self.log.log({"epoch": self.epoch, "step": self.step, **extra,
                      **{f"test/{k}": v for k, v in metrics.items()},
                      "eval_seconds": time.perf_counter() - start})
        return metrics

    # ----------------------------------------------------------------- training
    def _train_epoch(self) -> float:
        config = self.config
        self.objective.train()
        seed = config.run.seed * 100_003 + self.epoch
        torch.manual_seed(seed)  # augmentation in the main process, reproducible per epoch
        self.loaders.train.batch_sampler.set_epoch(self.epoch)  # type: ignore[union-attr]
        if hasattr(self.loaders.train.dataset, "set_epoch"):  # augmentation per (seed, epoch)
            self.loaders.train.dataset.set_epoch(self.epoch)
        self.loaders.train.generator.manual_seed(seed)  # type: ignore[union-attr]
        total, count = 0.0, 0
        steps = min(len(self.loaders.train), config.schedule.max_steps_per_epoch or sys.maxsize)
        bar = tqdm(total=steps, desc=f"epoch {self.epoch + 1}/{config.schedule.epochs}",
                   leave=False, disable=not (config.run.progress and dist.is_main()))
        for i, (images, labels, _) in enumerate(self.loaders.train):
            if i >= steps:
                break
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if config.model.channels_last and images.dim() == 4:  # images, not features
                images = images.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.objective(images, labels)
            self.scaler.scale(loss).backward()
            # the step's one wait for the device: the loss (logged, checked finite) and whether
            # every gradient is finite (fp16's scaler skips overflowing steps itself), before
            # the optimizer moves any weight
            value, finite = read_step(loss, None if self.scaler.is_enabled() else self.objective)
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at epoch {self.epoch + 1} "
                                         f"step {i}; lower optimizer.lr or optimizer.loss_lr")
            if not finite:  # a NaN or inf names its parameter; huge finite gradients pass
                check_gradients(self.objective, self.epoch, i)
            self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
            faults.point("step")
            self.step += 1
            total, count = total + value, count + 1
            bar.set_postfix(loss=f"{total / count:.4f}")
            bar.update()
        bar.close()
        self.scheduler.step()
        return dist.mean(total / max(count, 1))  # each rank's loss of its block, or gathered

    def train(self) -> dict[str, Any]:
        """Run the remaining epochs; return the final metrics (also in results.json). The run
        folder is released at the end, also when training fails."""
        try:
            return self._train()
        finally:
            self.release()

    def _train(self) -> dict[str, Any]:
        config = self.config
        if dist.is_main():
            self.run_dir.begin(dump_config(config), self.loaders.bad_images)
        self.log.open(self.step if self.state is not None else None)
        if self.epoch == 0 and config.evaluation.before_training:
            self._evaluate_and_log()
        metrics: dict[str, Any] = {}
        while self.epoch < config.schedule.epochs:
            start = time.perf_counter()
            mean_loss = self._train_epoch()
            self.epoch += 1
            lrs = {f"lr/{g.get('name', i)}": g["lr"]
                   for i, g in enumerate(self.optimizer.param_groups)}
            record = {"train/loss": mean_loss, **lrs, "epoch_seconds": time.perf_counter() - start}
            every, last = config.evaluation.every, self.epoch == config.schedule.epochs
            if last or (every and self.epoch % every == 0):
                metrics = self._evaluate_and_log(**record)
            else:
                self.log.log({"epoch": self.epoch, "step": self.step, **record})
            faults.point("logged")
            self.checkpoint.save(self.run_dir, {
                "epoch": self.epoch, "step": self.step, "config": config.to_dict(),
                "num_classes": self.loaders.num_classes, "history": self.history})
            dist.barrier()
        return self._finish(metrics or self.evaluate())  # resumed a finished run: evaluate

    def _finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """results.json and test_embeddings.npz (one file, written by rank 0 as each rank's
        shard arrives, never all of them at once)."""
        if hasattr(self.loss, "effective_centers"):  # SoftTriple: centers left after merging
            counts = self.loss.effective_centers().float()  # type: ignore[operator]
            if self.config.loss.shard_centers:  # each rank's block of classes
                counts = torch.cat(dist.gather(counts.cpu()))
            metrics = {**metrics, "effective_centers": float(counts.mean())}
        results = {"epochs": self.epoch, "steps": self.step, "metrics": metrics,
                   "run": str(self.out)}
        shards = dist.stream_to_main(self.last_embeddings)
        if dist.is_main():
            table = self.loaders.test_table
            write_embeddings(self.run_dir.embeddings, shards, table.encoded_labels()[0],
                             [str(p) for p in table.paths], table.item_class_names(),
                             run_owned=True)
            self.run_dir.write_results(results)
        self.log.close()
        return results


def read_step(loss: Tensor, module: nn.Module | None) -> tuple[float, bool]:
    """A training step's loss (0-d) as a float and whether every gradient of ``module`` is
    finite (True for None), read from the device in one synchronization: each parameter's
    gradient 2-norm (one foreach kernel per device and dtype, as clip_grad_norm_ computes them),
    their finiteness reduced on the device, copied to the host with the loss. A NaN or inf
    element makes its norm NaN or inf; so does a huge finite gradient (its squares overflow),
    which ``check_gradients`` then tells apart. A dozen operators a step, where
    ``get_total_norm`` dispatched a same-device copy per parameter: a CUDA step's host time is
    its operators."""
    parts = [loss.detach().float().reshape(1)]
    grads = ([p.grad for p in module.parameters() if p.grad is not None]
             if module is not None else [])
    if grads:
        norms = torch.stack(torch._foreach_norm(grads))  # (P,) one per parameter
        parts.append(torch.isfinite(norms).all().float().reshape(1))
    value, *flag = torch.cat(parts).tolist()
    return float(value), not flag or flag[0] == 1.0


def check_gradients(module: nn.Module, epoch: int, step: int) -> None:
    """FloatingPointError naming the first parameter whose gradient is NaN or inf (a finite loss
    can still overflow in its backward, e.g. at a huge scale lambda). The trainer calls it only
    where ``read_step``'s per-parameter 2-norms were not all finite (the fast check, 10x quicker
    than the max-norm on CPU): the max-norm then decides, since the squares of a huge finite
    gradient overflow too, and such gradients pass."""
    named = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    grads = [g for _, g in named]
    if not named or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf"),
                                                                      foreach=True))):
        return
    name = next(n for n, g in named if not bool(torch.isfinite(g).all()))
    raise FloatingPointError(f"the gradient of {name} became NaN or inf at epoch {epoch + 1} "
                             f"step {step}; lower optimizer.lr, optimizer.loss_lr or the loss's "
                             f"scale (la, scale, alpha)")
