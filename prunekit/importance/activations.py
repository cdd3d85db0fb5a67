"""Scorers that run calibration data through the model: IPAD and Taylor."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from ..graphs import ChannelGraph
from .weights import filter_weights


@contextmanager
def _hooks(model: nn.Module, names: Iterable[str], hook):
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _hookable(model: nn.Module, graph: ChannelGraph) -> list[str]:
    """Producers that are modules of their own (functional producers have no hook)."""
    names = []
    for name in graph.producer_weight:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            names.append(name)
    return names


def mean_activation_maps(model: nn.Module, graph: ChannelGraph, batches: Iterable,
                         reduce=None) -> dict[str, torch.Tensor]:
    """F_k: each producer's raw output averaged over all calibration images.

    One pass, running sums only: activations are never stored. ``reduce(sums, counts)``, when given,
    returns the sums and counts of every process (see ``prunekit.distributed``).
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            out = output.detach().double()
            if out.dim() == 2 or (isinstance(module, nn.Linear) and out.dim() > 2):
                out = out.reshape(-1, out.shape[-1])
            total = out.sum(0)
            sums[name] = sums[name] + total if name in sums else total
            counts[name] = counts.get(name, 0) + out.shape[0]

        return record

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _hooks(model, _hookable(model, graph), hook):
            for batch in batches:
                model(batch)
    finally:
        model.train(was_training)
    if reduce is not None:
        sums, counts = reduce(sums, counts)
    return {name: sums[name] / counts[name] for name in sums}


def activation_deviation(maps: torch.Tensor, norm: int = 1) -> torch.Tensor:
    """ADC_k = mean over positions |F_k - F_bar| (norm 1) or ||F_k - F_bar||_2 / positions (norm 2)."""
    flat = maps.reshape(maps.shape[0], -1)
    deviation = flat - flat.mean(0, keepdim=True)
    if norm == 1:
        return deviation.abs().mean(1)
    return deviation.norm(p=2, dim=1) / flat.shape[1]


def ipad(model, graph, batches, norm: int = 1, omega: float = 0.0, reduce=None, **options):
    """IPAD's activation deviation criterion (Vitek et al., 2023).

    importance_k = omega / n_l * ||W_k||_p + (1 - omega) * 10 * ADC_k,
    where F_k is filter k's raw output (before BatchNorm and activation)
    averaged over every calibration image, and n_l = C_in * kh * kw.
    """
    maps = mean_activation_maps(model, graph, batches, reduce)
    if not maps:
        raise ValueError("ipad needs calibration batches; none were given.")
    scores = {}
    for name, f in maps.items():
        adc = activation_deviation(f, norm)
        if omega:
            rows = filter_weights(model, graph, name).double()
            adc = omega / rows.shape[1] * rows.norm(p=norm, dim=1) + (1 - omega) * 10 * adc
        else:
            adc = 10 * adc
        scores[name] = adc.float()
    return scores


def taylor(model, graph, batches, loss_batches=None, loss_fn=None, reduce=None, **options):
    """|mean over positions of activation x gradient| (first-order Taylor), averaged over images."""
    if loss_batches is None or loss_fn is None:
        raise ValueError("taylor importance needs training data (data.train) for its loss.")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            def on_grad(grad, out=output.detach()):
                contribution = (out * grad).double()
                per_image = contribution.flatten(2).mean(2) if contribution.dim() > 2 else contribution
                total = per_image.abs().sum(0)
                sums[name] = sums[name] + total if name in sums else total
                counts[name] = counts.get(name, 0) + per_image.shape[0]

            if output.requires_grad:
                output.register_hook(on_grad)

        return record

    was_training = model.training
    model.eval()
    try:
        with _hooks(model, _hookable(model, graph), hook):
            for inputs, targets in loss_batches:
                model.zero_grad(set_to_none=True)
                loss_fn(model(inputs), targets).backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if reduce is not None:
        sums, counts = reduce(sums, counts)
    return {name: (sums[name] / counts[name]).float() for name in sums}
