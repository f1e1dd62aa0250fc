"""The trainer: an embedding model and a metric-learning loss, trained on the training classes
and evaluated on the held-out classes, writing everything into one run folder.

Run folder: config.yaml (resolved), metrics.jsonl (one JSON object per epoch and evaluation),
tensorboard/ (events), checkpoints/last.pt (atomic, every epoch), results.json (final metrics).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from softtriple import distributed as dist
from softtriple import faults
from softtriple.data import ImageTable
from softtriple.evaluation.sharded import sharded_evaluate
from softtriple.experiment.build import (
    PRECISIONS,
    build_config_loss,
    build_model,
    configure_kernels,
    resolve_device,
)
from softtriple.experiment.checkpoint import (
    CheckpointError,
    center_block_name,
    load_checkpoint,
    mismatch_detail,
    read_center_rows,
    save_checkpoint,
)
from softtriple.experiment.config import Config, ConfigError, dump_config, resolved_eps
from softtriple.experiment.loaders import Loaders, build_loaders, loader_workers
from softtriple.experiment.run_folder import RunDir, write_embeddings
from softtriple.losses import SoftTripleLoss
from softtriple.models import EmbeddingModel, embed
from softtriple.models.backbones import WHEEL_WEIGHTS
from softtriple.training.feature_cache import cached_features

# keys a resumed run may change: data.workers and data.decode_once_mib too, as the data order
# and every augmentation depend on (seed, epoch, sample) only, and decoding once is bitwise
RESUME_FREE = {("run", "out"), ("run", "progress"), ("run", "threads"), ("run", "report"),
               ("data", "workers"), ("data", "decode_once_mib"), ("schedule", "epochs")}


class Objective(nn.Module):
    """Model and loss as one module, so DistributedDataParallel syncs the loss's centers too.

    With ``autocast_dtype`` (bf16 / fp16) the model runs under autocast; the loss always
    computes in float32 against its float32 centers (``softtriple.losses._precision``). With
    ``gather`` the loss sees the global batch of every rank (``distributed.gather_batch``)."""

    def __init__(self, model: EmbeddingModel, loss: nn.Module,
                 autocast_dtype: torch.dtype | None = None, gather: bool = False) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.autocast_dtype = autocast_dtype
        self.gather = gather

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(images.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None):
            embeddings = self.model(images)
        if self.gather:
            embeddings, labels = dist.gather_batch(embeddings, labels)
        return self.loss(embeddings, labels)  # type: ignore[no-any-return]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for section in a:
        for key in a[section]:
            if (section, key) not in RESUME_FREE and a[section][key] != b.get(section, {}).get(key):
                out.append(f"{section}.{key}")
    return out


class Trainer:
    """Train ``config`` from scratch, or continue the run in ``resume`` exactly where its last
    completed epoch left it."""

    def __init__(self, config: Config, resume: str | Path | None = None,
                 overwrite: bool = False) -> None:
        self.config = config
        self.device = resolve_device(config.run.device)
        self.autocast_dtype = PRECISIONS[config.run.precision]
        configure_kernels(self.device, config.run.deterministic, config.run.cudnn_benchmark)
        dist.setup(self.device)
        self.world, self.rank = dist.world_size(), dist.rank()
        if self.device.type == "cpu" and config.run.precision == "fp16" and dist.is_main():
            print("run.precision=fp16 on a CPU: float16 products have no fast CPU kernels and "
                  "train slower than fp32; use fp32, or bf16 on a CPU with AVX512-BF16 or AMX",
                  file=sys.stderr)
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        self.out = Path(config.run.out)
        self.state: dict[str, Any] | None = None
        self._lock: IO[str] | None = None
        self._made_folder = False
        if dist.is_main():  # one trainer per run folder (the other ranks are its partners)
            target = Path(resume) if resume is not None else self.out
            folder = target if target.is_dir() or resume is None else target.parent.parent
            self._made_folder = not folder.exists()
            self._lock = RunDir(folder).lock()
        try:
            self._setup(config, resume, overwrite)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let another process train into this run folder (train() does this at its end)."""
        if self._lock is not None:
            folder = Path(self._lock.name).parent
            self._lock.close()
            self._lock = None
            if self._made_folder and [p.name for p in folder.iterdir()] == [".lock"]:
                (folder / ".lock").unlink()  # refused before it began: leave no folder behind
                folder.rmdir()

    def _setup(self, config: Config, resume: str | Path | None, overwrite: bool) -> None:
        if resume is not None and Path(resume).is_dir() and RunDir(resume).never_checkpointed():
            if dist.is_main():  # killed in its first epoch: nothing to keep, start it again
                print(f"{resume} has no checkpoint yet (stopped in its first epoch): "
                      f"starting it from the beginning", file=sys.stderr)
            self.out, resume, overwrite = Path(resume), None, True
        if resume is not None:
            self.state = load_checkpoint(resume)
            changed = _config_differences(self.state["config"], config.to_dict())
            if changed:
                raise ConfigError(f"cannot resume {resume}: the config differs in "
                                  f"{', '.join(changed)}; resume with the run's own config.yaml")
            self.out = Path(resume) if Path(resume).is_dir() else Path(resume).parent.parent
            if config.schedule.epochs < int(self.state["epoch"]):
                raise ConfigError(f"cannot resume {resume} with schedule.epochs="
                                  f"{config.schedule.epochs}: it has trained "
                                  f"{self.state['epoch']} epochs; a resumed run can extend, "
                                  f"never shrink")
        else:
            held = RunDir(self.out).held()
            if held and not overwrite:
                raise ConfigError(f"run folder {self.out} already holds a run ({held[0]}); "
                                  f"continue it with --resume {self.out}, start over with "
                                  f"--overwrite (deletes it), or choose another --out")
            if held and dist.is_main():
                RunDir(self.out).clear()
            dist.barrier()
        _seed_everything(config.run.seed)
        self.model = build_model(config).to(self.device)
        if config.model.sync_bn and self.world > 1:
            if self.device.type != "cuda":
                raise ConfigError("model.sync_bn needs CUDA devices (torch's SyncBatchNorm has "
                                  "no CPU kernels); on CPU set model.sync_bn=false, and "
                                  "model.freeze_bn=true for BatchNorm that does not depend on "
                                  "the process count")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if config.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if config.model.compile:
            self.model.compile()  # in place: the state dict's names stay the model's own
        self.loaders: Loaders = build_loaders(
            config.data, self.model.mean, self.model.std, config.evaluation.batch_size,
            config.run.seed, self.world, self.rank, self._feature_fn(),
            pin_memory=self.device.type == "cuda", interpolation=self.model.interpolation)
        self.loss = build_config_loss(config, self.loaders.num_classes).to(self.device)
        gather = (self.world > 1 and config.loss.gather
                  and getattr(self.loss, "needs_global_batch", True))
        self.sharded = config.loss.shard_centers
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.objective: nn.Module
        if self.sharded and self.world > 1:  # each rank's centers are its own: DDP the model
            ddp_model: Any = torch.nn.parallel.DistributedDataParallel(self.model, device_ids)
            self.objective = Objective(ddp_model, self.loss, self.autocast_dtype)
        else:
            self.objective = Objective(self.model, self.loss, self.autocast_dtype, gather)
            if self.world > 1:
                self.objective = torch.nn.parallel.DistributedDataParallel(self.objective,
                                                                           device_ids)
        opt = config.optimizer
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": trainable, "lr": opt.lr, "name": "network"}]
        if list(self.loss.parameters()):
            groups.append({"params": list(self.loss.parameters()), "lr": opt.loss_lr,
                           "name": "loss"})
        # fused: one pass over each tensor for the whole update, 2x quicker than torch's CPU
        # default (a kernel per operation per tensor); the same Adam, rounded differently in the
        # last bit (docs/PERFORMANCE.md)
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(groups, eps=resolved_eps(self.config),
                                          weight_decay=opt.weight_decay, fused=fused or None)
        # fp16's narrow exponent range needs loss scaling; bf16 has float32's and does not
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=config.run.precision == "fp16")
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, config.schedule.milestones, config.schedule.gamma)
        self.epoch, self.step = 0, 0
        self.history: list[dict[str, Any]] = []
        if self.state is not None:
            self._restore(self.state)
        elif config.loss.init_centers == "data":
            self._init_centers_from_data()
        self.writer: Any = None
        self.last_embeddings = np.zeros((0, config.model.embedding_dim), dtype=np.float32)

    def _feature_fn(self) -> Callable[[ImageTable], np.ndarray] | None:
        """The head protocol's cached backbone features, when data.feature_cache is on."""
        config = self.config
        if not config.data.feature_cache:
            return None
        if (config.model.weights is None and config.model.backbone not in WHEEL_WEIGHTS
                and not config.model.pretrained):
            raise ConfigError(f"data.feature_cache needs pretrained features: set model.weights "
                              f"for {config.model.backbone} (a random backbone's features "
                              f"change with the seed), or use {', '.join(WHEEL_WEIGHTS)}")

        def features(table: ImageTable) -> np.ndarray:
            rows, _ = cached_features(
                self.model, table, config.model.backbone, config.model.weights,
                config.data.image_size, config.evaluation.batch_size, self.device,
                loader_workers(config.data.workers, self.device.type == "cuda"),
                config.run.progress and dist.is_main())
            return rows

        return features

    @torch.no_grad()
    def _init_centers_from_data(self) -> None:
        """loss.init_centers=data: the centers from k-means of each class's embeddings by the
        initial model (the training set in order, its training transform; a generator of its
        own, so the run's other random draws are those of a random-init run)."""
        if not isinstance(self.loss, SoftTripleLoss) or self.sharded or self.world > 1:
            raise ConfigError("loss.init_centers=data applies to softtriple and hardtriple in one "
                              "process (not sharded)")
        dataset = self.loaders.train.dataset
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.config.evaluation.batch_size, shuffle=False,
            generator=torch.Generator().manual_seed(self.config.run.seed))
        self.model.eval()
        parts, labels = [], []
        for inputs, y, _ in loader:
            parts.append(self.model(inputs.to(self.device)).float().cpu())
            labels.append(y)
        self.model.train()
        self.loss.init_centers_from(torch.cat(parts), torch.cat(labels), self.config.run.seed)

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.out)

    # ----------------------------------------------------------------- state
    def _restore(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            if self.sharded:
                self._restore_center_block(state)
            else:
                self.loss.load_state_dict(state["loss"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"checkpoint does not fit this model: "
                                  f"{mismatch_detail(error)}") from error
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state.get("history", []))
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(("MT19937", state["rng"]["numpy"].numpy().astype(np.uint32),
                             *state["rng"]["numpy_pos"]))
        random.setstate(state["rng"]["python"])

    def _centers_index(self) -> int:
        """The sharded centers' position among the optimizer's parameters (its state key)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return next(i for i, p in enumerate(params) if p is self.loss.centers)

    def _restore_center_block(self, state: dict[str, Any]) -> None:
        """This rank's classes of the sharded centers and their Adam state, from the blocks the
        checkpoint names, whatever process count wrote them."""
        loss: Any = self.loss
        rows = read_center_rows(self.run_dir.checkpoint.parent, state["center_blocks"],
                                loss.start, loss.stop)
        with torch.no_grad():
            loss.centers.copy_(rows["centers"])
        self.optimizer.load_state_dict(state["optimizer"])  # without the centers' state
        if "exp_avg" in rows:
            self.optimizer.state[loss.centers] = {
                "step": rows["step"], "exp_avg": rows["exp_avg"].to(self.device),
                "exp_avg_sq": rows["exp_avg_sq"].to(self.device)}

    def _save_center_blocks(self) -> tuple[list[str], dict[str, Any]]:
        """Every rank writes its block of centers and their Adam state (atomically); returns
        every block's name (on every rank) and the optimizer state without the centers'."""
        loss: Any = self.loss
        optimizer = self.optimizer.state_dict()
        adam = optimizer["state"].pop(self._centers_index(), {})
        name = center_block_name(loss.start, loss.stop, self.step)
        save_checkpoint(self.run_dir.checkpoint.parent / name, {
            "start": loss.start, "stop": loss.stop, "centers": loss.centers.detach(),
            **{k: v for k, v in adam.items() if k in ("step", "exp_avg", "exp_avg_sq")}})
        return dist.gather(name), optimizer

    def _checkpoint(self) -> None:
        """checkpoints/last.pt, written by rank 0 (and each rank's block of sharded centers
        first: last.pt names them, so a kill between leaves the previous set in use)."""
        blocks: list[str] = []
        if self.sharded:
            blocks, optimizer = self._save_center_blocks()
            dist.barrier()
        if not dist.is_main():
            return
        if not self.sharded:
            optimizer = self.optimizer.state_dict()
        np_state: Any = np.random.get_state()
        save_checkpoint(self.run_dir.checkpoint, {
            "model": self.model.state_dict(),
            "loss": {} if self.sharded else self.loss.state_dict(),
            "center_blocks": blocks,
            "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
            "config": self.config.to_dict(),
            "num_classes": self.loaders.num_classes, "history": self.history,
            "rng": {"torch": torch.get_rng_state(),
                    "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                    "numpy_pos": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
                    "python": random.getstate()},
        })
        for stale in self.run_dir.checkpoint.parent.glob("centers-*.pt"):
            if stale.name not in blocks:  # an earlier step's (or process count's) blocks
                stale.unlink()

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not dist.is_main():
            return
        self.run_dir.append_metrics(record)
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, float) and key not in ("epoch",):
                    self.writer.add_scalar(key, value, record.get("step", self.step))

    # ----------------------------------------------------------------- evaluation
    def embed_test(self) -> np.ndarray:
        """Embeddings (N_r, d) of this rank's shard of the held-out classes (all of them in one
        process); the shards are contiguous, in rank order."""
        return embed(self.model, self.loaders.test, self.device, self.autocast_dtype,
                     self.config.model.channels_last)

    def evaluate(self) -> dict[str, Any]:
        """The test metrics, on every rank. Several processes search their shards of the test
        set (``softtriple.evaluation.sharded``: exact, equal to one process); only NMI/AMI's k-means
        gathers the embeddings."""
        embeddings = self.embed_test()
        faults.point("evaluation")
        self.last_embeddings = embeddings
        labels = self.loaders.test_table.encoded_labels()[0]
        ev = self.config.evaluation
        # the kNN runs on the run's device: one copy there, none per tile
        local = torch.from_numpy(embeddings).to(self.device)
        # in one process this is evaluate(); under N it searches each rank's shard
        metrics = sharded_evaluate(local, labels, ks=ev.ks, metrics=ev.metrics,
                                   seed=self.config.run.seed, kmeans_settings=ev.kmeans)
        return dist.broadcast(metrics)  # type: ignore[no-any-return]

    # ----------------------------------------------------------------- training
    def _train_epoch(self) -> float:
        schedule = self.config.schedule
        self.objective.train()
        seed = self.config.run.seed * 100_003 + self.epoch
        torch.manual_seed(seed)  # augmentation in the main process, reproducible per epoch
        self.loaders.train.batch_sampler.set_epoch(self.epoch)  # type: ignore[union-attr]
        if hasattr(self.loaders.train.dataset, "set_epoch"):  # augmentation per (seed, epoch)
            self.loaders.train.dataset.set_epoch(self.epoch)
        self.loaders.train.generator.manual_seed(seed)  # type: ignore[union-attr]
        total, count = 0.0, 0
        steps = len(self.loaders.train)
        if schedule.max_steps_per_epoch:
            steps = min(steps, schedule.max_steps_per_epoch)
        bar = tqdm(total=steps, desc=f"epoch {self.epoch + 1}/{schedule.epochs}", leave=False,
                   disable=not (self.config.run.progress and dist.is_main()))
        for i, (images, labels, _) in enumerate(self.loaders.train):
            if i >= steps:
                break
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.config.model.channels_last and images.dim() == 4:  # images, not features
                images = images.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.objective(images, labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)} at epoch {self.epoch + 1} "
                                         f"step {i}; lower optimizer.lr or optimizer.loss_lr")
            self.scaler.scale(loss).backward()
            if not self.scaler.is_enabled():  # fp16's scaler skips overflowing steps itself
                self._check_gradients(i)
            self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
            faults.point("step")
            self.step += 1
            total, count = total + loss.item(), count + 1
            bar.set_postfix(loss=f"{total / count:.4f}")
            bar.update()
        bar.close()
        self.scheduler.step()
        return dist.mean(total / max(count, 1))  # each rank's loss of its block, or gathered

    def _check_gradients(self, step: int) -> None:
        """FloatingPointError naming the first parameter whose gradient is NaN or inf (a finite
        loss can still overflow in its backward, e.g. at a huge scale lambda); one
        synchronizing check per step, the names only on failure. The check is the gradients'
        2-norm (one fast pass, 10x quicker than the max-norm on CPU), finite unless an element
        is; when it is not, the max-norm decides (the squares of a huge finite gradient overflow
        too)."""
        named = [(n, p.grad) for n, p in self.objective.named_parameters() if p.grad is not None]
        grads = [g for _, g in named]
        if not named or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True))) \
                or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf"),
                                                                     foreach=True))):
            return
        name = next(n for n, g in named if not bool(torch.isfinite(g).all()))
        raise FloatingPointError(f"the gradient of {name} became NaN or inf at epoch "
                                 f"{self.epoch + 1} step {step}; lower optimizer.lr, "
                                 f"optimizer.loss_lr or the loss's scale (la, scale, alpha)")

    def _evaluate_and_log(self, **extra: Any) -> dict[str, Any]:
        start = time.perf_counter()
        metrics = self.evaluate()
        self._log({"epoch": self.epoch, "step": self.step, **extra,
                   **{f"test/{k}": v for k, v in metrics.items()},
                   "eval_seconds": time.perf_counter() - start})
        return metrics

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
            self.out.mkdir(parents=True, exist_ok=True)
            self.run_dir.remove_leftovers()  # writes that a kill interrupted
            self.run_dir.write_config(dump_config(config))
            if self.loaders.bad_images:  # data.bad_images=skip: what was left out, and why
                self.run_dir.write_bad_images(self.loaders.bad_images)
                print(f"data.bad_images=skip: left out {len(self.loaders.bad_images)} "
                      f"unreadable image(s), listed in {self.run_dir.bad_images}",
                      file=sys.stderr)
            if self.state is not None:  # the log as of the checkpoint: no rows past it
                self.run_dir.write_metrics(self.history)
            try:
                from torch.utils.tensorboard import SummaryWriter
                # on resume, events past the checkpoint's step are dropped (TensorBoard's own
                # purge_step), so the curves show each step once
                self.writer = SummaryWriter(str(self.run_dir.tensorboard),
                                            purge_step=self.step if self.state else None)
            except ImportError:  # tensorboard is a dependency; tolerate its absence
                self.writer = None
        if self.epoch == 0 and config.evaluation.before_training:
            self._evaluate_and_log()
        metrics: dict[str, Any] = {}
        while self.epoch < config.schedule.epochs:
            start = time.perf_counter()
            mean_loss = self._train_epoch()
            self.epoch += 1
            lrs = {f"lr/{g.get('name', i)}": g["lr"]
                   for i, g in enumerate(self.optimizer.param_groups)}
            record = {"train/loss": mean_loss, **lrs,
                      "epoch_seconds": time.perf_counter() - start}
            every = config.evaluation.every
            last = self.epoch == config.schedule.epochs
            if last or (every and self.epoch % every == 0):
                metrics = self._evaluate_and_log(**record)
            else:
                self._log({"epoch": self.epoch, "step": self.step, **record})
            faults.point("logged")
            self._checkpoint()
            dist.barrier()
        if not metrics:  # resumed a finished run: nothing left to train
            metrics = self.evaluate()
        if hasattr(self.loss, "effective_centers"):  # SoftTriple: centers left after merging
            counts = self.loss.effective_centers().float()  # type: ignore[operator]
            if self.sharded:  # each rank's block of classes
                counts = torch.cat(dist.gather(counts.cpu()))
            metrics = {**metrics, "effective_centers": float(counts.mean())}
        results = {"epochs": self.epoch, "steps": self.step, "metrics": metrics,
                   "run": str(self.out)}
        # one file, written by rank 0 as each rank's shard arrives (never all of them at once)
        shards = dist.stream_to_main(self.last_embeddings)
        if dist.is_main():
            table = self.loaders.test_table
            write_embeddings(self.run_dir.embeddings, shards,
                             table.encoded_labels()[0], [str(p) for p in table.paths],
                             table.item_class_names(), run_owned=True)
            self.run_dir.write_results(results)
            if self.writer is not None:
                self.writer.close()
        return results

