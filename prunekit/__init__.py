"""prunekit: structured filter pruning for CNNs and U-Nets.

    import prunekit
    graph = prunekit.build_graph(model, torch.randn(1, 3, 256, 256))
    smaller = prunekit.remove_channels(model, example, {"enc1.conv": [0, 3]})
    prunekit.count_flops_params(smaller, example)

The names below are imported on first use, so ``prunekit.cli`` starts without
torch and a Ctrl-C while torch loads is still answered in one line.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ChannelGraph": ".graphs",
    "Config": ".config",
    "ExportResult": ".export",
    "PruneResult": ".loop",
    "PinnedChannelError": ".graphs",
    "PrunekitError": ".errors",
    "UntraceableModelError": ".graphs",
    "build_graph": ".graphs",
    "count_flops_params": ".costs",
    "export_onnx": ".export",
    "load_config": ".config",
    "load_pruned": ".artifacts",
    "measure_latency": ".latency",
    "prune": ".loop",
    "remove_channels": ".surgery",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
