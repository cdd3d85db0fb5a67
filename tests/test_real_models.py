"""Real third-party models (timm CNNs, MONAI networks): graph, prune half, run, count, exactness.

Models nobody on the team wrote, with random weights. For each one:

- the channel graph builds (``prunekit.build_graph`` on the model in eval mode);
- removing about half of the prunable units (``helpers.pick_units(g, 0.5)``)
  gives a model that runs in eval and in train mode (batch 2, with a backward
  pass) with the original's output structure and shapes;
- the analytic FLOPs agree with fvcore within 1%, before and after, and
  parameters are counted exactly (``prunekit.count_flops_params``, and the
  graph's cost model for the cut before it is made);
- removing a third of the prunable units after zeroing them changes nothing
  (``helpers.assert_exact``, in float64 so that summation order cannot hide a
  wrong cut).

A model in which every channel is rightly pinned (``NOTHING_PRUNABLE``, with
the reason) gets only the graph and count checks; any other model with nothing
prunable fails.

Modules traced as opaque leaves (``g.fallbacks``) are recorded as the test's
``fallbacks`` property (``--junitxml`` shows them) and printed with ``-s``;
``benchmarks/coverage.py`` reports them for the same models.

Everything is marked slow (``make test-slow``); a few of the fastest models
also run in the default suite.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

import prunekit
from helpers import assert_attributes_consistent, assert_exact, assert_same_structure, assert_train_mode_runs, \
    pick_units, time_limit
from prunekit.costs import CostModel, fvcore_counts
from prunekit.surgery import apply_removal

timm = pytest.importorskip("timm")
monai_nets = pytest.importorskip("monai.networks.nets")

# -- timm: the smallest variant of each family, random weights -------------------------------------

TIMM = [
    # plain and bottleneck residual nets
    "resnet10t", "resnet18", "resnet26d", "resnetv2_18", "resnetblur18", "resnet50_gn",
    "resnext26ts", "seresnet18", "legacy_seresnet18", "seresnext26d_32x4d", "skresnet18", "resnest14d",
    "res2net50_14w_8s", "res2next50", "eca_resnet33ts", "gcresnet33ts", "tresnet_m",
    # RegNets, NF nets
    "regnetx_002", "regnety_002", "regnetz_b16", "nf_resnet26", "nf_regnet_b0", "nfnet_l0",
    # FilterResponseNorm: per-channel scale, shift and threshold read element-wise
    "resnetv2_50d_frn",
    # depthwise / inverted residual / NAS families
    "efficientnet_b0", "efficientnet_es", "efficientnet_b0_gn", "tf_efficientnet_lite0", "tf_efficientnetv2_b0",
    "mobilenetv2_035", "mobilenetv3_small_050", "mobilenetv3_large_075", "mobilenetv4_conv_small_035",
    "mixnet_s", "tinynet_e", "hardcorenas_a", "mnasnet_small", "semnasnet_050", "spnasnet_100", "fbnetc_100",
    "lcnet_035", "rexnet_100", "ghostnet_050", "ghostnetv2_100", "repghostnet_050",
    # concatenation-heavy nets
    "densenet121", "dla34", "dla46_c", "dpn48b", "hrnet_w18_small", "vovnet39a", "ese_vovnet19b_dw",
    "selecsls42b", "hgnet_tiny", "hgnetv2_b0",
    # cross-stage-partial / darknet
    "cspresnet50", "cspdarknet53", "cs3darknet_s", "darknet17",
    # re-parameterisable and plain
    "repvgg_a0", "mobileone_s0", "gernet_s", "vgg11_bn", "repvit_m0_9",
    # inception / xception
    "inception_v3", "inception_v4", "xception41", "legacy_xception",
    # ConvNeXt-likes and conv/attention hybrids
    "convnext_atto", "convnextv2_atto", "inception_next_atto", "poolformerv2_s12", "mambaout_femto",
    "starnet_s050", "fasternet_t0", "edgenext_xx_small", "mobilevit_xxs", "mobilevitv2_050",
    "efficientvit_b0", "fastvit_t8", "efficientformerv2_s0", "levit_conv_128s",
]
# input side: 64 unless the architecture needs more (Inception's stem and reductions need 75)
TIMM_SIDE: dict[str, int] = {"inception_v3": 75, "inception_v4": 75}
# extra create_model arguments: attention biases sized for the 64x64 input
TIMM_KWARGS: dict[str, dict] = {"efficientformerv2_s0": {"img_size": 64}, "levit_conv_128s": {"img_size": 64}}
# models in which prunekit's rules rightly pin every channel: only the graph and the counts are checked
# (if prunekit ever finds prunable units in one, the whole check runs)
NOTHING_PRUNABLE = {
    "convnextv2_atto": "LayerNorm over channels on the residual stream; GlobalResponseNorm divides by the mean "
                       "over channels in the MLP",
    "mambaout_femto": "LayerNorm over channels on the residual stream; the gated MLP's hidden channels are split "
                      "at fixed sizes",
    "nf_resnet26": "weight standardisation (F.batch_norm over each filter's weights before the conv) is not "
                   "understood: the conv weights are computed in the forward, so their channels stay",
}
# models where a zeroed channel does not stay zero on its way to the next layer (an op with f(0) != 0 in
# between), so removing it cannot leave the output unchanged: every check but the exactness one runs
NOT_ZERO_PRESERVING = {
    "efficientformerv2_s0": "softmax over tokens between the talking-head convs turns a zeroed channel into 1/N",
}


def build_timm(name: str) -> tuple[nn.Module, int]:
    return timm.create_model(name, pretrained=False, **TIMM_KWARGS.get(name, {})), 3


# -- MONAI: each network in 2D and 3D, small widths and inputs ---------------------------------------

# HighResNet's default widths (16/32/64/80) at full resolution are too slow in 3D on a CPU
HIGHRESNET_LAYERS = ({"name": "conv_0", "n_features": 8, "kernel_size": 3},
                     {"name": "res_1", "n_features": 8, "kernels": (3, 3), "repeat": 2},
                     {"name": "res_2", "n_features": 16, "kernels": (3, 3), "repeat": 2},
                     {"name": "res_3", "n_features": 16, "kernels": (3, 3), "repeat": 2},
                     {"name": "conv_1", "n_features": 32, "kernel_size": 1},
                     {"name": "conv_2", "kernel_size": 1})


MONAI_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "UNet": lambda d: monai_nets.UNet(spatial_dims=d, in_channels=1, out_channels=2, channels=(8, 16, 32, 64),
                                      strides=(2, 2, 2), num_res_units=2),
    "BasicUNet": lambda d: monai_nets.BasicUNet(spatial_dims=d, in_channels=1, out_channels=2,
                                                features=(8, 8, 16, 32, 64, 8)),
    "BasicUNetPlusPlus": lambda d: monai_nets.BasicUNetPlusPlus(spatial_dims=d, in_channels=1, out_channels=2,
                                                                features=(8, 8, 16, 32, 64, 8), deep_supervision=True),
    "AttentionUnet": lambda d: monai_nets.AttentionUnet(spatial_dims=d, in_channels=1, out_channels=2,
                                                        channels=(8, 16, 32, 64), strides=(2, 2, 2)),
    "SegResNet": lambda d: monai_nets.SegResNet(spatial_dims=d, init_filters=8, in_channels=1, out_channels=2,
                                                blocks_down=(1, 2, 2), blocks_up=(1, 1)),
    "DynUNet": lambda d: monai_nets.DynUNet(spatial_dims=d, in_channels=1, out_channels=2, kernel_size=[3, 3, 3, 3],
                                            strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2],
                                            filters=[8, 16, 32, 64], norm_name="instance", deep_supervision=True,
                                            deep_supr_num=1, res_block=True),
    "FlexibleUNet": lambda d: monai_nets.FlexibleUNet(in_channels=1, out_channels=2,
                                                      backbone="efficientnet-b0" if d == 2 else "resnet10",
                                                      pretrained=False, spatial_dims=d,
                                                      decoder_channels=(64, 32, 16, 8, 8)),
    "VNet": lambda d: monai_nets.VNet(spatial_dims=d, in_channels=1, out_channels=2),
    "HighResNet": lambda d: monai_nets.HighResNet(spatial_dims=d, in_channels=1, out_channels=2,
                                                  layer_params=HIGHRESNET_LAYERS),
    # a type-A shortcut builds its pooling layer in the forward
    "ResNetA": lambda d: monai_nets.ResNet(block="bottleneck", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64],
                                           spatial_dims=d, n_input_channels=1, num_classes=3, shortcut_type="A"),
    # deep supervision heads run in both modes, returned in training only
    "SegResNetDS": lambda d: monai_nets.SegResNetDS(spatial_dims=d, init_filters=8, in_channels=1, out_channels=2,
                                                    blocks_down=(1, 2, 2), dsdepth=2),
    "MedNeXt": lambda d: monai_nets.MedNeXt(spatial_dims=d, init_filters=8, in_channels=1, out_channels=2,
                                            blocks_down=(1, 1, 1, 1), blocks_bottleneck=1, blocks_up=(1, 1, 1, 1),
                                            kernel_size=3, deep_supervision=True),
    "DenseNet121": lambda d: monai_nets.DenseNet121(spatial_dims=d, in_channels=1, out_channels=2, init_features=16,
                                                    growth_rate=8),
}
MONAI = [f"{net}_{d}d" for net in MONAI_BUILDERS for d in (2, 3)]  # inputs 1x1x64x64 and 1x1x32x32x32


def build_monai(name: str) -> tuple[nn.Module, int]:
    net, dims = name.rsplit("_", 1)
    return MONAI_BUILDERS[net](int(dims[0])), 1


# -- the check -----------------------------------------------------------------------------------------

# seconds per case before the guard fails it (the slowest take about 30 s with -n 2 on 2 busy cores)
TIMEOUT = 120

# the default (fast) run, each well under a second: timm's BatchNormAct2d and Linear subclasses with
# functional forwards, a star (product) block, MONAI residual units with skip concatenation, and a
# train-only deep-supervision output with instance norm
SMOKE = ["resnet10t", "starnet_s050", "UNet_2d", "DynUNet_2d"]


def build(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model (eval mode, seeded random weights) and example inputs of batch 1 and 2."""
    torch.manual_seed(0)
    if name in MONAI:
        model, channels = build_monai(name)
        dims = int(name.rsplit("_", 1)[1][0])
        side = 64 if dims == 2 else 32
    else:
        model, channels = build_timm(name)
        dims, side = 2, TIMM_SIDE.get(name, 64)
    shape = (channels,) + (side,) * dims
    return model.eval(), torch.randn(1, *shape), torch.randn(2, *shape)


def _close(analytic: int, reference: int, what: str) -> None:
    assert abs(analytic - reference) <= 0.01 * max(reference, 1), f"{what}: analytic {analytic} vs fvcore {reference}"


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check(name: str, seed: int = 0, build: Callable = build) -> list:
    """The whole check for one model (``build(name)`` gives it and its inputs); returns its fallbacks."""
    with time_limit(TIMEOUT, name):
        model, x1, x2 = build(name)
        graph = prunekit.build_graph(model, x1)

        flops, _ = fvcore_counts(model, x1)
        counted = prunekit.count_flops_params(model, x1, graph=graph)
        _close(counted["flops"], flops, f"{name} FLOPs")
        assert counted["params"] == _params(model)

        units = pick_units(graph, 0.5, seed)
        if not units and name in NOTHING_PRUNABLE:
            return list(graph.fallbacks)
        assert units, f"{name}: nothing prunable"
        mask = graph.removal_mask(units)
        with torch.no_grad():
            expected = model(x2)
        pruned = apply_removal(model, graph, mask).eval()
        assert_attributes_consistent(pruned)
        with torch.no_grad():
            assert_same_structure(pruned(x2), expected)
        assert_train_mode_runs(model, pruned, x2)
        pruned.eval()

        costs = CostModel(model, graph)
        flops_after, _ = fvcore_counts(pruned, x1)
        _close(costs.flops(mask), flops_after, f"{name} pruned FLOPs")
        assert costs.params(mask) == _params(pruned)
        assert costs.flops(mask) < costs.flops()
        counted_after = prunekit.count_flops_params(pruned, x1)
        _close(counted_after["flops"], flops_after, f"{name} pruned FLOPs, counted afresh")
        assert counted_after["params"] == _params(pruned)

        if name in NOT_ZERO_PRESERVING:
            return list(graph.fallbacks)
        # in float64, so that the summation order of the smaller convs cannot hide a wrong cut
        assert_exact(copy.deepcopy(model).double(), graph, x1.double(), pick_units(graph, 1 / 3, seed),
                     rtol=1e-9, atol=1e-10)
        return list(graph.fallbacks)


def _record(record_property, name: str, fallbacks: list) -> None:
    record_property("fallbacks", [f.describe() for f in fallbacks])
    for f in fallbacks:
        print(f"{name}: {f.describe()}")


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM)
def test_timm(name, record_property):
    _record(record_property, name, check(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", MONAI)
def test_monai(name, record_property):
    _record(record_property, name, check(name))


# timm encoders as segmentation libraries use them (features_only: a list of feature maps), of each kind:
# forward hooks kept with their handles (xception41), a rewritten forward (resnet18), per-stage blocks
# (efficientnet_b0), HRNet's own feature wrapper
FEATURES_ONLY = ["xception41", "resnet18", "efficientnet_b0", "hrnet_w18_small"]


def build_features_only(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, features_only=True).eval()
    return model, torch.randn(1, 3, 64, 64), torch.randn(2, 3, 64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", FEATURES_ONLY)
def test_timm_features_only(name, record_property):
    _record(record_property, name, check(name, build=build_features_only))


@pytest.mark.parametrize("name", SMOKE)
def test_real_models_smoke(name, record_property):
    _record(record_property, name, check(name))


def test_real_model_lists():
    assert len(TIMM) >= 60 and len(set(TIMM)) == len(TIMM)
    assert not set(TIMM) - set(timm.list_models()), "a listed timm model no longer exists"
    assert set(SMOKE) <= set(TIMM + MONAI)
    assert set(TIMM_SIDE) | set(TIMM_KWARGS) | set(NOTHING_PRUNABLE) | set(NOT_ZERO_PRESERVING) <= set(TIMM)


# the whole loop, end to end, on models whose layers hide their widths behind properties (timm's
# ConvNormAct), re-parameterisable blocks, concatenation and MONAI's residual units
END_TO_END = ["regnetx_002", "repvgg_a0", "rexnet_100", "ese_vovnet19b_dw", "UNet_2d", "SegResNet_2d"]


@pytest.mark.slow
@pytest.mark.parametrize("name", END_TO_END)
def test_prune_end_to_end(name, tmp_path):
    with time_limit(TIMEOUT, name):
        model, x1, x2 = build(name)
        before = copy.deepcopy(model.state_dict())
        config = {"targets": {"flops": 0.6}, "importance": {"method": "l1"}}
        result = prunekit.prune(model, x1, config, run_dir=tmp_path / "run", progress=False)
        assert result.targets_met, result.message
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model
        assert prunekit.count_flops_params(result.model, x1)["flops"] <= 0.6 * result.original["flops"] + 1
        with torch.no_grad():
            assert_same_structure(result.model(x2), model(x2))
            again = prunekit.load_pruned(tmp_path / "run", model=build(name)[0])
            torch.testing.assert_close(again(x2), result.model(x2), rtol=0, atol=0)
