"""The channel graph: tracing, channel rules, units, groups and pins."""

from .graph import ChannelGraph, Group, Pin, PinnedChannelError, build_graph
from .trace import UntraceableModelError

__all__ = ["ChannelGraph", "Group", "Pin", "PinnedChannelError", "UntraceableModelError", "build_graph"]
