"""Reference U-Net used by the demo and the tests."""

from __future__ import annotations

import torch
from torch import nn

MAX_BOTTOM_CHANNELS = 8192  # far above any real U-Net's (512-1024); a 3x3 conv at 8192 holds 0.6 G weights

__all__ = ["DoubleConv", "Up", "UNet", "unet"]


class DoubleConv(nn.Module):
    """(conv3x3 -> BN -> ReLU) x 2."""

    def __init__(self, in_channels: int, out_channels: int, batchnorm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(2):
            layers.append(nn.Conv2d(c, out_channels, 3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU())
            c = out_channels
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Up(nn.Module):
    """Upsample by 2 and halve the channels: ConvTranspose2d or bilinear + 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "transpose") -> None:
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        elif mode == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, out_channels, kernel_size=1),
            )
        else:
            raise ValueError(f"upsampling must be 'transpose' or 'bilinear', not {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class UNet(nn.Module):
    """A classic U-Net.

    Encoder blocks ``enc1..enc{depth}`` (width * 2**i channels) with max-pooling
    between them, a ``bottleneck`` of width * 2**depth channels, and decoder
    stages ``up{i}`` / ``dec{i}`` (i = depth..1) that concatenate the skip
    first: ``torch.cat([skip, up], dim=1)``.  The 1x1 head is ``out``.
    Input height and width must be divisible by ``2**depth``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        width: int = 16,
        depth: int = 4,
        upsampling: str = "transpose",
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        if width < 1:
            raise ValueError(f"width must be at least 1, not {width}")
        if width * 2**depth > MAX_BOTTOM_CHANNELS:  # checked before gigabytes of weights are allocated
            raise ValueError(f"width * 2**depth (the bottom block's channels) must be at most {MAX_BOTTOM_CHANNELS}, "
                             f"not {width * 2**depth} (width {width}, depth {depth})")
        self.depth = depth
        widths = [width * 2**i for i in range(depth + 1)]
        c = in_channels
        for i in range(depth):
            self.add_module(f"enc{i + 1}", DoubleConv(c, widths[i], batchnorm))
            c = widths[i]
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(c, widths[depth], batchnorm)
        for i in range(depth, 0, -1):
            self.add_module(f"up{i}", Up(widths[i], widths[i - 1], upsampling))
            self.add_module(f"dec{i}", DoubleConv(2 * widths[i - 1], widths[i - 1], batchnorm))
        self.out = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(1, self.depth + 1):
            x = getattr(self, f"enc{i}")(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for i in range(self.depth, 0, -1):
            up = getattr(self, f"up{i}")(x)
            x = getattr(self, f"dec{i}")(torch.cat([skips[i - 1], up], dim=1))
        return self.out(x)


def unet(
    in_channels: int = 3,
    num_classes: int = 2,
    width: int = 16,
    depth: int = 4,
    upsampling: str = "transpose",
    batchnorm: bool = True,
) -> UNet:
    """Build the reference U-Net (see :class:`UNet`)."""
    return UNet(in_channels, num_classes, width, depth, upsampling, batchnorm)
