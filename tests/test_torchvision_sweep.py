"""Every torchvision classification and segmentation builder: graph, prune half, run, count.
The smallest video models get the whole real-model check, exactness included.

For each model (random weights): the channel graph builds; removing half of
every producer's prunable units (as many as leave every layer a channel)
gives a model that runs in eval and in train mode (batch 2) with the
original's output structure and shapes; and the analytic FLOPs agree with
fvcore within 1%, before and after, with parameters counted exactly.

The whole sweep is marked slow (``make test-slow``); a handful of small,
structurally different models also run in the default suite.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torchvision
from torchvision import models

import prunekit
from helpers import assert_attributes_consistent, assert_same_structure, time_limit
from prunekit.costs import CostModel, fvcore_counts
from prunekit.surgery import apply_removal

CLASSIFICATION = models.list_models(module=models)
SEGMENTATION = models.list_models(module=models.segmentation)

# builders that need more than weights=None
KWARGS = {
    "googlenet": {"aux_logits": True, "init_weights": False},
    "inception_v3": {"aux_logits": True, "init_weights": False},
    **{name: {"weights_backbone": None, "aux_loss": True} for name in SEGMENTATION if not name.startswith("lraspp")},
    **{name: {"weights_backbone": None} for name in SEGMENTATION if name.startswith("lraspp")},
}
# input side: 64 where the architecture allows it
SIDE = {"inception_v3": 299, "maxvit_t": 224, **{n: 224 for n in CLASSIFICATION if n.startswith(("vit_", "swin_"))}}
# seconds per case before the guard fails it (the biggest models on a 2-core CPU)
TIMEOUT = {"vit_h_14": 900, "vit_l_16": 600, "vit_l_32": 300, "regnet_y_128gf": 600, "efficientnet_b7": 300,
           "efficientnet_v2_l": 300, "inception_v3": 300}
DEFAULT_TIMEOUT = 240

# the default (fast) run: small models that between them cover residuals, dense concatenation,
# grouped and depthwise convs, SE gates, channel shuffle, train-only aux heads, LayerNorm, dict outputs
SMOKE = ["resnet18", "mobilenet_v3_small", "densenet121", "googlenet", "shufflenet_v2_x0_5", "efficientnet_b0",
         "convnext_tiny", "regnet_x_400mf", "squeezenet1_1", "lraspp_mobilenet_v3_large"]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in SEGMENTATION:
        return models.get_model(name, weights=None, num_classes=3, **KWARGS.get(name, {}))
    return models.get_model(name, weights=None, **KWARGS.get(name, {}))


def half_of_every_producer(graph) -> np.ndarray:
    """The first half of each producer's prunable units, less any that would empty a layer."""
    arrays = [u for u in graph.widths.values() if u.size] + [u for u in graph.producers.values() if u.size]
    mask = np.zeros(graph.num_units, dtype=bool)
    for name, indices in graph.prunable_channels().items():
        units = list(dict.fromkeys(graph.producers[name][indices].tolist()))
        mask[units[: len(units) // 2]] = True
    while True:
        emptied = [u for u in arrays if mask[u].all()]
        if not emptied:
            return mask
        for u in emptied:
            mask[u[-1]] = False  # give the layer its last channel back


def _run(model, x, training: bool):
    model.train(training)
    with torch.no_grad():
        return model(x)


def _close(analytic: int, reference: int, what: str) -> None:
    assert abs(analytic - reference) <= 0.01 * max(reference, 1), f"{what}: analytic {analytic} vs fvcore {reference}"


def check(name: str, side: int | None = None) -> None:
    side = side or SIDE.get(name, 64)
    with time_limit(TIMEOUT.get(name, DEFAULT_TIMEOUT), name):
        model = build(name).eval()
        x1, x2 = torch.randn(1, 3, side, side), torch.randn(2, 3, side, side)
        graph = prunekit.build_graph(model, x1)
        costs = CostModel(model, graph)
        flops, _ = fvcore_counts(model, x1)
        _close(costs.flops(), flops, f"{name} FLOPs")
        assert costs.params() == sum(p.numel() for p in model.parameters())

        mask = half_of_every_producer(graph)
        assert mask.any(), f"{name}: nothing prunable"
        expected_eval = _run(model, x2, training=False)
        expected_train = _run(model, x2, training=True)
        model.eval()
        pruned = apply_removal(model, graph, mask)
        del model
        assert_attributes_consistent(pruned)
        assert_same_structure(_run(pruned, x2, training=False), expected_eval)
        assert_same_structure(_run(pruned, x2, training=True), expected_train)
        pruned.eval()

        flops_after, _ = fvcore_counts(pruned, x1)
        _close(costs.flops(mask), flops_after, f"{name} pruned FLOPs")
        assert costs.params(mask) == sum(p.numel() for p in pruned.parameters())
        assert costs.flops(mask) < costs.flops()
        counted = prunekit.count_flops_params(pruned, x1)
        _close(counted["flops"], flops_after, f"{name} pruned FLOPs, counted afresh")
        assert counted["params"] == costs.params(mask)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFICATION + SEGMENTATION)
def test_torchvision_sweep(name):
    check(name)


@pytest.mark.parametrize("name", SMOKE)
def test_torchvision_smoke(name):
    check(name, side=32 if name not in SIDE else None)


def test_sweep_lists_every_builder():
    assert len(CLASSIFICATION) >= 70 and len(SEGMENTATION) >= 6
    assert set(SMOKE) <= set(CLASSIFICATION + SEGMENTATION)
    assert torchvision.__version__


# video classifiers (N, 3, T, H, W): the smallest of each family, through the whole real-model check
# (exactness in float64 included). MViT, whose positional tables fix its input at 16 x 224 x 224, takes
# 80 s here: it passes the same check (by hand), and tests/test_costs.py has its wrapped function's case.
VIDEO = ["r2plus1d_18", "mc3_18", "swin3d_t"]


def build_video(name: str):
    torch.manual_seed(0)
    shape = (3, 8, 64, 64)
    return models.get_model(name, weights=None).eval(), torch.randn(1, *shape), torch.randn(2, *shape)


@pytest.mark.slow
@pytest.mark.parametrize("name", VIDEO)
def test_torchvision_video(name):
    """swin3d edits a list inside a wrapped function (its attention blocks were opaque leaves)."""
    from test_real_models import check as check_exactly

    assert check_exactly(name, build=build_video) == []  # no opaque leaves
