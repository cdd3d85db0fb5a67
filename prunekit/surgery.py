"""Cut units out of a model: one index_select per tensor, on a deep copy.

The channel graph says, for every parameter and buffer that must shrink,
which unit each position along each dim belongs to; removing a set of units
is keeping the other positions. Module attributes (in/out_channels, groups,
num_features...) are then set from the kept widths, so the result is an
ordinary module of the same class.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .graphs import ChannelGraph, build_graph
from .graphs.graph import as_inputs, check_graph_matches
from .ops import layer_spec


def kept(units: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Positions whose unit survives."""
    return np.flatnonzero(~removed[units])


def copy_module(module: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy(module, memo)``, minus its generic machinery.

    Same result for ordinary modules (the state is the deep-copied
    ``__dict__``, as nn.Module pickles itself), several times faster on big
    models; classes with their own ``__deepcopy__`` still get it.
    """
    if id(module) in memo:
        return memo[id(module)]
    if hasattr(module, "__deepcopy__"):
        return copy.deepcopy(module, memo)
    copied = module.__class__.__new__(module.__class__)
    memo[id(module)] = copied
    state = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = {n: None if m is None else copy_module(m, memo) for n, m in value.items()}
        elif type(value) in (dict, OrderedDict) and not value:
            # the many empty hook tables, memoised as deepcopy would: a hook's handle (timm's FeatureHookNet
            # keeps them) must refer to the copy's own tables, whether it is copied before or after them
            if id(value) not in memo:
                memo[id(value)] = type(value)()
            state[key] = memo[id(value)]
        else:
            state[key] = copy.deepcopy(value, memo)
    copied.__setstate__(state)
    return copied


def _cut(original: torch.Tensor, dims: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    value = original.detach()
    for dim, keep in dims:
        value = value.index_select(dim, torch.as_tensor(keep, device=value.device))
    value = value.contiguous(memory_format=_layout(original))
    return nn.Parameter(value, requires_grad=original.requires_grad) if isinstance(original, nn.Parameter) else value


def _layout(tensor: torch.Tensor) -> torch.memory_format:
    """The memory format a cut tensor keeps: channels-last weights stay channels-last (their kernels)."""
    for layout, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if tensor.dim() == ndim and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=layout):
            return layout
    return torch.contiguous_format


def apply_removal(model: nn.Module, graph: ChannelGraph, removed: np.ndarray, *, in_place: bool = False) -> nn.Module:
    """A deep copy of ``model`` without the units flagged in ``removed`` (a bool mask).

    ``in_place``: cut ``model`` itself, each tensor replaced as soon as its cut is made, so a caller
    that is done with the uncut model never holds two copies of it (the pruning loop does this).
    """
    graph.check_removal(removed)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    cuts: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for (name, dim), units in graph.slices.items():
        keep = kept(units, removed)
        if keep.size != units.size:
            cuts[name].append((dim, keep))
    if in_place:
        holders: dict[int, list[tuple[dict, str]]] = defaultdict(list)  # a tied tensor has several
        for m in model.modules():
            for table in (m._parameters, m._buffers):
                for attr, value in table.items():
                    if value is not None:
                        holders[id(value)].append((table, attr))
        # largest first: each cut tensor then fits where a larger one was freed, and the process does not grow
        by_size = sorted(cuts.items(), key=lambda item: tensors[item[0]].numel(), reverse=True)
        with torch.no_grad():
            for name, dims in by_size:
                original = tensors.pop(name)
                if id(original) in holders:  # not cut already under another name
                    value = _cut(original, dims)
                    for table, attr in holders.pop(id(original)):
                        table[attr] = value
                del original
        pruned = model
    else:
        # the cut tensors go into the copy directly, so deepcopy never clones them
        with torch.no_grad():
            memo: dict[int, torch.Tensor] = {id(tensors[name]): _cut(tensors[name], dims) for name, dims in cuts.items()}
        # a weight recomputed by a hook (old-style weight_norm, spectral_norm) is no leaf, which
        # deepcopy refuses; the copy's hook recomputes it before every forward
        for m in model.modules():
            for value in vars(m).values():
                if isinstance(value, torch.Tensor) and not value.is_leaf and id(value) not in memo:
                    memo[id(value)] = value.detach().clone()
        pruned = copy_module(model, memo)
    per_module: dict[str, dict[str, int]] = defaultdict(dict)
    for (name, role), units in graph.widths.items():
        per_module[name][role] = int((~removed[units]).sum())
    layers = dict(pruned.named_modules())
    for name, widths in per_module.items():
        layer = layers[name]
        spec = layer_spec(layer)
        if spec is not None:  # the size attributes follow the new tensors
            spec.resize(layer, widths, graph.original_attrs.get(name, {}), graph.grouping.get(name, ("", 1))[0])
    return pruned


def remove_channels(model: nn.Module, example_inputs, channels: Mapping[str, list[int]],
                    graph: ChannelGraph | None = None) -> nn.Module:
    """A smaller copy of ``model`` without the given producer channels and all coupled to them.

    ``channels`` maps a producer (conv, transposed conv or linear) name to the
    original output indices to remove; duplicates are fine. The caller's
    model is not modified.
    """
    if graph is None:
        graph = build_graph(model, as_inputs(example_inputs))
    else:
        check_graph_matches(graph, model, as_inputs(example_inputs))
    units = graph.units_for(channels)
    return apply_removal(model, graph, graph.removal_mask(units))
