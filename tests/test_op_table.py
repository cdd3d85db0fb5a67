"""Every record of the op table is exercised, and a new op is one ``register`` call.

The probes are derived from the table itself: each entry is called in a small
model between convolutions, the model's channel graph is built, and removing
zeroed channels must leave the output unchanged (or the entry must pin them).
A new entry without a way to probe it fails ``test_every_entry_has_a_probe``.
"""

from __future__ import annotations

import inspect
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from helpers import assert_exact, pick_units
from prunekit.costs import fvcore_counts
from prunekit.ops import OpSpec, register, table
from prunekit.ops.channels import passthrough
from prunekit.reports import model_report

C = 6  # channels of the probed tensors

# arguments an entry needs beyond its tensor(s); keyed by the entry's name
_ARGS = {
    "Threshold": (0.1, 0.0), "threshold": (0.1, 0.0), "_threshold": (0.1, 0.0), "GLU": (), "LPPool1d": (2, 2),
    "LPPool2d": (2, 2), "lp_pool2d": (2, 2), "clamp": (-1.0, 1.0), "clip": (-1.0, 1.0), "clamp_": (-1.0, 1.0),
    "clamp_min": (0.0,), "clamp_max": (0.0,), "pow": (2,), "pow_": (2,), "fmod": (1.5,), "to": (torch.float32,),
    "type": (torch.float32,), "requires_grad_": (False,), "cuda": (), "dropout": (0.5, False), "alpha_dropout": (0.5, False),
    "dropout1d": (0.5, False), "dropout2d": (0.5, False), "dropout3d": (0.5, False), "feature_alpha_dropout": (),
    "full_like": (0.5,),
}
_POOL_ARGS = {"MaxPool": (2,), "AvgPool": (2,), "AdaptiveAvgPool": (2,), "AdaptiveMaxPool": (2,), "max_pool": (2,),
              "avg_pool": (2,), "adaptive_avg_pool": (2,), "adaptive_max_pool": (2,)}
_RANK = {"1d": 1, "2d": 2, "3d": 3}


def _name(key) -> str:
    return key if isinstance(key, str) else getattr(key, "__name__", str(key))


def _rank(name: str) -> int:
    return next((r for suffix, r in _RANK.items() if name.lower().endswith(suffix)), 2)


def _pool_args(name: str):
    return next((args for prefix, args in _POOL_ARGS.items() if name.startswith(prefix)), None)


class Probe(nn.Module):
    """conv -> (the op on one or two tensors) -> a norm that can silence the channel -> conv."""

    def __init__(self, call, rank: int = 2, binary: bool = False, head_in: int = C):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[rank]
        self.a, self.b = conv(3, C, 1), conv(3, C, 1)
        self.call, self.binary = call, binary
        self.norm = norm(head_in)
        self.head = conv(head_in, 2, 1)

    def forward(self, x):
        a = self.a(x)
        y = self.call(a, self.b(x)) if self.binary else self.call(a)
        if isinstance(y, torch.Tensor) and y.dtype != a.dtype:  # comparisons, .half(): back to float
            y = y.to(a.dtype)
        if not isinstance(y, torch.Tensor) or y.dim() != a.dim() or y.shape[1] != self.norm.num_features:
            return self.head(self.norm(a)), y  # the op's result is returned as it is
        return self.head(self.norm(y))


def _probe(key, spec: OpSpec):
    """(model, input) exercising one table entry, or None where the entry cannot be probed alone."""
    name, rule = _name(key), spec.rule.__qualname__.split(".")[0]
    rank = _rank(name) if isinstance(key, type) or rule in ("rule", "spatial") else 2
    extra = _ARGS.get(name, ())
    if isinstance(key, type):
        if key in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
            layer = key(C, C, 1)
        elif key is nn.Linear:
            return Probe(nn.Sequential(nn.Flatten(2), nn.Linear(16, 16), nn.Unflatten(2, (4, 4)))), _x(2)
        elif key.__name__.startswith(("BatchNorm", "SyncBatchNorm")):
            layer = nn.BatchNorm2d(C) if key is nn.SyncBatchNorm else key(C)
            rank = 2 if key is nn.SyncBatchNorm else rank
            if key is nn.SyncBatchNorm:  # runs only under a process group: its record is BatchNorm's
                assert table.MODULES[key] is not None
        elif key.__name__.startswith("InstanceNorm"):
            layer = key(C, affine=True)
        elif key is nn.GroupNorm:
            layer = nn.GroupNorm(3, C)
        elif key is nn.LayerNorm:
            layer = nn.LayerNorm(4)
        elif key is nn.PReLU:
            layer = nn.PReLU(C)
        elif _pool_args(name):
            layer = key(*_pool_args(name))
        elif "Pad" in name:
            layer = key(1, *((0.0,) if "Constant" in name else ()))
        elif key in (nn.Upsample,):
            layer = nn.Upsample(scale_factor=2)
        elif key in (nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
            layer = key(scale_factor=2)
        elif key is nn.Flatten:
            layer = nn.Sequential(nn.Flatten(2), nn.Unflatten(2, (4, 4)))
        elif key is nn.GLU:
            layer = nn.GLU(dim=1)
            return Probe(layer, head_in=C // 2), _x(2)
        elif key is nn.Softmax2d or key in (nn.Softmax, nn.LogSoftmax, nn.Softmin):
            layer = key() if key is nn.Softmax2d else key(dim=1)
        elif key in (nn.PixelShuffle, nn.PixelUnshuffle):
            layer = nn.Sequential(nn.PixelUnshuffle(2), nn.PixelShuffle(2))
        elif key is nn.ChannelShuffle:
            layer = nn.ChannelShuffle(2)
        else:
            layer = key(*extra)
        return Probe(layer, rank), _x(rank)
    fn = (lambda t, *a, **k: getattr(t, key)(*a, **k)) if isinstance(key, str) else key
    call = _function_call(key, name, fn, spec, extra)
    if call is None:
        return None
    call, binary, head_in, rank = call
    return Probe(call, rank, binary, head_in), _x(rank)


def _function_call(key, name, fn, spec, extra):
    rule = getattr(spec.rule, "__qualname__", "").split(".")[0]
    rank = _rank(name) if _pool_args(name) or name.startswith(("conv", "max_pool", "avg_pool", "adaptive")) else 2
    if name == "type_as":
        return (lambda a, b: fn(a, b)), True, C, rank
    if name == "as_tensor":  # a factory: models look it up on torch at call time, as the tracer expects
        return (lambda a: torch.as_tensor(a)), False, C, rank
    if spec.rule is passthrough:
        return (lambda a: fn(a, *extra)), False, C, rank
    if rule == "elementwise" or name in ("where",):
        ternary = {"lerp": lambda a, b: fn(a, b, 0.3), "addcmul": lambda a, b: fn(a, a, b),
                   "addcdiv": lambda a, b: fn(a, a, b.abs() + 1), "masked_fill": lambda a, b: fn(a + b, b > 0, 0.0)}
        if name.rstrip("_") in ternary:
            return ternary[name.rstrip("_")], True, C, rank
        if name == "where":
            return (lambda a, b: fn(a > 0, a, b) if not isinstance(key, str) else a.where(a > 0, b)), True, C, rank
        return (lambda a, b: fn(a, b)), True, C, rank
    if _pool_args(name):
        return (lambda a: fn(a, *_pool_args(name))), False, C, rank
    if name == "lp_pool2d":
        return (lambda a: fn(a, 2, 2)), False, C, rank
    if name.startswith("conv"):
        weight = torch.randn(C, C, *([1] * rank)) * 0.3
        return (lambda a: fn(a, weight)), False, C, rank
    simple = {
        "linear": lambda a: fn(a, torch.randn(4, 4)),
        "batch_norm": lambda a: fn(a, torch.zeros(C), torch.ones(C)),
        "instance_norm": lambda a: fn(a), "group_norm": lambda a: fn(a, 3), "layer_norm": lambda a: fn(a, (4,)),
        "prelu": lambda a: fn(a, torch.full((1,), 0.25)),
        "interpolate": lambda a: fn(a, scale_factor=2.0), "upsample": lambda a: fn(a, scale_factor=2.0),
        "upsample_nearest": lambda a: fn(a, scale_factor=2), "upsample_bilinear": lambda a: fn(a, scale_factor=2),
        "grid_sample": lambda a: fn(a, torch.zeros(a.shape[0], 4, 4, 2), align_corners=False),
        "pad": lambda a: fn(a, (1, 1)),
        "roll": lambda a: fn(a, (1, -1), (2, 3)), "rot90": lambda a: fn(a, 1, (2, 3)),
        "flip": lambda a: fn(a, (3,)) if isinstance(key, str) else fn(a, (2, 3)),
        "softmax": lambda a: fn(a, 1), "log_softmax": lambda a: fn(a, 1), "softmin": lambda a: fn(a, 1),
        "cumsum": lambda a: fn(a, 3), "cumprod": lambda a: fn(a, 3), "normalize": lambda a: fn(a),
        "glu": lambda a: fn(a, 3),
        "cat": lambda a, b: fn([a, b], 1), "concat": lambda a, b: fn([a, b], 1),
        "concatenate": lambda a, b: fn([a, b], 1), "stack": lambda a, b: fn([a, b], 2).sum(2),
        "split": lambda a: fn(a, 2, 3)[0], "chunk": lambda a: fn(a, 2, 3)[0],
        "tensor_split": lambda a: fn(a, 2, 3)[0], "unbind": lambda a: torch.stack(fn(a, 3), 3),
        "narrow": lambda a: fn(a, 3, 0, 2),
        "getitem": lambda a: operator.getitem(a, (slice(None), slice(None), slice(0, 2))),
        "flatten": lambda a: fn(a, 2).view(a.shape), "reshape": lambda a: fn(a, a.shape),
        "squeeze": lambda a: fn(a.unsqueeze(2), 2), "unsqueeze": lambda a: fn(a, 2).squeeze(2),
        "view": lambda a: fn(a, a.shape), "view_as": lambda a: fn(a, a), "reshape_as": lambda a: fn(a, a),
        "permute": lambda a: fn(a, (0, 1, 3, 2)), "transpose": lambda a: fn(a, 2, 3),
        "swapaxes": lambda a: fn(a, 2, 3), "movedim": lambda a: fn(a, 3, 2), "moveaxis": lambda a: fn(a, 3, 2),
        "t": lambda a: fn(a.flatten(0, 1).flatten(1)).t().reshape(a.shape),
        "expand": lambda a: fn(a, a.shape), "expand_as": lambda a: fn(a, a), "repeat": lambda a: fn(a, 1, 1, 1, 1),
        "pixel_shuffle": lambda a: fn(F.pixel_unshuffle(a, 2), 2),
        "pixel_unshuffle": lambda a: F.pixel_shuffle(fn(a, 2), 2),
        "channel_shuffle": lambda a: fn(a, 2),
        "matmul": lambda a, b: fn(a, b.transpose(2, 3)), "mm": lambda a: fn(a.flatten(1), a.flatten(1).t()),
        "bmm": lambda a: fn(a.flatten(2), a.flatten(2).transpose(1, 2)),
        "addmm": lambda a: fn(torch.zeros(1), a.flatten(1), a.flatten(1).t()),
        "einsum": lambda a, b: fn("nchw,nchw->nhw", a, b),
        "getattr": lambda a: a.mT.mT,
        "numel": lambda a: fn(a), "size": lambda a: fn(a, 1), "dim": lambda a: fn(a),
    }
    if name in simple:
        binary = len(inspect.signature(simple[name]).parameters) == 2
        return simple[name], binary, C, rank
    if rule == "reduce":
        if name in ("any", "all", "count_nonzero"):
            return (lambda a: fn(a > 0, 3) if name != "count_nonzero" else fn(a, 3)), False, C, rank
        if name in ("max", "min"):
            return (lambda a: fn(a, 3, keepdim=True)[0]), False, C, rank
        return (lambda a: fn(a, 3, keepdim=True)), False, C, rank
    return None


def _x(rank: int):
    return torch.randn(1, 3, *([4] * rank))


def _entries():
    for part in ("MODULES", "NAMED_MODULES", "FUNCTIONS", "METHODS"):
        for key, spec in getattr(table, part).items():
            yield pytest.param(part, key, spec, id=f"{part}:{_name(key)}")


def test_every_entry_has_a_probe():
    missing = [f"{part}:{_name(key)}" for part, key, spec in (p.values for p in _entries())
               if part != "NAMED_MODULES" and _probe(key, spec) is None]
    assert not missing, f"table entries without a probe: {missing}"


@pytest.mark.parametrize("part,key,spec", list(_entries()))
def test_entry_is_exact(part, key, spec):
    if part == "NAMED_MODULES":  # other libraries' layers: covered by tests/test_real_models.py
        pytest.skip("needs its library")
    if key == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if key is nn.SyncBatchNorm:
        key = nn.BatchNorm2d  # needs a process group to run; its record is BatchNorm2d's
    torch.manual_seed(0)
    made = _probe(key, spec)
    model, x = made[0].eval(), made[1]
    graph = prunekit.build_graph(model, x)
    used = {n.target for g in graph.fx_graphs for n in g.nodes} | {
        type(model.get_submodule(n.target)) for n in graph.fx_graph.nodes if n.op == "call_module"}
    assert key in used or any(t is key for t in used) or (isinstance(key, type) and any(
        isinstance(m, key) for m in model.modules())), f"the probe never calls {_name(key)}"
    units = pick_units(graph, 0.5)
    if units:
        assert_exact(model, graph, x, units)
    else:  # the entry pinned everything it touched, and said why
        assert graph.pins


# -- a new op is one entry -------------------------------------------------------


class Swish2(nn.Module):
    """An activation prunekit does not know: channel i in, channel i out."""

    def forward(self, x):
        return x * torch.sigmoid(2 * x)


class WithSwish2(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.act = Swish2()
        self.gate = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        f = self.act(self.a(x))
        return self.head(f * torch.tanh(self.gate(f)))


def test_a_new_op_is_one_register_call(monkeypatch):
    torch.manual_seed(0)
    model, x = WithSwish2().eval(), torch.randn(1, 3, 8, 8)
    unknown = prunekit.build_graph(model, x, leaf_modules=["act"])  # as an opaque leaf: pinned
    assert "a" not in unknown.prunable_channels()

    monkeypatch.setitem(table.MODULES, Swish2, OpSpec(passthrough, shape="input"))  # the one entry
    graph = prunekit.build_graph(model, x)  # a known type is a leaf by itself
    assert "a" in graph.prunable_channels()
    units = graph.units_for({"a": [1, 4], "gate": [2]})  # the product couples a and gate: 3 units
    pruned = assert_exact(model, graph, x, units)
    counted = prunekit.count_flops_params(pruned, x)
    assert counted["flops"] == fvcore_counts(pruned, x)[0]
    report = model_report(pruned, x)
    rows = {r["name"]: r for r in report["rows"]}
    assert len(units) == 3 and tuple(rows["a"]["output_shape"]) == (1, 5, 8, 8) and rows["act"]["type"] == "Swish2"
    assert report["fvcore"]["agrees"] and report["totals"]["flops"] == counted["flops"]


def test_register_puts_each_kind_of_key_in_its_table(monkeypatch):
    spec = OpSpec(passthrough)
    for table_name in ("MODULES", "FUNCTIONS", "METHODS"):
        monkeypatch.setattr(table, table_name, dict(getattr(table, table_name)))
    register(Swish2, spec)
    register(torch.special.expit, spec)
    register("expit_", spec)
    assert table.MODULES[Swish2] is spec and table.FUNCTIONS[torch.special.expit] is spec
    assert table.METHODS["expit_"] is spec


@pytest.mark.parametrize("shapes, dim", [([(1, 3, 4, 4), (1, 5, 4, 4)], 1), ([(2, 3), (2, 4), (2, 1)], -1),
                                         ([(3, 2), (1, 2)], 0)])
def test_cat_shape_is_torch_cat_shape(shapes, dim):
    from prunekit.ops.meta_shapes import cat_shape

    tensors = [torch.empty(s, device="meta") for s in shapes]
    assert cat_shape((tensors,), None, {"dim": dim}) == tuple(torch.cat(tensors, dim=dim).shape)
    assert cat_shape((tensors, dim), None) == tuple(torch.cat(tensors, dim).shape)


def test_cat_shape_leaves_the_odd_cases_to_torch():
    from prunekit.ops.meta_shapes import cat_shape

    a = torch.empty(1, 3, device="meta")
    assert cat_shape(([a, a.double()],), None) is None  # type promotion
    assert cat_shape(([a, torch.empty(0, device="meta")],), None) is None  # legacy empty 1-d input
    assert cat_shape(([a, torch.empty(2, 4, device="meta")],), None) is None  # torch's own error
    assert cat_shape(([a],), None, {"dim": 2}) is None and cat_shape(([a],), None, {"out": a}) is None


@pytest.mark.parametrize("layer, rank", [
    (nn.MaxPool2d(2), 2), (nn.MaxPool2d(3, 2, 1), 2), (nn.MaxPool2d(3, 2, 1, ceil_mode=True), 2),
    (nn.MaxPool2d((3, 2), (2, 1), (1, 0)), 2), (nn.MaxPool2d(3, 2, 0, dilation=2, ceil_mode=True), 2),
    (nn.AvgPool2d(2, ceil_mode=True), 2), (nn.AvgPool2d(3, 2, 1), 2), (nn.MaxPool1d(3, 2, ceil_mode=True), 1),
    (nn.AvgPool1d(4, 3, 2), 1), (nn.MaxPool3d(2, 2, 1, ceil_mode=True), 3), (nn.AvgPool3d((1, 2, 2)), 3)])
@pytest.mark.parametrize("size", [7, 8, 13])
def test_pool_shape_is_torch_pooling_shape(layer, rank, size):
    from prunekit.ops.meta_shapes import pool_shape

    for shape in [(2, 3, *(size + i for i in range(rank))), (3, *(size,) * rank)]:  # batched and unbatched
        x = torch.randn(shape)
        assert pool_shape(rank)((x,), layer) == tuple(layer(x).shape)


def test_pool_shape_leaves_the_odd_cases_to_torch():
    from prunekit.ops.meta_shapes import pool_shape

    x = torch.empty(1, 3, 8, 8, device="meta")
    assert pool_shape(2)((x,), nn.MaxPool2d(2, return_indices=True)) is None
    assert pool_shape(2)((x,), nn.MaxPool2d(2, padding=2)) is None  # padding over half the kernel: torch's error
    assert pool_shape(2)((torch.empty(1, 3, 1, 1, device="meta"),), nn.MaxPool2d(3)) is None  # an empty output


class Moves(nn.Module):
    """roll / flip / rot90 over space keep channels; over the channel dim they move values across them."""

    def __init__(self, over_channels: bool):
        super().__init__()
        self.over_channels = over_channels
        self.a, self.b, self.c = nn.Conv2d(3, C, 1), nn.Conv2d(C, C, 1), nn.Conv2d(C, 2, 1)

    def forward(self, x):
        y = torch.roll(self.a(x), 1, 1 if self.over_channels else 3).flip(2, 3)
        y = torch.zeros_like(y) + torch.rot90(y, 1, (2, 3))
        return self.c(torch.flip(self.b(y), (1,) if self.over_channels else (2,)))


def test_moves_over_space_keep_channels_and_over_channels_pin_them():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    model = Moves(over_channels=False).eval()
    graph = prunekit.build_graph(model, x)
    assert set(graph.prunable_channels()) == {"a", "b"}
    assert_exact(model, graph, x, graph.units_for({"a": [1, 4], "b": [0]}))
    pinned = prunekit.build_graph(Moves(over_channels=True).eval(), x)
    assert not pinned.prunable_channels()
    assert any("moves values across channels" in p.reason for p in pinned.pins)
