"""Propagated importance: a channel matters as much as the consumers that read it (IPAD + NISP).

The IPAD authors proposed scoring a filter also by its influence on the important
filters of the next layer, "a weighted sum of IPAD and that, like backpropagation".
The channel graph knows every weight slice that reads a unit (through cat offsets,
flatten blocks and residual unions), so the backward pass is one table walk:

    S_p[k] = (1 - beta) * A_p[k] + beta * R_p[k] / mean(R_p)
    R_p[k] = sum over consumers q reading unit u = unit of p[k],
             over q's input positions i holding u, over q's outputs j:  |W_q[j, i]|_1 * S_q[j]

A_p is the producer's own score scaled to mean 1 over its layer, |W_q[j, i]|_1 the sum of
|weights| of output j of q that read input position i (the whole kernel), and S_q the
consumer's own propagated score. Producers whose outputs are model outputs (pinned)
start the recursion with S = 1 for every channel (each output counts the same, as in
NISP); producers nobody reads keep S = A. Producers are visited consumers-first (reverse
trace order); a residual union can make a consumer precede its producer, so the sweep
runs twice, the second with the first's values.
"""

from __future__ import annotations

import numpy as np
import torch

from ..graphs import ChannelGraph

SWEEPS = 2


def _mean_one(s: np.ndarray) -> np.ndarray:
    scale = np.abs(s).mean()
    return s / scale if scale > 0 else s


def reading_matrices(model, graph: ChannelGraph) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Producer q -> (|W_q| summed over the kernel as (outputs, inputs), the unit of each input position).

    Layers whose weight does not map one-to-one to inputs (grouped convs) read nothing here.
    """
    out = {}
    for q, (weight_name, out_dim) in graph.producer_weight.items():
        in_dim = 1 - out_dim
        units = graph.slices.get((weight_name, in_dim))
        if units is None:
            continue
        w = model.get_parameter(weight_name).detach().double().abs()
        if w.shape[out_dim] != len(graph.producers[q]) or w.shape[in_dim] != len(units):
            continue
        matrix = w.transpose(0, out_dim) if out_dim else w
        matrix = matrix.flatten(2).sum(2) if matrix.dim() > 2 else matrix
        out[q] = (matrix.cpu().numpy(), units)
    return out


def propagated(model, graph: ChannelGraph, scores: dict, beta: float) -> dict[str, torch.Tensor]:
    """Each producer's ``scores`` mixed with the importance of its readers (see the module docstring)."""
    own = {p: _mean_one(np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float64))
           for p, s in scores.items()}
    readers = reading_matrices(model, graph)
    current = {}
    for p, units in graph.producers.items():
        if graph.pinned[units].all():
            current[p] = np.ones(len(units))
        elif p in own:
            current[p] = own[p]
    flow_of = {}
    total = np.zeros(graph.num_units)

    def update_flow(q):
        nonlocal total
        if q not in readers or q not in current:
            return
        matrix, in_units = readers[q]
        flow = np.zeros(graph.num_units)
        np.add.at(flow, in_units, matrix.T @ current[q])
        total = total + flow - flow_of.get(q, 0.0)
        flow_of[q] = flow

    for q in current:
        update_flow(q)
    order = [p for p in graph.producers if p in own and not graph.pinned[graph.producers[p]].all()]
    for _ in range(SWEEPS):
        for p in reversed(order):
            reach = total[graph.producers[p]]
            if not reach.any():
                continue
            current[p] = (1 - beta) * own[p] + beta * _mean_one(reach)
            update_flow(p)
    return {p: torch.from_numpy(current[p] if p in order else own[p]) for p in own}
