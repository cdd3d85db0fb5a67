"""FLOPs and parameters, from kept channel counts alone.

Convention (fvcore's): **one fused multiply-add counts as one flop**, and only
the ops fvcore's FlopCountAnalysis counts are counted: convolutions, linear
and matrix products, normalisation layers, 2d nearest/bilinear upsampling,
2d adaptive average pooling and grid sampling. Element-wise ops, activations and max pooling
count zero. Multiply by two for the "multiplies and adds separately" count.

A :class:`CostModel` is compiled once from a channel graph: the totals become
sums of products of kept channel counts (each FLOPs handle run once on
symbolic counts), so pricing a removal is one numpy pass, with no tracing and
no forward pass, which is what lets the planner price many candidates cheaply.
Per-layer tables (``flops_by_layer``, ``layers``) run the handles themselves.
The pruned model's costs need no compiling either: :meth:`CostModel.derived`
prices its graph (derived from the cut one, see ``graphs/update.py``) as the
first graph with the cut units counted as removed.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import fx, nn

from .errors import PrunekitWarning
from .graphs import ChannelGraph, build_graph
from .graphs.graph import as_inputs, check_graph_matches
from .graphs.trace import training_mode
from .graphs.walk import materialize, reaching_output
from .ops import spec_for
from .ops.flops import Kept
from .safety import first_line

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
        self.graph = graph  # the graph compiled: removals are priced as removals from it
        self.num_units = graph.num_units  # of the graph priced (a derived model's is smaller)
        self._origin: np.ndarray | None = None  # a derived model's units, as units of the compiled graph
        self._base: np.ndarray | None = None  # ... and the compiled graph's units its cuts removed
        self.tensor_shapes = graph.tensor_shapes
        self._sliced: dict[str, dict[int, np.ndarray]] = defaultdict(dict)  # tensor -> {dim: units}
        for (name, dim), units in graph.slices.items():
            self._sliced[name][dim] = units
        self._unit_cache: dict[int, np.ndarray] = {}
        self._counts_table = _KeptCounts()
        self._terms: list[tuple[str, fx.Node, Callable]] = []  # (owning module, node, flop count)
        self._constant: dict[str, int] = defaultdict(int)
        live = reaching_output(graph.fx_graph)
        modules = dict(model.named_modules(remove_duplicate=False))  # a shared module under every name
        for node in graph.fx_graph.nodes:
            if node in live:  # a value nothing reads is not counted, as fvcore's traced graph drops it
                self._compile(modules, node)
        self._params = []  # (owner, shape, {dim: units})
        for name, p in model.named_parameters():
            self._params.append((name.rpartition(".")[0], tuple(p.shape), self._sliced.get(name, {})))
        self._compile_sums()
        self.module_types = {name: type(m).__name__ for name, m in modules.items()}
        self._counts: dict[int, int] = {}  # kept counts of the removal being priced, by unit array; shared
        # with derived models

    def derived(self, graph: ChannelGraph) -> CostModel:
        """The costs of the model cut from this one, whose ``graph`` was derived from this one's
        (``graph.parent_units``): the same compiled sums, with the cut units priced as removed."""
        if graph.parent_units is None:
            raise ValueError("derived costs need a derived graph (graphs.update.derive); this one was traced")
        view = copy.copy(self)
        view.num_units = graph.num_units
        view._origin = graph.parent_units if self._origin is None else self._origin[graph.parent_units]
        view._base = np.ones(self.graph.num_units, dtype=bool)
        view._base[view._origin] = False
        return view

    def kept_count(self, removed: np.ndarray, units: np.ndarray) -> int:
        """How many of ``units`` survive ``removed``; one pricing reads the same unit arrays many times
        (a conv's output is read by its norm, activation and consumers), so counts are kept until the next."""
        if removed is SYMBOLIC:  # compiling: the count itself, as a product with one factor
            return _Product(1, (self._counts_table.row(units),))
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

    def _compile(self, modules: dict[str, nn.Module], node: fx.Node) -> None:
        if node.op not in ("call_module", "call_function", "call_method"):
            return
        module = modules[node.target] if node.op == "call_module" else None
        spec = spec_for(node, module)
        flops = spec.flops(self, node, module) if spec.flops is not None else None
        if flops is None and "prunekit_call" in node.meta:
            # an op the table does not price (an opaque leaf, a user function): fvcore counts it once
            call = module if node.op == "call_module" else node.target
            name = str(node.target) if module is not None else getattr(call, "__qualname__", str(call))
            self._constant[self._owner(node)] += _fvcore_total(call, *materialize(node.meta["prunekit_call"]), name)
        elif flops is not None:
            self._terms.append((self._owner(node), node, flops))

    def _compile_sums(self) -> None:
        """FLOPs and parameters as sums of products of kept counts, so that pricing a removal is a few
        numpy operations. A parameter's size is such a product; so is almost every FLOPs handle's count,
        found by running the handle on symbolic counts; a handle that does more (divides, compares,
        rounds) stays a Python call."""
        self._param_sum = _Sum([_Product(math.prod(s for d, s in enumerate(shape) if d not in dims),
                                         tuple(self._counts_table.row(dims[d]) for d in sorted(dims)))
                                for _, shape, dims in self._params])
        kept = self._kept_fn(SYMBOLIC)
        products = [_Product(sum(self._constant.values()), ())]  # opaque calls: counted once, never cut
        self._flop_calls = []
        for owner, node, fn in self._terms:
            try:
                count = fn(kept, node, SYMBOLIC)
            except Exception:  # noqa: BLE001 - any handle that cannot run on symbols runs as Python
                count = None
            if isinstance(count, int) and not isinstance(count, bool):
                count = _Product(count, ())
            if isinstance(count, _Product):
                products.append(count)
            else:
                self._flop_calls.append((owner, node, fn))
        self._flop_sum = _Sum(products)
        self._counts_table.freeze()

    # -- evaluate --------------------------------------------------------

    def _kept_fn(self, removed: np.ndarray) -> Kept:
        graph = self.graph

        def kept(arg) -> tuple:
            if not isinstance(arg, fx.Node):
                return ()
            return kept_value(arg.meta.get("prunekit_shape"), arg.meta.get("prunekit_chan"))

        def kept_value(shape, chan) -> tuple:
            if shape is None or not shape:
                return tuple(shape or ())
            if not isinstance(shape[0], int):  # a tuple of values (a split's pieces): each its own
                chans = chan if isinstance(chan, (tuple, list)) and len(chan) == len(shape) else (None,) * len(shape)
                return tuple(kept_value(s, c) for s, c in zip(shape, chans))
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
        """The removal as a boolean mask over the compiled graph's units; a new pricing starts (the kept
        counts of the last are dropped)."""
        self._counts.clear()  # in place: the compiled handles read it through the model they were compiled on
        if self._origin is None:
            return np.zeros(self.num_units, dtype=bool) if removed is None else np.asarray(removed, dtype=bool)
        mask = self._base.copy()
        if removed is not None:
            mask[self._origin[np.asarray(removed, dtype=bool)]] = True
        return mask

    def flops_by_layer(self, removed=None) -> dict[str, int]:
        return self._flops_by_layer(self._mask(removed))

    def params_by_layer(self, removed=None) -> dict[str, int]:
        return self._params_by_layer(self._mask(removed))

    def _flops_by_layer(self, removed: np.ndarray) -> dict[str, int]:
        kept = self._kept_fn(removed)
        out: dict[str, int] = defaultdict(int, self._constant)
        for owner, node, fn in self._terms:
            out[owner] += int(fn(kept, node, removed))
        return dict(out)

    def _params_by_layer(self, removed: np.ndarray) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for owner, shape, dims in self._params:
            out[owner] += math.prod(self.kept_count(removed, dims[d]) if d in dims else s
                                    for d, s in enumerate(shape))
        return dict(out)

    def flops(self, removed=None) -> int:
        return self.totals(removed)[0]

    def params(self, removed=None) -> int:
        removed = self._mask(removed)
        return self._param_sum(self._counts_table.counts(removed))

    def totals(self, removed=None) -> tuple[int, int]:
        """``(flops(removed), params(removed))``, counting the kept channels once for both."""
        removed = self._mask(removed)
        counts = self._counts_table.counts(removed)
        kept = self._kept_fn(removed)
        called = sum(int(fn(kept, node, removed)) for _, node, fn in self._flop_calls)
        return self._flop_sum(counts) + called, self._param_sum(counts)

    def layers(self, removed=None) -> list[LayerCost]:
        """One row per leaf module (and per module owning functional ops), in graph order."""
        removed = self._mask(removed)
        flops, params = self._flops_by_layer(removed), self._params_by_layer(removed)
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


SYMBOLIC = object()  # the "removal" a FLOPs handle is compiled with: kept counts come back as _Products


class _Product:
    """``coef`` times the kept counts of some unit arrays (rows of a :class:`_KeptCounts`). Only
    multiplication by integers and other products is defined: anything else a handle does with a
    count (compare, divide, round, index) raises TypeError, and that handle stays a Python call."""

    __slots__ = ("coef", "rows")

    def __init__(self, coef: int, rows: tuple[int, ...]):
        self.coef, self.rows = coef, rows

    def __mul__(self, other):
        if isinstance(other, _Product):
            return _Product(self.coef * other.coef, self.rows + other.rows)
        if isinstance(other, int) and not isinstance(other, bool):
            return _Product(self.coef * other, self.rows)
        return NotImplemented

    __rmul__ = __mul__

    def _unknown(self, *args):
        raise TypeError("a kept count is not known until a removal is priced")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __int__ = __float__ = __index__ = _unknown
    __hash__ = None


class _KeptCounts:
    """Unit arrays, numbered once by their contents (a conv's weight, bias, norm and output share one),
    and the kept count of every one of them under a removal in a single numpy pass."""

    def __init__(self):
        self.rows: dict[bytes, int] = {}
        self.arrays: list[np.ndarray] = []
        self.seen: dict[int, tuple[np.ndarray, int]] = {}  # id -> (the array, kept alive, and its row)

    def row(self, units: np.ndarray) -> int:
        seen = self.seen.get(id(units))
        if seen is not None and seen[0] is units:
            return seen[1]
        key = np.asarray(units, dtype=np.int64).tobytes()
        if key not in self.rows:
            self.rows[key] = len(self.arrays)
            self.arrays.append(np.asarray(units, dtype=np.int64))
        self.seen[id(units)] = (units, self.rows[key])
        return self.rows[key]

    def freeze(self) -> None:
        self.units = np.concatenate(self.arrays) if self.arrays else np.zeros(0, dtype=np.int64)
        self.sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.ends = np.cumsum(self.sizes)

    def counts(self, removed: np.ndarray) -> np.ndarray:
        """Kept counts by row, and a last entry of 1 (the row -1 pads shorter products with)."""
        removed_so_far = np.concatenate(([0], np.cumsum(removed[self.units], dtype=np.int64)))
        lost = removed_so_far[self.ends] - removed_so_far[self.ends - self.sizes]
        return np.append(self.sizes - lost, 1)


class _Sum:
    """A sum of :class:`_Product` s, evaluated on the kept counts of one removal."""

    def __init__(self, products: list[_Product]):
        width = max((len(p.rows) for p in products), default=0)
        self.coef = np.array([p.coef for p in products], dtype=np.int64)
        self.rows = np.array([list(p.rows) + [-1] * (width - len(p.rows)) for p in products],
                             dtype=np.int64).reshape(len(products), width)

    def __call__(self, counts: np.ndarray) -> int:
        return int((self.coef * counts[self.rows].prod(axis=1)).sum())


class _Call(nn.Module):
    """Lets fvcore trace one call with keyword arguments; of what it returns, only the tensors (a Python
    number beside them, as torchvision's MViT returns, is not an output torch.jit.trace accepts)."""

    def __init__(self, fn, kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, *args):
        out = self.fn(*args, **self.kwargs)
        return out if isinstance(out, torch.Tensor) else \
            tuple(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _fvcore_total(fn, args: tuple, kwargs: dict, name: str) -> int:
    """FLOPs fvcore counts for one opaque call (grad enabled, as a plain fvcore call runs); 0, with a
    warning, for a call that torch.jit.trace cannot follow either (it checks a size with ``torch._check``)."""
    try:
        with torch.enable_grad():
            return int(fvcore_analysis(_Call(fn, kwargs), args).total())
    except Exception as exc:  # noqa: BLE001 - the model runs: count what can be counted, and say what not
        warnings.warn(f"the FLOPs of '{name}' are not counted (an opaque call that fvcore could not trace "
                      f"either: {type(exc).__name__}: {first_line(exc)}); its parameters are.", PrunekitWarning,
                      stacklevel=2)
        return 0


def fvcore_analysis(model: nn.Module, example_inputs):
    """fvcore's FlopCountAnalysis with its warnings silenced; used by reports and tests."""
    with warnings.catch_warnings():  # its import scripts a function, which recent torch deprecates
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, as_inputs(example_inputs))
    analysis.set_op_handle("aten::_convolution_mode", _conv_with_padding_mode)  # padding="same" / "valid"
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def _conv_with_padding_mode(inputs: list, outputs: list) -> Counter:
    """fvcore's count of a convolution whose padding is a string (never transposed), which it skips."""
    from fvcore.nn.jit_handles import conv_flop_count, get_shape

    return Counter({"conv": conv_flop_count(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0]))})


def count_flops_params(model: nn.Module, example_inputs, graph: ChannelGraph | None = None) -> dict[str, int]:
    """{"flops": fused multiply-adds (fvcore's convention), "params": parameter count}."""
    if graph is not None:
        check_graph_matches(graph, model, as_inputs(example_inputs))
    costs = CostModel(model, graph or build_graph(model, example_inputs))
    flops, params = costs.totals()
    return {"flops": flops, "params": params}


def fvcore_counts(model: nn.Module, example_inputs) -> tuple[int, Counter]:
    """fvcore's total FLOPs and the ops it skipped (name -> count), in eval mode."""
    with training_mode(model, False):
        analysis = fvcore_analysis(model, example_inputs)
        return int(analysis.total()), Counter(analysis.unsupported_ops())
