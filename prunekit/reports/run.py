"""What a pruning run leaves in its directory, each file written atomically.

model.pt (state_dict, loads with weights_only=True), manifest.json (builder,
kwargs, widths), module.pt (only for a model read from a trusted whole pickled
module, which no builder can make again: the pruned module itself),
report.json and report.md (the original and the delivered
model side by side: FLOPs, parameters, latency, metric; the trajectory from
the original through every step to the final fine-tune; the limits that
applied, what was pinned and why, per-layer before/after), trajectory.png and
widths.png (drawn by :mod:`.plots`).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict
from pathlib import Path

from torch import nn

from ..artifacts import PICKLED_MODULE
from ..config import to_dict
from ..costs import CONVENTION, CostModel
from ..graphs import ChannelGraph
from ..files import atomic_save_torch, atomic_write_bytes, atomic_write_text, save_json
from ..planner import ALIGN_FROM, layer_limit
from .console import threads_text
from .data import graph_report, tracing_report
from .plots import plot_trajectory, plot_widths

__all__ = ["build_report", "layer_rows", "render_markdown", "summary_lines", "write_outputs", "plot_trajectory",
           "plot_widths"]


def layer_rows(original: nn.Module, graph0: ChannelGraph, pruned: nn.Module, graph1: ChannelGraph,
               limits=None) -> list[dict]:
    """Per layer: channels, parameters and FLOPs before and after; for a producer, the limit that
    applied to it (``limit``, the fraction of its filters that could go, and ``limit_from``, the
    ``limits.layers`` key or ``default``) and whether pruning stopped there (``at_limit``), or
    ``pinned`` when none of its channels could go whatever the limit (a model output)."""
    before = {r.name: r for r in CostModel(original, graph0).layers()}
    after = {r.name: r for r in CostModel(pruned, graph1).layers()}
    widths0 = {n: len(u) for n, u in graph0.producers.items()}
    widths1 = {n: len(u) for n, u in graph1.producers.items()}
    rows = []
    for name, b in before.items():
        a = after.get(name)
        row = {
            "name": name, "type": b.type,
            "channels_before": widths0.get(name), "channels_after": widths1.get(name),
            "params_before": b.params, "params_after": a.params if a else 0,
            "flops_before": b.flops, "flops_after": a.flops if a else 0,
        }
        if limits is not None and row["channels_before"] is not None:
            row.update(_limit_of(name, row["channels_before"], row["channels_after"], limits))
            if graph0.pinned[graph0.producers[name]].all():
                row.update(limit=None, at_limit=False, pinned=True)
        rows.append(row)
    return rows


def _limit_of(name: str, before: int, after: int | None, limits) -> dict:
    fraction = layer_limit(name, limits)
    source = name if name in limits.layers else next(
        (p for p in limits.layers if fnmatch.fnmatchcase(name, p)), "default")
    allowed = min(math.floor(fraction * before + 1e-9), before - 1)
    removed = before - (after if after is not None else before)
    # a limit of 0 is 'never touched', which no pruning reaches
    return {"limit": fraction, "limit_from": source, "at_limit": fraction > 0 and removed >= allowed}


def _metric_source(cfg) -> str | None:
    if cfg.validate:
        return f"validate: {cfg.validate if isinstance(cfg.validate, str) else getattr(cfg.validate, '__name__', '?')}"
    if cfg.data.val is not None:
        return "data.val: accuracy (classification) or mean foreground IoU (segmentation)"
    return None


WEIGHT_ONLY = ("l1", "l2", "bn_scale", "random")  # scorers that read no data


def _calibration_source(cfg) -> str:
    """What the importance scores were computed on, in words."""
    method = cfg.importance.method
    if isinstance(method, str) and method in WEIGHT_ONLY:
        return "none needed (the weights alone)"
    for key in ("calibration", "train"):
        source = getattr(cfg.data, key)
        if isinstance(source, str):
            return f"data.{key}: {source} (random noise, as the config asks)"
        if source is not None:
            what = (f"images '{source.images}'" if getattr(source, "images", None)
                    else f"factory '{getattr(source, 'factory', None)}'")
            return f"data.{key}: {what}"
    return "the example input only (random values: set data.calibration to your images)"


def _trajectory(result) -> list[dict]:
    """The original, every step, and the delivered model (the best step after the final fine-tune)."""
    o, f, m = result.original, result.final, result.metrics
    rows = [{"step": 0, "label": "original", "flops_ratio": 1.0, "params_ratio": 1.0,
             "latency_ratio": 1.0 if result.latency else None, "removed_units": 0,
             "metric": m.get("original"), "seconds": None}]
    for h in result.history:
        rows.append({"label": str(h.step), **asdict(h)})
    final_ft = result.config.schedule.final_finetune
    tuned = final_ft is not None and final_ft.iterations > 0
    label = f"final (step {result.best_step}" + (" + fine-tune)" if tuned else ")")
    rows.append({"step": "final", "label": label, "flops": f["flops"], "params": f["params"],
                 "flops_ratio": f["flops"] / o["flops"], "params_ratio": f["params"] / o["params"],
                 "latency_ratio": f.get("latency_ratio"), "removed_units": None, "metric": m.get("final"),
                 "seconds": m.get("final_finetune_seconds"), "from_step": result.best_step,
                 "final_finetune_iterations": final_ft.iterations if final_ft is not None else 0})
    return rows


def _limits_applied(cfg, rows: list[dict]) -> dict:
    producers = [r for r in rows if r.get("limit_from") is not None]
    layers = {pattern: {"limit": float(value),
                        "matches": [r["name"] for r in producers if r["limit_from"] == pattern]}
              for pattern, value in cfg.limits.layers.items()}
    return {"default": cfg.limits.default, "layers": layers, "round_to": cfg.limits.round_to,
            "at_limit": [r["name"] for r in producers if r["at_limit"]]}


def build_report(result, rows: list[dict], graph0: ChannelGraph | None = None) -> dict:
    cfg = result.config
    report = {
        "convention": CONVENTION,
        "importance": to_dict(cfg.importance),
        "targets": to_dict(cfg.targets),
        "limits": to_dict(cfg.limits),
        "steps_planned": cfg.schedule.steps,
        "targets_met": result.targets_met,
        "message": result.message,
        "best_step": result.best_step,
        "original": {**result.original, "metric": result.metrics.get("original")},
        "final": {**result.final, "metric": result.metrics.get("final")},
        "ratios": {k: result.final[k] / result.original[k] for k in ("flops", "params")},
        "metric_source": _metric_source(cfg),
        "calibration": _calibration_source(cfg),
        "latency": result.latency,
        "steps": [asdict(h) for h in result.history],
        "trajectory": _trajectory(result),
        "candidates": result.candidates,
        "limits_applied": _limits_applied(cfg, rows),
        "layers": rows,
    }
    if graph0 is not None:
        report["pins"] = graph_report(graph0)["pins"]
        report["tracing"] = tracing_report(graph0)
    return report


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _pct(value) -> str:
    return "" if value is None else f"{value:.1%}"


def _num(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _summary_table(report: dict) -> list[str]:
    o, f, r = report["original"], report["final"], report["ratios"]
    lines = ["| | original | delivered | delivered / original |", "|---|---:|---:|---:|",
             f"| FLOPs | {_human(o['flops'])} | {_human(f['flops'])} | {r['flops']:.1%} |",
             f"| parameters | {_human(o['params'])} | {_human(f['params'])} | {r['params']:.1%} |"]
    latency = report.get("latency")
    if latency:
        lines.append(f"| latency | {latency['original_seconds'] * 1e3:.2f} ms | {latency['pruned_seconds'] * 1e3:.2f} ms "
                     f"| {latency['ratio']:.1%} |")
    if o.get("metric") is not None or f.get("metric") is not None:
        change = "" if o.get("metric") is None or f.get("metric") is None else f"{f['metric'] - o['metric']:+.4f}"
        lines.append(f"| metric | {_num(o.get('metric'))} | {_num(f.get('metric'))} | {change} |")
    return lines


def render_markdown(report: dict) -> str:
    t, imp = report["targets"], report["importance"]
    final = report["trajectory"][-1] if report.get("trajectory") else None
    targets = [f"FLOPs <= {t['flops']:.0%}", f"params <= {t['params']:.0%}"]
    if t.get("latency"):
        targets.append(f"latency <= {t['latency']:.0%}")
    lines = ["# prunekit run report", "", *_summary_table(report), ""]
    if final is not None:
        tuned = final.get("final_finetune_iterations") and final.get("seconds") is not None
        lines.append(f"- Delivered model: step {final.get('from_step', report['best_step'])}'s model"
                     + (f" after the final fine-tune ({final['final_finetune_iterations']} iterations, "
                        f"{final['seconds']:.1f} s)" if tuned else " (no final fine-tune)"))
    lines += [
        f"- Targets: {', '.join(targets)} (stop when {t['stop_when']}); {'met' if report['targets_met'] else 'NOT met'}"
        + (f" ({report['message']})" if report["message"] and not report["targets_met"] else ""),
        f"- Importance: `{imp['method']}` (norm {imp['norm']}, omega {imp['omega']}, combine {imp.get('combine')}, "
        f"normalize {imp.get('normalize')})",
        *([f"- Calibration data: {report['calibration']}"] if report.get("calibration") else []),
        f"- Metric: {report.get('metric_source') or 'none (no validate function and no data.val)'}",
        *_latency_lines(report.get("latency")),
        f"- Best step: {report['best_step']} of {len(report['steps'])}; convention: {report['convention']}", "",
        "## Trajectory", "",
        "From the original, through every step, to the delivered model.", "",
        "| step | FLOPs | params | latency | units removed | metric | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report.get("trajectory") or [{"label": str(s["step"]), **s} for s in report["steps"]]:
        seconds = "" if s.get("seconds") is None else f"{s['seconds']:.1f}"
        removed = "" if s.get("removed_units") is None else str(s["removed_units"])
        lines.append(f"| {s['label']} | {_pct(s['flops_ratio'])} | {_pct(s['params_ratio'])} "
                     f"| {_pct(s.get('latency_ratio'))} | {removed} | {_num(s['metric'])} | {seconds} |")
    lines += ["", "A unit is a channel with everything that must go with it: the same channel of every layer a "
              "residual sum couples, or a block of channels cut together (a GroupNorm group)."]
    lines += _limits_markdown(report.get("limits_applied"))
    lines += _pins_markdown(report.get("pins"), report.get("tracing", {}))
    lines += ["", "## Layers", "", "| layer | type | channels | limit | params | FLOPs |", "|---|---|---:|---:|---:|---:|"]
    for row in report["layers"]:
        if row["channels_before"] is None and not row["params_before"] and not row["flops_before"]:
            continue
        channels = "" if row["channels_before"] is None else f"{row['channels_before']} -> {row['channels_after']}"
        limit = "pinned" if row.get("pinned") else "" if row.get("limit") is None else \
            f"{row['limit']:.0%}" + (" (reached)" if row["at_limit"] else "")
        lines.append(f"| {row['name']} | {row['type']} | {channels} | {limit} | {_human(row['params_before'])} -> "
                     f"{_human(row['params_after'])} | {_human(row['flops_before'])} -> {_human(row['flops_after'])} |")
    return "\n".join(lines) + "\n"


def _limits_markdown(applied: dict | None) -> list[str]:
    if not applied:
        return []
    lines = ["", "## Limits", "",
             f"- default: at most {applied['default']:.0%} of any layer's filters removed"]
    for pattern, item in applied["layers"].items():
        names = ", ".join(f"`{n}`" for n in item["matches"]) or "no producer (it limits layers that own no filters)"
        what = "never touched" if item["limit"] == 0 else f"at most {item['limit']:.0%} removed"
        lines.append(f"- `{pattern}`: {what}; applies to {names}")
    lines.append(f"- round_to: {applied['round_to']}" + _alignment_note(applied["round_to"]))
    if applied["at_limit"]:
        lines.append(f"- Layers that reached their limit: {', '.join(f'`{n}`' for n in applied['at_limit'])}")
    return lines


def _alignment_note(round_to) -> str:
    if not isinstance(round_to, int) or round_to <= 1:
        return ""
    return (f" (layers of {ALIGN_FROM * round_to} channels or more keep multiples of {round_to}; "
            "narrower ones are pruned freely)")


def _pins_markdown(pins: list | None, tracing: dict) -> list[str]:
    lines = []
    if pins:
        lines += ["", "## Pinned channels", "", "Channels prunekit left alone, and why.", "",
                  "| source | channels | why |", "|---|---:|---|"]
        lines += [f"| `{p['source']}` | {p['channels']} | {p['reason']} |" for p in pins]
    if tracing.get("fallbacks") or tracing.get("notes"):
        lines += ["", "## Tracing", ""]
        lines += [f"- `{f['module'] or '(whole model)'}` ({f['type']}) traced as an opaque leaf: {f['reason']}"
                  + (f" at `{f['location']}`" if f["location"] else "") + f"; {f['pinned_channels']} channels pinned"
                  for f in tracing.get("fallbacks", [])]
        lines += [f"- Note: {n}" for n in tracing.get("notes", [])]
    return lines


def _latency_lines(latency: dict | None) -> list[str]:
    if not latency:
        return []
    return [f"- Latency: {latency['original_seconds'] * 1e3:.2f} ms -> {latency['pruned_seconds'] * 1e3:.2f} ms "
            f"({latency['ratio']:.1%}; median of {latency['repeats']} interleaved runs on {latency['device']}, "
            f"{threads_text(latency['threads'])}, torch {latency['torch']})"]


def write_outputs(result, original: nn.Module, graph0: ChannelGraph, final_graph: ChannelGraph, inputs,
                  directory=None) -> None:
    """Write the run's files into ``directory`` (default: ``result.run_dir``), which must exist."""
    run_dir = Path(directory if directory is not None else result.run_dir)
    rows = layer_rows(original, graph0, result.model, final_graph, result.config.limits)
    report = build_report(result, rows, graph0)
    atomic_save_torch(result.model.state_dict(), run_dir / "model.pt")
    if result.manifest.get("builder") is None and result.config.model.trusted_pickle:
        # no builder can make the model again: keep the pruned module itself, read back only when trusted
        atomic_save_torch(result.model, run_dir / PICKLED_MODULE)
    save_json(run_dir / "manifest.json", result.manifest)
    save_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_markdown(report))
    atomic_write_bytes(run_dir / "trajectory.png", plot_trajectory(report))
    atomic_write_bytes(run_dir / "widths.png", plot_widths(report))
    if result.metrics.get("sparsity"):  # the kept weights were also trained sparse (config sparsity)
        from ..sparse import render_sparsity_markdown

        save_json(run_dir / "sparsity.json", result.metrics["sparsity"])
        atomic_write_text(run_dir / "sparsity.md", render_sparsity_markdown(result.metrics["sparsity"]))


def summary_lines(result) -> list[str]:
    """What ``prunekit prune`` prints when it is done: the original and the delivered model's FLOPs,
    parameters, measured latency and metric, and whether the targets hold."""
    o, f = result.original, result.final
    m = result.metrics
    status = "targets met" if result.targets_met else "targets NOT met"
    lines = [f"FLOPs {o['flops']:,} -> {f['flops']:,} ({f['flops'] / o['flops']:.1%}), "
             f"parameters {o['params']:,} -> {f['params']:,} ({f['params'] / o['params']:.1%}); {status}."]
    lat = result.latency
    if lat:
        lines.append(f"Latency {lat['original_seconds'] * 1e3:.2f} ms -> {lat['pruned_seconds'] * 1e3:.2f} ms "
                     f"({lat['ratio']:.1%}; {lat['device']}, {threads_text(lat['threads'])}).")
    if m.get("original") is not None or m.get("final") is not None:
        tuned = result.config.schedule.final_finetune is not None and result.config.schedule.final_finetune.iterations
        source = _metric_source(result.config) or "metric"
        lines.append(f"Metric ({source.split(':')[0]}) {_num(m.get('original')) or '-'} -> {_num(m.get('final')) or '-'}"
                     f" (the delivered model: step {result.best_step}"
                     + (" after the final fine-tune)." if tuned else ")."))
    sparse = m.get("sparsity")
    if sparse:
        lines.append(f"Sparse ({sparse['method']}): density {sparse['overall']['density']:.4f} of the conv and "
                     f"Linear weights, {sparse['parameters']['nonzero']:,} parameters nonzero (sparsity.md); "
                     "compute is dense with masks.")
    return lines
