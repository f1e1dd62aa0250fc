"""BN-Inception (Ioffe & Szegedy, "Batch Normalization", ICML 2015), the SoftTriple paper's
backbone, with the module names of the widely used Caffe-converted weights
(``bn_inception-52deb4733.pth``: ``conv1_7x7_s2``, ``inception_3a_1x1_bn``, ...), so that their
state dict loads as it is. Inputs: BGR, 0-255, minus the mean (104, 117, 128); ``forward`` takes
RGB normalized by ``MEAN``/``STD`` below and flips the channels itself."""

from __future__ import annotations

import torch
from torch import Tensor, nn

MEAN = (128 / 255, 117 / 255, 104 / 255)  # RGB order, for transforms.Normalize
STD = (1 / 255, 1 / 255, 1 / 255)

# name: (in, 1x1, 3x3 reduce, 3x3, double reduce, double, pool projection or None, pool, stride)
_BLOCKS = [
    ("3a", 192, 64, 64, 64, 64, 96, 32, "avg", 1),
    ("3b", 256, 64, 64, 96, 64, 96, 64, "avg", 1),
    ("3c", 320, 0, 128, 160, 64, 96, 0, "max", 2),
    ("4a", 576, 224, 64, 96, 96, 128, 128, "avg", 1),
    ("4b", 576, 192, 96, 128, 96, 128, 128, "avg", 1),
    ("4c", 576, 160, 128, 160, 128, 160, 128, "avg", 1),
    ("4d", 608, 96, 128, 192, 160, 192, 128, "avg", 1),
    ("4e", 608, 0, 128, 192, 192, 256, 0, "max", 2),
    ("5a", 1056, 352, 192, 320, 160, 224, 128, "avg", 1),
    ("5b", 1024, 352, 192, 320, 192, 224, 128, "max", 1),
]


class BNInception(nn.Module):
    """BN-Inception features: (B, 3, H, W) -> (B, 1024, H/32, W/32)."""

    out_channels = 1024

    def __init__(self) -> None:
        super().__init__()
        self._conv("conv1_7x7_s2", 3, 64, 7, 2, 3)
        self.pool1_3x3_s2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self._conv("conv2_3x3_reduce", 64, 64, 1)
        self._conv("conv2_3x3", 64, 192, 3, 1, 1)
        self.pool2_3x3_s2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        for name, cin, c1, r3, c3, rd, cd, proj, pool, stride in _BLOCKS:
            p = f"inception_{name}_"
            if c1:
                self._conv(p + "1x1", cin, c1, 1)
            self._conv(p + "3x3_reduce", cin, r3, 1)
            self._conv(p + "3x3", r3, c3, 3, stride, 1)
            self._conv(p + "double_3x3_reduce", cin, rd, 1)
            self._conv(p + "double_3x3_1", rd, cd, 3, 1, 1)
            self._conv(p + "double_3x3_2", cd, cd, 3, stride, 1)
            if stride == 2:
                setattr(self, p + "pool", nn.MaxPool2d(3, 2, ceil_mode=True))
            elif pool == "avg":
                setattr(self, p + "pool", nn.AvgPool2d(3, 1, 1, ceil_mode=True,
                                                      count_include_pad=True))
            else:
                setattr(self, p + "pool", nn.MaxPool2d(3, 1, 1, ceil_mode=True))
            if proj:
                self._conv(p + "pool_proj", cin, proj, 1)

    def _conv(self, name: str, cin: int, cout: int, k: int, stride: int = 1,
              padding: int = 0) -> None:
        setattr(self, name, nn.Conv2d(cin, cout, k, stride, padding))
        setattr(self, name + "_bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))

    def _layer(self, name: str, x: Tensor) -> Tensor:
        return torch.relu(getattr(self, name + "_bn")(getattr(self, name)(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, [2, 1, 0]]  # RGB -> BGR, as the Caffe weights expect
        x = self.pool1_3x3_s2(self._layer("conv1_7x7_s2", x))
        x = self._layer("conv2_3x3", self._layer("conv2_3x3_reduce", x))
        x = self.pool2_3x3_s2(x)
        for name, _, c1, _, _, _, _, proj, _, _ in _BLOCKS:
            p = f"inception_{name}_"
            branches = []
            if c1:
                branches.append(self._layer(p + "1x1", x))
            branches.append(self._layer(p + "3x3", self._layer(p + "3x3_reduce", x)))
            d = self._layer(p + "double_3x3_reduce", x)
            branches.append(self._layer(p + "double_3x3_2", self._layer(p + "double_3x3_1", d)))
            pooled = getattr(self, p + "pool")(x)
            branches.append(self._layer(p + "pool_proj", pooled) if proj else pooled)
            x = torch.cat(branches, dim=1)
        return x
