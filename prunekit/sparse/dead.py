"""Filters that sparse training zeroed completely, removed physically through the channel graph.

A filter whose weights (and bias) are all zero outputs zeros, but a BatchNorm after it adds its
shift, and a bias-free zero filter still feeds that constant on: such a channel is not dead.
So a unit of the channel graph is offered when every producer channel in it has all-zero
weights and bias, and it is removed only when the exactness oracle agrees: the model's outputs
with and without it are the same on the example input and on random inputs of its shape.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..graphs import ChannelGraph, build_graph
from ..graphs.graph import as_inputs
from ..surgery import apply_removal

__all__ = ["DeadFilters", "zero_filters", "dead_filters", "remove_dead_filters"]


@dataclass
class DeadFilters:
    """``zero``: producer -> output channels whose weights and bias are all zero; ``removable``: the
    graph units made only of such channels whose removal leaves the outputs unchanged."""

    zero: dict[str, list[int]] = field(default_factory=dict)
    units: list[int] = field(default_factory=list)
    removable: dict[str, list[int]] = field(default_factory=dict)

    def counts(self) -> dict:
        zero = sum(map(len, self.zero.values()))
        removable = sum(map(len, self.removable.values()))
        reason = None
        if removable < zero:
            reason = (f"{zero - removable} zero filter(s) stay: their channel still carries a constant (a BatchNorm "
                      "shift or a bias) or is coupled to a channel that is not zero")
        return {"zero": zero, "removable": removable, "kept_reason": reason}


def _zero_outputs(module: nn.Module) -> np.ndarray:
    """Per output channel of a conv, transposed conv or Linear: are its weights and bias all zero?"""
    w = module.weight.detach()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # (in, out / groups, k...)
        g = module.groups
        per_in, per_out = w.shape[0] // g, w.shape[1]
        blocks = w.reshape(g, per_in, per_out, -1)  # group, in, out within the group, kernel
        nonzero = (blocks != 0).any(dim=3).any(dim=1).reshape(-1)  # output channel o = group * per_out + j
    else:  # conv (out, in / groups, k...) and Linear (out, in)
        nonzero = (w.reshape(w.shape[0], -1) != 0).any(dim=1)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        nonzero = nonzero | (bias.detach() != 0)
    return ~nonzero.cpu().numpy()


def zero_filters(model: nn.Module, graph: ChannelGraph) -> dict[str, list[int]]:
    """Producer name -> output channels with all-zero weights and bias."""
    modules = dict(model.named_modules())
    found = {}
    for name in graph.producers:
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        zero = np.flatnonzero(_zero_outputs(module))
        if zero.size:
            found[name] = zero.tolist()
    return found


def _outputs(model: nn.Module, inputs: list[tuple]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for args in inputs for t in tree_flatten(model(*args))[0] if isinstance(t, torch.Tensor)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Equal up to the rounding of a different summation order (a conv with fewer channels)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
        if x.is_floating_point() and not torch.allclose(x, y, rtol=1e-5, atol=1e-5 * scale):
            return False
    return True


def _probe_inputs(example: tuple, seed: int = 0) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    probes = [example]
    for _ in range(2):
        probes.append(tuple(torch.randn(x.shape, generator=generator, dtype=x.dtype) * 2
                            if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in example))
    return probes


def dead_filters(model: nn.Module, example_inputs, graph: ChannelGraph | None = None) -> DeadFilters:
    """Find the zero filters of ``model`` and the units among them whose removal is exact."""
    example = as_inputs(example_inputs)
    graph = graph or build_graph(model, example)
    zero = zero_filters(model, graph)
    result = DeadFilters(zero=zero)
    if not zero:
        return result
    zero_sets = {name: set(idx) for name, idx in zero.items()}
    candidates = []
    for unit in np.unique(np.concatenate([graph.producers[n][i] for n, i in zero.items()])):
        members = graph.members(int(unit))
        if graph.pinned[unit] or not all(set(idx) <= zero_sets.get(n, set()) for n, idx in members.items()):
            continue
        candidates.append(int(unit))
    model.eval()
    probes = _probe_inputs(example)
    reference = _outputs(model, probes)

    def exact(units: list[int]) -> bool:
        mask = graph.removal_mask(units)
        try:
            graph.check_removal(mask)
        except Exception:  # a layer would be emptied: not offered
            return False
        return _same(reference, _outputs(apply_removal(model, graph, mask).eval(), probes))

    chosen = candidates if candidates and exact(candidates) else [u for u in candidates if exact([u])]
    if len(chosen) > 1 and not exact(chosen):  # each alone is exact but not all together: add greedily
        kept: list[int] = []
        for u in chosen:
            if exact(kept + [u]):
                kept.append(u)
        chosen = kept
    result.units = chosen
    for u in chosen:
        for name, idx in graph.members(u).items():
            result.removable.setdefault(name, []).extend(idx)
    return result


def remove_dead_filters(model: nn.Module, example_inputs, graph: ChannelGraph | None = None
                        ) -> tuple[nn.Module, DeadFilters]:
    """A smaller copy of ``model`` without its exactly removable zero filters (and all coupled to them)."""
    example = as_inputs(example_inputs)
    graph = graph or build_graph(model, example)
    found = dead_filters(model, example, graph)
    if not found.units:
        return copy.deepcopy(model), found
    return apply_removal(model, graph, graph.removal_mask(found.units)).eval(), found
