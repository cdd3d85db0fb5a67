"""IPAD read after BatchNorm / activation, omega on comparable scales, propagated importance,
group magnitude and label-free Fisher, each against a hand computation on a tiny model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from helpers import TinyConvNet
from prunekit.importance import SCORERS, score_units
from prunekit.importance.activations import activation_deviation, ipad, measure_chain, mix
from prunekit.importance.propagate import propagated


class Chain(nn.Module):
    """conv1 -> BN -> ReLU(inplace) -> conv2 -> ReLU -> head: propagation through two layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.act2 = nn.ReLU()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.act2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


def _tiny():
    torch.manual_seed(0)
    m = TinyConvNet().eval()
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2)
    m.bn.weight.data.uniform_(0.5, 1.5)
    m.bn.bias.data.uniform_(-0.5, 0.5)
    return m


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 2, 5, 5, generator=g), torch.randn(2, 2, 5, 5, generator=g) * 2 + 1]


def _mean_map(f, batches):
    with torch.no_grad():
        return torch.cat([f(b) for b in batches]).double().mean(0)


@pytest.mark.parametrize("measure", ["raw", "bn", "act"])
def test_ipad_measured_after_batchnorm_or_activation(measure):
    model, batches = _tiny(), _batches()
    graph = prunekit.build_graph(model, batches[0][:1])
    at = {"raw": lambda x: model.conv(x), "bn": lambda x: model.bn(model.conv(x)),
          "act": lambda x: torch.relu(model.bn(model.conv(x)))}[measure]
    adc = activation_deviation(_mean_map(at, batches), 1).numpy()
    scores = ipad(model, graph, batches, measure=measure, scale="paper")["conv"].numpy()
    assert np.allclose(scores, 10 * adc, rtol=1e-5)
    assert len(measure_chain(model, graph, "conv", measure)) == {"raw": 0, "bn": 1, "act": 2}[measure]


def test_measure_act_reads_past_a_batchnorm_replaced_by_identity():
    model, batches = _tiny(), _batches()
    model.bn = nn.Identity()
    graph = prunekit.build_graph(model, batches[0][:1])
    adc = activation_deviation(_mean_map(lambda x: torch.relu(model.conv(x)), batches), 1).numpy()
    scores = ipad(model, graph, batches, measure="act", scale="paper")["conv"].numpy()
    assert np.allclose(scores, 10 * adc, rtol=1e-5)
    assert len(measure_chain(model, graph, "conv", "act")) == 1


def test_measure_through_inplace_activation_leaves_the_forward_alone():
    torch.manual_seed(0)
    model = Chain().eval()
    x = torch.randn(4, 1, 6, 6)
    graph = prunekit.build_graph(model, x[:1])
    before = model(x)
    scores = ipad(model, graph, [x], measure="act", scale="paper")
    f = _mean_map(lambda b: torch.relu(model.bn1(model.conv1(b))), [x])
    assert np.allclose(scores["conv1"].numpy(), 10 * activation_deviation(f, 1).numpy(), rtol=1e-5)
    f2 = _mean_map(lambda b: model.act2(model.conv2(model.act1(model.bn1(model.conv1(b))))), [x])
    assert np.allclose(scores["conv2"].numpy(), 10 * activation_deviation(f2, 1).numpy(), rtol=1e-5)
    assert torch.equal(model(x), before)


def test_omega_on_comparable_scales_changes_the_ranking():
    adc = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    w = torch.tensor([40.0, 30.0, 20.0, 10.0], dtype=torch.float64)
    # layer scale: each term / its mean, so omega is the filter norm's share
    assert torch.allclose(mix(adc, w, 18, 0.5, "layer"), 0.5 * adc / 2.5 + 0.5 * w / 25)
    assert mix(adc, w, 18, 0.0, "layer").argsort().tolist() == [0, 1, 2, 3]
    assert mix(adc, w, 18, 0.75, "layer").argsort().tolist() == [3, 2, 1, 0]
    # the published weighting: omega / n_l * ||W|| is tiny next to 10 * ADC, so omega 0.75 changes nothing
    assert mix(adc, w, 18, 0.75, "paper").argsort().tolist() == [0, 1, 2, 3]
    assert torch.allclose(mix(adc, w, 18, 0.75, "paper"), 0.75 / 18 * w + 0.25 * 10 * adc)


def test_propagated_ipad_matches_hand_computation():
    model, batches = _tiny(), _batches()
    graph = prunekit.build_graph(model, batches[0][:1])
    own = ipad(model, graph, batches)["conv"].double().numpy()
    beta = 0.4
    got = ipad(model, graph, batches, propagate=beta)["conv"].double().numpy()
    # head's outputs are the model's: each counts 1; conv channel k reaches them through head.weight[:, k]
    reach = model.head.weight.detach().double().abs().sum((0, 2, 3)).numpy()
    assert np.allclose(got, (1 - beta) * own / own.mean() + beta * reach / reach.mean(), rtol=1e-5)
    assert np.allclose(ipad(model, graph, batches, propagate=1.0)["conv"].numpy(), reach / reach.mean(), rtol=1e-5)


def test_propagation_runs_through_two_layers():
    torch.manual_seed(0)
    model = Chain().eval()
    graph = prunekit.build_graph(model, torch.randn(1, 1, 6, 6))
    own = {"conv1": torch.tensor([1.0, 2.0, 3.0]), "conv2": torch.tensor([1.0, 1.0, 2.0, 4.0])}
    beta = 0.5
    out = propagated(model, graph, own, beta)
    w_head = model.head.weight.detach().double().abs().sum((0, 2, 3)).numpy()
    s2 = (1 - beta) * np.array([1, 1, 2, 4]) / 2 + beta * w_head / w_head.mean()
    w2 = model.conv2.weight.detach().double().abs().sum((2, 3)).numpy()  # (out 4, in 3)
    reach1 = w2.T @ s2
    s1 = (1 - beta) * np.array([1, 2, 3]) / 2 + beta * reach1 / reach1.mean()
    assert np.allclose(out["conv2"].numpy(), s2) and np.allclose(out["conv1"].numpy(), s1)


def test_propagation_reads_a_unet_skip_and_a_transposed_conv():
    from prunekit.zoo import unet

    torch.manual_seed(0)
    model = unet(in_channels=1, num_classes=2, width=4, depth=2).eval()
    x = torch.rand(2, 1, 32, 32)
    graph = prunekit.build_graph(model, x[:1])
    plain = ipad(model, graph, [x])
    prop = ipad(model, graph, [x], propagate=0.5)
    assert set(prop) == set(plain) and all(torch.isfinite(v).all() for v in prop.values())
    assert not torch.allclose(prop["enc1.block.3"], plain["enc1.block.3"])  # read by enc2 and, through cat, dec1
    assert not torch.allclose(prop["up1.up"], plain["up1.up"])


def test_group_l2_sums_every_parameter_a_unit_owns():
    model = _tiny()
    graph = prunekit.build_graph(model, torch.randn(1, 2, 5, 5))
    got = SCORERS["group_l2"](model, graph)["conv"].numpy()
    sq = lambda t: t.detach().double().pow(2)  # noqa: E731
    expected = np.sqrt((sq(model.conv.weight).sum((1, 2, 3)) + sq(model.conv.bias) + sq(model.bn.weight)
                        + sq(model.bn.bias) + sq(model.head.weight).sum((0, 2, 3))).numpy())
    assert np.allclose(got, expected)


def test_fisher_uses_the_models_own_predictions():
    model, batches = _tiny(), _batches()
    graph = prunekit.build_graph(model, batches[0][:1])
    got = SCORERS["fisher"](model, graph, batches)["conv"].numpy()
    per_image = []
    for batch in batches:
        for image in batch:
            a = model.conv(image[None])
            a.retain_grad()
            out = model.head(torch.relu(model.bn(a)))
            F.cross_entropy(out, out.detach().argmax(1), reduction="sum").backward()
            per_image.append(((a * a.grad).sum((2, 3)) ** 2 / 2)[0].detach().double().numpy())
    model.zero_grad()
    assert np.allclose(got, np.mean(per_image, axis=0), rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_new_scorers_run_through_the_loop():
    from prunekit.zoo import unet

    torch.manual_seed(0)
    model = unet(in_channels=1, num_classes=2, width=4, depth=2).eval()
    x = torch.rand(1, 1, 32, 32)
    for importance in ({"method": "fisher"}, {"method": "group_l2"},
                       {"method": "ipad", "measure": "act", "omega": 0.5, "propagate": 0.5}):
        cfg = {"targets": {"flops": 0.7}, "limits": {"layers": {"out": 0.0}}, "schedule": {"steps": 1},
               "importance": importance, "data": {"calibration": "random"}}
        result = prunekit.prune(model, x, cfg, progress=False)
        assert result.targets_met, importance


def test_unknown_option_values_are_refused():
    model = _tiny()
    graph = prunekit.build_graph(model, torch.randn(1, 2, 5, 5))
    with pytest.raises(prunekit.PrunekitError, match="allocation 'balanced' is unknown"):
        score_units(model, graph, "l1", allocation="balanced")
    with pytest.raises(prunekit.errors.PrunekitError, match="importance.propagate"):
        prunekit.prune(model, torch.randn(1, 2, 5, 5), {"targets": {"flops": 0.7}, "importance": {"propagate": 2},
                                                       "data": {"calibration": "random"}}, progress=False)
