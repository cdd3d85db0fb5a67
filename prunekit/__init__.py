"""prunekit: structured filter pruning for CNNs and U-Nets.

    import prunekit
    graph = prunekit.build_graph(model, torch.randn(1, 3, 256, 256))
    smaller = prunekit.remove_channels(model, example, {"enc1.conv": [0, 3]})
    prunekit.count_flops_params(smaller, example)
"""

from .artifacts import load_pruned
from .config import Config, load_config
from .costs import count_flops_params
from .errors import PrunekitError
from .graphs import ChannelGraph, PinnedChannelError, UntraceableModelError, build_graph
from .pruner import PruneResult, prune
from .surgery import remove_channels

__all__ = [
    "ChannelGraph",
    "Config",
    "PruneResult",
    "PinnedChannelError",
    "PrunekitError",
    "UntraceableModelError",
    "build_graph",
    "count_flops_params",
    "load_config",
    "load_pruned",
    "prune",
    "remove_channels",
]
__version__ = "0.1.0"
