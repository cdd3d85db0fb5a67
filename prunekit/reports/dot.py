"""A channel graph as Graphviz text: one box per group, an edge to every module that reads it."""

from __future__ import annotations

from collections.abc import Sequence

from ..graphs import ChannelGraph
from .data import graph_report


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
        channels, prunable = g.get("channels", g["size"]), g.get("prunable_channels", g["prunable_units"])
        if g["status"] == "prunable":
            state = f"{channels} channels, all prunable"
        elif g["status"] == "pinned":
            state = f"{channels} channels, pinned"
        else:
            state = f"{channels} channels, {prunable} prunable, {channels - prunable} pinned"
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
