"""Report data (plain dicts, ready for JSON) and their rendering as rich tables.

The ``*_report`` functions build data and print nothing; ``render_*`` draw
that data on a :class:`rich.console.Console`; :func:`to_dot` writes a channel
graph as Graphviz text. The command line is a thin layer over these.

>>> data = model_report(model, torch.randn(1, 3, 256, 256), depth=1)
>>> data["totals"]["flops"], [row["name"] for row in data["rows"]][:3]
(3049521152, ['enc1', 'pool', 'enc2'])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .costs import CONVENTION, CostModel, LayerCost, fvcore_counts
from .errors import PrunekitError, UsageError
from .graphs import ChannelGraph, build_graph
from .graphs.graph import as_inputs

__all__ = [
    "model_report",
    "compare_report",
    "graph_report",
    "to_dot",
    "render_model_report",
    "render_compare_report",
    "render_graph_report",
    "human",
]

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
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"flops": None, "agrees": None, "uncounted_ops": {},
                "error": f"fvcore could not trace the model ({type(exc).__name__}: {first[:160]})"}
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


def render_tracing(data: dict, console) -> None:
    for f in data.get("fallbacks", []):
        where = f" at {f['location']}" if f["location"] else ""
        console.print(_txt(f"Traced as an opaque leaf: '{f['module'] or '(whole model)'}' ({f['type']}): "
                           f"{f['reason']}{where}; {f['pinned_channels']} channels pinned.", "yellow"))
    for note in data.get("notes", []):
        console.print(_txt(f"Note: {note}.", "dim"))


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


def graph_report(graph: ChannelGraph) -> dict:
    """Every group (producers, consumers, size, prunable units, pinned and why), the pins, totals.

    Groups come in model order (by their first producer in the trace).
    """
    order = {name: i for i, name in enumerate(graph.producers)}
    ordered = sorted(graph.groups, key=lambda g: min((order.get(p, len(order)) for p in g.producers), default=len(order)))
    groups = []
    for i, g in enumerate(ordered):
        groups.append({
            "id": i,
            "producers": list(g.producers),
            "consumers": list(g.consumers),
            "size": g.size,
            "prunable_units": len(g.prunable_units),
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
            "pinned_channels": sum(p["channels"] for p in pins),
        },
        "tracing": tracing_report(graph),
    }


# --------------------------------------------------------------------------- Graphviz


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _short_list(names: Sequence[str], limit: int = 4) -> list[str]:
    if len(names) <= limit:
        return list(names)
    return list(names[: limit - 1]) + [f"... and {len(names) - limit + 1} more"]


def to_dot(graph: ChannelGraph, name: str = "channel_groups") -> str:
    """The channel groups as a Graphviz digraph.

    One box per group (its producers, size, and prunable or pinned count),
    an edge from each group to every module that reads its channels, and a
    dashed edge from a module to the group it produces. Pinned groups are
    shaded dark, partly pinned ones light. Render with ``dot -Tsvg FILE``.
    """
    data = graph_report(graph)
    lines = [
        f"digraph {_dot_quote(name)} {{",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [color="#555555"];',
    ]
    modules: dict[str, str] = {}
    for g in data["groups"]:
        for c in g["consumers"]:
            modules.setdefault(c, f"m{len(modules)}")
    for module, node in modules.items():
        lines.append(f"  {node} [shape=ellipse, label={_dot_quote(module)}];")
    fills = {"prunable": "white", "partly pinned": "gray88", "pinned": "gray70"}
    for g in data["groups"]:
        if g["status"] == "prunable":
            state = f"{g['size']} channels, all prunable"
        elif g["status"] == "pinned":
            state = f"{g['size']} channels, pinned"
        else:
            state = f"{g['size']} channels, {g['prunable_units']} prunable, {g['pinned_units']} pinned"
        label = "\n".join(_short_list(g["producers"]) + [state] + [f"pinned: {r}" for r in _short_list(g["reasons"], 2)])
        lines.append(f"  g{g['id']} [shape=box, style=\"filled,rounded\", fillcolor={fills[g['status']]}, "
                     f"label={_dot_quote(label)}];")
    for g in data["groups"]:
        for p in g["producers"]:
            if p in modules:
                lines.append(f"  {modules[p]} -> g{g['id']} [style=dashed];")
        for c in g["consumers"]:
            lines.append(f"  g{g['id']} -> {modules[c]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- rendering


def human(n: float | int | None, unit: str = "") -> str:
    """3049521152 -> '3.05 G'; small numbers stay whole: 432 -> '432'."""
    if n is None:
        return "-"
    value = float(n)
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(value) < 1000 or prefix == "P":
            break
        value /= 1000
    if prefix == "":
        text = f"{int(n):,}" if float(n).is_integer() else f"{value:.3g}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {prefix}{unit}".rstrip()


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _paren_human(n: int) -> str:
    return f" ({human(n)})" if abs(n) >= 1000 else ""


def _pct(x: float) -> str:
    return "<0.1%" if 0 < x < 0.05 else f"{x:.1f}%"


def _ratio_text(r: float | None):
    from rich.text import Text

    if r is None:
        return Text("-", style="dim")
    style = "dim" if math.isclose(r, 1.0) else ("green" if r < 1 else "yellow")
    return Text(f"{r:.2f}", style=style)


def _shape_text(shape) -> str:
    if not shape:
        return ""
    if all(isinstance(s, int) for s in shape):
        return "x".join(str(s) for s in shape)
    return ", ".join(_shape_text(s) if isinstance(s, list) else str(s) for s in shape)


def _txt(value: Any, style: str | None = None):
    """Literal text: module names are never read as rich markup."""
    from rich.text import Text

    return Text(str(value), style=style or "")


def _inputs_text(shapes: list) -> str:
    return ", ".join(_shape_text(s) if isinstance(s, list) else str(s) for s in shapes)


def _fvcore_line(fv: dict | None, analytic: int, label: str = "") -> str | None:
    if fv is None:
        return None
    if fv["error"]:
        return f"{label}fvcore: {fv['error']}."
    verdict = "agrees" if fv["agrees"] else f"differs by {_count(fv['flops'] - analytic)}"
    text = f"{label}fvcore total: {_count(fv['flops'])} flops ({verdict})"
    if fv["uncounted_ops"]:
        ops = ", ".join(f"{op} x{n}" for op, n in fv["uncounted_ops"].items())
        text += f"; ops fvcore does not count: {ops}"
    return text + "."


def _layer_table(title: str, data: dict):
    """The per-layer table both model reports draw: ``title`` (plus the depth), then Layer and Type columns."""
    from rich import box
    from rich.table import Table

    if data.get("depth"):
        title += f"  |  depth {data['depth']}"
    table = Table(title=title, box=box.SIMPLE_HEAD, show_footer=True, title_justify="left",
                  footer_style="bold")
    table.add_column("Layer", footer="Total", overflow="fold")
    table.add_column("Type", footer="")
    return table


def render_model_report(data: dict, console) -> None:
    """Draw :func:`model_report` data: one row per layer (or block), then the totals."""
    totals = data["totals"]
    table = _layer_table(f"{data['model']}  |  input {_inputs_text(data['input_shapes'])}", data)
    table.add_column("Output", footer="")
    table.add_column("Params", justify="right", footer=_count(totals["params"]))
    table.add_column("FLOPs", justify="right", footer=human(totals["flops"]))
    table.add_column("Share", justify="right", footer=_pct(100.0) if totals["flops"] else "")
    hidden: dict[str, int] = {}
    for row in data["rows"]:
        share = row["flops_share"]
        if not row["params"] and not row["flops"]:
            hidden[row["type"] or "?"] = hidden.get(row["type"] or "?", 0) + 1
            continue  # ReLU, pooling...: in the JSON, not worth a line here
        table.add_row(
            _txt(row["name"]),
            _txt(row["type"], "cyan"),
            _txt(_shape_text(row["output_shape"]), "dim"),
            _txt(_count(row["params"]), "dim" if not row["params"] else None),
            _txt(human(row["flops"]) if row["flops"] else "0", "dim" if not row["flops"] else None),
            _txt(_pct(share) if row["flops"] else "", "bold" if share >= 10 else None),
        )
    console.print(table)
    if hidden:
        kinds = ", ".join(f"{n} {t}" for t, n in hidden.items())
        n = sum(hidden.values())
        console.print(_txt(f"Not shown: {n} layer{'s' * (n != 1)} without parameters or flops ({kinds}).", "dim"))
    console.print(_txt(f"Total: {_count(totals['flops'])} flops{_paren_human(totals['flops'])}, "
                       f"{_count(totals['params'])} parameters{_paren_human(totals['params'])}; "
                       f"{human(totals['flops_x2'])} with multiplies and adds counted separately.", "bold"))
    console.print(_txt(f"Convention: {data['convention']}.", "dim"))
    line = _fvcore_line(data["fvcore"], totals["flops"])
    if line:
        console.print(_txt(line, "dim"))
    render_tracing(data["tracing"], console)


def render_compare_report(data: dict, console) -> None:
    """Draw :func:`compare_report` data: before, after and after/before per layer."""
    t = data["totals"]
    table = _layer_table(f"{data['models'][0]} before and after  |  input {_inputs_text(data['input_shapes'])}", data)
    table.add_column("Params before", justify="right", footer=_count(t["before"]["params"]))
    table.add_column("after", justify="right", footer=_count(t["after"]["params"]))
    table.add_column("ratio", justify="right", footer=_ratio_text(t["params_ratio"]))
    table.add_column("FLOPs before", justify="right", footer=human(t["before"]["flops"]))
    table.add_column("after", justify="right", footer=human(t["after"]["flops"]))
    table.add_column("ratio", justify="right", footer=_ratio_text(t["flops_ratio"]))
    for row in data["rows"]:
        if not any((row["before"]["params"], row["before"]["flops"], row["after"]["params"], row["after"]["flops"])):
            continue  # parameter-free, cost-free layers (ReLU, pooling) say nothing here
        b, a = row["before"], row["after"]
        name = row["name"] + {"both": "", "before only": "  (removed)", "after only": "  (new)"}[row["status"]]
        table.add_row(
            _txt(name), _txt(row["type"], "cyan"),
            _txt(_count(b["params"])), _txt(_count(a["params"])), _ratio_text(row["params_ratio"]),
            _txt(human(b["flops"]) if b["flops"] else "0"), _txt(human(a["flops"]) if a["flops"] else "0"),
            _ratio_text(row["flops_ratio"]),
        )
    console.print(table)

    def pct(r):
        return "-" if r is None else f"{100 * r:.1f}%"

    console.print(_txt(
        f"After / before: flops {human(t['after']['flops'])} / {human(t['before']['flops'])} = {pct(t['flops_ratio'])}, "
        f"parameters {human(t['after']['params'])} / {human(t['before']['params'])} = {pct(t['params_ratio'])}.",
        "bold"))
    console.print(_txt(f"Convention: {data['convention']}.", "dim"))
    if data["fvcore"]:
        for side, label in (("before", "Before: "), ("after", "After: ")):
            line = _fvcore_line(data["fvcore"][side], t[side]["flops"], label)
            if line:
                console.print(_txt(line, "dim"))


def render_graph_report(data: dict, console) -> None:
    """Draw :func:`graph_report` data: the groups, then what is pinned and why."""
    from rich import box
    from rich.table import Table

    table = Table(title="Channel groups (channels that are removed together)", box=box.SIMPLE_HEAD,
                  title_justify="left", expand=True)
    table.add_column("#", justify="right", style="dim")
    longest = max((len(p) for g in data["groups"] for p in g["producers"]), default=9)
    table.add_column("Producers", overflow="fold", min_width=min(longest, 48))
    table.add_column("Size", justify="right")
    table.add_column("Prunable", justify="right")
    table.add_column("Read by", style="dim", overflow="fold", ratio=3)
    table.add_column("Status", ratio=2, overflow="fold")
    styles = {"prunable": "green", "partly pinned": "yellow", "pinned": "red"}
    for g in data["groups"]:
        status = g["status"] if not g["reasons"] else f"{g['status']}: " + "; ".join(g["reasons"])
        if g["granularity"]:
            status += "\n" + "; ".join(g["granularity"])
        table.add_row(
            _txt(g["id"]), _txt("\n".join(g["producers"])), _txt(_count(g["size"])),
            _txt(_count(g["prunable_units"])), _txt(", ".join(g["consumers"]) or "-"),
            _txt(status, styles[g["status"]]),
        )
    console.print(table)
    if data["pins"]:
        pins = Table(title="Pinned channels (left alone)", box=box.SIMPLE_HEAD, title_justify="left")
        pins.add_column("Source", overflow="fold")
        pins.add_column("Channels", justify="right")
        pins.add_column("Why", overflow="fold")
        for p in data["pins"]:
            pins.add_row(_txt(p["source"]), _txt(_count(p["channels"])), _txt(p["reason"], "dim"))
        console.print(pins)
    render_tracing(data["tracing"], console)
    t = data["totals"]
    console.print(_txt(
        f"{t['groups']} groups over {t['producers']} producers ({t['pinned_groups']} pinned); "
        f"{_count(t['prunable_units'])} of {_count(t['units'])} channels can be pruned.", "bold"))
