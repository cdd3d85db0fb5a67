"""Scorers: IPAD's ADC against a hand computation, norms, custom scorers, unit combination."""

import numpy as np
import pytest
import torch

import prunekit
from helpers import TinyConvNet
from prunekit.importance import SCORERS, score_units, unit_scores
from prunekit.importance.activations import activation_deviation, ipad


def _model():
    torch.manual_seed(0)
    m = TinyConvNet().eval()
    m.bn.running_mean.uniform_(-1, 1)  # BN must not affect IPAD: it reads the raw conv output
    return m


def _hand_adc(model, batches, norm):
    """ADC by explicit loops over images and filters."""
    maps = []
    with torch.no_grad():
        for batch in batches:
            for image in batch:
                maps.append(model.conv(image[None])[0].double().numpy())
    f = np.mean(maps, axis=0)  # (C, H, W): each filter's map averaged over all images
    f_bar = f.mean(axis=0)
    out = []
    for k in range(f.shape[0]):
        diff = f[k] - f_bar
        out.append(np.abs(diff).mean() if norm == 1 else np.sqrt((diff ** 2).sum()) / diff.size)
    return np.array(out)


@pytest.mark.parametrize("norm", [1, 2])
def test_ipad_matches_hand_computation_over_all_batches(norm):
    model = _model()
    batches = [torch.randn(3, 2, 5, 5), torch.randn(2, 2, 5, 5) * 3 + 1]
    graph = prunekit.build_graph(model, batches[0][:1])
    scores = ipad(model, graph, batches, norm=norm, scale="paper")
    expected = 10 * _hand_adc(model, batches, norm)
    assert np.allclose(scores["conv"].numpy(), expected, rtol=1e-5)
    by_layer = ipad(model, graph, batches, norm=norm)["conv"].numpy()  # default: mean 1 over the layer
    assert np.allclose(by_layer, expected / expected.mean(), rtol=1e-5)
    last_only = 10 * _hand_adc(model, batches[1:], norm)
    assert not np.allclose(expected, last_only, rtol=1e-3)  # the first batch counts too


def test_ipad_omega_mixes_in_filter_norm():
    model = _model()
    batches = [torch.randn(4, 2, 5, 5)]
    graph = prunekit.build_graph(model, batches[0][:1])
    omega = 0.3
    w = model.conv.weight.detach().double().flatten(1)
    norms, adc = w.abs().sum(1).numpy(), _hand_adc(model, batches, 1)
    paper = ipad(model, graph, batches, norm=1, omega=omega, scale="paper")["conv"].numpy()
    n_l = w.shape[1]  # C_in * kh * kw
    assert np.allclose(paper, omega / n_l * norms + (1 - omega) * 10 * adc, rtol=1e-5)
    layer = ipad(model, graph, batches, norm=1, omega=omega)["conv"].numpy()
    assert np.allclose(layer, omega * norms / norms.mean() + (1 - omega) * adc / adc.mean(), rtol=1e-5)


def test_activation_deviation_small_example():
    maps = torch.tensor([[[1.0, 3.0]], [[3.0, 5.0]]], dtype=torch.float64)  # two filters, 1x2 maps
    # mean map = [2, 4]; |F_0 - mean| = [1, 1]; |F_1 - mean| = [1, 1]
    assert activation_deviation(maps, 1).tolist() == [1.0, 1.0]
    assert torch.allclose(activation_deviation(maps, 2), torch.tensor([2 ** 0.5 / 2] * 2, dtype=torch.float64))


def test_weight_scorers():
    model = _model()
    graph = prunekit.build_graph(model, torch.randn(1, 2, 5, 5))
    l1 = SCORERS["l1"](model, graph)["conv"]
    assert torch.allclose(l1, model.conv.weight.abs().sum((1, 2, 3)))
    l2 = SCORERS["l2"](model, graph)["conv"]
    assert torch.allclose(l2, model.conv.weight.flatten(1).norm(dim=1))
    bn = SCORERS["bn_scale"](model, graph)["conv"]
    assert torch.allclose(bn, model.bn.weight.abs())


def test_scores_normalised_per_layer_and_pinned_units_infinite():
    model = _model()
    graph = prunekit.build_graph(model, torch.randn(1, 2, 5, 5))
    conv_units = graph.producers["conv"]
    by_mean = unit_scores(graph, {"conv": [1.0, 2.0, 3.0, 6.0]}, normalize="mean")
    assert np.allclose(by_mean[conv_units], [1 / 3, 2 / 3, 1.0, 2.0])  # divided by the layer's mean
    scores = unit_scores(graph, {"conv": [5.0, 2.0, 9.0, 1.0]})
    assert np.allclose(scores[conv_units], [2 / 3, 1 / 3, 1.0, 0.0])  # rank within the layer
    assert np.isinf(scores[graph.producers["head"]]).all()  # output channels are pinned


def test_custom_scorer_as_callable_and_by_path():
    model = _model()
    graph = prunekit.build_graph(model, torch.randn(1, 2, 5, 5))
    calls = []

    def reverse(model, graph, batches):
        calls.append(len(list(batches)))
        return {"conv": torch.tensor([4.0, 3.0, 2.0, 1.0])}

    scores = score_units(model, graph, reverse, [torch.randn(1, 2, 5, 5)])
    assert calls == [1]
    units = graph.producers["conv"]
    assert np.argsort(scores[units]).tolist() == [3, 2, 1, 0]
    by_path = score_units(model, graph, "tests.test_importance:constant_scorer", [])
    assert np.isfinite(by_path[units]).all()


def constant_scorer(model, graph, batches, **options):
    return {name: torch.ones(len(units)) for name, units in graph.producers.items()}


def test_bad_scorer_output_is_one_sentence():
    model = _model()
    graph = prunekit.build_graph(model, torch.randn(1, 2, 5, 5))
    with pytest.raises(prunekit.PrunekitError, match="returned 2 scores for 'conv', which has 4 output channels"):
        score_units(model, graph, lambda m, g, b: {"conv": [1.0, 2.0]})
    with pytest.raises(prunekit.PrunekitError, match="'nope', which is not a producer"):
        score_units(model, graph, lambda m, g, b: {"nope": [1.0]})
    with pytest.raises(prunekit.PrunekitError, match="importance method 'magic' is unknown"):
        score_units(model, graph, "magic")
