"""A battery of tiny architectures that, together, use every op the channel rules know.

Each entry of :data:`ARCHS` builds a model with random weights and random
norm statistics, gives example inputs for a batch size, and lists pin
reasons that its channel graph must report. Every model propagates exact
zeros along a removed channel: an op that turns a zero channel into
something else (``x + 1``, softmax over space, a LayerNorm bias over W) is
only used on pinned channels or before something that zeroes the channel
again (a BatchNorm whose weight and bias are zeroed, a product with a
coupled channel).
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from helpers import randomize_norms
from prunekit.zoo import resnet_small, small_cnn, unet


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]
    pins: tuple[str, ...] = ()  # substrings that must appear among graph.pins reasons
    leaf_modules: tuple[str, ...] = ()
    tags: frozenset = field(default_factory=frozenset)


def _img(c=3, h=16, w=16):
    return lambda n: (torch.randn(n, c, h, w),)


def cbr(cin, cout, k=3, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, **kw), nn.BatchNorm2d(cout), nn.ReLU())


# ---------------------------------------------------------------------------
# Convolutions, every rank and grouping


class PlainChain(nn.Module):
    """conv-bn-relu, biases, max/avg/adaptive pooling, dropout, identity, flatten + two Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = nn.ReLU6()
        self.pool2 = nn.AvgPool2d(3, stride=2, padding=1)
        self.drop = nn.Dropout2d(0.3)
        self.ident = nn.Identity()
        self.gap = nn.AdaptiveAvgPool2d((2, 2))
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(24, 10)
        self.drop2 = nn.Dropout(0.5)
        self.act3 = nn.GELU()
        self.fc2 = nn.Linear(10, 5)

    def forward(self, x):
        x = self.pool1(self.act1(self.bn1(self.c1(x))))
        x = self.ident(self.drop(self.pool2(self.act2(self.bn2(self.c2(x))))))
        return self.fc2(self.act3(self.drop2(self.fc1(self.flat(self.gap(x))))))


class Separable2d(nn.Module):
    """Depthwise (with bias), depthwise with a channel multiplier, grouped 1 < groups < C."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)
        self.dw_bn = nn.BatchNorm2d(8)
        self.dw_act = nn.Hardswish()
        self.pw = nn.Conv2d(8, 12, 1)
        self.pw_bn = nn.BatchNorm2d(12)
        self.pw_act = nn.SiLU()
        self.mult = nn.Conv2d(12, 24, 3, padding=1, groups=12, bias=False)  # multiplier 2
        self.mult_bn = nn.BatchNorm2d(24)
        self.mult_act = nn.LeakyReLU(0.1)
        self.grouped = nn.Conv2d(24, 16, 3, padding=1, groups=4)
        self.g_bn = nn.BatchNorm2d(16)
        self.g_act = nn.Tanh()
        self.fc = nn.Linear(16, 7)

    def forward(self, x):
        x = self.stem(x)
        x = self.dw_act(self.dw_bn(self.dw(x)))
        x = self.pw_act(self.pw_bn(self.pw(x)))
        x = self.mult_act(self.mult_bn(self.mult(x)))
        x = self.g_act(self.g_bn(self.grouped(x)))
        return self.fc(x.mean((2, 3)))


class Conv1dNet(nn.Module):
    """Conv1d plain/depthwise/multiplier/grouped, BatchNorm1d, ConvTranspose1d plain and grouped."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.dw = nn.Conv1d(8, 8, 5, padding=2, groups=8)
        self.mult = nn.Conv1d(8, 16, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm1d(16)
        self.grouped = nn.Conv1d(16, 12, 3, padding=1, groups=4)
        self.pool = nn.MaxPool1d(2)
        self.up = nn.ConvTranspose1d(12, 8, 2, stride=2)
        self.bn3 = nn.BatchNorm1d(8)
        self.gup = nn.ConvTranspose1d(8, 8, 3, padding=1, groups=2)
        self.avg = nn.AvgPool1d(2)
        self.amax = nn.AdaptiveMaxPool1d(4)
        self.fc = nn.Linear(32, 6)
        self.bn_fc = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.gelu(self.bn2(self.mult(self.dw(x))))
        x = self.pool(F.silu(self.grouped(x)))
        x = F.relu(self.bn3(self.up(x)))
        x = self.amax(self.avg(torch.tanh(self.gup(x))))
        x = x.view(x.size(0), -1)
        return self.out(F.relu(self.bn_fc(self.fc(x))))


class Conv3dNet(nn.Module):
    """Conv3d plain/depthwise/grouped, BatchNorm3d, InstanceNorm3d, ConvTranspose3d plain and grouped."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(8)
        self.dw = nn.Conv3d(8, 8, 3, padding=1, groups=8, bias=False)
        self.inorm = nn.InstanceNorm3d(8, affine=True)
        self.grouped = nn.Conv3d(8, 8, 1, groups=2)
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ConvTranspose3d(8, 6, 2, stride=2)
        self.bn2 = nn.BatchNorm3d(6)
        self.gup = nn.ConvTranspose3d(6, 6, 3, padding=1, groups=3)
        self.avg = nn.AvgPool3d(2)
        self.gap = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.leaky_relu(self.inorm(self.dw(x)))
        x = self.pool(F.hardswish(self.grouped(x)))
        x = F.relu(self.bn2(self.up(x)))
        x = self.gap(self.avg(self.gup(x)))
        return self.fc(torch.flatten(x, 1))


class Transpose2dNet(nn.Module):
    """ConvTranspose2d plain, grouped and depthwise; nn.Upsample and F.interpolate; a plain tensor out."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.gup = nn.ConvTranspose2d(8, 12, 3, padding=1, groups=4)
        self.dwup = nn.ConvTranspose2d(12, 12, 3, padding=1, groups=12)
        self.bn2 = nn.BatchNorm2d(12)
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        x = self.down(x)
        x = F.relu(self.bn(self.up(x)))
        x = F.relu(self.bn2(self.dwup(self.gup(x))))
        x = self.upsample(self.pool(x))
        x = F.interpolate(self.pool(x), scale_factor=2, mode="nearest")
        return self.head(x)


# ---------------------------------------------------------------------------
# Normalisation layers


class NormsNet(nn.Module):
    """GroupNorm (4 groups, 1 group: pinned), InstanceNorm (affine or not), LayerNorm over W and over C."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(1, 8)  # pins c2
        self.c3 = nn.Conv2d(8, 6, 3, padding=1)
        self.in_affine = nn.InstanceNorm2d(6, affine=True)
        self.c4 = nn.Conv2d(6, 6, 3, padding=1)
        self.in_plain = nn.InstanceNorm2d(6)
        self.c5 = nn.Conv2d(6, 6, 3, padding=1)
        self.ln_w = nn.LayerNorm(16, bias=False)  # over the last spatial dim: keeps zeros
        self.c6 = nn.Conv2d(6, 6, 3, padding=1)
        self.ln_wb = nn.LayerNorm(16)  # with a bias over W: a zero channel becomes the bias...
        self.bn_after = nn.BatchNorm2d(6)  # ...which this zeroed BatchNorm cancels
        self.c7 = nn.Conv2d(6, 6, 3, padding=1)
        self.ln_c = nn.LayerNorm(6)  # over channels, channels-last: pins c7
        self.c8 = nn.Conv2d(6, 4, 1)
        self.ln_chw = nn.LayerNorm([4, 16, 16])  # over C, H, W: pins c8
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = F.relu(self.gn(self.c1(x)))
        x = F.relu(self.gn1(self.c2(x)))
        x = F.relu(self.in_affine(self.c3(x)))
        x = F.silu(self.in_plain(self.c4(x)))
        x = F.relu(self.ln_w(self.c5(x)))
        x = F.relu(self.bn_after(self.ln_wb(self.c6(x))))
        x = self.ln_c(self.c7(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.ln_chw(self.c8(F.relu(x)))
        return self.head(x)


class GroupNormDeep(nn.Module):
    """GroupNorm with two-channel groups through a residual stage."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn0 = nn.GroupNorm(4, 8)
        self.a = nn.Conv2d(8, 12, 3, padding=1)
        self.gna = nn.GroupNorm(3, 12)
        self.b = nn.Conv2d(12, 8, 3, padding=1)
        self.gnb = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.gelu(self.gn0(self.stem(x)))
        y = self.gnb(self.b(F.relu(self.gna(self.a(x)))))
        x = F.relu(x + y)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ---------------------------------------------------------------------------
# Activations, PReLU, arithmetic


class ActivationsNet(nn.Module):
    """PReLU with one and with C parameters, relu/gelu/silu/leaky/hardswish/tanh, a sigmoid gate."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.p1 = nn.PReLU()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pc = nn.PReLU(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.acts = nn.ModuleList([nn.ReLU(), nn.GELU(), nn.SiLU(), nn.LeakyReLU(0.2), nn.Hardswish(), nn.Tanh(),
                                   nn.ELU(), nn.Mish()])
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = self.p1(self.c1(x))
        x = self.pc(self.c2(x))
        y = self.c3(x)
        for act in self.acts:
            y = act(y)
        y = y * torch.sigmoid(self.gate(x))  # gate channels couple with c3's
        return self.head(y + x)


class ArithmeticNet(nn.Module):
    """add/sub/mul/div with tensors and scalars, in place and out of place, method and operator forms."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 1)
        self.bn_shift = nn.BatchNorm2d(8)
        self.e = nn.Conv2d(8, 6, 3, padding=1)
        self.f = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.a(x)
        b, c, d = self.b(x), self.c(x), self.d(x)
        y = x + b                      # residual add
        y = y - c * 0.5                # sub with a scaled tensor
        y = y * 2                      # scalar mul keeps zeros
        y = y / 3.0                    # scalar div keeps zeros
        y = torch.add(y, d, alpha=0.5)
        y = y / (d.abs() + 1)          # tensor div; the denominator is never zero
        y = y.mul(torch.tanh(b))       # tensor mul (method form)
        y = -y + y.add(c)
        y = torch.sub(y, x)
        y = self.bn_shift(y + 1.0)     # x + scalar does not keep zeros; the zeroed BatchNorm does
        z = torch.mul(self.e(y), F.relu(self.f(y)))
        z = z.div(2)
        return self.head(z) + 0.25     # + scalar on pinned (output) channels


# ---------------------------------------------------------------------------
# Residuals, gates, skips


class SEResNet(nn.Module):
    """Residual adds (identity and projection), SE gates with Linear layers and with 1x1 convs."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1 = nn.Sequential(cbr(8, 8), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.b2 = nn.Sequential(cbr(8, 12), nn.Conv2d(12, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12))
        self.proj = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2), nn.BatchNorm2d(12))
        self.se_r = nn.Conv2d(12, 3, 1)
        self.se_e = nn.Conv2d(3, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.b1(x)
        s = F.adaptive_avg_pool2d(y, 1).view(y.size(0), -1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s)))).view(y.size(0), -1, 1, 1)
        x = F.relu(x + y * s)
        y = self.b2(x)
        g = y.mean((2, 3), keepdim=True)
        y = y * F.hardsigmoid(self.se_e(F.relu(self.se_r(g))))
        x = F.relu(self.proj(x) + y)
        return self.head(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))


class UNetCatStack(nn.Module):
    """U-Net skips (torch.cat on dim 1), a cat on a spatial dim, torch.stack, both upsamplings."""

    def __init__(self):
        super().__init__()
        self.e1 = cbr(3, 6)
        self.e2 = cbr(6, 8)
        self.mid = cbr(8, 10)
        self.up2 = nn.ConvTranspose2d(10, 8, 2, stride=2)
        self.d2 = cbr(16, 8)
        self.d1_reduce = nn.Conv2d(8, 6, 1)
        self.d1 = cbr(12, 6)
        self.left = nn.Conv2d(6, 4, 3, padding=1)
        self.right = nn.Conv2d(6, 4, 3, padding=1)
        self.stacked = nn.Conv3d(4, 4, (2, 1, 1))
        self.s1 = nn.Conv2d(6, 4, 1)
        self.s2 = nn.Conv2d(6, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        s1 = self.e1(x)
        s2 = self.e2(F.max_pool2d(s1, 2))
        m = self.mid(F.max_pool2d(s2, 2))
        d2 = self.d2(torch.cat([s2, self.up2(m)], dim=1))
        u = F.interpolate(self.d1_reduce(d2), scale_factor=2, mode="bilinear", align_corners=False)
        d1 = self.d1(torch.cat((u, s1), 1))
        # a cat along H unites the two inputs' channels
        hw = torch.cat([self.left(d1), self.right(d1)], dim=2)[:, :, ::2]
        # stack on a new depth dim, read by a Conv3d
        st = self.stacked(torch.stack([self.s1(d1), self.s2(d1)], dim=2)).squeeze(2)
        # stack on dim 0, reduced again
        sd = torch.stack([hw, st], 0).sum(0)
        return self.head(F.relu(sd))


class SplitChunkNet(nn.Module):
    """Equal chunks couple, fixed-size split / slices / narrow pin; splits along space do nothing."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = nn.Conv2d(8, 12, 3, padding=1)   # chunked in 2: coupled halves
        self.c = nn.Conv2d(6, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 3, padding=1)    # split [3, 5]: pinned
        self.e = nn.Conv2d(8, 8, 1)               # sliced [:, :4]: pinned
        self.f = nn.Conv2d(8, 8, 1)               # narrow: pinned
        self.g = nn.Conv2d(8, 6, 3, padding=1)    # torch.chunk in 3
        self.h = nn.Conv2d(6, 6, 1)               # split along H, sliced along W
        self.head = nn.Conv2d(2 + 3 + 4 + 4 + 6, 2, 1)

    def forward(self, x):
        x = self.a(x)
        l, r = self.b(x).chunk(2, dim=1)
        y = self.c(F.relu(l) * torch.sigmoid(r))
        p, q = torch.split(self.d(y), [3, 5], dim=1)
        s = self.e(y)[:, :4]
        n = self.f(y).narrow(1, 2, 4)
        g0, g1, g2 = torch.chunk(self.g(y), 3, dim=1)
        g = g0 + g1 * g2
        top, bottom = self.h(torch.cat([g0, g1, g2], 1)).split(8, dim=2)
        hh = torch.cat([top, bottom], dim=2)[:, :, :, 1:]
        hh = F.pad(hh, (1, 0))
        out = torch.cat([g, p, s, n[:, :, :, :], hh], dim=1)
        return self.head(out)


class ReduceNet(nn.Module):
    """mean/sum/amax over spatial dims, keepdim or not; Linear after x.mean((2, 3))."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.a(x)
        y = self.b(x)
        att = torch.sigmoid(y.sum(dim=(2, 3), keepdim=True) / 256 + y.amax((2, 3), keepdim=True))
        y = y * att
        row = y.mean(3, keepdim=True)          # (N, C, H, 1)
        y = y - row
        v = self.fc(x.mean((2, 3)))
        w = torch.mean(y, dim=[2, 3])
        return self.head(torch.cat([v, w], 1))


class ChannelsLast(nn.Module):
    """permute to channels-last, Linear over channels (an MLP block), permute back; also transpose/movedim."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.tail = nn.Linear(8, 6, bias=False)  # over channels after movedim
        self.w_fc = nn.Linear(16, 16, bias=False)  # over W: the channels pass through
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(y)))
        x = x + y.permute(0, 3, 1, 2)
        x = self.w_fc(self.mix(x))
        z = torch.movedim(x, 1, -1)
        z = self.tail(z).transpose(1, 3).transpose(2, 3)
        return self.head(z.contiguous())


class ShuffleNet(nn.Module):
    """ChannelShuffle, manual channel shuffle, a hard-coded reshape: all pin; pixel (un)shuffles keep channels
    in groups (see SubPixel), here between pinned ones."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)      # pixel shuffle: groups of 4 channels, read by the pinned c
        self.ps = nn.PixelShuffle(2)
        self.pu = nn.PixelUnshuffle(2)
        self.c = nn.Conv2d(2, 8, 3, padding=1)      # channel shuffle module: pinned
        self.cs = nn.ChannelShuffle(2)
        self.d = nn.Conv2d(8, 8, 1)                 # manual shuffle: pinned
        self.e = nn.Conv2d(8, 8, 1)                 # reshaped to a hard-coded count: pinned
        self.f = cbr(8, 8)                          # free
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.a(x)                                   # pinned: shuffled back and added to pinned channels below
        y = F.max_pool2d(self.ps(self.b(x)), 2)         # (N, 2, 16, 16)
        y = self.cs(self.c(y))
        n, c, h, w = y.size(0), y.size(1), y.size(2), y.size(3)
        y = self.d(y).view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        y = self.e(y).reshape(n, 8, h * w).view_as(y)
        y = y + self.pu(self.ps(x))
        return self.head(self.f(y))


class SubPixel(nn.Module):
    """Sub-pixel upsampling (a conv to C r^2 channels, then PixelShuffle) and space-to-depth (PixelUnshuffle),
    module and functional: each group of r^2 channels goes with the one channel it becomes or comes from."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 6)
        self.down = nn.PixelUnshuffle(2)            # 6 -> 24 channels at half the size
        self.b = cbr(24, 8)
        self.up = nn.Conv2d(8, 5 * 4, 3, padding=1)  # 5 groups of 4 -> 5 channels at full size
        self.shuffle = nn.PixelShuffle(2)
        self.c = cbr(5 + 6, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        skip = self.a(x)
        y = self.b(self.down(skip))
        y = F.relu(self.shuffle(self.up(y)))
        y = F.pixel_shuffle(F.pixel_unshuffle(y, 2), 2)
        return self.head(self.c(torch.cat([y, skip], 1)))


class PerChannelTensors(nn.Module):
    """Per-channel parameters read element-wise are cut with the channels they meet: layer scale (a (C,)
    vector indexed to (1, C, 1, 1)) on a residual branch, a FilterResponseNorm-like normalisation (scale,
    shift, learned threshold); a buffer over W meets no channel and changes nothing."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.weight = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.bias = nn.Parameter(torch.randn(1, 8, 1, 1) * 0.1)
        self.tau = nn.Parameter(torch.randn(1, 8, 1, 1) * 0.1)
        self.register_buffer("over_width", torch.rand(16) + 0.5)

    def forward(self, x):
        x = self.a(x)
        y = self.b(x)
        y = y * torch.rsqrt(y.pow(2).mean(dim=(2, 3), keepdim=True) + 1e-6)
        y = torch.maximum(self.weight * y + self.bias, self.tau)
        x = x + self.c(y) * self.gamma[None, :, None, None]
        return self.head(x * self.over_width)


class SoftmaxNet(nn.Module):
    """softmax/log_softmax over channels pin; over space they keep channels (then a coupled product)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.q = nn.Conv2d(8, 8, 1)
        self.v = nn.Conv2d(8, 8, 1)
        self.cls = nn.Conv2d(8, 4, 1)             # softmax over channels: pinned
        self.aux = nn.Conv2d(8, 4, 1)             # log_softmax over channels: pinned
        self.sm = nn.Softmax(dim=-1)
        self.bn = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 1)             # softmax over channels inside the model: pinned
        self.post = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.a(x)
        attn = self.sm(self.q(x).flatten(2)).view_as(x)           # over space
        y = self.v(x) * attn                                       # zero-channel v kills it
        z = self.bn(F.log_softmax(self.v(x), dim=3))               # over W, then zeroed BatchNorm
        y = y + z + self.post(torch.softmax(self.mid(y), dim=1))
        probs = torch.softmax(self.cls(y), dim=1)
        logp = F.log_softmax(self.aux(y), 1)
        return probs, logp


class AttentionNet(nn.Module):
    """Matrix products (bmm, @, einsum) are not channel-wise: their operands pin, and costs still count them."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.q = nn.Conv2d(8, 4, 1)
        self.k = nn.Conv2d(8, 4, 1)
        self.v = nn.Conv2d(8, 8, 1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)  # free
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        q, k, v = self.q(x).flatten(2), self.k(x).flatten(2), self.v(x).flatten(2)
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)        # (N, HW, HW)
        out = (v @ attn.transpose(1, 2)).view_as(x)
        g = torch.einsum("nchw,nc->nhw", x, x.mean((2, 3))).unsqueeze(1)     # (N, 1, H, W): broadcast
        y = self.mix(x + out) * torch.sigmoid(g)
        return self.head(F.relu(y))


# ---------------------------------------------------------------------------
# Output structures

Outputs = namedtuple("Outputs", ["logits", "features"])


class DictOut(nn.Module):
    """A dict of outputs (segmentation + classification)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(cbr(3, 8), cbr(8, 8))
        self.seg = nn.Conv2d(8, 3, 1)
        self.cls = nn.Linear(8, 5)

    def forward(self, x):
        f = self.body(x)
        return {"seg": self.seg(f), "cls": self.cls(f.mean((2, 3)))}


class NamedTupleOut(nn.Module):
    """A namedtuple of outputs; one of them is a feature map (its channels are pinned)."""

    def __init__(self):
        super().__init__()
        self.body = cbr(3, 8)
        self.neck = cbr(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        f = self.neck(self.body(x))
        return Outputs(self.fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)), f)


class TupleOut(nn.Module):
    """A tuple output and two example inputs."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(2, 8)
        self.fuse = nn.Conv2d(16, 8, 1)
        self.out1 = nn.Conv2d(8, 1, 1)
        self.out2 = nn.Linear(8, 2)

    def forward(self, x, y):
        f = F.relu(self.fuse(torch.cat([self.a(x), self.b(y)], 1)))
        return self.out1(f), self.out2(f.amax((2, 3)))


# ---------------------------------------------------------------------------
# Functional forms and tensor methods


class FunctionalNet(nn.Module):
    """F.conv2d with parameters, F.batch_norm with registered buffers, F.linear, functional pooling."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.beta = nn.Parameter(torch.randn(8) * 0.1)
        self.register_buffer("mean", torch.randn(8) * 0.1)
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.w2 = nn.Parameter(torch.randn(6, 8, 3, 3) * 0.2)
        self.wt = nn.Parameter(torch.randn(6, 4, 2, 2) * 0.3)  # conv_transpose2d: (in, out, k, k)
        self.lw = nn.Parameter(torch.randn(5, 4) * 0.3)
        self.lb = nn.Parameter(torch.randn(5) * 0.1)
        self.prelu_w = nn.Parameter(torch.rand(6) * 0.3)

    def forward(self, x):
        x = F.conv2d(x, self.w1, self.b1, padding=1)
        x = F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, training=self.training)
        x = F.max_pool2d(F.relu(x), 2)
        x = F.prelu(F.conv2d(x, self.w2, padding=1), self.prelu_w)
        x = F.dropout(x, 0.2, training=self.training)
        x = F.conv_transpose2d(x, self.wt, stride=2)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return F.linear(x, self.lw, self.lb)


class MethodsNet(nn.Module):
    """Tensor methods: x.add(y), x.mul_(2), x.view, x.flatten(1), x.relu(), x.sigmoid(), x.sum."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 6)
        self.fc2 = nn.Linear(8, 6)

    def forward(self, x):
        x = self.bn(self.a(x)).relu()
        y = self.b(x).add(x)
        y.mul_(2)
        y = y.clamp(min=0).contiguous()
        y = y * self.c(y).sigmoid()
        v = self.pool(y).view(y.shape[0], -1)
        w = y.sum([2, 3]).flatten(1)
        return self.fc(v) + self.fc2(w).clone()


# ---------------------------------------------------------------------------
# Shared modules, train-only branches, user leaves


class SharedNet(nn.Module):
    """A conv and a BatchNorm called twice (shared weights), on two branches that meet again."""

    def __init__(self):
        super().__init__()
        self.stem_a = cbr(3, 8)
        self.stem_b = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU())
        self.shared = nn.Conv2d(8, 10, 3, padding=1)
        self.shared_bn = nn.BatchNorm2d(10)
        self.block = cbr(10, 10)
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        a = self.shared_bn(self.shared(self.stem_a(x)))
        b = self.shared_bn(self.shared(self.stem_b(x)))
        y = self.block(F.relu(a)) + self.block(F.relu(b))
        return self.head(y)


class AuxHead(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(F.adaptive_avg_pool2d(x, 2))))
        return self.fc(torch.flatten(x, 1))


class TrainAuxNet(nn.Module):
    """GoogLeNet-style: an auxiliary head that runs only in training."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(8, 8)
        self.aux = AuxHead(8)
        self.c = cbr(8, 12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.b(self.a(x))
        aux = self.aux(x) if self.training else None
        x = self.fc(self.c(x).mean((2, 3)))
        if self.training:
            return x, aux
        return x


class DataDependent(nn.Module):
    """torch.fx cannot trace this: the branch depends on the data."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class WithUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.gate = DataDependent()
        self.b = cbr(8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.b(self.gate(self.a(x))))


# ---------------------------------------------------------------------------
# Python control flow that only a concrete trace follows


class ShapeChecks(nn.Module):
    """An input-size check that raises, an assert on shapes, padding computed with int() and %,
    and a resize guarded by a comparison of spatial sizes (segmentation_models_pytorch's pattern)."""

    def __init__(self, output_stride: int = 4):
        super().__init__()
        self.output_stride = output_stride
        self.enc = cbr(3, 8)
        self.down = cbr(8, 12, stride=2)
        self.dec = cbr(12 + 8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % self.output_stride != 0 or w % self.output_stride != 0:
            raise RuntimeError(f"input size {h}x{w} must be divisible by {self.output_stride}")
        assert x.dim() == 4, "expects N, C, H, W"
        skip = self.enc(x)
        y = self.down(skip)
        pad = int(y.shape[-1] * 2 - skip.shape[-1])
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        if pad != 0 or y.shape[-2:] != skip.shape[-2:]:
            y = F.interpolate(y, size=skip.shape[-2:], mode="nearest")
        return self.head(self.dec(torch.cat([y, skip], dim=1)))


class SizeLoops(nn.Module):
    """Loops whose bounds come from sizes and len(): over the batch, over a list of stages,
    and a len() of a tensor; a stage count read with len() on a ModuleList."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([cbr(3, 6), cbr(6, 6), cbr(6, 8)])
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        for i in range(len(self.stages)):
            x = self.stages[i](x)
            if x.size(-1) > 8:  # spatial size: the same after pruning
                x = F.max_pool2d(x, 2)
        rows = [x[b:b + 1] for b in range(len(x))]  # per-sample, then back together
        return self.head(torch.cat(rows, dim=0))


class DefaultArgs(nn.Module):
    """A forward with defaults the caller never passes, one of them a flag choosing a branch."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(8, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x, scale: float = 1.0, return_features: bool = False, mask=None):
        f = self.b(self.a(x)) * scale
        if mask is not None:
            f = f * mask
        out = self.head(f)
        return (out, f) if return_features else out


class DictInOut(nn.Module):
    """A dict of inputs, iterated with .items(); a dict of outputs read back with .keys()."""

    def __init__(self):
        super().__init__()
        self.stem = nn.ModuleDict({"rgb": cbr(3, 6), "depth": cbr(1, 6)})
        self.fuse = cbr(6, 8)
        self.heads = nn.ModuleDict({"seg": nn.Conv2d(8, 3, 1), "edge": nn.Conv2d(8, 1, 1)})

    def forward(self, batch: dict):
        feats = [self.stem[k](v) for k, v in batch.items()]
        f = self.fuse(sum(feats))
        out = {k: head(f) for k, head in self.heads.items()}
        assert set(out.keys()) == {"seg", "edge"}
        return out


class DataBranchTop(nn.Module):
    """A branch on the input's values in the top-level forward: resolved for the example input
    (and said so); both branches run the same layers."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("NaN in the input")
        f = self.a(x)
        f = self.b(f) if float(f.mean()) > -1e9 else f
        return self.head(f)


class ChannelCountBranch(nn.Module):
    """A channel count that steers Python: the channels it counts must stay."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(8, 6)
        self.wide = nn.Conv2d(6, 2, 1)
        self.narrow = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.b(self.a(x))
        return self.wide(x) if x.shape[1] == 6 else self.narrow(x[:, :4])


class SamePadConv(nn.Conv2d):
    """A conv subclass that pads itself and calls the functional op (EfficientNet ports, timm)."""

    def forward(self, x):
        k = self.weight.shape[-1]
        x = F.pad(x, [k // 2] * 4)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass fused with its activation, calling F.batch_norm (timm's BatchNormAct2d)."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return F.silu(x)


class SubclassedLayers(nn.Module):
    """Subclasses of known layers whose forward is functional: their attributes must follow the cut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(SamePadConv(3, 8, 3), BatchNormAct(8))
        self.dw = nn.Sequential(SamePadConv(8, 8, 3, groups=8), BatchNormAct(8))
        self.grouped = nn.Sequential(SamePadConv(8, 12, 3, groups=2), BatchNormAct(12))
        self.head = nn.Conv2d(12, 3, 1)

    def forward(self, x):
        return self.head(self.grouped(self.dw(self.stem(x))))


# ---------------------------------------------------------------------------
# The registry


def _zoo_unet(mode):
    return lambda: unet(in_channels=3, num_classes=2, width=4, depth=2, upsampling=mode)


ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("plain_chain", PlainChain, _img()),
    Arch("separable2d", Separable2d, _img()),
    Arch("conv1d", Conv1dNet, lambda n: (torch.randn(n, 3, 32),)),
    Arch("conv3d", Conv3dNet, lambda n: (torch.randn(n, 2, 8, 8, 8),)),
    Arch("transpose2d", Transpose2dNet, _img()),
    Arch("norms", NormsNet, _img(), pins=("GroupNorm with one group", "normalises over channels")),
    Arch("groupnorm_residual", GroupNormDeep, _img()),
    Arch("activations", ActivationsNet, _img()),
    Arch("arithmetic", ArithmeticNet, _img()),
    Arch("se_resnet", SEResNet, _img()),
    Arch("unet_cat_stack", UNetCatStack, _img()),
    Arch("split_chunk", SplitChunkNet, _img(), pins=("split into fixed sizes", "fixed bounds")),
    Arch("reduce", ReduceNet, _img()),
    Arch("channels_last", ChannelsLast, _img()),
    Arch("shuffle", ShuffleNet, _img(), pins=("channel shuffle", "reshapes channels", "hard-coded channel count")),
    Arch("sub_pixel", SubPixel, _img()),
    Arch("per_channel_tensors", PerChannelTensors, _img()),
    Arch("softmax", SoftmaxNet, _img(), pins=("mixes channels",)),
    Arch("attention", AttentionNet, _img(h=8, w=8), pins=("op not understood",)),
    Arch("dict_out", DictOut, _img()),
    Arch("namedtuple_out", NamedTupleOut, _img()),
    Arch("tuple_out", TupleOut, lambda n: (torch.randn(n, 3, 16, 16), torch.randn(n, 2, 16, 16))),
    Arch("functional", FunctionalNet, _img()),
    Arch("methods", MethodsNet, _img()),
    Arch("shared", SharedNet, _img()),
    Arch("train_aux", TrainAuxNet, _img()),
    Arch("user_leaf", WithUntraceable, _img(), leaf_modules=("gate",)),
    Arch("subclassed_layers", SubclassedLayers, _img()),
    Arch("shape_checks", ShapeChecks, _img()),
    Arch("size_loops", SizeLoops, _img()),
    Arch("default_args", DefaultArgs, _img()),
    Arch("dict_in_out", DictInOut, lambda n: ({"rgb": torch.randn(n, 3, 16, 16), "depth": torch.randn(n, 1, 16, 16)},)),
    Arch("data_branch_top", DataBranchTop, _img()),
    Arch("data_branch_module", WithUntraceable, _img(), pins=("could not be traced",)),
    Arch("channel_count_branch", ChannelCountBranch, _img(), pins=("decides a branch",)),
    Arch("zoo_unet_transpose", _zoo_unet("transpose"), _img()),
    Arch("zoo_unet_bilinear", _zoo_unet("bilinear"), _img()),
    Arch("zoo_resnet_small", lambda: resnet_small(width=4), _img(h=16, w=16)),
    Arch("zoo_small_cnn", lambda: small_cnn(in_channels=1, width=4), lambda n: (torch.randn(n, 1, 28, 28),)),
]}


def build(name: str, seed: int = 0) -> tuple[nn.Module, Arch]:
    """The named model with seeded random weights and norm statistics, in eval mode."""
    arch = ARCHS[name]
    torch.manual_seed(seed)
    model = arch.build()
    randomize_norms(model, seed)
    return model.eval(), arch


def example(arch: Arch, batch: int = 1, seed: int = 1) -> tuple:
    torch.manual_seed(seed)
    return tuple(arch.inputs(batch))
