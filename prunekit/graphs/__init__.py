"""The channel graph: the concrete tracer, the channel walk, union-find units, groups and pins.

Names are imported on first use, so the op table (which reads only the
union-find state) and the graph (which reads the op table) can import each
other's parts in either order.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ChannelGraph": ".graph", "Group": ".graph", "Pin": ".graph", "PinnedChannelError": ".graph",
    "build_graph": ".graph", "UntraceableModelError": ".trace", "updated_graph": ".update",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prunekit.graphs' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
