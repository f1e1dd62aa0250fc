"""The build layer: the device, precision, embedding model, loss, objective and optimizer that a
Config describes. Below the trainer and inference (both call it); it imports neither."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from softtriple import distributed as dist
from softtriple.experiment.config import Config, ConfigError, resolved_eps
from softtriple.losses import SoftTripleLoss, build_loss, loss_arguments
from softtriple.models import EmbeddingModel, build_backbone, embed

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}


def precision_advice(device: torch.device, precision: str) -> str | None:
    """One line to warn with when ``run.precision`` has no fast kernels on ``device``: fp16 on a
    CPU; bf16 on a GPU older than Ampere (compute capability < 8: no bfloat16 units, so torch
    emulates it). None where the precision suits the device."""
    if device.type == "cpu" and precision == "fp16":
        return ("run.precision=fp16 on a CPU: float16 products have no fast CPU kernels and "
                "train slower than fp32; use fp32, or bf16 on a CPU with AVX512-BF16 or AMX")
    if device.type == "cuda" and precision == "bf16":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return (f"run.precision=bf16 on {torch.cuda.get_device_name(device)} (compute "
                    f"capability {major}.{minor}): it has no bfloat16 units, so bf16 runs "
                    f"emulated, slower than fp32; use fp16 (loss-scaled) on this GPU")
    return None


def resolve_device(name: str) -> torch.device:
    """The device ``run.device`` names (auto: CUDA when visible); under torchrun, GPU number
    LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but no GPU is visible; use auto or cpu")
    if name == "cuda":
        device = torch.device("cuda", dist.local_rank())
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def configure_kernels(device: torch.device, deterministic: bool,
                      cudnn_benchmark: bool = True) -> None:
    """Process-wide kernel choice for ``run.deterministic`` and ``run.cudnn_benchmark``.

    Deterministic: every op must use a deterministic kernel (``torch.use_deterministic_algorithms``
    raises on one that has none), cuDNN deterministic with no autotuning, and cuBLAS a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which cuBLAS reads when a process first uses
    it: set here before any product, kept if the user set it). Otherwise torch's defaults, with
    cuDNN autotuning as ``cudnn_benchmark`` says. The CPU's kernels are deterministic either way.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(config: Config, pretrained: bool = True) -> EmbeddingModel:
    """The embedding model ``config.model`` describes (pretrained weights where it names some)."""
    backbone = build_backbone(config.model.backbone, config.model.weights, pretrained,
                              fetch=pretrained and config.model.pretrained,
                              options=config.model.backbone_args)
    return EmbeddingModel(backbone, config.model.embedding_dim, config.model.freeze_bn,
                          config.model.freeze_backbone, config.model.head_hidden,
                          config.model.normalize)


# the losses whose centers loss.shard_centers can shard, as arguments of ShardedSoftTripleLoss
SHARDABLE: dict[str, dict[str, Any]] = {
    "softtriple": {}, "hardtriple": {"gamma": 0.0},
    "softmax_norm": {"centers_per_class": 1, "tau": 0.0}}


def build_config_loss(config: Config, num_classes: int) -> nn.Module:
    """The loss ``config.loss`` names (checked when the config was read, ``config.check_loss``),
    sized for ``num_classes`` training classes; with ``loss.shard_centers`` this process's block
    of a ShardedSoftTripleLoss."""
    if config.loss.shard_centers:
        from softtriple.losses.sharded_softtriple import ShardedSoftTripleLoss
        if config.loss.name not in SHARDABLE:
            raise ConfigError(f"loss.shard_centers applies to {', '.join(SHARDABLE)}; "
                              f"{config.loss.name} has no class centers to shard")
        args = dict(config.loss.args) | SHARDABLE[config.loss.name]
        try:
            return ShardedSoftTripleLoss(num_classes, config.model.embedding_dim, **args,
                                         seed=config.run.seed)
        except TypeError as error:
            raise ConfigError(f"loss.args {sorted(config.loss.args)} do not fit the sharded "
                              f"{config.loss.name}: {error}") from error
    params = loss_arguments(config.loss.name)
    sized = {"num_classes": num_classes, "embedding_dim": config.model.embedding_dim}
    kwargs = {k: v for k, v in sized.items() if k in params} | dict(config.loss.args)
    return build_loss(config.loss.name, **kwargs)




def build_training_model(config: Config, device: torch.device) -> EmbeddingModel:
    """``build_model`` on ``device`` as the trainer runs it: SyncBatchNorm under several CUDA
    processes (model.sync_bn), channels_last and torch.compile where the config says."""
    model = build_model(config).to(device)
    if config.model.sync_bn and dist.world_size() > 1:
        if device.type != "cuda":
            raise ConfigError("model.sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU "
                              "kernels); on CPU set model.sync_bn=false, and model.freeze_bn=true "
                              "for BatchNorm that does not depend on the process count")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.model.compile:
        model.compile()  # in place: the state dict's names stay the model's own
    return model


def graph_network(model: EmbeddingModel, config: Config, device: torch.device) -> None:
    """``model.cuda_graph``: the network's training forward and backward captured once as CUDA
    graphs (``torch.cuda.make_graphed_callables``, in place: the module and its parameters stay
    the same objects), for uint8 batches of (data.batch_size, 3, image_size, image_size) (the
    loader's; their normalization is in the graph) under the run's autocast. In eval mode the
    module runs its eager forward. The capture's warm-up passes (three forward and backward
    passes on a random batch) leave the BatchNorm statistics and CUDA's random generator as they
    found them, and no parameter's gradient."""
    if device.type != "cuda":
        raise ConfigError(f"model.cuda_graph needs a CUDA device; the run is on {device.type}: "
                          "set model.cuda_graph=false")
    if dist.world_size() > 1:
        raise ConfigError("model.cuda_graph is for one process (DistributedDataParallel's "
                          "gradient hooks do not replay): set model.cuda_graph=false under "
                          "torchrun")
    size = config.data.image_size
    memory = torch.channels_last if config.model.channels_last else torch.contiguous_format
    sample = torch.randint(0, 256, (config.data.batch_size, 3, size, size), dtype=torch.uint8,
                           device=device).contiguous(memory_format=memory)  # the loader's
    buffers = [(b, b.clone()) for b in model.buffers()]
    rng = torch.cuda.get_rng_state(device)
    dtype = PRECISIONS[config.run.precision]
    model.train()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None, cache_enabled=False):
        torch.cuda.make_graphed_callables(model, (sample,))
    torch.cuda.synchronize(device)
    for buffer, saved in buffers:
        buffer.copy_(saved)
    torch.cuda.set_rng_state(rng, device)


class Objective(nn.Module):
    """Model and loss as one module, so DistributedDataParallel syncs the loss's centers too.

    With ``autocast_dtype`` (bf16 / fp16) the model runs under autocast; the loss always
    computes in float32 against its float32 centers (``softtriple.losses._precision``). With
    ``gather`` the loss sees the global batch of every rank (``distributed.gather_batch``).
    ``graphed``: the model's training pass is a CUDA graph (graph_network), which autocast's
    cast cache must stay off for (a cast in the graph is replayed, not cached)."""

    def __init__(self, model: nn.Module, loss: nn.Module,
                 autocast_dtype: torch.dtype | None = None, gather: bool = False,
                 graphed: bool = False) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.autocast_dtype = autocast_dtype
        self.gather = gather
        self.graphed = graphed

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(images.device.type, dtype=self.autocast_dtype,
                            enabled=self.autocast_dtype is not None,
                            cache_enabled=not self.graphed):
            embeddings = self.model(images)
        if self.gather:
            embeddings, labels = dist.gather_batch(embeddings, labels)
        return self.loss(embeddings, labels)  # type: ignore[no-any-return]


def build_objective(config: Config, model: nn.Module, loss: nn.Module,
                    device: torch.device) -> nn.Module:
    """The module a training step calls, ``(images, labels) -> loss``: in one process the
    Objective; under several, DistributedDataParallel of it (the loss sees the global batch
    where it needs one and loss.gather is on), or of the model alone when the loss's centers are
    sharded (each rank's centers are its own)."""
    world = dist.world_size()
    autocast_dtype = PRECISIONS[config.run.precision]
    device_ids = [device.index] if device.type == "cuda" else None
    if config.loss.shard_centers and world > 1:
        return Objective(torch.nn.parallel.DistributedDataParallel(model, device_ids), loss,
                         autocast_dtype)
    gather = world > 1 and config.loss.gather and getattr(loss, "needs_global_batch", True)
    objective = Objective(model, loss, autocast_dtype, gather, graphed=config.model.cuda_graph)
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(objective, device_ids)
    return objective


def build_optimizer(config: Config, model: nn.Module, loss: nn.Module, device: torch.device
                    ) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """Adam over the model's trainable parameters ("network", optimizer.lr) and the loss's
    ("loss", optimizer.loss_lr), its MultiStepLR schedule, and fp16's loss scaler (a no-op
    otherwise): (optimizer, scheduler, scaler)."""
    opt = config.optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": trainable, "lr": opt.lr, "name": "network"}]
    if list(loss.parameters()):
        groups.append({"params": list(loss.parameters()), "lr": opt.loss_lr, "name": "loss"})
    # fused: one pass over each tensor for the whole update, 2x quicker than torch's CPU default
    # (a kernel per operation per tensor); the same Adam, rounded differently in the last bit
    # (docs/PERFORMANCE.md)
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(groups, eps=resolved_eps(config), weight_decay=opt.weight_decay,
                                 fused=fused or None)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, config.schedule.milestones,
                                                     config.schedule.gamma)
    # fp16's narrow exponent range needs loss scaling; bf16 has float32's and does not
    scaler = torch.amp.GradScaler(device.type, enabled=config.run.precision == "fp16")
    return optimizer, scheduler, scaler


@torch.no_grad()
def init_centers_from_data(config: Config, model: nn.Module, loss: nn.Module,
                           dataset: torch.utils.data.Dataset[Any], device: torch.device) -> None:
    """loss.init_centers=data: the centers from k-means of each class's embeddings by the
    initial model (the training set in order, its training transform; a generator of its own,
    so the run's other random draws are those of a random-init run)."""
    if not isinstance(loss, SoftTripleLoss) or config.loss.shard_centers \
            or dist.world_size() > 1:
        raise ConfigError("loss.init_centers=data applies to softtriple and hardtriple in one "
                          "process (not sharded)")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.evaluation.batch_size, shuffle=False,
        generator=torch.Generator().manual_seed(config.run.seed))
    embeddings = embed(model, loader, device)  # float32, the test embeddings' loop
    labels = torch.as_tensor(np.asarray(dataset.labels))  # type: ignore[attr-defined]
    model.train()
    loss.init_centers_from(torch.from_numpy(embeddings), labels, config.run.seed)
