"""Seeded random architectures: small DAGs of the ops the channel rules understand.

``random_dag(seed)`` returns ``(model, example_input, ops)``: an ``nn.Module``
whose forward walks a list of op specs (torch.fx unrolls the walk), its
example input, and the op kinds it used. Every op keeps a zeroed channel at
exact zero (ReLU, GELU, pooling, upsampling, BatchNorm with zeroed
parameters, products...), so removing zeroed units must leave the outputs
unchanged. Ops that would not (sigmoid, ``+ 1``) appear only as gates
multiplied with a coupled channel.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from helpers import randomize_norms

__all__ = ["KINDS", "RandomDAG", "random_dag"]

KINDS = (
    "conv", "dw", "dw_mult", "grouped", "conv_t", "bn", "gn", "inorm", "act", "prelu", "pool", "up",
    "add", "sub", "mul", "gate", "se", "scale", "cat", "chunk", "split", "spatial_mean", "interp",
    "mlp_last", "stack", "se_fc",
)
WEIGHTS = (8, 2, 1, 2, 2, 4, 1, 1, 4, 1, 2, 1, 3, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1)


@dataclass
class Step:
    kind: str
    inputs: tuple[int, ...]
    arg: object = None


_ACTS = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "hardswish": F.hardswish,
    "leaky": lambda t: F.leaky_relu(t, 0.1), "elu": F.elu, "relu6": F.relu6, "mish": F.mish,
}


class RandomDAG(nn.Module):
    """Runs ``steps`` in order; step i's value is ``values[i + 1]`` (``values[0]`` is the input)."""

    def __init__(self, steps: list[Step], modules: dict[str, nn.Module], heads: list[tuple[str, int, str]],
                 out_form: str):
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleDict(modules)
        self.heads = heads  # (kind, node, module key)
        self.out_form = out_form

    def forward(self, x):
        values = [x]
        for i, step in enumerate(self.steps):
            key = f"s{i}"
            a = values[step.inputs[0]]
            k = step.kind
            if k in ("conv", "dw", "dw_mult", "grouped", "conv_t", "bn", "gn", "inorm", "prelu", "pool", "up"):
                y = self.layers[key](a)
            elif k == "act":
                y = _ACTS[step.arg](a)
            elif k == "add":
                y = a + values[step.inputs[1]]
            elif k == "sub":
                y = a - values[step.inputs[1]]
            elif k == "mul":
                y = a * values[step.inputs[1]]
            elif k == "gate":
                y = a * torch.sigmoid(values[step.inputs[1]])
            elif k == "se":
                s = a.mean((2, 3), keepdim=True)
                y = a * torch.sigmoid(self.layers[key](s))
            elif k == "scale":
                y = a * step.arg if step.arg > 0 else a / -step.arg
            elif k == "cat":
                y = torch.cat([values[j] for j in step.inputs], dim=1)
            elif k == "chunk":
                p, q = a.chunk(2, dim=1)
                y = {"first": p, "second": q, "sum": p + q, "prod": p * q}[step.arg]
            elif k == "split":  # fixed sizes: pins
                y = torch.split(a, [1, a.shape[1] - 1], dim=1)[1]
            elif k == "spatial_mean":
                y = a - a.mean(3, keepdim=True) if step.arg else a * a.amax((2, 3), keepdim=True)
            elif k == "interp":
                y = F.interpolate(a, scale_factor=2, mode=step.arg)
            elif k == "mlp_last":  # channels-last MLP: permute, Linear over channels, permute back
                y = self.layers[key](a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            elif k == "stack":
                y = torch.stack([a, values[step.inputs[1]]], dim=step.arg).amax(step.arg)
            elif k == "se_fc":  # squeeze-excite with Linear layers and None-indexing back to a map
                s = self.layers[key](a.mean((2, 3)))
                y = a * torch.sigmoid(s)[:, :, None, None]
            else:
                raise ValueError(k)
            values.append(y)
        outs = []
        for kind, node, key in self.heads:
            v = values[node]
            if kind == "seg":
                outs.append(self.layers[key](v))
            elif kind == "mean_fc":
                outs.append(self.layers[key](v.mean((2, 3))))
            elif kind == "pool_fc":
                outs.append(self.layers[key](torch.flatten(F.adaptive_avg_pool2d(v, 2), 1)))
            elif kind == "view_fc":
                p = F.adaptive_max_pool2d(v, 1)
                outs.append(self.layers[key](p.view(p.size(0), -1)))
            else:
                outs.append(v)
        if self.out_form == "tensor":
            return outs[0]
        if self.out_form == "dict":
            return {f"out{i}": o for i, o in enumerate(outs)}
        return tuple(outs)


def _divisors(c: int) -> list[int]:
    return [g for g in range(2, c) if c % g == 0]


def random_dag(seed: int, max_steps: int = 12):
    """A random model (eval mode, seeded weights and norm statistics), its example input, the op kinds used."""
    rng = random.Random(seed)
    torch.manual_seed(seed)  # layer initialisation
    size = rng.choice([8, 8, 16])
    shapes: list[tuple[int, int]] = [(3, size)]  # (channels, side) of every value
    steps: list[Step] = []
    modules: dict[str, nn.Module] = {}
    used: list[str] = []

    def pick(pred=lambda shape: True, exclude=()) -> int | None:
        # prefer recent values, so the graph is deep as well as wide
        candidates = [j for j, shape in enumerate(shapes) if pred(shape) and j not in exclude]
        if not candidates:
            return None
        return candidates[-1] if rng.random() < 0.5 else rng.choice(candidates)

    def add(kind, inputs, shape, module=None, arg=None):
        if module is not None:
            modules[f"s{len(steps)}"] = module
        steps.append(Step(kind, tuple(inputs), arg))
        shapes.append(shape)
        used.append(kind)
        return len(shapes) - 1

    def conv_from(i, cout, k=None):
        c, s = shapes[i]
        k = k or rng.choice([1, 3])
        return add("conv", [i], (cout, s), nn.Conv2d(c, cout, k, padding=k // 2, bias=rng.random() < 0.5))

    n_steps = rng.randint(3, max_steps)
    for _ in range(n_steps):
        kind = rng.choices(KINDS, WEIGHTS)[0]
        i = pick()
        c, s = shapes[i]
        if kind == "conv" or (i == 0 and kind not in ("conv", "conv_t")):
            cout = rng.choice([2, 3, 4, 6, 8])
            stride = 2 if s >= 8 and rng.random() < 0.25 else 1
            k = rng.choice([1, 3])
            add("conv", [i], (cout, s // stride),
                nn.Conv2d(c, cout, k, stride=stride, padding=k // 2, bias=rng.random() < 0.5))
        elif kind == "dw":
            add(kind, [i], (c, s), nn.Conv2d(c, c, 3, padding=1, groups=c, bias=rng.random() < 0.5))
        elif kind == "dw_mult":
            add(kind, [i], (2 * c, s), nn.Conv2d(c, 2 * c, 3, padding=1, groups=c, bias=rng.random() < 0.5))
        elif kind == "grouped":
            groups = _divisors(c)
            if not groups:
                conv_from(i, rng.choice([4, 6, 8]))
                continue
            g = rng.choice(groups)
            cout = g * rng.choice([1, 2])
            add(kind, [i], (cout, s), nn.Conv2d(c, cout, 3, padding=1, groups=g, bias=rng.random() < 0.5))
        elif kind == "conv_t":
            cout = rng.choice([2, 4, 6])
            if s <= 8 and rng.random() < 0.6:
                add(kind, [i], (cout, 2 * s), nn.ConvTranspose2d(c, cout, 2, stride=2, bias=rng.random() < 0.5))
            else:
                groups = [g for g in _divisors(c) if cout % g == 0] or [1]
                g = rng.choice(groups)
                add(kind, [i], (cout, s), nn.ConvTranspose2d(c, cout, 3, padding=1, groups=g))
        elif kind == "bn":
            add(kind, [i], (c, s), nn.BatchNorm2d(c))
        elif kind == "gn":
            add(kind, [i], (c, s), nn.GroupNorm(rng.choice(_divisors(c) + [c, 1]), c))
        elif kind == "inorm":
            add(kind, [i], (c, s), nn.InstanceNorm2d(c, affine=rng.random() < 0.5))
        elif kind == "act":
            add(kind, [i], (c, s), arg=rng.choice(sorted(_ACTS)))
        elif kind == "prelu":
            add(kind, [i], (c, s), nn.PReLU(rng.choice([1, c])))
        elif kind == "pool":
            if s < 4:
                add("act", [i], (c, s), arg="relu")
                continue
            pool = rng.choice([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d(3, 2, 1)])
            add(kind, [i], (c, s // 2), pool)
        elif kind in ("up", "interp"):
            if s > 8:
                add("act", [i], (c, s), arg="gelu")
                continue
            mode = rng.choice(["nearest", "bilinear"])
            if kind == "up":
                add(kind, [i], (c, 2 * s), nn.Upsample(scale_factor=2, mode=mode))
            else:
                add(kind, [i], (c, 2 * s), arg=mode)
        elif kind in ("add", "sub", "mul", "gate"):
            j = pick(lambda t: t == (c, s), exclude=(i,))
            if j is None:
                src = pick(lambda t: t[1] == s)
                j = conv_from(src, c)  # a projection to the same shape: a residual
            add(kind, [i, j], (c, s))
        elif kind == "se":
            hidden = max(1, c // 2)
            add(kind, [i], (c, s), nn.Sequential(nn.Conv2d(c, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, c, 1)))
        elif kind == "scale":
            add(kind, [i], (c, s), arg=rng.choice([0.5, 2.0, -3.0, -0.25]))
        elif kind == "cat":
            partners = [j for j, t in enumerate(shapes) if t[1] == s and j != i and j != 0]
            chosen = [i] + rng.sample(partners, min(len(partners), rng.choice([1, 2])))
            if len(chosen) == 1:
                chosen.append(conv_from(i, rng.choice([2, 4])))
            add(kind, chosen, (sum(shapes[j][0] for j in chosen), s))
        elif kind == "chunk":
            if c % 2:
                i = conv_from(i, 2 * rng.choice([1, 2, 3, 4]))
                c = shapes[i][0]
            mode = rng.choice(["first", "second", "sum", "prod"])
            add(kind, [i], (c // 2, s), arg=mode)
        elif kind == "split":
            if c < 3:
                i = conv_from(i, 4)
                c = 4
            add(kind, [i], (c - 1, s))
        elif kind == "spatial_mean":
            add(kind, [i], (c, s), arg=rng.random() < 0.5)
        elif kind == "mlp_last":
            hidden, cout = rng.choice([4, 8]), rng.choice([c, 2, 4])
            add(kind, [i], (cout, s), nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, cout)))
        elif kind == "stack":
            j = pick(lambda t: t == (c, s), exclude=(i,))
            if j is None:
                j = conv_from(pick(lambda t: t[1] == s), c)
            add(kind, [i, j], (c, s), arg=rng.choice([0, 2, -1]))
        elif kind == "se_fc":
            hidden = max(1, c // 2)
            add(kind, [i], (c, s), nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, c)))

    # a last conv + activation, so that every model has a free producer, then the heads:
    # on that last value always (never a raw feature map), and sometimes on others
    final = conv_from(len(shapes) - 1, rng.choice([3, 4, 6]))
    add("act", [final], shapes[final], arg=rng.choice(sorted(_ACTS)))
    last = len(shapes) - 1
    nodes = [last] + rng.sample(range(1, final), min(final - 1, rng.choice([0, 0, 1, 2])))
    heads = []
    for n, node in enumerate(nodes):
        c, s = shapes[node]
        kind = rng.choice(["seg", "seg", "mean_fc", "pool_fc", "view_fc"] + (["raw"] if n else []))
        key = f"head{n}"
        if kind == "seg":
            modules[key] = nn.Conv2d(c, rng.choice([1, 2, 3]), 1)
        elif kind in ("mean_fc", "view_fc"):
            modules[key] = nn.Linear(c, rng.choice([2, 5]))
        elif kind == "pool_fc":
            modules[key] = nn.Linear(4 * c, rng.choice([2, 5]))
        heads.append((kind, node, key))
        used.append(f"head:{kind}")
    out_form = "tensor" if len(heads) == 1 else rng.choice(["tuple", "dict"])

    model = RandomDAG(steps, modules, heads, out_form)
    randomize_norms(model, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, size, size, generator=g)
    return model.eval(), x, used
