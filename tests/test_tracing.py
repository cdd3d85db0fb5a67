"""The concrete tracer: Python control flow is answered from real values, nothing is refused.

What the exactness battery (tests/archs.py) cannot say by comparing outputs:
which branches were specialised and reported, which modules fell back to
opaque leaves and where, that channel counts steering Python stay, that
train-only code is found however it reads ``self.training``, and that
depthwise and grouped convolutions are listed and cut as documented.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from archs import ARCHS, ChannelCountBranch, DataBranchTop, build, cbr, example
from helpers import assert_exact, assert_train_mode_runs, pick_units
from prunekit.config import Limits
from prunekit.costs import CostModel
from prunekit.graphs.trace import ExampleInputError, trace
from prunekit.planner import Planner
from prunekit.surgery import apply_removal


def _graph(name):
    model, arch = build(name)
    x = example(arch)
    return model, x, prunekit.build_graph(model, x, leaf_modules=arch.leaf_modules)


@pytest.mark.parametrize("name", ["shape_checks", "size_loops", "default_args", "dict_in_out"])
def test_control_flow_on_sizes_is_followed_without_fallback(name):
    model, x, graph = _graph(name)
    assert graph.fallbacks == [] and graph.notes == []
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    prunable = graph.prunable_channels()
    assert [c for c in convs if c in prunable], "some conv must stay prunable"
    # every inner conv's output is prunable: only model inputs and outputs are pinned
    for name_, units in graph.producers.items():
        if graph.pinned[units].any():
            assert all(r in ("model output", "model input") or r.startswith("model ") for r in
                       {graph.unit_pin[int(u)].split(" (")[0] for u in units if graph.pinned[u]}), name_


def test_spatial_size_checks_do_not_pin_channels():
    model, x, graph = _graph("shape_checks")
    assert not graph.pinned[graph.producers["enc.0"]].any()
    assert not graph.pinned[graph.producers["down.0"]].any()


def test_a_branch_on_data_at_the_top_level_is_resolved_and_said():
    model, x, graph = _graph("data_branch_top")
    assert graph.fallbacks == []
    assert len(graph.notes) == 2 and all("tensor data" in n for n in graph.notes)
    line = inspect.getsource(DataBranchTop.forward).splitlines()
    assert any(f"archs.py:{inspect.getsourcelines(DataBranchTop.forward)[1] + i}" in graph.notes[0]
               for i, text in enumerate(line) if "isnan" in text)
    assert not graph.pinned[graph.producers["b.0"]].any()


def test_a_channel_count_that_steers_python_is_pinned():
    model, x, graph = _graph("channel_count_branch")
    reasons = {graph.unit_pin[int(u)] for u in graph.producers["b.0"]}
    assert reasons and all("decides a branch" in r for r in reasons)
    assert not graph.pinned[graph.producers["a.0"]].any()  # its count steers nothing
    pruned = assert_exact(model, graph, x, graph.units_for({"a.0": [1, 2]}))
    assert pruned.wide.in_channels == 6  # the branch the example took is still the one taken
    assert isinstance(ChannelCountBranch(), nn.Module)


class _ScriptedGate(nn.Module):
    """Calls a TorchScript function, which cannot take torch.fx proxies."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return _scaled(self.conv(x))


@torch.jit.script
def _scaled(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5


class _WithScripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.gate = _ScriptedGate()
        self.b = cbr(8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.b(self.gate(self.a(x))))


def test_untraceable_code_falls_back_to_the_smallest_module():
    torch.manual_seed(0)
    model = _WithScripted().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    (fallback,) = graph.fallbacks
    assert fallback.module == "gate" and fallback.type == "_ScriptedGate"
    line = inspect.getsourcelines(_ScriptedGate.forward)[1] + 1
    assert fallback.location == f"tests/test_tracing.py:{line}"
    assert graph.fallback_cost(fallback) == 16
    assert "could not be traced" in graph.unit_pin[int(graph.producers["a.0"][0])]
    pruned = assert_exact(model, graph, x, graph.units_for({"b.0": [0, 3]}))
    assert pruned.b[0].out_channels == 6 and pruned.gate.conv.in_channels == 8


class _ScriptedTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(_scaled(self.a(x)))


def test_a_model_whose_own_forward_cannot_be_traced_is_one_opaque_op():
    model = _ScriptedTop().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    assert [f.module for f in graph.fallbacks] == [""]
    assert graph.prunable_channels() == {}
    costs = prunekit.count_flops_params(model, x, graph=graph)
    assert costs["params"] == sum(p.numel() for p in model.parameters())
    assert costs["flops"] > 0


def test_a_model_that_does_not_run_is_the_only_error():
    model = _WithScripted().eval()
    with pytest.raises(ExampleInputError, match="fails on the example input"):
        prunekit.build_graph(model, torch.randn(1, 5, 8, 8))


def test_the_callers_model_is_untouched_by_tracing():
    model, arch = build("train_aux")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = set(vars(model))
    prunekit.build_graph(model, example(arch))
    assert set(vars(model)) == attrs and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics included (train-mode trace)


# -- train-only code, however it reads the flag ----------------------------------------


def _is_training(module: nn.Module) -> bool:
    return module.training


class _HiddenFlag(nn.Module):
    """The train-only head hides behind a variable and a helper function: no `if self.training`."""

    def __init__(self, via_helper: bool):
        super().__init__()
        self.via_helper = via_helper
        self.a = cbr(3, 8)
        self.aux = nn.Conv2d(8, 2, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = self.a(x)
        mode = _is_training(self) if self.via_helper else self.__dict__["training"]
        outputs = [self.head(f)]
        if mode:
            outputs.append(self.aux(f))
        return tuple(outputs)


@pytest.mark.parametrize("via_helper", [True, False])
def test_train_only_branches_are_found_without_reading_source(via_helper):
    torch.manual_seed(0)
    model = _HiddenFlag(via_helper).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    if via_helper:  # a read of .training through the attribute is seen wherever it happens
        assert len(graph.fx_graphs) == 2 and "aux" in graph.producers
        pruned = apply_removal(model, graph, graph.removal_mask(graph.units_for({"a.0": [0, 5]})))
        out = pruned.train()(torch.randn(2, 3, 8, 8))
        assert len(out) == 2 and pruned.aux.in_channels == 6
    else:  # reading the instance dict bypasses every attribute hook: only the eval graph exists
        assert len(graph.fx_graphs) == 1


def test_models_without_training_reads_are_traced_once():
    _, _, graph = _graph("plain_chain")
    assert len(graph.fx_graphs) == 1


# -- depthwise and grouped convolutions ------------------------------------------------


class _Separable(nn.Module):
    def __init__(self, groups: int = 4):
        super().__init__()
        self.pw1 = cbr(3, 8, k=1)
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=groups), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.head(self.grouped(self.dw(self.pw1(x))))


def test_depthwise_convs_are_producers_of_their_channels():
    torch.manual_seed(0)
    model = _Separable().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    assert "dw.0" in graph.prunable_channels()
    assert graph.coupled_channels("dw.0", 3) == graph.coupled_channels("pw1.0", 3)
    assert set(graph.coupled_channels("pw1.0", 3)) == {"pw1.0", "dw.0"}
    assert graph.producer_kind["dw.0"] == "depthwise"


def test_a_limit_that_names_a_depthwise_conv_applies_to_its_units():
    torch.manual_seed(0)
    model = _Separable(groups=1).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    widths = {n: len(u) for n, u in graph.producers.items()}
    scores = np.arange(graph.num_units, dtype=float)
    for limits, allowed in ((Limits(default=0.75, layers={"dw.*": 0}), 0), (Limits(default=0.75), 6)):
        chosen = Planner(graph, CostModel(model, graph), limits, widths).sequence(scores)
        touched = np.isin(graph.producers["dw.0"], chosen).sum()
        assert touched == allowed


def test_grouped_convs_keep_their_groups_and_lose_channel_j_of_each():
    torch.manual_seed(0)
    model = _Separable(groups=4).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    # grouped.0 reads 2 channels per group: channel j of every group is one unit (4 channels)
    members = graph.coupled_channels("dw.0", 1)
    assert members["dw.0"] == [1, 3, 5, 7]
    assert graph.coupled_channels("grouped.0", 0)["grouped.0"] == [0, 3, 6, 9]
    group = next(g for g in graph.groups if "grouped.0" in g.producers)
    assert group.granularity == ("channel j of each of the 4 groups of 'grouped.0'",)
    units = graph.units_for({"dw.0": [1], "grouped.0": [0, 1]})
    pruned = assert_exact(model, graph, x, units)
    conv = pruned.grouped[0]
    assert (conv.groups, conv.in_channels, conv.out_channels) == (4, 4, 4)
    assert conv.weight.shape == (4, 1, 3, 3)
    assert_train_mode_runs(model, pruned, (torch.randn(2, 3, 8, 8),))


def test_depthwise_with_a_multiplier_loses_whole_groups():
    torch.manual_seed(0)
    model = nn.Sequential(cbr(3, 4, k=1), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    assert graph.coupled_channels("0.0", 1) == {"0.0": [1], "1": [2, 3]}
    pruned = assert_exact(model, graph, x, graph.units_for({"0.0": [1]}))
    assert (pruned[1].groups, pruned[1].in_channels, pruned[1].out_channels) == (3, 3, 6)


# -- the trace itself -------------------------------------------------------------------


def test_the_trace_keeps_size_provenance_and_values():
    model, arch = build("shape_checks")
    traced = trace(model, example(arch))
    assert traced.meta  # shapes only: no data was computed
    sizes = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is getattr]
    assert sizes and all(n.args[1] == "shape" for n in sizes)
    placeholder = next(iter(traced.graph.nodes))
    assert traced.values[placeholder].shape == (1, 3, 16, 16)


def clamp_window(window: list[int], size: list[int]) -> list[int]:
    """Edits the list it is given, as torchvision's swin3d clamps its window sizes."""
    for i in range(len(window)):
        if size[i] <= window[i]:
            window[i] = size[i]
    return window


torch.fx.wrap("clamp_window")


def test_a_wrapped_function_may_edit_the_list_it_is_given():
    """Registered with torch.fx.wrap, the function is one recorded op; run on the real values it gets
    the lists the model's code built, not immutable copies (it was a fallback that pinned the block)."""

    class Windowed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.body, self.head = cbr(3, 8), nn.Sequential(cbr(8, 16), cbr(16, 8)), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x = self.stem(x)
            window = clamp_window([7, 7], list(x.shape[2:]))
            return self.head(x + self.body(x)[:, :, :window[0], :window[1]])

    model = Windowed().eval()
    x = torch.randn(1, 3, 5, 5)
    graph = prunekit.build_graph(model, x)
    assert graph.fallbacks == []
    assert "body.0.0" in graph.prunable_channels()
    assert_exact(model, graph, x, graph.units_for({"body.0.0": [1, 4, 9]}))


def test_ops_without_meta_kernels_use_real_values():
    class Nonzero(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = cbr(3, 4)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            f = self.a(x)
            k = int(torch.count_nonzero(f > -1e9).item() > 0)  # data at the top level
            return self.head(f) * k

    model = Nonzero().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    assert graph.fallbacks == [] and graph.notes
    assert "a.0" in graph.prunable_channels()
    assert_exact(model, graph, x, graph.units_for({"a.0": [1]}))


def test_battery_has_control_flow_models():
    for name in ("shape_checks", "size_loops", "default_args", "dict_in_out", "data_branch_top",
                 "data_branch_module", "channel_count_branch"):
        assert name in ARCHS
    model, x, graph = _graph("data_branch_module")
    assert [f.module for f in graph.fallbacks] == ["gate"]
    pruned = apply_removal(model, graph, graph.removal_mask(pick_units(graph, 0.5)))
    assert pruned(*x).shape == model(*x).shape
    assert F.relu is not None


@pytest.mark.parametrize("layer, x", [
    (nn.Conv2d(3, 8, 3), torch.randn(1, 4, 8, 8)),
    (nn.ConvTranspose2d(3, 8, 2, stride=2), torch.randn(1, 5, 8, 8)),
    (nn.Linear(6, 4), torch.randn(2, 5)),
])
def test_shape_shortcuts_still_refuse_inputs_that_do_not_fit(layer, x):
    with pytest.raises(ExampleInputError):
        prunekit.build_graph(nn.Sequential(layer).eval(), x)


@pytest.mark.parametrize("layer, x", [
    (nn.Conv2d(4, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)), torch.randn(1, 4, 9, 11)),
    (nn.Conv2d(4, 8, 3, groups=4, padding="same"), torch.randn(1, 4, 9, 11)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), torch.randn(1, 4, 5, 7)),
    (nn.Conv3d(2, 3, 3, stride=2), torch.randn(1, 2, 7, 8, 9)),
    (nn.Linear(5, 3), torch.randn(2, 4, 5)),
    (nn.AdaptiveAvgPool2d((3, None)), torch.randn(1, 4, 9, 11)),
    (nn.AdaptiveMaxPool1d(2), torch.randn(1, 4, 9)),
])
def test_shape_shortcuts_match_the_ops(layer, x):
    traced = trace(nn.Sequential(layer).eval(), (x,))
    node = next(n for n in traced.graph.nodes if n.op == "call_module")
    assert tuple(traced.values[node].shape) == tuple(layer(x).shape)


def test_prune_warns_in_one_line_and_reports_the_fallback(tmp_path):
    from archs import WithUntraceable
    from prunekit.errors import PrunekitWarning

    torch.manual_seed(0)
    model, x = WithUntraceable().eval(), torch.randn(1, 3, 16, 16)
    config = {"input_shape": [1, 3, 16, 16], "targets": {"flops": 0.8}, "importance": {"method": "l1"},
              "schedule": {"steps": 1, "finetune": None, "final_finetune": None}}
    with pytest.warns(PrunekitWarning) as caught:
        prunekit.prune(model, x, config, run_dir=tmp_path / "run", progress=False)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, PrunekitWarning)]
    assert "'gate' (DataDependent)" in message and "archs.py:" in message and "16 channels pinned" in message
    assert "\n" not in message
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Tracing" in report and "`gate` (DataDependent) traced as an opaque leaf" in report
