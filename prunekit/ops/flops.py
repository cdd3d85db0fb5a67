"""FLOPs handles, fvcore's convention: one fused multiply-add counts as one flop.

Each handle is compiled once per node from the cost context (which knows the
kept shape of every tensor for a removal) and returns ``flops(kept, node,
removed)``. Only what fvcore's FlopCountAnalysis counts is counted:
convolutions, linear and matrix products, normalisation layers, nearest and
bilinear upsampling, adaptive average pooling and grid sampling.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from torch import fx, nn

Kept = Callable[[object], tuple]  # fx argument -> its shape with kept channel counts
FlopFn = Callable[[Kept, fx.Node, np.ndarray], int]


def _conv(transposed: bool, weight: Callable[[np.ndarray], tuple]) -> FlopFn:
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        x, out = kept(node.args[0]), kept(node)
        spatial = (x if transposed else out)[2:]
        return x[0] * math.prod(weight(removed)) * math.prod(spatial)

    return flops


def _linear(weight: Callable[[np.ndarray], tuple]) -> FlopFn:
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        return math.prod(kept(node.args[0])) * weight(removed)[0]

    return flops


def matmul(ctx, node: fx.Node, module) -> FlopFn:
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        a, b = kept(node.args[0]), kept(node.args[1])
        if len(a) < 1 or len(b) < 2:
            return 0
        return math.prod(a) * b[-1]

    return flops


def bmm(ctx, node: fx.Node, module) -> FlopFn:
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        (n, c, t), d = kept(node.args[0]), kept(node.args[1])[-1]
        return n * c * t * d

    return flops


def addmm(ctx, node: fx.Node, module) -> FlopFn:
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        (batch, inner), out = kept(node.args[1]), kept(node.args[2])[-1]
        return batch * inner * out

    return flops


def einsum(ctx, node: fx.Node, module) -> FlopFn:
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        equation = node.args[0]
        operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        shapes = [kept(o) for o in operands]
        letters = equation.replace(" ", "")
        if letters in ("abc,abd->acd", "abc,adc->adb"):  # fvcore's own two special cases
            (n, c, t), p = shapes[0], shapes[-1][-1 if letters == "abc,abd->acd" else 1]
            return n * c * t * p
        path = np.einsum_path(equation, *[np.zeros(s) for s in shapes], optimize="optimal")[1]
        for line in path.split("\n"):
            if "optimized flop" in line.lower():
                return int(np.floor(float(line.split(":")[-1]) / 2))
        return 0

    return flops


def _scaled_input(scale: int) -> FlopFn:
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        return math.prod(kept(node.args[0])) * scale

    return flops


def _has(node: fx.Node, index: int, keyword: str) -> bool:
    value = node.args[index] if index < len(node.args) else node.kwargs.get(keyword)
    return value is not None


def upsample(mode: str | None = None):
    def compile(ctx, node: fx.Node, module) -> FlopFn:
        chosen = getattr(module, "mode", None) or mode

        def flops(kept: Kept, node: fx.Node, removed) -> int:
            out = kept(node)
            m = chosen or node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
            if len(out) != 4:
                return 0
            if m == "area":  # runs adaptive_avg_pool2d, which fvcore counts by its input
                return math.prod(kept(node.args[0]))
            return math.prod(out) * {"nearest": 1, "bilinear": 4}.get(m, 0)

        return flops

    return compile


def adaptive_avg_pool2d(ctx, node: fx.Node, module) -> FlopFn:
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        x = kept(node.args[0])
        return math.prod(x) if len(x) == 4 else 0

    return flops


def grid_sample(ctx, node: fx.Node, module) -> FlopFn:
    return lambda kept, node, removed: math.prod(kept(node)) * 4  # fvcore: 4 per output element


# -- layers with weights --------------------------------------------------------


def conv_module(ctx, node: fx.Node, m: nn.Module) -> FlopFn:
    return _conv(m.transposed, ctx.weight_shape(f"{node.target}.weight", m.weight))


def linear_module(ctx, node: fx.Node, m: nn.Module) -> FlopFn:
    return _linear(ctx.weight_shape(f"{node.target}.weight", m.weight))


def _weighted_function(make: Callable[[Callable], FlopFn]):
    """F.conv2d / F.linear: the weight's kept shape, read from the model's tensor or, for a weight
    computed in the forward (weight standardisation), from that value's traced shape."""

    def compile(ctx, node: fx.Node, module) -> FlopFn | None:
        w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        if not isinstance(w, fx.Node):
            return None
        if w.op == "get_attr" and str(w.target) in ctx.tensor_shapes:
            return make(ctx.weight_shape(str(w.target)))
        return lambda kept, node, removed: make(lambda _removed: kept(w))(kept, node, removed)

    return compile


def conv_function(transposed: bool):
    return _weighted_function(lambda shape: _conv(transposed, shape))


linear_function = _weighted_function(_linear)


def batchnorm_module(ctx, node: fx.Node, m: nn.Module) -> FlopFn:
    # without running statistics it normalises with the batch's, even in eval
    if m.running_mean is None:
        return _scaled_input(5 if m.affine else 4)
    return _scaled_input(2 if m.affine else 1)


def affine_norm_module(attribute: str):
    """GroupNorm, InstanceNorm (``affine``), LayerNorm (``elementwise_affine``)."""
    return lambda ctx, node, m: _scaled_input(5 if getattr(m, attribute) else 4)


def batch_norm_function(ctx, node: fx.Node, module) -> FlopFn:
    training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
    if training is True:  # batch statistics: priced like the other norms
        return _scaled_input(5 if _has(node, 3, "weight") else 4)
    return _scaled_input(2 if _has(node, 3, "weight") else 1)


def affine_norm_function(weight_index: int):
    """F.group_norm, F.layer_norm, F.instance_norm: with or without their weight argument."""
    return lambda ctx, node, m: _scaled_input(5 if _has(node, weight_index, "weight") else 4)
