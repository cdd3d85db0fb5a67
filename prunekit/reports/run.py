"""What a pruning run leaves in its directory, each file written atomically.

model.pt (state_dict, loads with weights_only=True), manifest.json (builder,
kwargs, widths), report.json and report.md (per-layer before/after, totals,
importance, steps), trajectory.png and widths.png.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path

from torch import nn

from ..config import to_dict
from ..costs import CONVENTION, CostModel
from ..graphs import ChannelGraph
from ..files import atomic_save_torch, atomic_write_bytes, atomic_write_text, save_json
from .data import tracing_report


def layer_rows(original: nn.Module, graph0: ChannelGraph, pruned: nn.Module, graph1: ChannelGraph) -> list[dict]:
    before = {r.name: r for r in CostModel(original, graph0).layers()}
    after = {r.name: r for r in CostModel(pruned, graph1).layers()}
    widths0 = {n: len(u) for n, u in graph0.producers.items()}
    widths1 = {n: len(u) for n, u in graph1.producers.items()}
    rows = []
    for name, b in before.items():
        a = after.get(name)
        rows.append({
            "name": name, "type": b.type,
            "channels_before": widths0.get(name), "channels_after": widths1.get(name),
            "params_before": b.params, "params_after": a.params if a else 0,
            "flops_before": b.flops, "flops_after": a.flops if a else 0,
        })
    return rows


def build_report(result, rows: list[dict]) -> dict:
    cfg = result.config
    return {
        "convention": CONVENTION,
        "importance": to_dict(cfg.importance),
        "targets": to_dict(cfg.targets),
        "limits": to_dict(cfg.limits),
        "steps_planned": cfg.schedule.steps,
        "targets_met": result.targets_met,
        "message": result.message,
        "best_step": result.best_step,
        "original": result.original,
        "final": result.final,
        "ratios": {k: result.final[k] / result.original[k] for k in ("flops", "params")},
        "latency": result.latency,
        "steps": [asdict(h) for h in result.history],
        "candidates": result.candidates,
        "layers": rows,
    }


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def render_markdown(report: dict) -> str:
    o, f, r = report["original"], report["final"], report["ratios"]
    lines = [
        "# prunekit run report", "",
        f"- Importance: `{report['importance']['method']}` (norm {report['importance']['norm']}, "
        f"omega {report['importance']['omega']})",
        f"- Targets: FLOPs <= {report['targets']['flops']:.0%}, params <= {report['targets']['params']:.0%}"
        + (f", latency <= {report['targets']['latency']:.0%} " if report["targets"].get("latency") else " ") +
        f"(stop when {report['targets']['stop_when']}); {'met' if report['targets_met'] else 'NOT met'}"
        + (f" ({report['message']})" if report["message"] and not report["targets_met"] else ""),
        f"- FLOPs: {_human(o['flops'])} -> {_human(f['flops'])} ({r['flops']:.1%}); "
        f"parameters: {_human(o['params'])} -> {_human(f['params'])} ({r['params']:.1%})",
        *_latency_lines(report.get("latency")),
        f"- Best step: {report['best_step']}; convention: {report['convention']}", "",
        "## Steps", "", "| step | FLOPs | params | latency | units removed | metric | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["steps"]:
        metric = "" if s["metric"] is None else f"{s['metric']:.4f}"
        latency = "" if s.get("latency_ratio") is None else f"{s['latency_ratio']:.1%}"
        lines.append(f"| {s['step']} | {s['flops_ratio']:.1%} | {s['params_ratio']:.1%} | {latency} "
                     f"| {s['removed_units']} | {metric} | {s['seconds']:.1f} |")
    tracing = report.get("tracing", {})
    if tracing.get("fallbacks") or tracing.get("notes"):
        lines += ["", "## Tracing", ""]
        lines += [f"- `{f['module'] or '(whole model)'}` ({f['type']}) traced as an opaque leaf: {f['reason']}"
                  + (f" at `{f['location']}`" if f["location"] else "") + f"; {f['pinned_channels']} channels pinned"
                  for f in tracing.get("fallbacks", [])]
        lines += [f"- Note: {n}" for n in tracing.get("notes", [])]
    lines += ["", "## Layers", "", "| layer | type | channels | params | FLOPs |", "|---|---|---:|---:|---:|"]
    for row in report["layers"]:
        if row["channels_before"] is None and not row["params_before"] and not row["flops_before"]:
            continue
        channels = "" if row["channels_before"] is None else f"{row['channels_before']} -> {row['channels_after']}"
        lines.append(f"| {row['name']} | {row['type']} | {channels} | {_human(row['params_before'])} -> "
                     f"{_human(row['params_after'])} | {_human(row['flops_before'])} -> {_human(row['flops_after'])} |")
    return "\n".join(lines) + "\n"


def _latency_lines(latency: dict | None) -> list[str]:
    if not latency:
        return []
    return [f"- Latency: {latency['original_seconds'] * 1e3:.2f} ms -> {latency['pruned_seconds'] * 1e3:.2f} ms "
            f"({latency['ratio']:.1%}; median of {latency['repeats']} interleaved runs on {latency['device']}, "
            f"{latency['threads']} threads, torch {latency['torch']})"]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_trajectory(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [0] + [s["step"] for s in report["steps"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [1] + [s["flops_ratio"] for s in report["steps"]], "o-", label="FLOPs")
    ax.plot(steps, [1] + [s["params_ratio"] for s in report["steps"]], "s-", label="parameters")
    ax.axhline(report["targets"]["flops"], ls="--", c="C0", lw=0.8)
    ax.axhline(report["targets"]["params"], ls="--", c="C1", lw=0.8)
    measured = [(s["step"], s["latency_ratio"]) for s in report["steps"] if s.get("latency_ratio") is not None]
    if measured:
        ax.plot([0] + [m[0] for m in measured], [1] + [m[1] for m in measured], "d-", c="C3", label="latency")
        ax.axhline(report["targets"]["latency"], ls="--", c="C3", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of original")
    metrics = [(s["step"], s["metric"]) for s in report["steps"] if s["metric"] is not None]
    if metrics:
        other = ax.twinx()
        other.plot(*zip(*metrics), "^-", c="C2", label="metric")
        other.set_ylabel("metric")
        other.legend(loc="upper right")
    ax.legend(loc="lower left")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def plot_widths(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["layers"] if r["channels_before"] is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 3.5))
    xs = range(len(rows))
    ax.bar(xs, [r["channels_before"] for r in rows], color="0.8", label="before")
    ax.bar(xs, [r["channels_after"] or 0 for r in rows], color="C0", label="after")
    ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.legend()
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def write_outputs(result, original: nn.Module, graph0: ChannelGraph, final_graph: ChannelGraph, inputs,
                  directory=None) -> None:
    """Write the run's files into ``directory`` (default: ``result.run_dir``), which must exist."""
    run_dir = Path(directory if directory is not None else result.run_dir)
    report = build_report(result, layer_rows(original, graph0, result.model, final_graph))
    report["tracing"] = tracing_report(graph0)
    atomic_save_torch(result.model.state_dict(), run_dir / "model.pt")
    save_json(run_dir / "manifest.json", result.manifest)
    save_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_markdown(report))
    atomic_write_bytes(run_dir / "trajectory.png", plot_trajectory(report))
    atomic_write_bytes(run_dir / "widths.png", plot_widths(report))
