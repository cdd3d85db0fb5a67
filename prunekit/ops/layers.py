"""Layers with weights: producers (conv, transposed conv, linear) and per-channel holders
(norms, PReLU), their channel rules and how a resize rewrites their size attributes."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from ..graphs.state import Chan
from .channels import passthrough
from .op import Op, pin_all, unknown


def _param_name(op: Op, raw) -> str | None:
    """Qualified name of a parameter passed straight from a get_attr node."""
    if isinstance(raw, fx.Node) and raw.op == "get_attr":
        return str(raw.target)
    return None


def _conv_core(op: Op, name: str, weight: torch.Tensor, has_bias: bool, groups: int,
               transposed: bool, weight_name: str, bias_name: str | None, module: bool):
    chan, x = op.chan(0, "input"), op.value(0, "input")
    out = op.out
    state = op.state
    spatial_rank = weight.dim() - 2
    if x.dim() != spatial_rank + 2:
        return unknown(op)
    cin = x.shape[1]
    cout = out.shape[1]
    if chan is None:
        chan = Chan(1, state.new_atoms(f"input of {name}", cin, pin="created by an op"))
    if chan.dim != 1:
        state.pin(chan.atoms, f"channels not on dim 1 ({op.label()})")
        chan = Chan(1, state.new_atoms(f"input of {name}", cin, pin="untracked input"))
    in_atoms = chan.atoms
    out_dim_w, in_dim_w = (1, 0) if transposed else (0, 1)
    kind = "conv_transpose" if transposed else "conv"
    cin_g, cout_g = cin // groups, cout // groups
    grouping = conv_grouping(groups, cin, cout)
    if grouping is None:
        out_atoms = state.producer_atoms(name, cout, kind, (weight_name, out_dim_w))
        state.add_slice(weight_name, in_dim_w, in_atoms)
        state.add_slice(weight_name, out_dim_w, out_atoms)
    elif grouping == "depthwise":
        # depthwise: each channel keeps its unit, and this layer owns a filter of it
        out_atoms = in_atoms
        state.shared_producer(name, in_atoms, "depthwise", (weight_name, 0))
        state.add_slice(weight_name, 0, in_atoms)
        state.grouping[name] = ("depthwise", groups)
    elif grouping == "positions":
        # grouped: channel j of every group leaves together, so the groups stay and each shrinks
        out_atoms = state.producer_atoms(name, cout, kind, (weight_name, out_dim_w))
        for atoms, size in ((in_atoms, cin_g), (out_atoms, cout_g)):
            for g in range(1, groups):
                state.unite_vectors(atoms[:size], atoms[g * size:(g + 1) * size])
        state.add_slice(weight_name, in_dim_w, in_atoms if transposed else in_atoms[:cin_g])
        state.add_slice(weight_name, out_dim_w, out_atoms[:cout_g] if transposed else out_atoms)
        state.grouping[name] = ("positions", groups)
    else:
        # one channel per group on a side (depthwise with a multiplier): whole groups leave
        out_atoms = state.producer_atoms(name, cout, kind, (weight_name, out_dim_w))
        for g in range(groups):
            members = in_atoms[g * cin_g:(g + 1) * cin_g] + out_atoms[g * cout_g:(g + 1) * cout_g]
            for a in members[1:]:
                state.unite(members[0], a)
        state.add_slice(weight_name, 0, in_atoms if transposed else out_atoms)
        state.grouping[name] = ("whole", groups)
    if has_bias and bias_name:
        state.add_slice(bias_name, 0, out_atoms)
    if module:
        state.add_width(name, "in", in_atoms)
        state.add_width(name, "out", out_atoms)
    return Chan(1, out_atoms)


def conv_grouping(groups: int, cin: int, cout: int) -> str | None:
    """How a convolution's channels are cut: None (one group), "depthwise", "positions" (channel j of
    every group: the groups stay) or "whole" (one channel per group on a side: whole groups leave)."""
    if groups == 1:
        return None
    if groups == cin == cout:
        return "depthwise"
    return "positions" if cin // groups > 1 and cout // groups > 1 else "whole"


def _hooked_weight(m: nn.Module) -> bool:
    """The weight is recomputed by a hook (old-style weight_norm, spectral_norm): nothing to slice."""
    return "weight" not in m._parameters and "weight" not in m._buffers


def conv_module(op: Op):
    m = op.module
    if _hooked_weight(m):
        return pin_all("weight computed by a hook (weight_norm or spectral_norm)")(op)
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    name = op.name
    return _conv_core(op, name, m.weight, m.bias is not None, m.groups, transposed,
                      f"{name}.weight", f"{name}.bias", module=True)


def _weight_and_bias(op: Op) -> tuple[str, str | None] | None:
    """Qualified names of a functional layer's weight and bias; None unless both come
    straight from the model's tensors (a computed weight cannot be sliced)."""
    weight_name = _param_name(op, op.raw(1, "weight"))
    bias_raw = op.raw(2, "bias")
    bias_name = _param_name(op, bias_raw)
    if weight_name is None or (bias_raw is not None and bias_name is None):
        return None
    return weight_name, bias_name


def conv_function(transposed: bool) -> Callable[[Op], Any]:
    def rule(op: Op):
        names = _weight_and_bias(op)
        if names is None:
            return unknown(op)
        weight_name, bias_name = names
        groups = op.value(6, "groups", 1)
        layer = _layer_of(op, weight_name, nn.modules.conv._ConvNd)
        if layer is not None and groups == layer[1].groups:
            # a conv subclass calling F.conv2d with its own weight and groups (same padding...):
            # its attributes follow the cut like a Conv2d's
            return _conv_core(op, layer[0], op.value(1, "weight"), bias_name is not None, groups, transposed,
                              weight_name, bias_name, module=True)
        if groups != 1:  # a literal in the forward: it would not follow the removed channels
            return pin_all("groups of a functional convolution are fixed in code")(op)
        return _conv_core(op, weight_name.rsplit(".", 1)[0] if weight_name.endswith(".weight") else weight_name,
                          op.value(1, "weight"), bias_name is not None, groups, transposed,
                          weight_name, bias_name, module=False)

    return rule


def _linear_core(op: Op, name: str, weight_name: str, bias_name: str | None, module: bool):
    chan, x, out = op.chan(0, "input"), op.value(0, "input"), op.out
    state = op.state
    last = x.dim() - 1
    if chan is not None and chan.dim != last:
        if not all(a in state.pin_reason for a in chan.atoms):
            return chan  # features from an untracked dim; the tracked one passes through
        chan = None  # nothing to track there: make the features the channels
    if chan is None:
        chan = Chan(last, state.new_atoms(f"input of {name}", x.shape[-1], pin="created by an op"))
    out_atoms = state.producer_atoms(name, out.shape[-1], "linear", (weight_name, 0))
    state.add_slice(weight_name, 1, chan.atoms)
    state.add_slice(weight_name, 0, out_atoms)
    if bias_name:
        state.add_slice(bias_name, 0, out_atoms)
    if module:
        state.add_width(name, "in", chan.atoms)
        state.add_width(name, "out", out_atoms)
    return Chan(out.dim() - 1, out_atoms)


def linear_module(op: Op):
    if _hooked_weight(op.module):
        return pin_all("weight computed by a hook (weight_norm or spectral_norm)")(op)
    name = op.name
    return _linear_core(op, name, f"{name}.weight", f"{name}.bias" if op.module.bias is not None else None, True)


def linear_function(op: Op):
    names = _weight_and_bias(op)
    if names is None:
        return unknown(op)
    layer = _layer_of(op, names[0], nn.Linear)
    if layer is not None:
        return _linear_core(op, layer[0], names[0], names[1], True)
    return _linear_core(op, names[0], names[0], names[1], False)


def _layer_of(op: Op, tensor_name: str, kind) -> tuple[str, nn.Module] | None:
    """(name, module) when ``tensor_name`` is the own tensor of a layer of type ``kind`` (a functional
    call inside a subclass of a known layer), so that its size attributes can follow a cut."""
    owner, _, attr = tensor_name.rpartition(".")
    module = (op.modules or {}).get(owner)
    return (owner, module) if isinstance(module, kind) and isinstance(getattr(module, attr, None), torch.Tensor) \
        else None


def _holder(op: Op, tensors: list[str], group_size: int = 1, name: str | None = None):
    """A channel-wise op owning per-channel tensors (BatchNorm, PReLU...)."""
    chan = op.chan(0, "input")
    if chan is None:
        return op.opaque("created by an op")
    if chan.dim != 1:
        return unknown(op)
    if group_size > 1:
        for g in range(0, len(chan.atoms), group_size):
            block = chan.atoms[g:g + group_size]
            for a in block[1:]:
                op.state.unite(block[0], a)
    for t in tensors:
        op.state.add_slice(t, 0, chan.atoms)
    name = name or (op.name if op.node.op == "call_module" else None)
    if name:
        op.state.add_width(name, "in", chan.atoms)
    return chan


def _owned(m: nn.Module, name: str, attrs: tuple[str, ...]) -> list[str]:
    return [f"{name}.{a}" for a in attrs if isinstance(getattr(m, a, None), torch.Tensor)]


def batchnorm_module(op: Op):
    return _holder(op, _owned(op.module, op.name, ("weight", "bias", "running_mean", "running_var")))


def groupnorm_module(op: Op):
    m = op.module
    if m.num_groups == 1:
        return pin_all("GroupNorm with one group normalises over every channel")(op)
    return _holder(op, _owned(m, op.name, ("weight", "bias")), group_size=m.num_channels // m.num_groups)


def prelu_module(op: Op):
    if op.module.num_parameters == 1:
        return passthrough(op)
    return _holder(op, _owned(op.module, op.name, ("weight",)))


def holder_function(param_args: dict[str, int]):
    """Functional BatchNorm / InstanceNorm / PReLU with get_attr tensors."""

    def rule(op: Op):
        names = []
        for keyword, index in param_args.items():
            raw = op.raw(index, keyword)
            if raw is None:
                continue
            pname = _param_name(op, raw)
            if pname is None:
                return unknown(op)
            names.append(pname)
        if param_args.get("weight") == 1 and op.value(1, "weight").numel() == 1:  # scalar PReLU
            return passthrough(op)
        layer = _layer_of(op, names[0], (nn.modules.batchnorm._NormBase, nn.PReLU)) if names else None
        return _holder(op, names, name=layer[0] if layer else None)

    return rule


def group_norm_function(op: Op):
    """F.group_norm inside a GroupNorm subclass (GroupNormAct...): its groups follow the cut as a
    GroupNorm's do; anywhere else the group count is fixed in code, so the channels stay."""
    names = [n for key, index in (("weight", 2), ("bias", 3)) if (n := _param_name(op, op.raw(index, key)))]
    layer = _layer_of(op, names[0], nn.GroupNorm) if names else None
    groups = op.value(1, "num_groups")
    if layer is None or groups != layer[1].num_groups:
        return pin_all("functional group_norm: num_groups is fixed in code")(op)
    if groups == 1:
        return pin_all("GroupNorm with one group normalises over every channel")(op)
    return _holder(op, names, group_size=layer[1].num_channels // groups, name=layer[0])


def norm_over_trailing(op: Op, normalized_ndim: int):
    chan, x = op.chan(0, "input"), op.value(0, "input")
    if chan is None:
        return op.opaque("created by an op")
    if chan.dim >= x.dim() - normalized_ndim:
        op.pin_inputs("normalises over channels")
        return op.opaque("normalised over channels")
    return chan


def layernorm_module(op: Op):
    return norm_over_trailing(op, len(op.module.normalized_shape))


def layernorm_function(op: Op):
    shape = op.value(1, "normalized_shape")
    return norm_over_trailing(op, 1 if isinstance(shape, int) else len(shape))


# ---------------------------------------------------------------------------
# Resizing: the size attributes a cut rewrites, from the kept widths


def resize_conv(m: nn.Module, widths: dict[str, int], original: dict, grouping: str) -> None:
    cin, cout = widths.get("in"), widths.get("out")
    groups = original.get("groups", 1)
    if groups > 1 and grouping != "positions":  # depthwise, or whole groups removed
        m.groups = groups * cin // original["in_channels"]
    m.in_channels = cin
    m.out_channels = cout if cout is not None else cin


def resize_linear(m: nn.Module, widths: dict[str, int], original: dict, grouping: str) -> None:
    m.in_features, m.out_features = widths.get("in"), widths.get("out")


def resize_norm(m: nn.Module, widths: dict[str, int], original: dict, grouping: str) -> None:
    m.num_features = widths["in"]


def resize_groupnorm(m: nn.Module, widths: dict[str, int], original: dict, grouping: str) -> None:
    m.num_groups = original["num_groups"] * widths["in"] // original["num_channels"]
    m.num_channels = widths["in"]


def resize_prelu(m: nn.Module, widths: dict[str, int], original: dict, grouping: str) -> None:
    m.num_parameters = widths["in"]


# ---------------------------------------------------------------------------
# Which tensors carry a channel's value: zeroing those positions silences the channel
# (a producer's output rows, biases, norm scales); the rest is only sliced (inputs, statistics)


def conv_carries(transposed: bool | None = None):
    def carries(role: str, dim: int, module: nn.Module | None, sliced: set[int]) -> bool | None:
        if role == "bias":
            return True
        if role == "weight":
            flipped = module.transposed if transposed is None else transposed
            # a transposed conv's outputs are dim 1, unless only dim 0 is cut (depthwise, whole groups)
            return dim == (1 if flipped and 1 in sliced else 0)
        return None

    return carries


def linear_carries(role: str, dim: int, module: nn.Module | None, sliced: set[int]) -> bool | None:
    return {"bias": True, "weight": dim == 0}.get(role)


def holder_carries(role: str, dim: int, module: nn.Module | None, sliced: set[int]) -> bool | None:
    return {"weight": True, "bias": True, "running_mean": False, "running_var": False}.get(role)
