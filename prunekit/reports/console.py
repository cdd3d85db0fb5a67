"""Report data drawn as rich tables: the model, a comparison, the channel graph, what tracing left opaque."""

from __future__ import annotations

import math
from typing import Any


def threads_text(threads: int) -> str:
    """'1 thread', '2 threads'."""
    return f"{threads} thread" + ("" if threads == 1 else "s")


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
    render_latency(data.get("latency"), console)
    render_tracing(data["tracing"], console)


def render_latency(latency: dict | None, console) -> None:
    """One line: the measured latency (before and after, and their ratio, when two models were timed)."""
    if not latency:
        return
    before, after = latency["before"], latency.get("after")
    where = (f"median of {before['repeats']} runs on {before['device']}, {threads_text(before['threads'])}, "
             f"torch {before['torch']}" + (", interleaved" if after else ""))
    if after is None:
        text = f"Latency: {before['median'] * 1e3:.2f} ms (spread {before['spread'] * 1e3:.2f} ms; {where})."
    else:
        text = (f"Latency: {before['median'] * 1e3:.2f} ms -> {after['median'] * 1e3:.2f} ms "
                f"= {100 * latency['ratio']:.1f}% ({where}).")
    console.print(_txt(text, "bold"))


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
    render_latency(data.get("latency"), console)


def render_graph_report(data: dict, console) -> None:
    """Draw :func:`graph_report` data: the groups, then what is pinned and why."""
    from rich import box
    from rich.table import Table

    from rich.text import Text

    table = Table(title="Channel groups (channels that are removed together)", box=box.SIMPLE_HEAD,
                  title_justify="left", expand=True)
    styles = {"prunable": "green", "partly pinned": "yellow", "pinned": "red"}
    details = []
    for g in data["groups"]:  # the status, why, and who reads the channels, as one cell: the table fits 80 columns
        status = g["status"] if not g["reasons"] else f"{g['status']}: " + "; ".join(g["reasons"])
        if g["granularity"]:
            status += "\n" + "; ".join(g["granularity"])
        if g["channels"] != g["size"]:  # units of several channels: a GroupNorm's groups, a grouped conv's
            per_unit = g["channels"] // g["size"] if g["channels"] % g["size"] == 0 else None
            status += (f"\ncut in blocks of {per_unit} channels ({g['size']} blocks)" if per_unit
                       else f"\ncut in {g['size']} blocks")
        details.append(Text.assemble((status, styles[g["status"]]),
                                     ("\nread by " + (", ".join(g["consumers"]) or "-"), "dim")))
    # a column is never narrower than its longest word: names wrap between words, never inside one
    cap = 60 if console.is_terminal else None  # a file or a pipe cuts nothing: as wide as the longest names need
    names_width = _longest_word((p for g in data["groups"] for p in g["producers"]), cap)
    details_width = _longest_word((d.plain for d in details), cap)
    if cap is None:
        console.width = max(console.width, names_width + details_width + len("#  Size  Prunable") + 5 * 3)
    table.add_column("#", justify="right", style="dim")
    table.add_column("Producers", overflow="fold", min_width=names_width)
    table.add_column("Size", justify="right")
    table.add_column("Prunable", justify="right")
    table.add_column("Status; layers that read the channels", overflow="fold", min_width=details_width)
    for g, detail in zip(data["groups"], details):
        table.add_row(_txt(g["id"]), _txt("\n".join(g["producers"])), _txt(_count(g["channels"])),
                      _txt(_count(g["prunable_channels"])), detail)
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
        f"{_count(t['prunable_channels'])} of {_count(t['channels'])} channels can be pruned.", "bold"))


def _longest_word(texts, cap: int | None = 60) -> int:
    """The length of the longest whitespace-separated word in ``texts`` (at most ``cap``, if given)."""
    longest = max((len(word) for text in texts for word in str(text).split()), default=1)
    return longest if cap is None else min(longest, cap)


def render_tracing(data: dict, console) -> None:
    for f in data.get("fallbacks", []):
        where = f" at {f['location']}" if f["location"] else ""
        console.print(_txt(f"Traced as an opaque leaf: '{f['module'] or '(whole model)'}' ({f['type']}): "
                           f"{f['reason']}{where}; {f['pinned_channels']} channels pinned.", "yellow"))
    for note in data.get("notes", []):
        console.print(_txt(f"Note: {note}.", "dim"))


def render_export_report(data: dict, console) -> None:
    """Draw :meth:`prunekit.export.ExportResult.as_dict` data: what was written, the check, the timings."""
    from rich import box
    from rich.table import Table

    batch = "dynamic batch" if data["dynamic_batch"] else "fixed batch"
    opset = f", opset {data['opset']}" if data["opset"] else ""
    console.print(_txt(f"Wrote {data['path']} ({data['exporter']} exporter{opset}, {batch}; "
                       f"input {_inputs_text(data['input_shapes'])})."))
    if data["fallback_reason"]:
        console.print(_txt(f"The dynamo exporter was not used: {data['fallback_reason']}.", "yellow"))
    if data["checked"]:
        n = len(data["outputs"])
        first = data["input_shapes"][0][0] if data["input_shapes"][0] else 1
        batches = f"batch sizes {first} and {first + 1}" if data["dynamic_batch"] else f"batch size {first}"
        console.print(_txt(f"Check: ONNX Runtime matches PyTorch on {n} output{'s' if n != 1 else ''} at {batches} "
                           f"(largest difference {data['max_abs_diff']:.2g}).", "green"))
    elif data["skipped"]:
        console.print(_txt(f"Check skipped: {data['skipped']}."))
    else:
        console.print(_txt("Check skipped (--no-check)."))
    pt, ort = data["pytorch_latency"], data["onnxruntime_latency"]
    if pt is None or ort is None:
        return
    table = Table(box=box.SIMPLE_HEAD, title="Latency per forward pass (median of interleaved runs)",
                  title_justify="left")
    table.add_column("Runtime")
    table.add_column("median ms", justify="right")
    table.add_column("spread ms (IQR)", justify="right")
    table.add_column("speed-up", justify="right")
    for name, lat in (("PyTorch", pt), ("ONNX Runtime", ort)):
        speedup = pt["median"] / lat["median"] if lat["median"] else None
        table.add_row(name, f"{1e3 * lat['median']:.3f}", f"{1e3 * lat['spread']:.3f}",
                      _ratio_speedup(speedup))
    console.print(table)
    v = data["versions"]
    console.print(_txt(f"{pt['device'].upper()}, {threads_text(pt['threads'])}, "
                       f"{pt['repeats']} runs each; torch {v['torch']}, onnxruntime {v['onnxruntime']}.", "dim"))


def _ratio_speedup(r: float | None):
    from rich.text import Text

    if r is None:
        return Text("-", style="dim")
    style = "dim" if math.isclose(r, 1.0, rel_tol=0.02) else ("green" if r > 1 else "yellow")
    return Text(f"{r:.2f}x", style=style)
