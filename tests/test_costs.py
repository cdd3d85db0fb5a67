"""Analytic costs agree with fvcore, before and after pruning.

The cost model prices a removal from kept channel counts alone; fvcore
counts the pruned model by tracing it. They must agree (FLOPs within 1%,
parameters exactly) on the whole battery and on the zoo models.
"""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.graphs.tracer import ConcreteTracer
from archs import ARCHS, build, example
from helpers import pick_units
from prunekit.costs import CONVENTION, CostModel, fvcore_counts
from prunekit.errors import PrunekitWarning
from prunekit.surgery import apply_removal
from prunekit.zoo import resnet_small, small_cnn, unet

NAMES = sorted(ARCHS)


def _close(analytic: int, reference: int, what: str) -> None:
    assert abs(analytic - reference) <= 0.01 * max(reference, 1), f"{what}: analytic {analytic} vs fvcore {reference}"


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _check(model, x, leaf_modules=(), fraction=1 / 3, seed=0):
    model.eval()
    graph = prunekit.build_graph(model, x, leaf_modules=leaf_modules)
    costs = CostModel(model, graph)

    flops, _ = fvcore_counts(model, x)
    _close(costs.flops(), flops, "original FLOPs")
    assert costs.params() == _params(model)
    assert prunekit.count_flops_params(model, x, graph=graph) == {"flops": costs.flops(), "params": costs.params()}
    assert sum(costs.flops_by_layer().values()) == costs.flops()
    assert sum(costs.params_by_layer().values()) == costs.params()

    units = pick_units(graph, fraction=fraction, seed=seed)
    mask = graph.removal_mask(units)
    pruned = apply_removal(model, graph, mask).eval()
    flops_after, _ = fvcore_counts(pruned, x)
    _close(costs.flops(mask), flops_after, "pruned FLOPs (priced from the original's graph)")
    assert costs.params(mask) == _params(pruned)
    # and the pruned model, counted from scratch
    counted = prunekit.count_flops_params(pruned, x, graph=prunekit.build_graph(pruned, x, leaf_modules))
    _close(counted["flops"], flops_after, "pruned FLOPs (counted on the pruned model)")
    assert counted["params"] == _params(pruned)
    assert costs.flops(mask) < costs.flops() or not units
    assert costs.params(mask) < costs.params()
    # the layer table adds up to the totals
    rows = costs.layers(mask)
    assert sum(r.flops for r in rows) == costs.flops(mask)
    assert sum(r.params for r in rows) == costs.params(mask)


@pytest.mark.parametrize("name", NAMES)
def test_costs_match_fvcore_on_the_battery(name):
    model, arch = build(name)
    _check(model, example(arch), arch.leaf_modules)


@pytest.mark.parametrize("name", ["conv1d", "conv3d", "separable2d", "zoo_unet_bilinear", "functional"])
def test_costs_match_fvcore_after_heavy_pruning(name):
    model, arch = build(name, seed=2)
    _check(model, example(arch), arch.leaf_modules, fraction=2 / 3, seed=2)


@pytest.mark.parametrize("builder, shape", [
    (lambda: unet(), (1, 3, 64, 64)),
    (lambda: unet(upsampling="bilinear", depth=3), (1, 3, 32, 48)),
    (lambda: unet(batchnorm=False, depth=2), (2, 3, 32, 32)),
    (lambda: resnet_small(), (2, 3, 32, 32)),
    (lambda: small_cnn(), (1, 1, 28, 28)),
], ids=["unet", "unet_bilinear", "unet_no_bn_batch2", "resnet_small", "small_cnn"])
def test_costs_match_fvcore_on_the_zoo(builder, shape):
    torch.manual_seed(0)
    _check(builder(), torch.randn(*shape))


def test_convolutions_with_string_padding_are_counted_by_fvcore_too():
    """torch traces padding="same" / "valid" as aten::_convolution_mode, which fvcore does not know: the
    reports' fvcore counts missed those convs (timm's ConvMixer read 6% low) until prunekit gave it a handle."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding="same"), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding="valid", groups=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 5, padding="same"))
    x = torch.randn(1, 3, 16, 16)
    flops, skipped = fvcore_counts(model, x)
    assert not skipped
    assert flops == 16 * 16 * 8 * 3 * 9 + 14 * 14 * 8 * 4 * 9 + 14 * 14 * 4 * 8 * 25
    _check(model, x)


def gram_and_rank(x: torch.Tensor):
    """A user function that returns a Python number beside its tensor, as torchvision's MViT does."""
    y = x.flatten(2)
    return y @ y.transpose(1, 2), x.dim()


torch.fx.wrap("gram_and_rank")


def test_a_wrapped_function_that_returns_a_number_is_counted():
    """An op the table does not know is counted by fvcore, whose torch.jit.trace refused the number
    among the outputs (count_flops_params raised on torchvision's mvit_v2_s)."""

    class Gram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 4)

        def forward(self, x):
            gram, rank = gram_and_rank(self.conv(x))
            return self.fc(gram) * rank

    model, x = Gram().eval(), torch.randn(1, 3, 10, 10)
    counted = prunekit.count_flops_params(model, x)
    flops, _ = fvcore_counts(model, x)
    assert counted == {"flops": flops, "params": _params(model)}
    assert flops == 8 * 8 * 3 * 9 * 8 + 8 * 64 * 8 + 8 * 8 * 4  # conv, the wrapped matmul, fc


def test_an_opaque_call_that_fvcore_cannot_trace_is_left_out_with_a_warning():
    """A leaf that checks a size with torch._check runs, but torch.jit.trace (so fvcore) refuses it:
    the model is still counted, that call's FLOPs left out with a warning that names it (it raised)."""

    class Checked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            torch._check(x.shape[1] == 8)
            return self.conv(x)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), Checked(), torch.nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 10, 10)
    graph = prunekit.build_graph(model, x, leaf_modules=["1"])
    with pytest.warns(PrunekitWarning, match="FLOPs of '1' are not counted"):
        counted = prunekit.count_flops_params(model, x, graph=graph)
    assert counted == {"flops": 8 * 8 * 3 * 9 * 8 + 8 * 8 * 8 * 2, "params": _params(model)}


def test_cost_model_prices_without_tracing(monkeypatch):
    """Pricing many removals reuses one graph: no trace and no forward pass, only kept counts."""
    model, arch = build("zoo_resnet_small")
    x = example(arch)
    graph = prunekit.build_graph(model, x)
    costs = CostModel(model, graph)
    calls = []
    monkeypatch.setattr(ConcreteTracer, "trace", lambda *a, **k: calls.append("trace"))
    original_call = torch.nn.Module.__call__
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda *a, **k: calls.append("forward") or original_call(*a, **k))
    prices = [costs.flops(graph.removal_mask(pick_units(graph, seed=s))) for s in range(20)]
    assert calls == []
    assert all(p < costs.flops() for p in prices)
    prunekit.build_graph(model, x)  # the probes do see a trace
    assert "trace" in calls


def test_convention_is_stated():
    assert "fused multiply-add" in CONVENTION and "fvcore" in CONVENTION


class Gated(torch.nn.Module):
    """An element-wise op whose FLOPs handle branches on the kept width and divides."""

    def forward(self, x):
        return x * 2


def _gated_flops(ctx, node, module):
    def flops(kept, node, removed):
        channels = kept(node.args[0])[1]
        return 0 if channels <= 4 else channels * 100 // 3

    return flops


def test_flops_handles_that_branch_or_divide_are_priced_by_running_them():
    """Handles are compiled to products of kept counts where they are one; a comparison or a division
    on a count must not be evaluated once at compile time, but for every removal."""
    from prunekit.ops import OpSpec, register
    from prunekit.ops.channels import passthrough

    register(Gated, OpSpec(passthrough, _gated_flops, shape="input"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), Gated(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 5, 5)
    graph = prunekit.build_graph(model, x)
    costs = CostModel(model, graph)
    first = graph.producers["0"]
    for removed, kept in ((0, 8), (2, 6), (5, 3)):
        mask = graph.removal_mask(first[:removed])
        conv_flops = 25 * (3 * kept + kept * 4)  # 1x1 convs on 5x5: one multiply-add per weight and pixel
        gated = 0 if kept <= 4 else kept * 100 // 3
        assert costs.flops(mask) == sum(costs.flops_by_layer(mask).values()) == conv_flops + gated
        assert costs.params(mask) == 3 * kept + kept + kept * 4 + 4
