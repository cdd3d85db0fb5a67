"""The channel graph and the surgery are exact on a battery of small architectures.

For every architecture in ``archs.ARCHS`` (which together use every op the
channel rules know, plus the zoo models): a seeded random third of the
prunable units is zeroed at its producers and cut out; the output must not
change, the kept weights must be the original's slices and every module's
size attributes must match its tensors. The pruned model must also run in
train mode. Further tests cover pins and their reasons, coupling, errors,
and that the caller's model is never modified.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from archs import ARCHS, DataDependent, WithUntraceable, build, example
from helpers import (
    as_tuple,
    assert_attributes_consistent,
    assert_exact,
    assert_train_mode_runs,
    pick_units,
    zero_units,
)
from prunekit.graphs.trace import ExampleInputError
from prunekit.surgery import apply_removal

NAMES = sorted(ARCHS)


def _graph(name: str, seed: int = 0):
    model, arch = build(name, seed)
    x = example(arch)
    return model, arch, x, prunekit.build_graph(model, x, leaf_modules=arch.leaf_modules)


@pytest.mark.parametrize("name", NAMES)
def test_exact_removal(name):
    model, arch, x, graph = _graph(name)
    assert (~graph.pinned).any(), f"{name}: nothing prunable, the battery entry tests nothing"
    units = pick_units(graph, seed=0)
    pruned = assert_exact(model, graph, x, units)
    assert_train_mode_runs(model, pruned, example(arch, batch=2))


@pytest.mark.parametrize("name", NAMES)
def test_exact_removal_of_most_units(name):
    """Two thirds of the units, another seed: layers get thin, coupled groups go whole."""
    model, arch, x, graph = _graph(name, seed=1)
    assert_exact(model, graph, x, pick_units(graph, fraction=2 / 3, seed=1))


@pytest.mark.parametrize("name", NAMES)
def test_graph_is_consistent_with_the_model(name):
    model, arch, x, graph = _graph(name)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for (tensor, dim), units in graph.slices.items():
        assert tensor in tensors, f"slice of an unknown tensor {tensor!r}"
        assert len(units) == tensors[tensor].shape[dim], f"{tensor} dim {dim}: {len(units)} units"
        assert units.max() < graph.num_units
    for pname, units in graph.producers.items():
        assert units.ndim == 1 and len(units) > 0, pname
    for (mname, role), units in graph.widths.items():
        m = model.get_submodule(mname)
        attr = {"in": ("in_channels", "in_features", "num_features", "num_channels", "num_parameters"),
                "out": ("out_channels", "out_features")}[role]
        width = next(getattr(m, a) for a in attr if hasattr(m, a))
        if not (isinstance(m, nn.PReLU) and m.num_parameters == 1):
            assert width == len(units), f"{mname}.{role}: {width} != {len(units)}"
    # units: pinned flags and groups partition them
    seen = [u for g in graph.groups for u in g.units]
    assert len(seen) == len(set(seen))
    assert set(seen) == set(np.unique(np.concatenate(list(graph.producers.values()))).tolist())
    for g in graph.groups:
        assert g.size == len(g.units)
        assert set(g.prunable_units) == {u for u in g.units if not graph.pinned[u]}
        assert g.prunable == bool(g.prunable_units)
        if len(g.prunable_units) < g.size:
            assert g.reasons and all(r.strip() for r in g.reasons), f"{g.producers}: pinned without a reason"
    # every prunable channel is a member of its own unit and of nothing else
    for pname, indices in graph.prunable_channels().items():
        for i in indices:
            members = graph.coupled_channels(pname, i)
            assert i in members[pname]
            unit = graph.unit_of(pname, i)
            assert members == graph.members(unit)
            assert graph.units_for({pname: [i]}).tolist() == [unit]


@pytest.mark.parametrize("name", NAMES)
def test_pins_are_reported_with_reasons(name):
    model, arch, x, graph = _graph(name)
    reasons = [p.reason for p in graph.pins]
    assert graph.pins, "model inputs and outputs are always pinned"
    assert all(p.channels > 0 and p.reason and p.source for p in graph.pins)
    assert any("model input" in r for r in reasons)
    for expected in arch.pins:
        assert any(expected in r for r in reasons), f"no pin mentions {expected!r}: {sorted(set(reasons))}"


@pytest.mark.parametrize("name", ["zoo_resnet_small", "functional", "shared", "split_chunk", "train_aux"])
def test_producer_outputs_are_exact_zeros(name):
    """The zeroing helper really silences the removed channels at every producer (the check is not vacuous)."""
    model, arch, x, graph = _graph(name)
    units = pick_units(graph)
    mask = graph.removal_mask(units)
    zeroed = zero_units(copy.deepcopy(model), graph, units)
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for pname in graph.producers:
        try:
            m = zeroed.get_submodule(pname)
        except AttributeError:
            continue  # functional producer
        hooks.append(m.register_forward_hook(lambda mod, i, o, pname=pname: seen.__setitem__(pname, o)))
    with torch.no_grad():
        zeroed(*x)
    for h in hooks:
        h.remove()
    for pname, out in seen.items():
        removed = np.flatnonzero(mask[graph.producers[pname]])
        dim = out.dim() - 1 if isinstance(zeroed.get_submodule(pname), nn.Linear) else 1
        if removed.size:
            assert out.index_select(dim, torch.as_tensor(removed)).abs().max() == 0, pname
        kept = np.flatnonzero(~mask[graph.producers[pname]])
        assert out.index_select(dim, torch.as_tensor(kept)).abs().max() > 0, pname


@pytest.mark.parametrize("name", ["zoo_unet_transpose", "se_resnet", "functional", "train_aux"])
def test_callers_model_is_not_modified(name):
    model, arch, x, graph = _graph(name)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    modes = [m.training for m in model.modules()]
    attrs = [(type(m), dict(vars(m))) for m in model.modules()]
    keys = [set(vars(m)) for m in model.modules()]
    graph = prunekit.build_graph(model, x, leaf_modules=arch.leaf_modules)
    chosen = {p: idx[: max(1, len(idx) // 2)] for p, idx in graph.prunable_channels().items()}
    try:
        smaller = prunekit.remove_channels(model, x, chosen, graph=graph)
    except prunekit.PrunekitError:  # a selection that would empty a layer: take one channel
        first = next(iter(chosen))
        smaller = prunekit.remove_channels(model, x, {first: chosen[first][:1]}, graph=graph)
    assert smaller is not model
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for k, v in after.items():
        assert id(v) == ids[k], f"{k} was replaced"
        assert torch.equal(v.detach(), before[k]), f"{k} was modified"
    assert [m.training for m in model.modules()] == modes
    assert [set(vars(m)) for m in model.modules()] == keys, "attributes were added or removed"
    for (t, d), m in zip(attrs, model.modules()):
        assert type(m) is t
        for key in ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features",
                    "num_groups", "num_channels", "num_parameters"):
            if key in d:
                assert getattr(m, key) == d[key], key
    assert sum(p.numel() for p in smaller.parameters()) < sum(p.numel() for p in model.parameters())


def test_remove_channels_takes_coupled_channels_along():
    model, arch, x, graph = _graph("zoo_resnet_small")
    members = graph.coupled_channels("layer1.0.conv2", 1)
    # the identity residuals couple the stem with every conv2 of the first stage
    assert members == {"stem.0": [1], "layer1.0.conv2": [1], "layer1.1.conv2": [1]}
    smaller = prunekit.remove_channels(model, x, {"layer1.0.conv2": [1]}, graph=graph)
    for name in members:
        assert smaller.get_submodule(name).out_channels == model.get_submodule(name).out_channels - 1
    assert smaller.layer1[0].conv1.in_channels == 3
    assert smaller.layer2[0].downsample[0].in_channels == 3
    assert smaller.layer1[0].bn2.num_features == 3
    # removal through a different member of the same unit gives the same model
    again = prunekit.remove_channels(model, x, {"stem.0": [1, 1]}, graph=graph)
    for (k, a), b in zip(smaller.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    # and it is exact once the channel is silent
    assert_exact(model, graph, x, graph.units_for({"stem.0": [1]}))


def test_chunks_couple_and_fixed_splits_pin():
    model, arch, x, graph = _graph("split_chunk")
    b = graph.coupled_channels("b", 2)
    assert b == {"b": [2, 8]}  # the two halves of chunk(2) lose the same slot
    g = graph.coupled_channels("g", 0)
    assert g == {"g": [0, 2, 4]}  # chunk(3), and the sum of the pieces
    for pinned in ("d", "e", "f"):
        with pytest.raises(prunekit.PinnedChannelError):
            graph.coupled_channels(pinned, 0)


def test_pinned_channel_raises_with_its_reason():
    model, arch, x, graph = _graph("softmax")
    assert any("mixes channels" in p.reason and p.source == "mid" for p in graph.pins)
    with pytest.raises(prunekit.PinnedChannelError, match="mixes channels"):
        graph.coupled_channels("mid", 0)
    with pytest.raises(prunekit.PinnedChannelError, match="cannot be removed"):
        prunekit.remove_channels(model, x, {"mid": [3]}, graph=graph)
    assert issubclass(prunekit.PinnedChannelError, prunekit.PrunekitError)
    # and the unknown producer / index errors are user errors, with a hint
    with pytest.raises(prunekit.PrunekitError, match="did you mean 'mid'"):
        graph.coupled_channels("mdi", 0)
    with pytest.raises(prunekit.PrunekitError, match="out of range"):
        graph.coupled_channels("q", 99)


def test_norm_pins():
    model, arch, x, graph = _graph("norms")
    for name, why in (("c2", "one group"), ("c7", "normalises over channels"), ("c8", "normalises over channels")):
        with pytest.raises(prunekit.PinnedChannelError, match=why):
            graph.coupled_channels(name, 0)
    for name in ("c3", "c4", "c5", "c6"):
        assert graph.coupled_channels(name, 0) == {name: [0]}
    assert graph.coupled_channels("c1", 0) == {"c1": [0, 1]}  # GroupNorm(4, 8): groups of two


def test_shared_module_couples_both_callers():
    model, arch, x, graph = _graph("shared")
    assert graph.coupled_channels("stem_a.0", 3) == {"stem_a.0": [3], "stem_b.0": [3]}
    assert graph.coupled_channels("shared", 0) == {"shared": [0]}
    assert graph.coupled_channels("block.0", 0) == {"block.0": [0]}  # block(a) + block(b): one producer


def test_train_only_branch_is_in_the_graph():
    model, arch, x, graph = _graph("train_aux")
    assert len(graph.fx_graphs) == 2
    assert "aux.conv" in graph.producers and "aux.fc" in graph.producers
    assert not graph.pinned[graph.producers["aux.conv"]].any()
    units = graph.units_for({"aux.conv": [0, 1], "b.0": [2]})
    pruned = assert_exact(model, graph, x, units)
    assert pruned.aux.conv.out_channels == 4 and pruned.aux.fc.in_features == 16
    out, aux = pruned.train()(*example(arch, batch=2))
    assert out.shape == (2, 3) and aux.shape == (2, 3)


def test_a_module_that_branches_on_data_becomes_an_opaque_leaf():
    """No error: the smallest module whose code branches on tensor data is traced as one op,
    named with the statement that branches; the rest of the model is prunable and exact."""
    torch.manual_seed(0)
    model = WithUntraceable().eval()
    x = torch.randn(1, 3, 16, 16)
    graph = prunekit.build_graph(model, x)
    assert [(f.module, f.type) for f in graph.fallbacks] == [("gate", "DataDependent")]
    fallback = graph.fallbacks[0]
    assert "tensor data" in fallback.reason
    line = inspect.getsourcelines(DataDependent.forward)[1] + 1  # the `if x.sum() > 0:` line
    assert fallback.location == f"tests/archs.py:{line}"
    assert graph.fallback_cost(fallback) == 8 + 8  # its input and its output channels
    _assert_gate_is_opaque(model, graph, x)
    # naming the leaf up front gives the same graph and no fallback
    named = prunekit.build_graph(model, x, leaf_modules=["gate"])
    assert named.fallbacks == [] and named.num_units == graph.num_units
    _assert_gate_is_opaque(model, named, x)


def _assert_gate_is_opaque(model, graph, x):
    with pytest.raises(prunekit.PinnedChannelError):
        graph.coupled_channels("a.0", 0)
    assert "gate.conv" not in graph.producers
    assert graph.coupled_channels("b.0", 0) == {"b.0": [0]}
    pruned = assert_exact(model, graph, x, graph.units_for({"b.0": [0, 5]}))
    assert pruned.gate.conv.weight.shape == model.gate.conv.weight.shape


def test_example_input_that_does_not_fit():
    model, arch, x, graph = _graph("plain_chain")
    with pytest.raises(ExampleInputError, match="fails on the example input"):
        prunekit.build_graph(model, torch.randn(1, 5, 16, 16))
    assert issubclass(ExampleInputError, prunekit.PrunekitError)


def test_removal_that_empties_a_layer_is_refused():
    model, arch, x, graph = _graph("plain_chain")
    with pytest.raises(prunekit.PrunekitError, match="no output channels|no input channels"):
        prunekit.remove_channels(model, x, {"c2": list(range(6))}, graph=graph)


@pytest.mark.parametrize("name", ["zoo_unet_bilinear", "se_resnet", "separable2d", "split_chunk", "functional"])
def test_pruning_twice(name):
    """A pruned model is an ordinary model: it traces again and prunes exactly again."""
    model, arch, x, graph = _graph(name)
    once = apply_removal(model, graph, graph.removal_mask(pick_units(graph, seed=3))).eval()
    assert_attributes_consistent(once)
    graph2 = prunekit.build_graph(once, x, leaf_modules=arch.leaf_modules)
    assert int((~graph2.pinned).sum()) < int((~graph.pinned).sum())
    twice = assert_exact(once, graph2, x, pick_units(graph2, seed=4))
    assert_train_mode_runs(once, twice, example(arch, batch=2))


def test_battery_uses_every_op_family():
    """The battery is meant to cover every op kind; fail loudly if an entry is dropped."""
    kinds: set[type] = set()
    for name in NAMES:
        model, _ = build(name)
        kinds |= {type(m) for m in model.modules()}
    for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
              nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm2d, nn.InstanceNorm3d,
              nn.LayerNorm, nn.Linear, nn.PReLU, nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish, nn.Tanh,
              nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Upsample, nn.Identity,
              nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Softmax, nn.Flatten):
        assert t in kinds, f"no battery model uses {t.__name__}"
    convs = [m for name in NAMES for m in build(name)[0].modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert any(m.groups == m.in_channels == m.out_channels > 1 for m in convs)  # depthwise
    assert any(m.groups == m.in_channels < m.out_channels for m in convs)  # depthwise with a multiplier
    assert any(1 < m.groups < m.in_channels for m in convs if not m.transposed)  # grouped
    assert any(1 < m.groups < m.in_channels for m in convs if m.transposed)  # grouped transposed
    assert any(as_tuple(example(ARCHS[n])) and len(example(ARCHS[n])) > 1 for n in NAMES)  # two inputs
