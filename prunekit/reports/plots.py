"""The run report's two pictures, drawn from the report data with matplotlib (Agg, no display).

- ``trajectory.png``: the size of the model (FLOPs, parameters, measured latency) as a fraction of
  the original, with each target as a labelled line, and below it the metric, from the original
  through every step to the delivered model (the best step after the final fine-tune). The metric
  axis starts at 0 for a metric that cannot be negative, so a change of 0.01 looks like one.
- ``widths.png``: output channels before and after, one horizontal bar per layer, as many layers
  as fit a readable picture (the ones that lost most, when there are more).
"""

from __future__ import annotations

import io

MAX_LAYERS = 40  # widths.png shows at most this many layers: the ones that lost most channels
RIGHT_EDGE = ("axes fraction", "data")  # a line's label sits in the margin, right of the markers, at its height


def _figure(**kwargs):
    """A figure drawn without pyplot: no global state, no GUI backend, a quarter less import time."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)  # laid out by tight_layout: one draw less than bbox "tight"
    return buffer.getvalue()


def _trajectory_rows(report: dict) -> list[dict]:
    if report.get("trajectory"):
        return report["trajectory"]
    steps = [{"label": str(s["step"]), **s} for s in report["steps"]]  # a report from before the trajectory key
    return [{"step": 0, "label": "original", "flops_ratio": 1.0, "params_ratio": 1.0, "metric": None}, *steps]


def _tick_label(row: dict) -> str:
    if row["step"] == 0:
        return "original"
    if row["step"] == "final":
        return f"final\n(step {row.get('from_step', '?')}" + (" + fine-tune)" if row.get("final_finetune_iterations")
                                                              else ")")
    return str(row["step"])


def _metric_limits(values: list[float]) -> tuple[float, float]:
    """A metric axis that starts at a meaningful baseline: 0 for a metric that cannot be negative
    (up to 1 for a score in [0, 1]); otherwise a span of at least a tenth of the largest value."""
    low, high = min(values), max(values)
    if low >= 0:
        return 0.0, 1.1 if high <= 1 else high * 1.1
    span = max(high - low, 0.1 * max(abs(high), abs(low)), 1e-6) * 1.3
    middle = (low + high) / 2
    return middle - span / 2, middle + span / 2


def plot_trajectory(report: dict) -> bytes:
    rows = _trajectory_rows(report)
    xs = list(range(len(rows)))
    metrics = [(x, r["metric"]) for x, r in zip(xs, rows) if r.get("metric") is not None]
    panels = 2 if metrics else 1
    fig = _figure(figsize=(7.5, 3.2 * panels + 0.6))
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)
    size = axes[0][0]
    targets = report["targets"]
    series = [("flops_ratio", "FLOPs", "o-", "C0", targets.get("flops")),
              ("params_ratio", "parameters", "s-", "C1", targets.get("params")),
              ("latency_ratio", "latency (measured)", "d-", "C3", targets.get("latency"))]
    labelled: list[float] = []  # targets labelled so far: a close one's label moves away from theirs
    for key, name, style, color, target in series:
        points = [(x, r[key]) for x, r in zip(xs, rows) if r.get(key) is not None]
        if not points:
            continue
        if len(points) < len(rows) and len(points) <= 2:  # measured before and after only: no line between
            style, name = style[0], f"{name}: original and delivered"
        size.plot(*zip(*points), style, c=color, label=name, ms=8 if style == "d" else None)
        if target is not None and target < 1:
            size.axhline(target, ls="--", c=color, lw=1)
            near = [other for other in labelled if abs(target - other) < 0.05]
            shift = 0 if not near else 10 * len(near) * (1 if target >= max(near) else -1)
            labelled.append(target)
            size.annotate(f"{name.split(' ')[0]} target {target:.0%}", (1, target), xycoords=RIGHT_EDGE,
                          xytext=(4, shift), textcoords="offset points", color=color, fontsize=8,
                          va="center", ha="left", annotation_clip=False)
    size.set_ylim(0, 1.08)
    size.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    size.set_ylabel("fraction of the original")
    size.set_title("Model size: FLOPs, parameters and latency per step", fontsize=10)
    size.grid(axis="y", alpha=0.3)
    size.legend(loc="lower left", fontsize=8)
    if metrics:
        ax = axes[1][0]
        ax.plot(*zip(*metrics), "^-", c="C2", label="metric")
        original = rows[0].get("metric")
        if original is not None:
            ax.axhline(original, ls=":", c="0.4", lw=1)
            ax.annotate(f"original\n{original:.4f}", (1, original), xycoords=RIGHT_EDGE, xytext=(4, 0),
                        textcoords="offset points", color="0.3", fontsize=8, va="center", ha="left",
                        annotation_clip=False)
        last_x, last = metrics[-1]
        if rows[-1]["step"] == "final":
            ax.plot([last_x], [last], "*", c="C2", ms=12, label="delivered model")
            ax.annotate(f"{last:.4f}", (last_x, last), xytext=(6, -12), textcoords="offset points", fontsize=8,
                        color="C2")
        ax.set_ylim(*_metric_limits([m for _, m in metrics]))
        ax.set_ylabel("metric (higher is better)")
        source = report.get("metric_source")
        ax.set_title("Metric" + (f" ({source.split(':')[0]})" if source else ""), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    bottom = axes[-1][0]
    bottom.set_xticks(xs, [_tick_label(r) for r in rows], fontsize=8)
    bottom.set_xlabel("step")
    bottom.set_xlim(-0.3, xs[-1] + 0.3)
    fig.suptitle("prunekit: pruning trajectory", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def plot_widths(report: dict) -> bytes:
    layers = [r for r in report["layers"] if r["channels_before"] is not None]
    shown = layers
    title = "Output channels per layer, before and after"
    if len(layers) > MAX_LAYERS:
        order = sorted(range(len(layers)), key=lambda i: (-(layers[i]["channels_before"]
                                                            - (layers[i]["channels_after"] or 0)), i))
        shown = [layers[i] for i in sorted(order[:MAX_LAYERS])]  # the ones that lost most, in model order
        title = f"Output channels: the {MAX_LAYERS} of {len(layers)} layers that lost the most"
    fig = _figure(figsize=(7.5, 1.2 + 0.26 * max(len(shown), 3)))
    ax = fig.subplots()
    ys = list(range(len(shown)))
    before = [r["channels_before"] for r in shown]
    after = [r["channels_after"] or 0 for r in shown]
    ax.barh(ys, before, color="0.82", label="before")
    ax.barh(ys, after, color="C0", label="after")
    for y, b, a in zip(ys, before, after):
        ax.annotate(f"{a} / {b}", (b, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7,
                    color="0.25")
    ax.set_yticks(ys, [r["name"] for r in shown], fontsize=8)
    ax.invert_yaxis()  # the model's first layer on top
    ax.set_xlim(0, max(before) * 1.15 if before else 1)
    ax.set_xlabel("output channels (kept / original)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)
