"""Scorers that read weights only: filter norms, BatchNorm scales, random."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..graphs import ChannelGraph


def filter_weights(model: nn.Module, graph: ChannelGraph, name: str) -> torch.Tensor:
    """The producer's filters as rows: (out channels, everything else)."""
    weight_name, out_dim = graph.producer_weight[name]
    weight = model.get_parameter(weight_name).detach()
    if not out_dim:
        return weight.flatten(1)
    groups = len(graph.producers[name]) // weight.shape[out_dim]
    if groups > 1:  # a grouped transposed conv: (in, out / groups, ...) holds group g's inputs in block g of dim 0
        per_group = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        return per_group.transpose(1, 2).reshape(len(graph.producers[name]), -1)
    return weight.transpose(0, out_dim).flatten(1)


def filter_norms(model: nn.Module, graph: ChannelGraph, p: int) -> dict[str, torch.Tensor]:
    """Every filter's norm, for the producers with a channel that can go (a classifier's cannot: its
    weight, often the largest, is not read)."""
    rows = {name: filter_weights(model, graph, name) for name in graph.producer_weight
            if not graph.pinned[graph.producers[name]].all()}
    if p != 1:
        return {name: w.norm(p=p, dim=1) for name, w in rows.items()}
    return _l1_rows(rows)


def _l1_rows(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each row's L1 norm. torch's L1 norm along a dim is a slow reduction, and ``abs()`` into a fresh
    tensor pays the page faults of every large layer: |w| into one reused buffer and a sum is 3-4x faster."""
    largest: dict[tuple, int] = {}
    for w in rows.values():
        largest[(w.dtype, w.device)] = max(largest.get((w.dtype, w.device), 0), w.numel())
    scratch = {key: torch.empty(n, dtype=key[0], device=key[1]) for key, n in largest.items()}
    norms = {}
    for name, w in rows.items():
        buffer = scratch[(w.dtype, w.device)][:w.numel()].view(w.shape)
        norms[name] = torch.abs(w, out=buffer).sum(dim=1)
    return norms


def l1(model, graph, batches=None, **options):
    """||W_k||_1 of every filter."""
    return filter_norms(model, graph, 1)


def l2(model, graph, batches=None, **options):
    """||W_k||_2 of every filter."""
    return filter_norms(model, graph, 2)


def bn_scale(model, graph, batches=None, **options):
    """|gamma| of the BatchNorm reading the producer's output (network slimming).

    Producers without a BatchNorm of their own are scored by their L1 norm.
    """
    scores = filter_norms(model, graph, 1)
    units_to_producer = {graph.producers[n].tobytes(): n for n in graph.producers}
    for module_name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            units = graph.widths.get((module_name, "in"))
            if units is not None and units.tobytes() in units_to_producer:
                scores[units_to_producer[units.tobytes()]] = m.weight.detach().abs()
    return scores


def random(model, graph, batches=None, seed: int = 0, **options):
    """Uniform random scores: the baseline every criterion must beat."""
    rng = np.random.default_rng(seed)
    return {name: torch.from_numpy(rng.random(len(units))) for name, units in graph.producers.items()}


def group_l2(model, graph, batches=None, **options):
    """The L2 norm of every parameter a unit owns (see :func:`group_magnitude`)."""
    return group_magnitude(model, graph, 2)


def group_magnitude(model, graph, norm: int = 2):
    """||every parameter a unit owns||_p: producer rows, bias, norm scale and shift, consumer columns.

    The group criterion of Torch-Pruning's group L2: each (tensor, dim) slice of the channel
    graph adds |w|^p of the unit's positions to the unit's sum; the score is the sum ^ (1/p).
    Buffers (running statistics) are not weights and do not count.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    total = np.zeros(graph.num_units)
    for (name, dim), units in graph.slices.items():
        if name not in params:
            continue
        w = params[name].detach().double().abs().pow(norm)
        per_position = w.sum([d for d in range(w.dim()) if d != dim]) if w.dim() > 1 else w
        if per_position.shape[0] != len(units):
            continue
        np.add.at(total, units, per_position.cpu().numpy())
    total = total ** (1 / norm)
    return {name: torch.from_numpy(total[units]) for name, units in graph.producers.items()}
