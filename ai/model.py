"""The 2D segmentation network: a small U-Net for the label set of ``ai.labels``.

Small on purpose: about 1-2 M parameters so that a 512x512 slice (resampled to the
model's input grid, see :mod:`ai.card`) is segmented in tens of milliseconds on a CPU
core, and the shipped weights stay far below 20 MB.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

#: Groups of the group normalisation (channel counts below are multiples of it).
NORM_GROUPS = 4


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyper-parameters (recorded in the model card).

    Attributes
    ----------
    in_channels
        Image channels (1: one normalised MR slice).
    num_classes
        Output classes, background included.
    channels
        Feature channels per resolution level, finest first; each level halves the grid.
    """

    in_channels: int = 1
    num_classes: int = 13
    channels: tuple[int, ...] = (16, 32, 64, 96, 128)

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.num_classes < 2:
            raise ValueError("in_channels must be >= 1 and num_classes >= 2")
        if len(self.channels) < 2:
            raise ValueError("channels needs at least two levels")
        if any(c < NORM_GROUPS or c % NORM_GROUPS for c in self.channels):
            raise ValueError(f"every channel count must be a multiple of {NORM_GROUPS}")

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (one halving per level after the first)."""
        return int(2 ** (len(self.channels) - 1))

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> UNetConfig:
        ch = d.get("channels", cls.channels)
        if not isinstance(ch, list | tuple):
            raise ValueError("channels must be a list")
        return cls(
            in_channels=int(d.get("in_channels", 1)),  # type: ignore[call-overload]
            num_classes=int(d.get("num_classes", 13)),  # type: ignore[call-overload]
            channels=tuple(int(c) for c in ch),
        )


class _DoubleConv(nn.Module):
    """Two 3x3 convolutions, each followed by group norm and ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)  # type: ignore[no-any-return]


class UNet(nn.Module):
    """U-Net (Ronneberger 2015) with max-pool down, bilinear up and additive-free concat skips.

    Input ``(batch, in_channels, H, W)`` with H and W multiples of
    :attr:`UNetConfig.divisor`; output logits ``(batch, num_classes, H, W)``.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        ch = self.config.channels
        self.encoders = nn.ModuleList()
        cin = self.config.in_channels
        for c in ch:
            self.encoders.append(_DoubleConv(cin, c))
            cin = c
        self.reducers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(len(ch) - 1, 0, -1):
            self.reducers.append(nn.Conv2d(ch[i], ch[i - 1], 1))
            self.decoders.append(_DoubleConv(2 * ch[i - 1], ch[i - 1]))
        self.head = nn.Conv2d(ch[0], self.config.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, enc in enumerate(self.encoders):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = enc(x)
            skips.append(x)
        x = skips.pop()
        for red, dec in zip(self.reducers, self.decoders, strict=True):
            skip = skips.pop()
            x = F.interpolate(red(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([x, skip], dim=1))
        return self.head(x)  # type: ignore[no-any-return]


def fold_batchnorm(model: UNet) -> UNet:
    """An inference copy of ``model`` with every BatchNorm folded into the convolution before it.

    In eval mode a BatchNorm is a fixed per-channel affine map, so it can be merged into
    the preceding convolution's weights and bias: the outputs are equal up to float
    rounding, and the separate memory-bound BatchNorm passes (about a fifth of a CPU
    forward pass) disappear. The copy is in eval mode and must not be trained.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, _DoubleConv):
            continue
        layers: list[nn.Module] = []
        pending: nn.Conv2d | None = None
        for layer in module.block:
            if isinstance(layer, nn.BatchNorm2d) and pending is not None:
                layers.append(fuse_conv_bn_eval(pending, layer))
                pending = None
                continue
            if pending is not None:
                layers.append(pending)
                pending = None
            if isinstance(layer, nn.Conv2d):
                pending = layer
            else:
                layers.append(layer)
        if pending is not None:
            layers.append(pending)
        module.block = nn.Sequential(*layers)
    return folded


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
