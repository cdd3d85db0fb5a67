"""The one op table: everything prunekit knows about an op is one :class:`OpSpec` record.

The channel walk reads ``rule``, the tracer reads ``shape`` (to skip running
shape-keeping ops on meta tensors), the cost model reads ``flops``, the
surgery reads ``resize`` and ``widths``, and the tests read ``carries`` and
``params``. Keys are module types, functions, or method names. An op that is
not here is pinned: prunekit never guesses.

Supporting a new op is one entry (``register``) and at most one small function::

    from prunekit.ops import OpSpec, register
    from prunekit.ops.channels import passthrough
    register(MyActivation, OpSpec(passthrough, shape="input"))
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graphs.state import Chan
from . import flops as fl
from .channels import along_dim, along_dims, cat, elementwise, glu, interpolate, narrow, pad, passthrough, \
    pixel_shuffle, pixel_unshuffle, reduce, softmax2d, spatial, split, stack, _softmax_dim
from .layers import batchnorm_module, group_norm_function, conv_carries, conv_function, conv_module, \
    groupnorm_module, holder_carries, holder_function, layernorm_function, layernorm_module, linear_carries, \
    linear_function, linear_module, prelu_module, resize_conv, resize_groupnorm, resize_linear, resize_norm, \
    resize_prelu
from .meta_shapes import adaptive_pool_shape, cat_shape, conv_shape, linear_shape, pool_shape
from .op import Op, constant, model_input, model_output, no_channels, pin_all, unknown
from .shapes import attribute, expand, getitem, permute, reshape


@dataclass(frozen=True)
class OpSpec:
    """What prunekit knows about one op."""

    rule: Callable[[Op], Any]  # input channel vectors -> output channel vector(s)
    flops: Callable | None = None  # (cost context, node, module) -> flops(kept, node, removed); None: 0
    # the output's shape without running the op: "input" (the first input's), "broadcast" (all
    # inputs broadcast), or a function (args, module) -> shape or None
    shape: str | Callable | None = None
    widths: tuple[str, ...] = ()  # size attributes a resize rewrites
    resize: Callable | None = None  # (module, kept widths, original attributes, grouping) -> None
    carries: Callable | None = None  # (tensor role, dim, module, sliced dims) -> zeroing silences a channel?
    params: dict[str, int] | None = None  # functional ops: tensor argument keyword -> position


def _same(rule, **fields) -> OpSpec:
    return OpSpec(rule, shape="input", **fields)


_CONV = dict(widths=("in_channels", "out_channels", "groups"), resize=resize_conv, carries=conv_carries())
_NORM = dict(widths=("num_features",), resize=resize_norm, carries=holder_carries)
_ACTIVATIONS = [
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
]

MODULES: dict[type, OpSpec] = {
    **{t: OpSpec(conv_module, fl.conv_module, shape=conv_shape, **_CONV)
       for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
    nn.Linear: OpSpec(linear_module, fl.linear_module, shape=linear_shape, widths=("in_features", "out_features"),
                      resize=resize_linear, carries=linear_carries),
    **{t: _same(batchnorm_module, flops=fl.batchnorm_module, **_NORM)
       for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)},
    **{t: _same(batchnorm_module, flops=fl.affine_norm_module("affine"), **_NORM)
       for t in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)},
    nn.GroupNorm: _same(groupnorm_module, flops=fl.affine_norm_module("affine"), widths=("num_channels", "num_groups"),
                        resize=resize_groupnorm, carries=holder_carries),
    nn.LayerNorm: _same(layernorm_module, flops=fl.affine_norm_module("elementwise_affine")),
    nn.PReLU: _same(prelu_module, widths=("num_parameters",), resize=resize_prelu, carries=holder_carries),
    **{t: _same(passthrough) for t in _ACTIVATIONS},
    **{t: OpSpec(spatial(1), shape=pool_shape(1)) for t in (nn.MaxPool1d, nn.AvgPool1d)},
    nn.LPPool1d: OpSpec(spatial(1)),
    **{t: OpSpec(spatial(1), shape=adaptive_pool_shape(1)) for t in (nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)},
    **{t: OpSpec(spatial(2), shape=pool_shape(2)) for t in (nn.MaxPool2d, nn.AvgPool2d)},
    nn.LPPool2d: OpSpec(spatial(2)),
    nn.AdaptiveMaxPool2d: OpSpec(spatial(2), shape=adaptive_pool_shape(2)),
    nn.AdaptiveAvgPool2d: OpSpec(spatial(2), fl.adaptive_avg_pool2d, shape=adaptive_pool_shape(2)),
    nn.UpsamplingNearest2d: OpSpec(spatial(2), fl.upsample("nearest")),
    nn.UpsamplingBilinear2d: OpSpec(spatial(2), fl.upsample("bilinear")),
    **{t: OpSpec(spatial(3), shape=pool_shape(3)) for t in (nn.MaxPool3d, nn.AvgPool3d)},
    **{t: OpSpec(spatial(3), shape=adaptive_pool_shape(3)) for t in (nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)},
    nn.Upsample: OpSpec(spatial(None), fl.upsample()),
    **{t: OpSpec(pad) for t in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                                nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
                                nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)},
    nn.Flatten: OpSpec(reshape),
    **{t: OpSpec(along_dim(0, implicit=_softmax_dim)) for t in (nn.Softmax, nn.LogSoftmax, nn.Softmin)},
    nn.Softmax2d: OpSpec(softmax2d),
    nn.GLU: OpSpec(glu),
    nn.PixelShuffle: OpSpec(pixel_shuffle),
    nn.PixelUnshuffle: OpSpec(pixel_unshuffle),
    nn.ChannelShuffle: OpSpec(pin_all("channel shuffle reorders channels")),
}

# layers of other libraries, named so that importing prunekit imports none of them
NAMED_MODULES: dict[str, OpSpec] = {
    # stochastic depth drops whole samples in training, never channels
    "torchvision.ops.stochastic_depth.StochasticDepth": _same(passthrough),
    "timm.layers.drop.DropPath": _same(passthrough),
    "monai.networks.layers.drop_path.DropPath": _same(passthrough),
}

_UNARY_FUNCTIONS = [
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.threshold,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt,
    torch.rsqrt, torch.clamp, torch.clip, torch.square, torch.dropout, torch.log, torch.sign,
    torch.nan_to_num, torch.erf, operator.neg, operator.pos, torch.clone, torch.detach, torch.as_tensor,
    torch.isnan, torch.isfinite, torch.isinf, operator.invert, torch.logical_not,
    torch.reciprocal, torch.floor, torch.ceil, torch.round, torch.trunc, torch.sin, torch.cos, torch.expm1,
    torch.log1p, torch.clamp_min, torch.clamp_max, F.rrelu, F.hardshrink, F.softshrink, F.tanhshrink,
    # values of their own, in the shape (and so the channels) of their input
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like,
]
_BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.floordiv, torch.add, torch.sub, torch.mul,
    torch.div, torch.true_divide, torch.maximum, torch.minimum, torch.pow, torch.fmod,
    torch.rsub, torch.multiply, torch.subtract, torch.divide, torch.atan2, torch.remainder, torch.lerp,
    torch.addcmul, torch.addcdiv, torch.masked_fill,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge,
]
_BATCH_NORM_PARAMS = {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4}
_REDUCTIONS = [torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.any, torch.all,
               torch.count_nonzero, torch.std, torch.var, torch.logsumexp, torch.prod]


def _conv_function(transposed: bool) -> OpSpec:
    return OpSpec(conv_function(transposed), fl.conv_function(transposed), carries=conv_carries(transposed),
                  params={"weight": 1, "bias": 2})


FUNCTIONS: dict[Any, OpSpec] = {
    **{f: _same(passthrough) for f in _UNARY_FUNCTIONS},
    **{f: OpSpec(elementwise, shape="broadcast") for f in _BINARY_FUNCTIONS},
    torch.where: OpSpec(elementwise),
    **{f: _conv_function(False) for f in (F.conv1d, F.conv2d, F.conv3d)},
    **{f: _conv_function(True) for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)},
    F.linear: OpSpec(linear_function, fl.linear_function, carries=linear_carries, params={"weight": 1, "bias": 2}),
    F.batch_norm: OpSpec(holder_function(_BATCH_NORM_PARAMS), fl.batch_norm_function, carries=holder_carries,
                         params=_BATCH_NORM_PARAMS),
    F.instance_norm: OpSpec(holder_function(_BATCH_NORM_PARAMS), fl.affine_norm_function(3), carries=holder_carries,
                            params=_BATCH_NORM_PARAMS),
    F.group_norm: OpSpec(group_norm_function, fl.affine_norm_function(2), carries=holder_carries,
                         params={"weight": 2, "bias": 3}),
    F.prelu: OpSpec(holder_function({"weight": 1}), carries=holder_carries, params={"weight": 1}),
    F.layer_norm: OpSpec(layernorm_function, fl.affine_norm_function(2)),
    **{f: OpSpec(spatial(1)) for f in (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d,
                                       torch.max_pool1d, torch.avg_pool1d, torch.adaptive_avg_pool1d)},
    **{f: OpSpec(spatial(2)) for f in (F.max_pool2d, F.avg_pool2d, F.adaptive_max_pool2d, torch.max_pool2d,
                                       F.lp_pool2d)},
    F.adaptive_avg_pool2d: OpSpec(spatial(2), fl.adaptive_avg_pool2d, shape=adaptive_pool_shape(2)),
    **{f: OpSpec(spatial(3)) for f in (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d,
                                       torch.max_pool3d)},
    F.interpolate: OpSpec(interpolate, fl.upsample()),  # F.upsample* call it: it is what is recorded
    F.grid_sample: OpSpec(unknown, fl.grid_sample),
    F.pad: OpSpec(pad),
    torch.roll: _same(along_dims(2)),
    torch.flip: _same(along_dims(1)),
    torch.rot90: OpSpec(along_dims(2, default=(0, 1))),
    **{f: OpSpec(along_dim(1, implicit=_softmax_dim)) for f in (F.softmax, F.log_softmax, F.softmin)},
    **{f: OpSpec(along_dim(1)) for f in (torch.softmax, torch.log_softmax, torch.cumsum, torch.cumprod)},
    F.normalize: OpSpec(along_dim(2, default=1)),
    F.glu: OpSpec(glu),
    **{f: OpSpec(cat, shape=cat_shape) for f in (torch.cat, torch.concat, torch.concatenate)},
    torch.stack: OpSpec(stack),
    **{f: OpSpec(split) for f in (torch.split, torch.chunk, torch.tensor_split, torch.unbind)},
    torch.narrow: OpSpec(narrow),
    operator.getitem: OpSpec(getitem),
    **{f: OpSpec(reshape) for f in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)},
    **{f: OpSpec(permute) for f in (torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.moveaxis,
                                    torch.t)},
    **{f: OpSpec(reduce) for f in _REDUCTIONS},
    **{f: OpSpec(pixel_shuffle) for f in (torch.pixel_shuffle, F.pixel_shuffle)},
    **{f: OpSpec(pixel_unshuffle) for f in (torch.pixel_unshuffle, F.pixel_unshuffle)},
    torch.channel_shuffle: OpSpec(pin_all("channel shuffle reorders channels")),
    **{f: OpSpec(unknown, fl.matmul) for f in (torch.matmul, operator.matmul, torch.mm)},
    torch.bmm: OpSpec(unknown, fl.bmm),
    torch.addmm: OpSpec(unknown, fl.addmm),
    torch.einsum: OpSpec(unknown, fl.einsum),
    getattr: OpSpec(attribute), torch.numel: OpSpec(no_channels),
}

_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "rsqrt",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "contiguous", "float", "half", "double",
    "bfloat16", "to", "type", "type_as", "clone", "detach", "requires_grad_", "square", "log", "sign",
    "exp_", "nan_to_num", "erf", "cpu", "cuda", "isnan", "isfinite", "isinf", "logical_not",
    "int", "long", "bool", "reciprocal", "floor", "ceil", "round", "sin", "cos", "expm1", "log1p", "abs_", "neg_",
]
_BINARY_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "maximum", "minimum",
    "pow", "pow_", "fmod", "where", "eq", "ne", "lt", "le", "gt", "ge", "atan2", "remainder", "lerp", "lerp_",
    "addcmul", "addcmul_", "addcdiv", "addcdiv_", "masked_fill", "masked_fill_",
]

METHODS: dict[str, OpSpec] = {
    **{m: OpSpec(passthrough) for m in _UNARY_METHODS},
    **{m: OpSpec(elementwise) for m in _BINARY_METHODS},
    **{m: OpSpec(along_dim(1)) for m in ("softmax", "log_softmax", "cumsum")},
    **{m: OpSpec(split) for m in ("split", "chunk", "tensor_split", "unbind")},
    "narrow": OpSpec(narrow),
    "roll": OpSpec(along_dims(2)),
    "flip": OpSpec(along_dims(1, varargs=True)),
    "rot90": OpSpec(along_dims(2, default=(0, 1))),
    **{m: OpSpec(reshape) for m in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as")},
    **{m: OpSpec(permute) for m in ("permute", "transpose", "t", "swapaxes", "movedim")},
    **{m: OpSpec(expand) for m in ("expand", "expand_as", "repeat")},
    **{m: OpSpec(reduce) for m in ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod",
                                   "any", "all", "count_nonzero")},
    **{m: OpSpec(unknown, fl.matmul) for m in ("matmul", "mm")},
    "bmm": OpSpec(unknown, fl.bmm),
    **{m: OpSpec(no_channels) for m in ("size", "dim", "numel")},
}


def per_channel_tensor(op: Op):
    """A parameter or buffer of the model with one dim longer than 1, read only element-wise (through
    reshapes and element-wise functions): a per-channel scale, shift or threshold (layer scale,
    FilterResponseNorm's weight, bias and tau). Its positions are channels of whatever it meets, and it
    is sliced with them; channels it meets that no layer produces stay (see ChannelGraph). Any other
    tensor is a constant whose channels stay."""
    value, target = op.out, str(op.node.target)
    long_dims = [d for d, n in enumerate(value.shape) if n > 1] if isinstance(value, torch.Tensor) else []
    owner, _, attr = target.rpartition(".")
    module = (op.modules or {}).get(owner)
    held = module is not None and (attr in module._parameters or attr in module._buffers)
    if len(long_dims) != 1 or not held or not _read_element_wise(op.node):
        return constant(op)
    atoms = op.state.new_atoms(target, value.shape[long_dims[0]])
    op.state.add_slice(target, long_dims[0], atoms)
    op.node.meta["prunekit_per_channel"] = True  # a derived graph cuts it with its channels
    return Chan(long_dims[0], atoms)


def _read_element_wise(node: fx.Node) -> bool:
    """Every use of ``node``'s value is element-wise, directly or after ops that keep its positions."""
    for user in node.users:
        rule = spec_for_target(user.op, user.target, None).rule if user.op in ("call_function", "call_method") \
            else None
        if rule is elementwise or (rule in (reshape, expand, getitem, passthrough) and _read_element_wise(user)):
            continue
        return False
    return bool(node.users)


_UNKNOWN = OpSpec(unknown)
_GRAPH_NODES = {"placeholder": OpSpec(model_input), "get_attr": OpSpec(per_channel_tensor),
                "output": OpSpec(model_output)}


def register(key: type | Callable | str, spec: OpSpec) -> None:
    """Teach prunekit an op: a module type, a function, or a tensor method's name."""
    table = MODULES if isinstance(key, type) else METHODS if isinstance(key, str) else FUNCTIONS
    table[key] = spec


def module_spec(module: nn.Module) -> OpSpec | None:
    """The record of a module's exact type (a leaf when traced), or None."""
    kind = type(module)
    spec = MODULES.get(kind)
    if spec is None and kind.__module__.split(".")[0] in ("torchvision", "timm", "monai"):
        spec = NAMED_MODULES.get(f"{kind.__module__}.{kind.__qualname__}")
    return spec


def layer_spec(module: nn.Module) -> OpSpec | None:
    """The record of the closest known class of a layer, subclasses included (for resizing)."""
    for kind in type(module).__mro__:
        if kind in MODULES and MODULES[kind].resize is not None:
            return MODULES[kind]
    return None


def spec_for_target(kind: str, target, module: nn.Module | None) -> OpSpec:
    if kind == "call_module":
        return module_spec(module) or _UNKNOWN
    if kind == "call_function":
        return FUNCTIONS.get(target, _UNKNOWN)
    if kind == "call_method":
        return METHODS.get(target, _UNKNOWN)
    return _GRAPH_NODES.get(kind, _UNKNOWN)


def spec_for(node: fx.Node, module: nn.Module | None) -> OpSpec:
    leaf = node.meta.get("prunekit_leaf")
    if leaf is not None:  # a module traced as one opaque op
        return OpSpec(pin_all(leaf))
    return spec_for_target(node.op, node.target, module)


def is_leaf_type(module: nn.Module) -> bool:
    return module_spec(module) is not None


def width_attributes() -> tuple[str, ...]:
    """Every size attribute a resize may rewrite (what a manifest may set)."""
    return tuple(dict.fromkeys(a for spec in MODULES.values() for a in spec.widths))
