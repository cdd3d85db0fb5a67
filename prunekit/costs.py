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
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import fx, nn

from .graphs import ChannelGraph, build_graph
from .graphs.graph import as_inputs
from .graphs.trace import training_mode
from .graphs.walk import materialize, reaching_output
from .ops import spec_for
from .ops.flops import Kept

CONVENTION = "1 fused multiply-add = 1 flop (fvcore's convention); multiply by 2 to count multiplies and adds"


@dataclass(frozen=True)
class LayerCost:
    name: str
    type: str
    output_shape: tuple
    params: int
    flops: int


class CostModel:
    """Analytic FLOPs and parameters of a model and of any removal from it."""

    def __init__(self, model: nn.Module, graph: ChannelGraph):
        self.graph = graph
        self.tensor_shapes = graph.tensor_shapes
        self._sliced: dict[str, dict[int, np.ndarray]] = defaultdict(dict)  # tensor -> {dim: units}
        for (name, dim), units in graph.slices.items():
            self._sliced[name][dim] = units
        self._unit_cache: dict[int, np.ndarray] = {}
        self._terms: list[tuple[str, fx.Node, Callable]] = []  # (owning module, node, flop count)
        self._constant: dict[str, int] = defaultdict(int)
        live = reaching_output(graph.fx_graph)
        for node in graph.fx_graph.nodes:
            if node in live:  # a value nothing reads is not counted, as fvcore's traced graph drops it
                self._compile(model, node)
        self._params = []  # (owner, shape, {dim: units})
        for name, p in model.named_parameters():
            self._params.append((name.rpartition(".")[0], tuple(p.shape), self._sliced.get(name, {})))
        self._compile_params()
        self.module_types = {name: type(m).__name__ for name, m in model.named_modules()}
        self._counts: dict[int, int] = {}  # kept counts of the removal being priced, by unit array

    def kept_count(self, removed: np.ndarray, units: np.ndarray) -> int:
        """How many of ``units`` survive ``removed``; one pricing reads the same unit arrays many times
        (a conv's output is read by its norm, activation and consumers), so counts are kept until the next."""
        count = self._counts.get(id(units))
        if count is None:
            count = self._counts[id(units)] = len(units) - int(np.count_nonzero(removed[units]))
        return count

    # -- compile ---------------------------------------------------------

    def weight_shape(self, tensor: str, value: torch.Tensor | None = None) -> Callable[[np.ndarray], tuple]:
        """A function from a removal to ``tensor``'s kept shape (the flops handles' view of the model)."""
        # a weight recomputed by a hook (weight_norm, spectral_norm) is no parameter: read its value's shape
        shape = self.tensor_shapes[tensor] if value is None else tuple(value.shape)
        dims = self._sliced.get(tensor, {})

        def kept_shape(removed: np.ndarray) -> tuple:
            return tuple(self.kept_count(removed, dims[d]) if d in dims else s for d, s in enumerate(shape))

        return kept_shape

    def _owner(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        return next(reversed(stack.values()))[0] if stack else ""

    def _compile(self, model: nn.Module, node: fx.Node) -> None:
        if node.op not in ("call_module", "call_function", "call_method"):
            return
        module = model.get_submodule(node.target) if node.op == "call_module" else None
        spec = spec_for(node, module)
        flops = spec.flops(self, node, module) if spec.flops is not None else None
        if flops is None and "prunekit_call" in node.meta:
            # an op the table does not price (an opaque leaf, a user function): fvcore counts it once
            call = module if node.op == "call_module" else node.target
            self._constant[self._owner(node)] += _fvcore_total(call, *materialize(node.meta["prunekit_call"]))
        elif flops is not None:
            self._terms.append((self._owner(node), node, flops))

    def _compile_params(self) -> None:
        """The parameter count as arrays: a tensor's size is its fixed dims' product times the kept counts
        of its sliced dims, so pricing a removal is a few numpy operations, not a loop over tensors."""
        arrays: dict[bytes, int] = {}  # a unit array's contents -> its row (a conv, its bias and norm share one)
        units, fixed, factors = [], [], []
        for _, shape, dims in self._params:
            fixed.append(math.prod(s for d, s in enumerate(shape) if d not in dims))
            rows = []
            for d in sorted(dims):
                key = np.asarray(dims[d], dtype=np.int64).tobytes()
                if key not in arrays:
                    arrays[key] = len(units)
                    units.append(dims[d])
                rows.append(arrays[key])
            factors.append(rows)
        width = max(map(len, factors), default=0)
        self._param_fixed = np.array(fixed, dtype=np.int64)
        padded = [f + [-1] * (width - len(f)) for f in factors]  # -1: the constant 1 appended to the kept counts
        self._param_factors = np.array(padded, dtype=np.int64).reshape(len(factors), width)
        self._param_units = np.concatenate(units) if units else np.zeros(0, dtype=np.int64)
        self._param_sizes = np.array([len(u) for u in units], dtype=np.int64)
        self._param_owner = np.repeat(np.arange(len(units)), self._param_sizes)

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
            shape[chan.dim] = self.kept_count(removed, units)
            return tuple(shape)

        return kept

    def _mask(self, removed) -> np.ndarray:
        """The removal as a boolean mask; a new pricing starts (the kept counts of the last are dropped)."""
        self._counts = {}
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
            out[owner] += math.prod(self.kept_count(removed, dims[d]) if d in dims else s
                                    for d, s in enumerate(shape))
        return dict(out)

    def flops(self, removed=None) -> int:
        return sum(self.flops_by_layer(removed).values())

    def params(self, removed=None) -> int:
        removed = self._mask(removed)
        lost = np.bincount(self._param_owner, weights=removed[self._param_units], minlength=len(self._param_sizes))
        kept = np.append(self._param_sizes - lost.astype(np.int64), 1)  # index -1: a dim that is not sliced
        return int((self._param_fixed * kept[self._param_factors].prod(axis=1)).sum())

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
