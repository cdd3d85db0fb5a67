"""Regression tests for channel-graph and surgery bugs, one per bug."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from helpers import assert_exact, assert_train_mode_runs


def _exact(model: nn.Module, x: torch.Tensor, units=None):
    model.eval()
    graph = prunekit.build_graph(model, x)
    pruned = assert_exact(model, graph, x, units)
    assert_train_mode_runs(model, pruned, torch.cat([x, x]))
    return graph


class SizeFromOther(nn.Module):
    """A reshape or expand whose channel count is read from another, uncoupled tensor."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.post = nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = self.a(x)
        n, c, h, w = a.size()
        v = self.fc(F.adaptive_avg_pool2d(self.b(x), 1).flatten(1))
        if self.mode == "view":
            v = v.view(n, c, 1, 1)
        elif self.mode == "shape":
            v = v.reshape(a.shape[0], a.shape[1], 1, 1)
        elif self.mode == "size_dim":
            v = v.view(-1, a.size(1), 1, 1)
        elif self.mode == "view_as":
            v = v.view_as(a[:, :, :1, :1])
        elif self.mode == "whole_shape":
            v = v.view(a[:, :, :1, :1].shape)
        elif self.mode == "expand_as":
            v = v.view(n, -1, 1, 1).expand_as(a)
        elif self.mode == "expand":
            v = v.view(n, -1, 1, 1).expand(n, c, h, w)
        elif self.mode == "arithmetic":
            v = v.view(n, c * 1, 1, 1)
        return self.head(a) + self.post(v)


@pytest.mark.parametrize("mode", ["view", "shape", "size_dim", "view_as", "whole_shape", "expand_as", "expand"])
def test_size_read_from_another_tensor_couples_its_channels(mode):
    """Bug: view/reshape/expand/view_as/expand_as with the channel count of another tensor
    (x.size(1), x.shape[1], view_as(x)) left the two tensors' channels independent, so
    pruning one of them broke the reshape."""
    torch.manual_seed(0)
    model = SizeFromOther(mode)
    graph = _exact(model, torch.randn(1, 3, 8, 8))
    fc, a = graph.producers["fc"], graph.producers["a"]
    assert (fc == a).all(), "fc's channels must follow a's"
    assert not graph.pinned[a].any()


def test_channel_count_from_arithmetic_pins():
    torch.manual_seed(0)
    model = SizeFromOther("arithmetic")
    graph = _exact(model, torch.randn(1, 3, 8, 8))
    assert graph.pinned[graph.producers["fc"]].all()
    assert any("channel count taken from elsewhere" in p.reason for p in graph.pins)


class ChannelCountInCode(nn.Module):
    """A channel count read from one tensor and used, through arithmetic or a factory, for another."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        self.post = nn.Conv2d(8, 4, 1)
        self.f = nn.Conv2d(3, 6, 3, padding=1)  # free, so the exactness check has work
        self.g = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        a = self.a(x)
        n, c, h, w = a.size()
        v = F.relu(self.b(x))
        if self.mode == "arithmetic":
            v = v.mean((2, 3)).view(n, c * 1, 1, 1)
        elif self.mode == "factory":
            v = v + v.new_zeros((n, c, h, w))
        elif self.mode == "slice":
            v = v[:, : c // 2]
            v = torch.cat([v, v], 1)
        return self.head(a) + self.post(v) + self.g(F.relu(self.f(x)))


@pytest.mark.parametrize("mode", ["arithmetic", "factory", "slice"])
def test_channel_count_computed_in_code_pins_its_source(mode):
    """Bug: a channel count read with t.size() and used in arithmetic, a tensor factory or a
    slice pinned the op's inputs but not t, so pruning t changed the count and broke the op."""
    torch.manual_seed(0)
    graph = _exact(ChannelCountInCode(mode), torch.randn(1, 3, 8, 8))
    assert graph.pinned[graph.producers["a"]].all()
    assert graph.pinned[graph.producers["b"]].all()
    assert any("channel count is read by" in p.reason for p in graph.pins)


class FunctionalGroups(nn.Module):
    """Functional ops whose group count is a literal in the forward."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3))
        self.gw = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.3)
        self.tw = nn.Parameter(torch.randn(8, 2, 3, 3) * 0.3)
        self.gn_w = nn.Parameter(torch.rand(8) + 0.5)
        self.gn_b = nn.Parameter(torch.randn(8))
        self.head = nn.Conv2d(8, 2, 1)
        self.f = nn.Conv2d(3, 6, 3, padding=1)  # free, so the exactness check has work
        self.g = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if self.mode == "depthwise":
            y = F.conv2d(y, self.dw, padding=1, groups=8)
        elif self.mode == "grouped":
            y = F.conv2d(y, self.gw, padding=1, groups=2)
        elif self.mode == "transposed":
            y = F.conv_transpose2d(y, self.tw, padding=1, groups=4)
        elif self.mode == "group_norm":
            y = F.group_norm(y, 4, self.gn_w, self.gn_b)
        return self.head(F.relu(y)) + self.g(F.relu(self.f(x)))


@pytest.mark.parametrize("mode", ["depthwise", "grouped", "transposed", "group_norm"])
def test_functional_group_counts_pin(mode):
    """Bug: F.conv2d(..., groups=g) and F.group_norm(x, g, ...) were pruned like their modules,
    but the group count is a literal in the forward, so the pruned model no longer ran."""
    torch.manual_seed(0)
    graph = _exact(FunctionalGroups(mode), torch.randn(1, 3, 8, 8))
    assert graph.pinned[graph.producers["a"]].all()
    assert any("fixed in code" in p.reason for p in graph.pins)


class TiedWeights(nn.Module):
    """Two convolutions sharing one weight tensor (their biases are their own)."""

    def __init__(self, same_module: bool = False):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        if same_module:
            self.c = self.b  # one module under two names
        else:
            self.c = nn.Conv2d(8, 8, 3, padding=1)
            self.c.weight = self.b.weight
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        return self.head(torch.cat([self.b(x), F.relu(self.c(x))], 1))


def test_tied_weights_are_cut_once():
    """Bug: two modules sharing a weight got independent channels, and the shared tensor was
    cut by whichever name came last, so the pruned model failed on a shape mismatch."""
    torch.manual_seed(0)
    graph = _exact(TiedWeights(), torch.randn(1, 3, 8, 8))
    assert (graph.producers["b"] == graph.producers["c"]).all()
    assert not graph.pinned[graph.producers["b"]].any()


def test_one_module_under_two_names_is_not_pinned():
    torch.manual_seed(0)
    graph = _exact(TiedWeights(same_module=True), torch.randn(1, 3, 8, 8))
    assert not graph.pinned[graph.producers["b"]].any()


class DeadBranch(nn.Module):
    """A branch whose value nothing reads: eager runs it, fvcore's traced graph drops it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.unused = nn.Conv2d(8, 8, 3, padding=1)
        self.unused_bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        self.unused_bn(self.unused(x))
        return self.head(x)


def test_costs_skip_values_nothing_reads():
    """Bug: the analytic FLOPs counted convolutions and norms whose output is never used,
    so they disagreed with fvcore (and the report) on models with a dead branch."""
    from prunekit.costs import CostModel, fvcore_counts

    torch.manual_seed(0)
    model = DeadBranch().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    flops, _ = fvcore_counts(model, x)
    assert prunekit.count_flops_params(model, x)["flops"] == flops
    mask = graph.removal_mask(graph.units_for({"a": [0, 1]}))
    pruned = prunekit.remove_channels(model, x, {"a": [0, 1]}, graph=graph)
    assert CostModel(model, graph).flops(mask) == fvcore_counts(pruned, x)[0]
    assert prunekit.count_flops_params(model, x)["params"] == sum(p.numel() for p in model.parameters())


class BatchStatsAndGridSample(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, track_running_stats=False)
        self.bn_plain = nn.BatchNorm2d(8, affine=False, track_running_stats=False)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.c(x)
        if self.mode == "bn":
            y = self.bn(y)
        elif self.mode == "bn_no_affine":
            y = self.bn_plain(y)
        elif self.mode == "functional_bn":
            y = F.batch_norm(y, None, None, training=True)
        elif self.mode == "grid_sample":
            grid = torch.linspace(-1, 1, 6).view(1, 6, 1, 1).expand(1, 6, 6, 2)
            y = F.grid_sample(y, grid, align_corners=False)
        return self.head(F.relu(y))


@pytest.mark.parametrize("mode", ["bn", "bn_no_affine", "functional_bn", "grid_sample"])
def test_costs_of_batch_statistics_and_grid_sample_match_fvcore(mode):
    """Bug: a BatchNorm without running statistics (it uses batch statistics even in eval,
    which fvcore prices like the other norms) and F.grid_sample (4 per output element in
    fvcore) were priced differently by the analytic cost model."""
    from prunekit.costs import CostModel, fvcore_counts

    torch.manual_seed(0)
    model = BatchStatsAndGridSample(mode).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    assert prunekit.count_flops_params(model, x, graph=graph)["flops"] == fvcore_counts(model, x)[0]
    if mode != "grid_sample":  # grid_sample pins its input; the others prune
        pruned = prunekit.remove_channels(model, x, {"c": [1, 4]}, graph=graph)
        mask = graph.removal_mask(graph.units_for({"c": [1, 4]}))
        assert CostModel(model, graph).flops(mask) == fvcore_counts(pruned, x)[0]
        assert_exact(model, graph, x, graph.units_for({"c": [1, 4]}))


class StdConv(nn.Conv2d):
    """Weight standardisation: the weight is computed in the forward."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ComputedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.std = StdConv(8, 8, 3, padding=1)
        self.t = nn.Parameter(torch.randn(8, 4, 2, 2) * 0.3)
        self.lw = nn.Parameter(torch.randn(5, 4) * 0.3)
        self.b = nn.Conv2d(3, 6, 3, padding=1)  # free
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = F.relu(self.std(self.a(x)))
        y = F.conv_transpose2d(y, self.t * 0.5, stride=2)
        z = F.linear(y.mean((2, 3)), self.lw * 1.0)
        return self.head(F.relu(self.b(x))), z


def test_costs_count_convolutions_with_computed_weights():
    """Bug: F.conv2d / F.conv_transpose2d / F.linear whose weight is computed in the forward
    (weight standardisation, a scaled parameter) were priced at zero FLOPs."""
    from prunekit.costs import CostModel, fvcore_counts

    torch.manual_seed(0)
    model = ComputedWeights().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    assert prunekit.count_flops_params(model, x, graph=graph)["flops"] == fvcore_counts(model, x)[0]
    assert graph.pinned[graph.producers["a"]].all()  # the computed weight's channels are not followed
    units = graph.units_for({"b": [0, 3]})
    pruned = assert_exact(model, graph, x, units)
    assert CostModel(model, graph).flops(graph.removal_mask(units)) == fvcore_counts(pruned, x)[0]


class HookedWeights(nn.Module):
    """Old-style weight_norm / spectral_norm: the weight is a plain attribute a hook recomputes."""

    def __init__(self, wrap):
        super().__init__()
        self.a = wrap(nn.Conv2d(3, 8, 3, padding=1))
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = wrap(nn.Linear(8, 4))

    def forward(self, x):
        y = F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_weights_recomputed_by_hooks(wrap):
    """Bug: a conv or linear under old-style weight_norm / spectral_norm had its hook-computed
    weight sliced (KeyError in the cost model and the surgery), and the surgery's deep copy
    failed on the non-leaf weight. Now such layers pin and the rest prunes."""
    from prunekit.costs import CostModel, fvcore_counts
    from prunekit.surgery import apply_removal

    from helpers import assert_close_nested, zero_units

    torch.manual_seed(0)
    model = HookedWeights(getattr(torch.nn.utils, wrap)).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    assert "a" not in graph.producers and "fc" not in graph.producers  # opaque: nothing is sliced
    assert not any(name.startswith(("a.", "fc.")) for name, _ in graph.slices)
    assert any("computed by a hook" in p.reason for p in graph.pins)
    assert prunekit.count_flops_params(model, x, graph=graph)["flops"] == fvcore_counts(model, x)[0]
    units = graph.units_for({"b": [1, 2]})
    zero_units(model, graph, units)  # in place: such a model cannot be deep-copied by torch itself
    expected = model(x).detach()  # with autograd on, as after a training step: the weight is no leaf
    pruned = apply_removal(model, graph, graph.removal_mask(units)).eval()
    with torch.no_grad():
        assert_close_nested(pruned(x), expected)
    assert pruned.b.out_channels == 6 and pruned.c.in_channels == 6
    assert CostModel(model, graph).flops(graph.removal_mask(units)) == fvcore_counts(pruned, x)[0]


class PlainTensorWeights(nn.Module):
    """Functional ops reading tensors that are neither parameters nor buffers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.sobel = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]]).expand(4, 1, 3, 3).clone()  # plain
        self.stats = torch.rand(4) + 0.5  # plain attributes, not buffers
        self.centre = torch.randn(4) * 0.1
        self.proj = torch.randn(3, 4)
        self.b = nn.Conv2d(3, 6, 3, padding=1)  # free
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        edges = F.conv2d(self.a(x), self.sobel, padding=1, groups=4)
        edges = F.batch_norm(edges, self.centre, self.stats, training=False)
        mixed = F.conv2d(edges, torch.ones(3, 4, 1, 1))  # a constant made in the forward
        z = F.linear(mixed.mean((2, 3)), self.proj.t())
        return self.head(F.relu(self.b(x))) * z.sum()


def test_tensors_that_are_not_parameters_are_not_cut():
    """Bug: F.conv2d / F.batch_norm / F.linear reading a plain tensor attribute or a constant made
    in the forward (torch.fx lifts it to '_tensor_constantN') sliced that tensor like a parameter:
    KeyError in the cost model and in the surgery."""
    from prunekit.costs import CostModel, fvcore_counts

    torch.manual_seed(0)
    model = PlainTensorWeights().eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    registered = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert all(name in registered for name, _ in graph.slices)
    assert any("constant of the forward" in p.reason for p in graph.pins)
    assert prunekit.count_flops_params(model, x, graph=graph)["flops"] == fvcore_counts(model, x)[0]
    units = graph.units_for({"b": [0, 3]})
    pruned = assert_exact(model, graph, x, units)
    assert CostModel(model, graph).flops(graph.removal_mask(units)) == fvcore_counts(pruned, x)[0]


def test_train_only_branch_in_an_inherited_forward():
    """Bug: the check for forwards that branch on self.training read only the model's own class
    source, so a subclass inheriting such a forward lost its train-only aux head from the graph
    and the pruned model failed in train mode."""
    from _inherited_forward import InheritsTrainAux

    from helpers import randomize_norms

    torch.manual_seed(0)
    model = randomize_norms(InheritsTrainAux()).eval()
    x = torch.randn(1, 3, 16, 16)
    graph = prunekit.build_graph(model, x)
    assert len(graph.fx_graphs) == 2 and "aux.conv" in graph.producers
    pruned = assert_exact(model, graph, x, graph.units_for({"b.0": [1, 2]}))
    assert_train_mode_runs(model, pruned, torch.randn(2, 3, 16, 16))


def test_tracing_leaves_no_constants_on_the_callers_model():
    """Bug: torch.fx stores tensors made in the forward on the traced module, so build_graph
    added '_tensor_constant0'... attributes to the caller's model (one more set per call)."""
    torch.manual_seed(0)
    model = PlainTensorWeights().eval()
    x = torch.randn(1, 3, 8, 8)
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    for _ in range(2):
        graph = prunekit.build_graph(model, x)
        prunekit.count_flops_params(model, x, graph=graph)
        smaller = prunekit.remove_channels(model, x, {"b": [1]}, graph=graph)
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before
    assert not any(k.startswith("_tensor_constant") for k in vars(smaller))
    assert smaller(x).shape == model(x).shape


class AreaResize(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Upsample(scale_factor=0.5, mode="area")
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = F.interpolate(y, size=(3, 3), mode="area") if self.functional else self.down(y)
        return self.head(y)


@pytest.mark.parametrize("functional", [True, False])
def test_area_resize_costs_match_fvcore(functional):
    """Bug: F.interpolate / nn.Upsample with mode='area' run adaptive_avg_pool2d, which fvcore
    counts (one per input element); the analytic model priced it at zero."""
    from prunekit.costs import CostModel, fvcore_counts

    torch.manual_seed(0)
    model = AreaResize(functional).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    assert prunekit.count_flops_params(model, x, graph=graph)["flops"] == fvcore_counts(model, x)[0]
    units = graph.units_for({"a": [0, 5]})
    pruned = assert_exact(model, graph, x, units)
    assert CostModel(model, graph).flops(graph.removal_mask(units)) == fvcore_counts(pruned, x)[0]


# -- found by the sweep over timm and MONAI models (tests/test_real_models.py) ----------


class _AsTensor(nn.Module):
    def __init__(self, top: bool):
        super().__init__()
        self.top = top
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if self.top:
            return torch.as_tensor(self.b(self.a(x)))
        return self.b(torch.as_tensor(self.a(x)))


@pytest.mark.parametrize("top", [False, True])
def test_as_tensor_of_a_traced_tensor_is_an_op_not_a_constant(top):
    """MONAI's HighResNet: torch.as_tensor(x) was stowed as a constant, losing the data flow (a cut then
    broke the model, or at the top level silently changed the output's channels)."""
    torch.manual_seed(0)
    model, x = _AsTensor(top).eval(), torch.randn(1, 3, 16, 16)
    graph = prunekit.build_graph(model, x)
    assert graph.fallbacks == [] and prunekit.count_flops_params(model, x, graph=graph)["flops"] > 0
    assert graph.pinned[graph.producers["b"]].all()  # the model's output
    pruned = assert_exact(model, graph, x, graph.units_for({"a": [0, 3, 5]}))
    assert pruned.b.in_channels == 5


class _BatchNormFunctional(nn.BatchNorm2d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1,
                            self.eps)


def test_train_mode_trace_of_a_batch_of_one_after_global_pooling():
    """timm's mobilenetv4 and inception: the train-mode trace ran a batch of one through BatchNorm after
    global pooling, which cannot take batch statistics, and the model was refused."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), _BatchNormFunctional(8), nn.Flatten(),
                          nn.Linear(8, 2)).eval()
    graph = prunekit.build_graph(model, torch.randn(1, 3, 16, 16))
    assert "0" in graph.prunable_channels() and graph.notes == []


class _GroupNormFunctional(nn.GroupNorm):
    def forward(self, x):
        return F.relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


def test_group_norm_subclass_with_a_functional_forward_is_prunable():
    """timm's resnet50_gn (GroupNormAct): F.group_norm pinned every channel."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), _GroupNormFunctional(4, 8), nn.Conv2d(8, 2, 1)).eval(), \
        torch.randn(1, 3, 16, 16)
    graph = prunekit.build_graph(model, x)
    assert graph.coupled_channels("0", 2) == {"0": [2, 3]}  # one group of two channels
    pruned = assert_exact(model, graph, x, graph.units_for({"0": [2]}))
    assert (pruned[1].num_groups, pruned[1].num_channels) == (3, 6)


class _InstanceForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.forward = self.forward_fast  # timm's FasterNet Partial_conv3 picks its forward per instance

    def forward_fast(self, x):
        return self.c(x) + x


def test_a_forward_chosen_per_instance_is_traced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _InstanceForward(), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    assert graph.fallbacks == [] and "1.c" in graph.prunable_channels()
    assert_exact(model, graph, x, graph.units_for({"1.c": [1, 4]}))


def test_a_whole_model_fallback_names_the_model_briefly_and_counts_its_cost():
    class Numpy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return torch.from_numpy(y.detach().numpy())

    model, x = Numpy().eval(), torch.randn(1, 3, 4, 4)
    graph = prunekit.build_graph(model, x)
    (fallback,) = graph.fallbacks
    assert fallback.module == "" and graph.fallback_cost(fallback) > 0
    assert all(len(reason) < 120 for reason in graph.unit_pin.values())


def test_filter_norms_of_a_grouped_transposed_conv_read_each_output_channels_own_weights():
    # the weight of ConvTranspose2d(8, 8, groups=2) is (in, out / groups, ...): l1 once saw 4 filters, not 8
    from prunekit.importance.weights import filter_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1)).eval()
    graph = prunekit.build_graph(model, torch.randn(1, 3, 8, 8))
    rows, weight = filter_weights(model, graph, "2"), model[2].weight
    for o in range(8):
        group, j = divmod(o, 4)
        assert torch.equal(rows[o], weight[group * 4:(group + 1) * 4, j].flatten())


@pytest.mark.parametrize("name", ["conv1d", "conv3d", "transpose2d", "dict_in_out"])
def test_prune_runs_on_grouped_transposed_convs_and_dict_inputs(name, tmp_path):
    # l1 failed on grouped transposed convs; prune read .shape of a dict input
    from archs import build

    model, arch = build(name)
    example = arch.inputs(1)
    result = prunekit.prune(model, example, {"importance": {"method": "l1"}}, run_dir=tmp_path / "run",
                            progress=False)
    assert result.final["flops"] < result.original["flops"]
    with torch.no_grad():
        want, got = model(*example), result.model(*example)
    shapes = lambda out: [t.shape for t in torch.utils._pytree.tree_leaves(out)]  # noqa: E731
    assert shapes(got) == shapes(want)


class _ModuleMadeInForward(nn.Module):
    """A pooling layer built inside the forward (MONAI ResNet's type-A shortcut), a slice of a registered
    Sequential called as a module (smp's DPN encoder), and a conv kept outside the module tree (a list):
    the first two are traced through, the third's input channels stay (its weights are not the model's)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.features = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.hidden = [nn.Conv2d(8, 8, 1)]  # not registered: not in state_dict, never cut
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        h = self.features[0:3](x) + nn.AvgPool2d(1, 1)(x)
        return self.head(h + self.hidden[0](torch.relu(h)))


def test_modules_made_in_the_forward_are_traced_through():
    torch.manual_seed(0)
    model = _ModuleMadeInForward()
    graph = _exact(model, torch.randn(1, 3, 16, 16))
    assert not graph.fallbacks
    assert (~graph.pinned[graph.producers["features.0"]]).all()  # read by features.2 only: free
    assert graph.pinned[graph.producers["stem"]].all()  # the sum reaches the unregistered conv: kept


class _TrainOnlyOutput(nn.Module):
    """Deep supervision as MONAI's SegResNetDS and MedNeXt write it: the heads run in both modes, the
    auxiliary one is returned only in training (the two traces run the same ops in the same order)."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        outs = [self.head(h), self.aux(h)]
        return outs if self.training else outs[0]


def test_an_output_returned_only_in_training_keeps_its_channels():
    torch.manual_seed(0)
    graph = _exact(_TrainOnlyOutput(), torch.randn(1, 3, 16, 16))
    assert len(graph.fx_graphs) == 2
    assert [p.channels for p in graph.pins if p.reason == "model input"] == [3]  # once, not once per trace
    assert graph.pinned[graph.producers["aux"]].all() and graph.pinned[graph.producers["head"]].all()
    assert (~graph.pinned[graph.producers["body"]]).all()


def _hooked_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_forward_hooks_are_traced_not_skipped():
    """A hook on a layer changes what the model computes; a recorded layer call skipped it, and a hook that
    reorders channels gave a pruned model off by 1.27 with no warning."""
    x = torch.randn(1, 3, 16, 16)
    flipped = _hooked_net()
    flipped[0].register_forward_hook(lambda module, args, out: out.flip(1))
    with pytest.raises(prunekit.PrunekitError, match="cannot be removed"):
        prunekit.remove_channels(flipped, x, {"0": [0]})
    scaled, captured = _hooked_net(), {}
    scaled[0].register_forward_hook(lambda module, args, out: out * 2.0)
    scaled[3].register_forward_pre_hook(lambda module, args: (args[0] * 3.0,))
    scaled[1].register_forward_hook(lambda module, args, out: captured.__setitem__("bn", out))  # returns None
    graph = _exact(scaled, x)
    assert len(graph.prunable_channels()["0"]) == 8


def test_a_torch_fx_graph_module_is_pruned_like_the_module_it_came_from():
    """GraphModule's __new__ makes each instance a class of its own, holding the generated forward; a copy
    made through it had no forward, and the model was refused as failing on its input."""
    model = torch.fx.symbolic_trace(_hooked_net())
    x = torch.randn(1, 3, 16, 16)
    graph = _exact(model, x)
    assert len(graph.prunable_channels()["0"]) == 8
    small = prunekit.remove_channels(model, x, {"0": [0, 1]})
    assert small(x).shape == (1, 4, 16, 16) and small.get_submodule("0").out_channels == 6


class _ConvNormAct(nn.Module):
    """timm's ConvNormAct: in_channels and out_channels are read-only properties reading its conv's."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _blocks() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_ConvNormAct(3, 16), _ConvNormAct(16, 16), nn.Conv2d(16, 2, 1)).eval()


def test_width_properties_follow_their_layers_through_a_whole_prune(tmp_path):
    """The run recorded such properties as widths and set them on the delivered model: AttributeError at the
    end of every prune of a timm model built from ConvNormAct (RegNet, RepVGG, ReXNet, CSPDarkNet...)."""
    x = torch.randn(1, 3, 16, 16)
    config = {"targets": {"flops": 0.6}, "importance": {"method": "l1"}, "limits": {"round_to": 1}}
    result = prunekit.prune(_blocks(), x, config, run_dir=tmp_path / "run", progress=False)
    assert result.targets_met
    block = result.model[1]
    assert block.in_channels == block.conv.in_channels < 16 and block.out_channels == block.conv.out_channels
    again = prunekit.load_pruned(tmp_path / "run", model=_blocks())
    torch.testing.assert_close(again(x), result.model(x), rtol=0, atol=0)
    # a manifest that recorded the property (as earlier prunekit did) still loads
    manifest_path = tmp_path / "run" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["modules"]["1"] = {"type": "_ConvNormAct", "original": {"in_channels": 16},
                                "pruned": {"in_channels": block.in_channels}}
    manifest_path.write_text(json.dumps(manifest))
    torch.testing.assert_close(prunekit.load_pruned(tmp_path / "run", model=_blocks())(x), result.model(x))


class _Versioned(nn.Module):
    """As torchvision's MNASNet: loading a state_dict needs the module versions it was saved with."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 2, 1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, x):
        return self.layers(x)


def versioned_net() -> nn.Module:
    torch.manual_seed(0)
    return _Versioned().eval()


def test_modules_that_check_their_version_on_load_are_pruned_and_loaded(tmp_path):
    """Copies of a state_dict lost its module versions: every prune of torchvision's MNASNet failed at the
    end, and its weights file could not be read for the command line."""
    from prunekit.loading import load_model

    x = torch.randn(1, 3, 16, 16)
    result = prunekit.prune(versioned_net(), x, {"targets": {"flops": 0.6}, "importance": {"method": "l1"}},
                            run_dir=tmp_path / "run", progress=False)
    assert result.targets_met
    torch.testing.assert_close(prunekit.load_pruned(tmp_path / "run", model=versioned_net())(x), result.model(x))
    torch.save(dict(versioned_net().state_dict()), tmp_path / "plain.pt")  # a plain dict: no versions at all
    loaded = load_model(tmp_path / "plain.pt", builder="tests.test_regressions:versioned_net")
    torch.testing.assert_close(loaded(x), versioned_net()(x))


def test_pins_list_what_is_left_alone_once_and_not_a_functional_norms_own_weights():
    """timm's BatchNormAct2d calls F.batch_norm with its weights: each of them was listed as a pinned
    'constant tensor' with twice the layer's width (once per trace), though the layer is pruned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _BatchNormFunctional(8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    graph = _exact(model.eval(), torch.randn(1, 3, 16, 16))
    assert {(p.reason, p.channels) for p in graph.pins} == {("model input", 3), ("model output (output() at "
                                                                                  "'output')", 2)}
    assert len(graph.prunable_channels()["0"]) == 8


def test_sub_pixel_layers_prune_whole_groups():
    """PixelShuffle(2) makes channel c of four input channels 4c..4c+3, PixelUnshuffle(2) the reverse: the
    conv before a shuffle loses whole groups of four, and a layer read after an unshuffle four columns per
    channel (both were pinned)."""
    from archs import SubPixel

    torch.manual_seed(0)
    model, x = SubPixel().eval(), torch.randn(2, 3, 16, 16)
    graph = prunekit.build_graph(model, x)
    assert graph.coupled_channels("up", 5) == {"up": [4, 5, 6, 7]}
    assert not graph.pinned[graph.producers["up"]].any() and not graph.pinned[graph.producers["a.0"]].any()
    units = sorted(set(graph.units_for({"up": [5], "a.0": [2]})))
    pruned = assert_exact(model, graph, x, units)
    assert (pruned.up.out_channels, pruned.c[0].in_channels) == (16, 4 + 5)
    assert (pruned.a[0].out_channels, pruned.b[0].in_channels) == (5, 20)
    kept_columns = [c for c in range(24) if c not in (8, 9, 10, 11)]  # a's channel 2 was b's inputs 8..11
    assert torch.equal(pruned.b[0].weight, model.b[0].weight[:, kept_columns])


class _Collector:
    """Keeps a module's output through a forward hook, and the hook's handle, as timm's FeatureHooks do."""

    def __init__(self, module: nn.Module):
        self.outputs: dict = {}
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.outputs["features"] = output

    def take(self):
        return self.outputs.pop("features")


class HookedFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        self.collector = _Collector(self.act)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.b(self.act(self.a(x))), self.collector.take()


def test_a_pruned_model_whose_hook_handles_live_in_it_can_be_copied():
    """The pruned copy of a model that keeps its hooks' handles (timm's features_only nets of the hook
    kind, such as xception41) could not be deep-copied: the handles referred to hook tables nothing held."""
    torch.manual_seed(0)
    model, x = HookedFeatures().eval(), torch.randn(1, 3, 8, 8)
    pruned = prunekit.remove_channels(model, x, {"stem": [0]})
    assert pruned.a.in_channels == 7
    copied = copy.deepcopy(pruned)
    assert copied.collector.handle.extra_dict_ref[0]() is copied.act._forward_hooks_with_kwargs
    with torch.no_grad():
        for ours, theirs in zip(copied(x), pruned(x)):
            assert torch.equal(ours, theirs)
    copied.collector.handle.remove()  # the copy's handle removes the copy's hook, not the original's
    assert not copied.act._forward_hooks and pruned.act._forward_hooks


def test_an_example_input_the_model_cannot_take_stops_a_run_before_its_first_step(tmp_path, monkeypatch):
    """The trace reads shapes only, so an integer input to a float model went through every step and
    failed at the report's latency row at the very end; a run that will time the model runs it once first."""
    from prunekit.graphs.trace import ExampleInputError
    from prunekit.zoo import unet

    torch.manual_seed(0)
    model, x = unet(in_channels=1, num_classes=2, width=8, depth=2).eval(), torch.randint(0, 9, (1, 1, 32, 32))
    steps = []
    import prunekit.loop

    monkeypatch.setattr(prunekit.loop, "apply_removal", lambda *a, **k: steps.append(a) or None)
    config = {"targets": {"flops": 0.7}, "importance": {"method": "l1"}, "schedule": {"steps": 2}}
    with pytest.raises(ExampleInputError, match="fails on the example input"):
        prunekit.prune(model, x, config, run_dir=tmp_path / "run", progress=False)
    assert not steps and not (tmp_path / "run").exists()
    assert prunekit.count_flops_params(model, x)["flops"] > 0  # without a run directory nothing runs it


def test_per_channel_tensors_are_cut_with_their_channels_through_a_whole_prune():
    """Layer scale and FilterResponseNorm-style parameters (read only element-wise) used to pin the
    channels they touched; now they are sliced with them, in a cut and in the model a prune delivers."""
    from archs import PerChannelTensors

    torch.manual_seed(0)
    model, x = PerChannelTensors().eval(), torch.randn(1, 3, 16, 16)
    graph = prunekit.build_graph(model, x)
    assert set(graph.prunable_channels()) == {"a.0", "b", "c"}
    pruned = prunekit.remove_channels(model, x, {"b": [1, 3], "a.0": [0]}, graph=graph)
    kept_b, kept_a = [0, 2, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]  # a and c share the residual stream
    assert torch.equal(pruned.tau, model.tau[:, kept_b]) and torch.equal(pruned.bias, model.bias[:, kept_b])
    assert torch.equal(pruned.gamma, model.gamma[kept_a]) and torch.equal(pruned.over_width, model.over_width)
    result = prunekit.prune(model, x, {"targets": {"flops": 0.6}, "importance": {"method": "l1"},
                                       "schedule": {"steps": 2}, "limits": {"round_to": 1}}, progress=False)
    delivered = result.model
    assert delivered.gamma.shape[0] == delivered.c.out_channels < 8
    assert delivered.weight.shape[1] == delivered.b.out_channels
    assert delivered(x).shape == (1, 2, 16, 16)


class _HandWrittenBatchNorm(nn.Module):
    """A BatchNorm written out in user code: its statistics and affine parameters are plain tensors
    read element-wise, and in training it updates its running statistics in place."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)
        self.register_buffer("running_mean", torch.randn(channels) * 0.1)
        self.register_buffer("running_var", torch.rand(channels) + 0.5)

    def forward(self, x):
        if self.training:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * mean)
                self.running_var.mul_(0.9).add_(0.1 * var)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight[None, :, None, None] / torch.sqrt(var[None, :, None, None] + 1e-5)
        return (x - mean[None, :, None, None]) * scale + self.bias[None, :, None, None]


class _WithHandWrittenNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm_a = nn.Conv2d(3, 8, 3, padding=1), _HandWrittenBatchNorm(8)
        self.b, self.norm_b = nn.Conv2d(8, 8, 3, padding=1), _HandWrittenBatchNorm(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.norm_a(self.a(x)))
        return self.head(torch.relu(self.norm_b(self.b(y))) + y)


def test_a_hand_written_norm_is_cut_with_its_channels_in_both_modes():
    """Its tensors pinned every channel they met, so a model with its own norm layer had nothing
    prunable; now they are per-channel tensors, cut exactly, and its training-mode update still runs."""
    torch.manual_seed(0)
    model, x = _WithHandWrittenNorms().eval(), torch.randn(2, 3, 8, 8)
    graph = prunekit.build_graph(model, x)
    assert set(graph.prunable_channels()) == {"a", "b"}
    units = graph.units_for({"a": [0, 5]})  # the residual add couples a and b: 2 channels of both
    pruned = assert_exact(model, graph, x, units)
    assert pruned.norm_a.running_var.shape == pruned.norm_a.weight.shape == (6,) and pruned.b.out_channels == 6
    kept = [i for i, unit in enumerate(graph.producers["b"]) if unit not in set(units)]
    assert torch.equal(pruned.norm_b.running_mean, model.norm_b.running_mean[kept])
    assert_train_mode_runs(model, pruned, x)
