"""FLOPs and parameters, from kept channel counts alone.

Convention (fvcore's): **one fused multiply-add counts as one flop**, and only
the ops fvcore's FlopCountAnalysis counts are counted: convolutions, linear
and matrix products, normalisation layers, 2d nearest/bilinear upsampling,
2d adaptive average pooling and grid sampling. Element-wise ops, activations and max pooling
count zero. Multiply by two for the "multiplies and adds separately" count.

A :class:`CostModel` is compiled once from a channel graph; pricing a
removal is then a few numpy sums per layer, with no tracing and no forward
pass, which is what lets the planner price many candidates cheaply.
"""

from __future__ import annotations

import math
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .graphs import ChannelGraph, build_graph
from .graphs.graph import as_inputs
from .graphs.trace import training_mode
from .graphs.walk import materialize, reaching_output

CONVENTION = "1 fused multiply-add = 1 flop (fvcore's convention); multiply by 2 to count multiplies and adds"


@dataclass(frozen=True)
class LayerCost:
    name: str
    type: str
    output_shape: tuple
    params: int
    flops: int


Kept = Callable[[object], tuple]  # fx argument -> its shape with kept channel counts


def _conv(transposed: bool, weight: Callable[[np.ndarray], tuple]):
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        x, out = kept(node.args[0]), kept(node)
        spatial = (x if transposed else out)[2:]
        return x[0] * math.prod(weight(removed)) * math.prod(spatial)

    return flops


def _linear(weight: Callable[[np.ndarray], tuple]):
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        return math.prod(kept(node.args[0])) * weight(removed)[0]

    return flops


def _matmul(kept: Kept, node: fx.Node, removed) -> int:
    a, b = kept(node.args[0]), kept(node.args[1])
    if len(a) < 1 or len(b) < 2:
        return 0
    return math.prod(a) * b[-1]


def _bmm(kept: Kept, node: fx.Node, removed) -> int:
    (n, c, t), d = kept(node.args[0]), kept(node.args[1])[-1]
    return n * c * t * d


def _addmm(kept: Kept, node: fx.Node, removed) -> int:
    (batch, inner), out = kept(node.args[1]), kept(node.args[2])[-1]
    return batch * inner * out


def _einsum(kept: Kept, node: fx.Node, removed) -> int:
    equation = node.args[0]
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    shapes = [kept(o) for o in operands]
    letters = equation.replace(" ", "")
    if letters in ("abc,abd->acd", "abc,adc->adb"):
        (n, c, t), p = shapes[0], shapes[-1][-1 if letters == "abc,abd->acd" else 1]
        return n * c * t * p
    path = np.einsum_path(equation, *[np.zeros(s) for s in shapes], optimize="optimal")[1]
    for line in path.split("\n"):
        if "optimized flop" in line.lower():
            return int(np.floor(float(line.split(":")[-1]) / 2))
    return 0


def _scaled_input(scale: float):
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        return int(math.prod(kept(node.args[0])) * scale)

    return flops


def _upsample(mode: str | None):
    def flops(kept: Kept, node: fx.Node, removed) -> int:
        out = kept(node)
        m = mode or node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
        if len(out) != 4:
            return 0
        if m == "area":  # runs adaptive_avg_pool2d, which fvcore counts by its input
            return math.prod(kept(node.args[0]))
        return math.prod(out) * {"nearest": 1, "bilinear": 4}.get(m, 0)

    return flops


def _adaptive_avg_pool2d(kept: Kept, node: fx.Node, removed) -> int:
    x = kept(node.args[0])
    return math.prod(x) if len(x) == 4 else 0


def _computed_weight(make: Callable, weight: fx.Node):
    """A conv or linear whose weight is computed in the forward: its weight's shape is read as traced."""

    def flops(kept: Kept, node: fx.Node, removed) -> int:
        return make(lambda _removed: kept(weight))(kept, node, removed)

    return flops


def _grid_sample(kept: Kept, node: fx.Node, removed) -> int:
    return math.prod(kept(node)) * 4  # fvcore: 4 per output element


def _has(node: fx.Node, index: int, keyword: str) -> bool:
    value = node.args[index] if index < len(node.args) else node.kwargs.get(keyword)
    return value is not None


class CostModel:
    """Analytic FLOPs and parameters of a model and of any removal from it."""

    def __init__(self, model: nn.Module, graph: ChannelGraph):
        self.graph = graph
        self._unit_cache: dict[int, np.ndarray] = {}
        self._terms: list[tuple[str, fx.Node, Callable]] = []  # (owning module, node, flop count)
        self._constant: dict[str, int] = defaultdict(int)
        live = reaching_output(graph.fx_graph)
        for node in graph.fx_graph.nodes:
            if node in live:  # a value nothing reads is not counted, as fvcore's traced graph drops it
                self._compile(model, node)
        self._params = []  # (owner, shape, {dim: units})
        sliced: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        for (name, dim), units in graph.slices.items():
            sliced[name][dim] = units
        for name, p in model.named_parameters():
            self._params.append((name.rpartition(".")[0], tuple(p.shape), sliced.get(name, {})))
        self.module_types = {name: type(m).__name__ for name, m in model.named_modules()}

    # -- compile ---------------------------------------------------------

    def _weight_shape(self, tensor: str, value: torch.Tensor | None = None) -> Callable[[np.ndarray], tuple]:
        # a weight recomputed by a hook (weight_norm, spectral_norm) is no parameter: read its value's shape
        shape = self.graph.tensor_shapes[tensor] if value is None else tuple(value.shape)
        dims = {dim: units for (name, dim), units in self.graph.slices.items() if name == tensor}

        def kept_shape(removed: np.ndarray) -> tuple:
            return tuple(int((~removed[dims[d]]).sum()) if d in dims else s for d, s in enumerate(shape))

        return kept_shape

    def _owner(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        return next(reversed(stack.values()))[0] if stack else ""

    def _compile(self, model: nn.Module, node: fx.Node) -> None:
        flops = None
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            name = str(node.target)
            if isinstance(m, nn.modules.conv._ConvNd):
                flops = _conv(m.transposed, self._weight_shape(f"{name}.weight", m.weight))
            elif isinstance(m, nn.Linear):
                flops = _linear(self._weight_shape(f"{name}.weight", m.weight))
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
                # without running statistics it normalises with the batch's, even in eval
                flops = _scaled_input((5 if m.affine else 4) if m.running_mean is None else (2 if m.affine else 1))
            elif isinstance(m, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
                flops = _scaled_input(5 if m.affine else 4)
            elif isinstance(m, nn.LayerNorm):
                flops = _scaled_input(5 if m.elementwise_affine else 4)
            elif isinstance(m, nn.Upsample):
                flops = _upsample(m.mode)
            elif isinstance(m, nn.AdaptiveAvgPool2d):
                flops = _adaptive_avg_pool2d
        elif node.op == "call_function":
            flops = self._function_flops(node)
        if flops is None and "prunekit_call" in node.meta:
            call = m if node.op == "call_module" else node.target
            self._constant[self._owner(node)] += _fvcore_total(call, *materialize(node.meta["prunekit_call"]))
            return
        elif node.op == "call_method" and node.target in ("matmul", "mm"):
            flops = _matmul
        elif node.op == "call_method" and node.target == "bmm":
            flops = _bmm
        if flops is not None:
            self._terms.append((self._owner(node), node, flops))

    def _function_flops(self, node: fx.Node):
        t = node.target
        if t in (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
            w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            transposed = t in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
            if isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target) in self.graph.tensor_shapes:
                return _conv(transposed, self._weight_shape(str(w.target)))
            if isinstance(w, fx.Node):  # computed in the forward (weight standardisation...) or a constant
                return _computed_weight(lambda shape: _conv(transposed, shape), w)
        if t is F.linear:
            w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            if isinstance(w, fx.Node) and w.op == "get_attr" and str(w.target) in self.graph.tensor_shapes:
                return _linear(self._weight_shape(str(w.target)))
            if isinstance(w, fx.Node):
                return _computed_weight(_linear, w)
        if t in (torch.matmul, operator.matmul, torch.mm):
            return _matmul
        if t is torch.bmm:
            return _bmm
        if t is torch.addmm:
            return _addmm
        if t is torch.einsum:
            return _einsum
        if t is F.batch_norm:
            training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
            if training is True:  # batch statistics: priced like the other norms
                return _scaled_input(5 if _has(node, 3, "weight") else 4)
            return _scaled_input(2 if _has(node, 3, "weight") else 1)
        if t is F.group_norm:
            return _scaled_input(5 if _has(node, 2, "weight") else 4)
        if t is F.layer_norm:
            return _scaled_input(5 if _has(node, 2, "weight") else 4)
        if t is F.instance_norm:
            return _scaled_input(5 if _has(node, 3, "weight") else 4)
        if t in (F.interpolate, F.upsample):
            return _upsample(None)
        if t is F.upsample_nearest:
            return _upsample("nearest")
        if t is F.upsample_bilinear:
            return _upsample("bilinear")
        if t is F.adaptive_avg_pool2d:
            return _adaptive_avg_pool2d
        if t is F.grid_sample:
            return _grid_sample
        return None

    # -- evaluate --------------------------------------------------------

    def _kept_fn(self, removed: np.ndarray) -> Kept:
        graph = self.graph

        def kept(arg) -> tuple:
            if not isinstance(arg, fx.Node):
                return ()
            shape = arg.meta.get("prunekit_shape")
            chan = arg.meta.get("prunekit_chan")
            if shape is None or not shape or not isinstance(shape[0], int):
                return tuple(shape or ())
            if chan is None or not hasattr(chan, "dim"):
                return shape
            units = self._unit_cache.get(id(chan))
            if units is None:
                units = self._unit_cache[id(chan)] = graph.unit_of_atom[np.asarray(chan.atoms, dtype=np.int64)]
            shape = list(shape)
            shape[chan.dim] = int((~removed[units]).sum())
            return tuple(shape)

        return kept

    def _mask(self, removed) -> np.ndarray:
        if removed is None:
            return np.zeros(self.graph.num_units, dtype=bool)
        return np.asarray(removed, dtype=bool)

    def flops_by_layer(self, removed=None) -> dict[str, int]:
        removed = self._mask(removed)
        kept = self._kept_fn(removed)
        out: dict[str, int] = defaultdict(int, self._constant)
        for owner, node, fn in self._terms:
            out[owner] += int(fn(kept, node, removed))
        return dict(out)

    def params_by_layer(self, removed=None) -> dict[str, int]:
        removed = self._mask(removed)
        out: dict[str, int] = defaultdict(int)
        for owner, shape, dims in self._params:
            out[owner] += math.prod(int((~removed[dims[d]]).sum()) if d in dims else s
                                    for d, s in enumerate(shape))
        return dict(out)

    def flops(self, removed=None) -> int:
        return sum(self.flops_by_layer(removed).values())

    def params(self, removed=None) -> int:
        return sum(self.params_by_layer(removed).values())

    def layers(self, removed=None) -> list[LayerCost]:
        """One row per leaf module (and per module owning functional ops), in graph order."""
        removed = self._mask(removed)
        flops, params = self.flops_by_layer(removed), self.params_by_layer(removed)
        kept = self._kept_fn(removed)
        rows, seen = [], set()
        for node in self.graph.fx_graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            owner = self._owner(node)
            if owner in seen or (node.op != "call_module" and not flops.get(owner)):
                continue  # functional ops that cost nothing get no row
            seen.add(owner)
            rows.append(LayerCost(owner or "(top level)", self.module_types.get(owner, "function"),
                                  kept(node), params.get(owner, 0), flops.get(owner, 0)))
        for owner in sorted(set(params) - seen):  # parameters never called in eval (aux heads)
            rows.append(LayerCost(owner, self.module_types.get(owner, ""), (), params[owner], 0))
        return rows


class _Call(nn.Module):
    """Lets fvcore trace one call with keyword arguments."""

    def __init__(self, fn, kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, *args):
        return self.fn(*args, **self.kwargs)


def _fvcore_total(fn, args: tuple, kwargs: dict) -> int:
    """FLOPs fvcore counts for one opaque call (grad enabled, as a plain fvcore call runs)."""
    with torch.enable_grad():
        return int(fvcore_analysis(_Call(fn, kwargs), args).total())


def fvcore_analysis(model: nn.Module, example_inputs):
    """fvcore's FlopCountAnalysis with its warnings silenced; used by reports and tests."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, as_inputs(example_inputs))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def count_flops_params(model: nn.Module, example_inputs, graph: ChannelGraph | None = None) -> dict[str, int]:
    """{"flops": fused multiply-adds (fvcore's convention), "params": parameter count}."""
    costs = CostModel(model, graph or build_graph(model, example_inputs))
    return {"flops": costs.flops(), "params": costs.params()}


def fvcore_counts(model: nn.Module, example_inputs) -> tuple[int, Counter]:
    """fvcore's total FLOPs and the ops it skipped (name -> count), in eval mode."""
    with training_mode(model, False):
        analysis = fvcore_analysis(model, example_inputs)
        return int(analysis.total()), Counter(analysis.unsupported_ops())
