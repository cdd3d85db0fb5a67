"""Report data: plain dicts, ready for JSON, built from the channel graph and the costs.

The ``*_report`` functions build data and print nothing; :mod:`.console`
draws it with rich, :mod:`.dot` writes a channel graph as Graphviz text.

>>> from prunekit.zoo import unet
>>> data = model_report(unet().eval(), torch.randn(1, 3, 256, 256), depth=1, fvcore=False)
>>> data["totals"]["flops"], [row["name"] for row in data["rows"]][:3]
(3049521152, ['enc1', 'pool', 'enc2'])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..costs import CONVENTION, CostModel, LayerCost, fvcore_counts
from ..errors import PrunekitError, UsageError
from ..graphs import ChannelGraph, build_graph
from ..graphs.graph import as_inputs
from ..safety import first_line

FLOPS_X2_NOTE = "multiplies and adds counted separately (2 x flops)"
TOP_LEVEL = "(top level)"


# --------------------------------------------------------------------------- data


def _shape(value: Any) -> Any:
    """A shape (or nested shapes of a multi-output layer) as JSON lists."""
    if isinstance(value, (tuple, list, torch.Size)):
        return [_shape(v) for v in value]
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


def _input_shapes(example_inputs) -> list:
    return [_shape(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
            for x in as_inputs(example_inputs)]


def check_depth(depth: int | None) -> None:
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise UsageError(f"The depth must be a whole number of at least 1, not {depth!r}.")


def _aggregate(layers: Sequence[LayerCost], depth: int | None, module_types: dict[str, str]) -> list[dict]:
    """Rows by layer, or summed by the first ``depth`` components of the module name.

    A group keeps the position of its first layer and the output shape of its
    last one (the output of the block).
    """
    rows: dict[str, dict] = {}
    for layer in layers:
        parts = layer.name.split(".") if layer.name != TOP_LEVEL else [layer.name]
        key = ".".join(parts[:depth]) if depth is not None else layer.name
        row = rows.get(key)
        if row is None:
            own = key == layer.name
            rows[key] = {
                "name": key,
                "type": layer.type if own else module_types.get(key, ""),
                "output_shape": _shape(layer.output_shape),
                "params": int(layer.params),
                "flops": int(layer.flops),
                "layers": 1,
            }
        else:
            row["params"] += int(layer.params)
            row["flops"] += int(layer.flops)
            row["layers"] += 1
            if layer.output_shape:
                row["output_shape"] = _shape(layer.output_shape)
    return list(rows.values())


def _fvcore(model: nn.Module, example_inputs, analytic_flops: int) -> dict:
    """fvcore's own count beside the analytic one; a model fvcore cannot trace gets a note."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            total, skipped = fvcore_counts(model, as_inputs(example_inputs))
    except Exception as exc:  # noqa: BLE001 - fvcore's jit trace fails where torch.fx may not
        return {"flops": None, "agrees": None, "uncounted_ops": {},
                "error": f"fvcore could not trace the model ({type(exc).__name__}: {first_line(exc)})"}
    return {"flops": int(total), "agrees": int(total) == int(analytic_flops),
            "uncounted_ops": dict(sorted(skipped.items())), "error": None}


def _costs(model: nn.Module, example_inputs, leaf_modules: Iterable[str], graph: ChannelGraph | None):
    graph = graph if graph is not None else build_graph(model, example_inputs, leaf_modules)
    costs = CostModel(model, graph)
    return costs.layers(), costs.flops(), costs.params(), costs.module_types, graph


def tracing_report(graph: ChannelGraph) -> dict:
    """What tracing could not follow: modules left opaque (why, where, what it cost), and
    what was specialised to the example input."""
    return {
        "fallbacks": [{"module": f.module, "type": f.type, "reason": f.reason, "location": f.location,
                       "pinned_channels": graph.fallback_cost(f)} for f in graph.fallbacks],
        "notes": list(graph.notes),
    }


def model_report(model: nn.Module, example_inputs, depth: int | None = None, *,
                 leaf_modules: Iterable[str] = (), graph: ChannelGraph | None = None,
                 fvcore: bool = True) -> dict:
    """FLOPs and parameters per layer, totals, and fvcore's count beside them.

    ``depth=N`` sums the layers by the first N components of their names
    (depth 1: ``layer1``, ``layer2``...). Rows always add up to the totals.
    ``graph``: a channel graph already built for ``model`` (saves a trace).
    ``fvcore=False`` skips fvcore's count (one extra forward pass).
    """
    check_depth(depth)
    inputs = as_inputs(example_inputs)
    layers, flops, params, types, graph = _costs(model, inputs, leaf_modules, graph)
    rows = _aggregate(layers, depth, types)
    for row in rows:
        row["flops_share"] = 100.0 * row["flops"] / flops if flops else 0.0
    return {
        "kind": "model",
        "model": type(model).__name__,
        "input_shapes": _input_shapes(inputs),
        "depth": depth,
        "convention": CONVENTION,
        "rows": rows,
        "totals": {"flops": flops, "params": params, "flops_x2": 2 * flops, "flops_x2_note": FLOPS_X2_NOTE},
        "fvcore": _fvcore(model, inputs, flops) if fvcore else None,
        "tracing": tracing_report(graph),
    }


def _ratio(after: int, before: int) -> float | None:
    return after / before if before else None


def _merge_names(before: list[str], after: list[str]) -> list[str]:
    """Names of both sides in order: ``before``'s, with ``after``-only names placed after their predecessor."""
    order = list(before)
    known = set(before)
    last = -1
    for name in after:
        if name in known:
            last = order.index(name)
        else:
            last += 1
            order.insert(last, name)
            known.add(name)
    return order


def compare_report(model: nn.Module, other: nn.Module, example_inputs, depth: int | None = None, *,
                   leaf_modules: Iterable[str] = (), fvcore: bool = True) -> dict:
    """``model`` (before) against ``other`` (after, e.g. pruned), layer by layer.

    Layers are matched by name; one present on one side only shows zeros on the
    other. Ratios are after / before (``None`` where before is 0).
    """
    before = model_report(model, example_inputs, depth, leaf_modules=leaf_modules, fvcore=fvcore)
    try:
        after = model_report(other, example_inputs, depth, leaf_modules=leaf_modules, fvcore=fvcore)
    except UsageError:
        raise
    except PrunekitError as exc:
        raise PrunekitError(f"The model to compare with cannot be analysed: {exc}") from None
    rows_b = {r["name"]: r for r in before["rows"]}
    rows_a = {r["name"]: r for r in after["rows"]}
    empty = {"type": "", "output_shape": [], "params": 0, "flops": 0}
    rows = []
    for name in _merge_names(list(rows_b), list(rows_a)):
        b, a = rows_b.get(name, empty), rows_a.get(name, empty)
        rows.append({
            "name": name,
            "type": b["type"] or a["type"],
            "status": "both" if name in rows_b and name in rows_a else ("before only" if name in rows_b else "after only"),
            "before": {k: b[k] for k in ("output_shape", "params", "flops")},
            "after": {k: a[k] for k in ("output_shape", "params", "flops")},
            "params_ratio": _ratio(a["params"], b["params"]),
            "flops_ratio": _ratio(a["flops"], b["flops"]),
        })
    tb, ta = before["totals"], after["totals"]
    return {
        "kind": "compare",
        "models": [before["model"], after["model"]],
        "input_shapes": before["input_shapes"],
        "depth": depth,
        "convention": CONVENTION,
        "rows": rows,
        "totals": {
            "before": {k: tb[k] for k in ("flops", "params", "flops_x2")},
            "after": {k: ta[k] for k in ("flops", "params", "flops_x2")},
            "flops_ratio": _ratio(ta["flops"], tb["flops"]),
            "params_ratio": _ratio(ta["params"], tb["params"]),
            "flops_x2_note": FLOPS_X2_NOTE,
        },
        "fvcore": {"before": before["fvcore"], "after": after["fvcore"]} if fvcore else None,
    }


def _status(prunable: int, size: int) -> str:
    if prunable == size:
        return "prunable"
    return "pinned" if prunable == 0 else "partly pinned"


def _unit_widths(graph: ChannelGraph) -> np.ndarray:
    """Channels per unit in each layer that makes it: more than one where a unit is cut as a block
    (a GroupNorm group, a grouped conv's group); 1 for a unit no layer makes (an input's channel)."""
    width = np.ones(graph.num_units, dtype=np.int64)
    for units in graph.producers.values():
        width = np.maximum(width, np.bincount(units, minlength=graph.num_units))
    return width


def graph_report(graph: ChannelGraph) -> dict:
    """Every group (producers, consumers, size, prunable units, pinned and why), the pins, totals.

    Groups come in model order (by their first producer in the trace).
    """
    order = {name: i for i, name in enumerate(graph.producers)}
    ordered = sorted(graph.groups, key=lambda g: min((order.get(p, len(order)) for p in g.producers), default=len(order)))
    width = _unit_widths(graph)
    groups = []
    for i, g in enumerate(ordered):
        groups.append({
            "id": i,
            "producers": list(g.producers),
            "consumers": list(g.consumers),
            "size": g.size,
            "channels": int(width[list(g.units)].sum()),
            "prunable_units": len(g.prunable_units),
            "prunable_channels": int(width[list(g.prunable_units)].sum()),
            "pinned_units": g.size - len(g.prunable_units),
            "status": _status(len(g.prunable_units), g.size),
            "reasons": list(g.reasons),
            "granularity": list(g.granularity),
        })
    pins = [{"source": p.source, "channels": int(p.channels), "reason": p.reason} for p in graph.pins]
    pinned_units = int(graph.pinned.sum())
    return {
        "kind": "graph",
        "groups": groups,
        "pins": pins,
        "totals": {
            "groups": len(groups),
            "prunable_groups": sum(g["status"] != "pinned" for g in groups),
            "pinned_groups": sum(g["status"] == "pinned" for g in groups),
            "producers": len(graph.producers),
            "units": int(graph.num_units),
            "prunable_units": int(graph.num_units) - pinned_units,
            "pinned_units": pinned_units,
            "channels": int(width.sum()),
            "prunable_channels": int(width[~graph.pinned].sum()),
            "pinned_channels": sum(p["channels"] for p in pins),
        },
        "tracing": tracing_report(graph),
    }


def latency_report(model: nn.Module, other: nn.Module | None, example_inputs, device: str = "cpu",
                   threads: int | None = None) -> dict:
    """Measured forward latency of ``model`` (and ``other``, interleaved with it, and their ratio)."""
    from ..latency import compare_latency

    models = {"before": model} if other is None else {"before": model, "after": other}
    measured = {k: v.as_dict() for k, v in compare_latency(models, example_inputs, device, threads).items()}
    if other is not None:
        measured["ratio"] = measured["after"]["median"] / measured["before"]["median"]
    return measured
