"""Scorers that run calibration data through the model: IPAD, Taylor and label-free Fisher."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..graphs import ChannelGraph
from .weights import filter_weights

MEASURE_POINTS = ("raw", "bn", "act")  # where IPAD reads a producer's output

# Element-wise activations IPAD may read through with measure: act (f applied channel-wise, no mixing).
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                       nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.PReLU)
_ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
                         F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, torch.tanh}
_ACTIVATION_METHODS = {"relu", "sigmoid", "tanh"}


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


# -- where the output is read: raw, after the BatchNorm, after the activation -------------------


def _step(model: nn.Module, node) -> tuple[str, Callable] | None:
    """(kind, f) when fx ``node`` applies a BatchNorm or an activation to its first argument alone
    ("same" for an nn.Identity, which changes nothing)."""
    rest, kwargs = node.args[1:], {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if any(isinstance(a, type(node)) for a in (*rest, *kwargs.values())):
        return None  # reads a second tensor: not channel-wise on this one
    if node.op == "call_module":
        m = model.get_submodule(node.target)
        if isinstance(m, nn.Identity):  # a norm layer switched off: read past it
            return "same", m
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "bn", m
        if isinstance(m, _ACTIVATION_MODULES):
            return "act", m
    elif node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        return "act", lambda x, f=node.target: f(x, *rest, **kwargs)
    elif node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return "act", lambda x, m=node.target: getattr(x, m)(*rest, **kwargs)
    return None


def measure_chain(model: nn.Module, graph: ChannelGraph, name: str, measure: str) -> list[Callable]:
    """The functions between producer ``name``'s raw output and the point ``measure`` reads.

    "raw": none. "bn": the BatchNorm that directly reads the output, if any. "act": that
    BatchNorm (if any) and the activation after it, if any. Found on the traced graph (the
    producer's only reader, then that node's only reader); nothing is traced again.
    """
    if measure == "raw":
        return []
    node = next((n for n in graph.fx_graph.nodes if n.op == "call_module" and n.target == name), None)
    chain, wanted = [], ["bn", "act"] if measure == "act" else ["bn"]
    while node is not None and wanted and len(node.users) == 1:
        node = next(iter(node.users))
        step = _step(model, node)
        if step is not None and step[0] == "same":
            continue
        if step is None or step[0] not in wanted:
            break
        chain.append(step[1])
        wanted = wanted[wanted.index(step[0]) + 1:]
    return chain


def mean_activation_maps(model: nn.Module, graph: ChannelGraph, batches: Iterable,
                         measure: str = "raw", reduce=None) -> dict[str, torch.Tensor]:
    """F_k: each producer's output (raw, or after its BatchNorm / activation) averaged over all images.

    One pass, running sums only: activations are never stored. ``reduce(sums, counts)``, when given,
    returns the sums and counts of every process (see ``prunekit.distributed``).
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    names = _hookable(model, graph)
    chains = {n: measure_chain(model, graph, n, measure) for n in names}

    def hook(name):
        def record(module, inputs, output):
            out = output.detach()
            if chains[name]:
                out = out.clone()  # an in-place activation must not touch the model's own tensor
                for f in chains[name]:
                    out = f(out)
            out = out.double()
            if out.dim() == 2 or (isinstance(module, nn.Linear) and out.dim() > 2):
                out = out.reshape(-1, out.shape[-1])
            total = out.sum(0)
            sums[name] = sums[name] + total if name in sums else total
            counts[name] = counts.get(name, 0) + out.shape[0]

        return record

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _hooks(model, names, hook):
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


def _to_mean_one(s: torch.Tensor) -> torch.Tensor:
    scale = s.abs().mean()
    return s / scale if scale > 0 else s


def ipad_terms(model, graph, batches, norm: int = 1, measure: str = "raw", reduce=None) -> dict[str, tuple]:
    """Per producer: (ADC_k, ||W_k||_p, n_l) with n_l = inputs per filter (C_in * kh * kw)."""
    maps = mean_activation_maps(model, graph, batches, measure, reduce)
    if not maps:
        raise ValueError("ipad needs calibration batches; none were given.")
    terms = {}
    for name, f in maps.items():
        rows = filter_weights(model, graph, name).double()
        terms[name] = (activation_deviation(f, norm), rows.norm(p=norm, dim=1), rows.shape[1])
    return terms


def mix(adc: torch.Tensor, weight_norm: torch.Tensor, n_l: int, omega: float, scale: str) -> torch.Tensor:
    """IPAD's mix of the two terms.

    scale "layer" (default): each term divided by its mean over the layer's filters, so both
    average 1 and omega is the share of the filter-norm term:
    (1 - omega) * ADC_k / mean(ADC) + omega * ||W_k|| / mean(||W||).
    scale "paper": the published weighting, omega / n_l * ||W_k|| + (1 - omega) * 10 * ADC_k,
    whose filter-norm term is typically orders of magnitude smaller than the ADC term.
    """
    if scale == "paper":
        return omega / n_l * weight_norm + (1 - omega) * 10 * adc
    if not omega:
        return _to_mean_one(adc)
    return (1 - omega) * _to_mean_one(adc) + omega * _to_mean_one(weight_norm)


def ipad(model, graph, batches, norm: int = 1, omega: float = 0.0, measure: str = "raw", scale: str = "layer",
         propagate: float = 0.0, reduce=None, **options):
    """IPAD's activation deviation criterion (Vitek et al., 2023), optionally propagated.

    F_k is filter k's output averaged over every calibration image (raw by default, as the
    paper; ``measure`` "bn" / "act" reads it after the BatchNorm / activation that follows),
    ADC_k its deviation from the layer's mean map, mixed with ||W_k||_p by ``omega`` (see
    :func:`mix`). ``propagate`` > 0 adds the importance of the consumers that read the
    channel (see :mod:`prunekit.importance.propagate`).
    """
    terms = ipad_terms(model, graph, batches, norm, measure, reduce)
    scores = {name: mix(adc, w, n_l, omega, scale) for name, (adc, w, n_l) in terms.items()}
    if propagate:
        from .propagate import propagated

        scores = propagated(model, graph, scores, propagate)
    return {name: s.float() for name, s in scores.items()}


# -- gradient criteria ----------------------------------------------------------------------


def _gradient_pass(model, graph, batches_with_loss, per_image: Callable, over_positions: str = "mean", reduce=None):
    """``per_image(activation x gradient reduced over positions)`` averaged over images, per producer."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            def on_grad(grad, out=output.detach()):
                contribution = (out * grad).double()
                if contribution.dim() > 2:
                    contribution = getattr(contribution.flatten(2), over_positions)(2)
                total = per_image(contribution).sum(0)
                sums[name] = sums[name] + total if name in sums else total
                counts[name] = counts.get(name, 0) + contribution.shape[0]

            if output.requires_grad:
                output.register_hook(on_grad)

        return record

    was_training = model.training
    model.eval()
    try:
        with _hooks(model, _hookable(model, graph), hook):
            for loss in batches_with_loss:
                model.zero_grad(set_to_none=True)
                loss().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if reduce is not None:
        sums, counts = reduce(sums, counts)
    return {name: (sums[name] / counts[name]).float() for name in sums}


def taylor(model, graph, batches, loss_batches=None, loss_fn=None, reduce=None, **options):
    """|mean over positions of activation x gradient| (first-order Taylor), averaged over images."""
    if loss_batches is None or loss_fn is None:
        raise ValueError("taylor importance needs training data (data.train) for its loss.")
    losses = (lambda x=x, y=y: loss_fn(model(x), y) for x, y in loss_batches)
    return _gradient_pass(model, graph, losses, torch.abs, reduce=reduce)


def own_prediction_loss(output) -> torch.Tensor:
    """A loss whose targets are the model's own predictions: no labels needed.

    Several classes on dim 1 (classification or segmentation logits): cross-entropy against
    the argmax; one channel: binary cross-entropy against ``output > 0``; a vector: half its
    squared norm. Summed over images, so each image's gradient is its own.
    """
    from ..data.trainer import main_output

    out = main_output(output)
    if out.dim() >= 2 and out.shape[1] > 1:
        return F.cross_entropy(out, out.detach().argmax(1), reduction="sum")
    if out.dim() >= 2:
        return F.binary_cross_entropy_with_logits(out, (out.detach() > 0).to(out.dtype), reduction="sum")
    return 0.5 * out.pow(2).sum()


def fisher(model, graph, batches, **options):
    """Label-free Fisher pruning (Theis et al., 2018): mean over images of (sum_positions a x g)^2 / 2.

    g is the gradient of :func:`own_prediction_loss`, so only calibration images are needed
    (segmentation included).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("fisher needs calibration batches; none were given.")
    losses = (lambda x=x: own_prediction_loss(model(x)) for x in batches)
    return _gradient_pass(model, graph, losses, lambda c: c.pow(2) / 2, over_positions="sum")
