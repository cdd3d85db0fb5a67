"""Per-layer latency tables, measured on the device, and the latency a removal is predicted to leave.

In the spirit of NetAdapt's and HALP's lookup tables: each convolution and linear
layer of the original model is timed alone, on the configured device, at a grid of
kept widths (input x output channels, both aligned to 8 where the layer is wide
enough), once per distinct layer shape. A removal's latency is then the sum of
the interpolated table entries at the widths it keeps, plus the rest of the model
(element-wise ops, pooling, norms) scaled with the activations it keeps. The
prediction is calibrated on a real measurement of the current model at every
step, so only its *shape* (which channels cost time where) has to be right.

    tables = LatencyTables.measure(model, graph, example_inputs, Settings(threads=1))  # or .from_json(text, settings)
    model_now = LatencyModel(model, graph, tables, measured_ratio=1.0)
    model_now.ratio(mask)          # predicted latency after the removal, as a fraction of the original
    model_now.unit_seconds()       # seconds each unit's channels cost (to rank units by importance per second)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import torch
from torch import fx, nn

from .graphs import ChannelGraph
from .latency import compare_latency, measure_latency
from .surgery import apply_removal

TABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                nn.Linear)
FRACTIONS = (1.0, 0.75, 0.5, 0.25)
TABLE_SECONDS = 0.05  # per grid point: fewer repeats for slow layers (at least 3)
ALIGNMENTS = (32, 16, 8, 4, 2)  # candidates for round_to: auto, largest first
TABLES_FORMAT = 1


@dataclass(frozen=True)
class Settings:
    """Where and how tables and latencies are measured."""

    device: str = "cpu"
    threads: int | None = None
    repeats: int = 7
    warmup: int = 2
    budget: float | None = None  # seconds of timed runs after which a measurement may stop early

    def key(self) -> dict:
        return {"device": self.device, "threads": self.threads or torch.get_num_threads(),
                "torch": torch.__version__}


@dataclass
class Table:
    """Seconds of one layer at a grid of kept widths; ``joint``: input and output shrink together (grouped)."""

    cin: list[int]
    cout: list[int]
    seconds: list[list[float]]  # [input width][output width]; one row when joint
    joint: bool
    cout0: int
    cin0: int

    def at(self, cin: float, cout: float) -> float:
        """Interpolated seconds at kept widths (clamped to the grid)."""
        rows = np.asarray(self.seconds)
        if self.joint:
            return float(np.interp(cout, self.cout, rows[0]))
        along_out = [np.interp(cout, self.cout, row) for row in rows]
        return float(np.interp(cin, self.cin, along_out))


def _grid(width: int) -> list[int]:
    """Kept widths to time: fractions of ``width``, multiples of 8 where that leaves a width."""
    widths = {width}
    for f in FRACTIONS[1:]:
        w = width * f
        widths.add(max(1, int(round(w / 8)) * 8 if width >= 32 else int(round(w))))
    return sorted(w for w in widths if 1 <= w <= width)


def _base_class(module: nn.Module) -> type:
    return next(cls for cls in type(module).__mro__ if cls in TABLE_LAYERS)


def latency_calls(model: nn.Module, graph: ChannelGraph) -> Iterable[tuple[str, fx.Node, nn.Module]]:
    """(key, node, module) for every call of a table layer; a module called twice has two keys."""
    seen: dict[str, int] = {}
    for node in graph.fx_graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        if not isinstance(module, TABLE_LAYERS) or not isinstance(node.args[0], fx.Node):
            continue
        shape = node.args[0].meta.get("prunekit_shape")
        if not shape or not all(isinstance(d, int) for d in shape):
            continue
        index = seen[node.target] = seen.get(node.target, -1) + 1
        yield f"{node.target}#{index}", node, module


def _layer(module: nn.Module, cin: int, cout: int) -> nn.Module:
    """A fresh layer of ``module``'s kind with ``cin`` input and ``cout`` output channels."""
    cls = _base_class(module)
    if cls is nn.Linear:
        return nn.Linear(cin, cout, bias=module.bias is not None)
    groups = module.groups
    if groups > 1:
        groups = cin if groups == module.in_channels else groups  # depthwise follows its width
    return cls(cin, cout, module.kernel_size, module.stride, module.padding, dilation=module.dilation,
               groups=groups, bias=module.bias is not None)


def _joint_widths(module: nn.Module, f: float) -> tuple[int, int]:
    """Input and output widths of a grouped layer kept at fraction ``f`` (groups stay valid)."""
    g = module.groups
    if g == module.in_channels:  # depthwise: one channel per group, the multiplier stays
        cin = max(1, int(round(module.in_channels * f)))
        return cin, cin * (module.out_channels // module.in_channels)
    per_in = max(1, int(round(module.in_channels // g * f)))
    per_out = max(1, int(round(module.out_channels // g * f)))
    return per_in * g, per_out * g


def _signature(module: nn.Module, shape: tuple) -> str:
    fields = {k: getattr(module, k, None) for k in ("kernel_size", "stride", "padding", "dilation", "groups",
                                                   "in_channels", "out_channels", "in_features", "out_features")}
    return json.dumps([_base_class(module).__name__, list(shape), module.bias is not None,
                       {k: v for k, v in fields.items() if v is not None}], default=str)


def _time_layer(module: nn.Module, shape: tuple, cin: int, cout: int, settings: Settings) -> float:
    dim = -1 if isinstance(module, nn.Linear) else 1
    size = list(shape)
    size[dim] = cin
    layer = _layer(module, cin, cout)
    with torch.random.fork_rng(devices=[]):
        x = torch.randn(size)
    first = measure_latency(layer, x, settings.device, settings.threads, repeats=1, warmup=1).median
    repeats = max(3, min(settings.repeats, int(TABLE_SECONDS / max(first, 1e-6))))
    return measure_latency(layer, x, settings.device, settings.threads, repeats, warmup=0).median


def _measure_table(module: nn.Module, shape: tuple, settings: Settings) -> Table:
    dim = -1 if isinstance(module, nn.Linear) else 1
    cin0, cout0 = shape[dim], (module.out_features if isinstance(module, nn.Linear) else module.out_channels)
    if getattr(module, "groups", 1) > 1:
        widths = sorted({_joint_widths(module, f) for f in FRACTIONS})
        seconds = [_time_layer(module, shape, cin, cout, settings) for cin, cout in widths]
        return Table([w[0] for w in widths], [w[1] for w in widths], [seconds], True, cout0, cin0)
    cins, couts = _grid(cin0), _grid(cout0)
    seconds = [[_time_layer(module, shape, cin, cout, settings) for cout in couts] for cin in cins]
    return Table(cins, couts, seconds, False, cout0, cin0)


@dataclass
class LatencyTables:
    """Tables for every table-layer call of the original model, and the rest of its latency."""

    settings: dict  # device, threads, torch: where the tables hold
    layers: dict[str, str]  # call key -> signature
    tables: dict[str, Table]  # signature -> table
    outputs: dict[str, int]  # call key -> elements of its output in the original (scales the rest)
    rest: float  # seconds of the original model outside the tables
    fixed: float = 0.0  # the share of ``rest`` that does not shrink with the channels (per-op overhead)
    alignment: int | None = None  # what round_to: auto chose on this device (None: not asked)

    @classmethod
    def measure(cls, model: nn.Module, graph: ChannelGraph, example_inputs, settings: Settings,
                progress=None) -> "LatencyTables":
        """Time every distinct table layer at its grid, then the whole model (and a half-width probe).

        ``progress(done, total)`` is called after each layer call.
        """
        calls = list(latency_calls(model, graph))
        layers, tables, outputs = {}, {}, {}
        for i, (key, node, module) in enumerate(calls):
            shape = tuple(node.args[0].meta["prunekit_shape"])
            signature = layers[key] = _signature(module, shape)
            outputs[key] = int(np.prod(node.meta.get("prunekit_shape") or (0,)))
            if signature not in tables:
                tables[signature] = _measure_table(module, shape, settings)
            if progress is not None:
                progress(i + 1, len(calls))
        probe_model, probe_mask = _probe(model, graph)
        timed = {"model": model} if probe_model is None else {"model": model, "probe": probe_model}
        measured = compare_latency(timed, example_inputs, settings.device, settings.threads,
                                   max(settings.repeats, 15), settings.warmup)
        in_tables = sum(tables[s].at(tables[s].cin0, tables[s].cout0) for s in layers.values())
        result = cls(settings.key(), layers, tables, outputs, max(0.0, measured["model"].median - in_tables))
        if probe_model is not None and result.rest > 0:
            # how much of the rest stays when half the channels go: solve the probe's measurement for it
            probe = LatencyModel(model, graph, result)
            tables_part, outputs_part = probe.parts(probe_mask)
            shrink = outputs_part / probe._outputs0
            stays = (measured["probe"].median - tables_part - result.rest * shrink) / (result.rest * (1 - shrink))
            result.fixed = float(min(1.0, max(0.0, stays)))
        return result

    def as_json(self) -> str:
        return json.dumps({"format": TABLES_FORMAT, "settings": self.settings, "layers": self.layers,
                           "tables": {s: asdict(t) for s, t in self.tables.items()}, "outputs": self.outputs,
                           "rest": self.rest, "fixed": self.fixed,
                           "alignment": self.alignment}, indent=1)

    @classmethod
    def from_json(cls, text: str, settings: Settings) -> "LatencyTables | None":
        """Tables saved by :meth:`as_json`, or None when they were measured elsewhere (or are unreadable)."""
        try:
            raw = json.loads(text)
            if raw.get("format") != TABLES_FORMAT or raw.get("settings") != settings.key():
                return None
            tables = {s: Table(**t) for s, t in raw["tables"].items()}
            return cls(raw["settings"], dict(raw["layers"]), tables, dict(raw["outputs"]), float(raw["rest"]),
                       float(raw["fixed"]), raw.get("alignment"))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


class LatencyModel:
    """Predicted latency of removals from the current model, as a fraction of the original's.

    ``measured_ratio``: the current model's latency over the original's, measured; the
    prediction is scaled so that removing nothing predicts exactly that.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, tables: LatencyTables, measured_ratio: float = 1.0):
        self.graph, self.tables = graph, tables
        self._calls = []  # (table, output units, input units, current widths (in, out), output spatial size)
        for key, node, module in latency_calls(model, graph):
            if key in tables.layers:
                dim = -1 if isinstance(module, nn.Linear) else 1
                widths = (node.args[0].meta["prunekit_shape"][dim], node.meta["prunekit_shape"][dim])
                self._calls.append((tables.tables[tables.layers[key]], _units(graph, node),
                                    _units(graph, node.args[0]), widths, _spatial(node)))
        self._outputs0 = max(1, sum(tables.outputs.values()))
        self._original = sum(tables.tables[s].at(tables.tables[s].cin0, tables.tables[s].cout0)
                             for s in tables.layers.values()) + tables.rest
        self._scale = 1.0
        self._scale = measured_ratio / max(self.ratio(None), 1e-12)

    @staticmethod
    def _kept(removed: np.ndarray | None, units: np.ndarray, width: int) -> int:
        return width if removed is None or not len(units) else width - int(removed[units].sum())

    def parts(self, removed: np.ndarray | None) -> tuple[float, int]:
        """Seconds in the table layers, and output elements of the table layers, after ``removed``."""
        total, outputs = 0.0, 0
        for table, out_units, in_units, (cin, cout), spatial in self._calls:
            kept_out = self._kept(removed, out_units, cout)
            total += table.at(self._kept(removed, in_units, cin), kept_out)
            outputs += kept_out * spatial
        return total, outputs

    def seconds(self, removed: np.ndarray | None) -> float:
        """Predicted seconds (before calibration) of the current model after ``removed``."""
        tables_part, outputs = self.parts(removed)
        rest = self.tables.rest
        return tables_part + rest * (self.tables.fixed + (1 - self.tables.fixed) * outputs / self._outputs0)

    def ratio(self, removed: np.ndarray | None) -> float:
        """Predicted latency after ``removed``, as a fraction of the original model's."""
        return self._scale * self.seconds(removed) / self._original

    def unit_seconds(self) -> np.ndarray:
        """Seconds (as a fraction of the original latency) each unit's channels cost now: one channel
        less in every table layer it feeds or leaves, plus its share of the rest."""
        cost = np.zeros(self.graph.num_units)
        rest_per_element = self.tables.rest * (1 - self.tables.fixed) / self._outputs0
        for table, out_units, in_units, (cin, cout), spatial in self._calls:
            here = table.at(cin, cout)
            if len(out_units):
                less = table.at(cin - 1, cout - 1) if table.joint else table.at(cin, cout - 1)
                np.add.at(cost, out_units, max(0.0, here - less) + rest_per_element * spatial)
            if len(in_units) and not table.joint:
                np.add.at(cost, in_units, max(0.0, here - table.at(cin - 1, cout)))
        return cost * self._scale / self._original


def _probe(model: nn.Module, graph: ChannelGraph) -> tuple[nn.Module | None, np.ndarray | None]:
    """The model with every other prunable unit of each group removed (None when nothing can go)."""
    units = np.flatnonzero(~graph.pinned)
    removed = graph.removal_mask(units[::2]) if len(units) > 1 else None
    if removed is None:
        return None, None
    try:
        return apply_removal(model, graph, removed), removed
    except Exception:  # noqa: BLE001 - a removal the graph refuses (a layer left empty): no probe
        return None, None


def _units(graph: ChannelGraph, arg) -> np.ndarray:
    chan = arg.meta.get("prunekit_chan") if isinstance(arg, fx.Node) else None
    if chan is None or not hasattr(chan, "atoms"):
        return np.zeros(0, dtype=np.int64)
    return graph.unit_of_atom[np.asarray(chan.atoms, dtype=np.int64)]


def _spatial(node: fx.Node) -> int:
    shape = node.meta.get("prunekit_shape") or ()
    chan = node.meta.get("prunekit_chan")
    if not shape or chan is None or not hasattr(chan, "dim"):
        return 0
    return int(np.prod(shape)) // max(1, shape[chan.dim])


def choose_alignment(model: nn.Module, graph: ChannelGraph, tables: LatencyTables, settings: Settings) -> int:
    """The largest width alignment that pays off on the device, or 1.

    An alignment ``a`` pays off when, in the layers that take the most time, keeping a
    multiple of ``a`` channels is measured no slower than keeping ``a / 2`` fewer.
    """
    calls = {key: (module, tuple(node.args[0].meta["prunekit_shape"])) for key, node, module in
             latency_calls(model, graph)}
    heavy = sorted((k for k in tables.layers if k in calls and getattr(calls[k][0], "groups", 1) == 1),
                   key=lambda k: -tables.tables[tables.layers[k]].at(1e9, 1e9))[:3]
    for a in ALIGNMENTS:
        votes = []
        for key in heavy:
            table = tables.tables[tables.layers[key]]
            width = table.cout0 // 2 // a * a
            if width < 2 * a:
                continue
            aligned = _time_layer(*calls[key], table.cin0, width, settings)
            fewer = _time_layer(*calls[key], table.cin0, width - a // 2, settings)
            votes.append(fewer >= aligned)
        if votes and sum(votes) * 2 > len(votes):
            return a
    return 1


class LatencyGauge:
    """A run's latency: the tables, a real measurement after every cut, and the model that plans the next."""

    def __init__(self, original: nn.Module, example_inputs, tables: LatencyTables, settings: Settings):
        self.original, self.inputs, self.tables, self.settings = original, example_inputs, tables, settings

    def measure(self, model: nn.Module) -> dict:
        """``model``'s latency beside the original's, timed interleaved; ``ratio`` is pruned / original."""
        s = self.settings
        lat = compare_latency({"original": self.original, "pruned": model}, self.inputs, s.device, s.threads,
                              s.repeats, s.warmup, s.budget)
        original, pruned = lat["original"], lat["pruned"]
        return {"original_seconds": original.median, "pruned_seconds": pruned.median,
                "ratio": pruned.median / original.median, "spread": [original.spread, pruned.spread],
                "device": original.device, "threads": original.threads, "torch": original.torch,
                "repeats": original.repeats}

    def confirmed_ratio(self, model: nn.Module, target: float) -> float:
        """``model``'s latency ratio; one that meets ``target`` is measured a second time and the slower
        of the two counts, so that one lucky measurement on a busy machine does not end a run early."""
        ratio = self.measure(model)["ratio"]
        return max(ratio, self.measure(model)["ratio"]) if ratio <= target else ratio

    def planning_model(self, model: nn.Module, graph: ChannelGraph, measured_ratio: float) -> LatencyModel:
        return LatencyModel(model, graph, self.tables, measured_ratio)
