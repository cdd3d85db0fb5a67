"""The channel rules: one table from op to the function that maps channels.

Every op prunekit understands is listed in ``MODULE_RULES``, ``FUNCTION_RULES``
and ``METHOD_RULES`` at the bottom of this file. A rule receives an
:class:`Op` (the node, its real argument values and output, and the channel
vectors of its inputs) and returns the channel vector(s) of its output. It
may unite atoms (residual adds, concatenated skips that meet again), pin them
(anything that mixes channels), or record that a parameter must be sliced.

Anything not in the tables is pinned: prunekit never guesses.
Supporting a new op is one entry here and, at most, one small function.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import stochastic_depth

from .state import Chan, ChannelState

# ---------------------------------------------------------------------------
# The op handed to every rule


@dataclass
class Op:
    node: fx.Node
    args: tuple
    kwargs: dict
    out: Any
    module: nn.Module | None
    state: ChannelState
    chans: dict  # fx.Node -> channel structure of its value
    live: bool = True  # False when the value never reaches the output (it only steers Python)
    modules: dict | None = None  # the traced model's layers by name, to find a functional op's weight's layer

    @property
    def name(self) -> str:
        return str(self.node.target) if self.node.op == "call_module" else self.node.name

    def label(self) -> str:
        target = self.node.target
        if self.node.op == "call_module":
            return f"{type(self.module).__name__} '{target}'"
        if self.node.op == "call_method":
            return f"method .{target}() at '{self.node.name}'"
        return f"{getattr(target, '__name__', str(target))}() at '{self.node.name}'"

    def raw(self, index: int, keyword: str | None = None, default=None):
        """The unevaluated argument (an fx.Node or a constant)."""
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(keyword, default) if keyword else default

    def value(self, index: int, keyword: str | None = None, default=None):
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(keyword, default) if keyword else default

    def chan(self, index: int = 0, keyword: str | None = None):
        arg = self.raw(index, keyword)
        return self.chans.get(arg) if isinstance(arg, fx.Node) else None

    def all_chans(self) -> list[Chan]:
        found: list[Chan] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: _collect(self.chans.get(n), found))
        return found

    def pin_inputs(self, why: str) -> None:
        for c in self.all_chans():
            self.state.pin(c.atoms, f"{why} ({self.label()})")
        # a channel count read in code (n, c, h, w = t.size()) and handed to this op stays fixed too
        for source, dim in _size_reads(self.node):
            chan = self.chans.get(source)
            shape = source.meta.get("prunekit_shape")
            if isinstance(chan, Chan) and (dim is None or (isinstance(shape, tuple)
                                                          and _norm_dim(dim, len(shape)) == chan.dim)):
                self.state.pin(chan.atoms, f"its channel count is read by {self.label()}")

    def opaque(self, why: str):
        """Fresh pinned channels for every tensor in the output.

        A same-rank output keeps the input's channel dim, so a Linear after a
        LayerNorm over channels still finds its features on the last dim.
        """
        reason = f"{why} ({self.label()})"
        first, x = self.chan(0, "input"), self.value(0, "input")
        if (isinstance(first, Chan) and isinstance(self.out, torch.Tensor) and isinstance(x, torch.Tensor)
                and self.out.dim() == x.dim()):
            return Chan(first.dim, self.state.new_atoms(self.name, self.out.shape[first.dim], pin=reason))
        return opaque(self.state, self.out, reason, self.name)


def _is_tensor_node(node: fx.Node) -> bool:
    shape = node.meta.get("prunekit_shape")
    return isinstance(shape, tuple) and all(isinstance(s, int) for s in shape)


def _size_reads(node: fx.Node) -> list[tuple[fx.Node, int | None]]:
    """(tensor, dim) for every size query that the non-tensor arguments of ``node`` are computed from."""
    found, seen = [], set()
    stack = [n for n in node.all_input_nodes if not _is_tensor_node(n)]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        source = _shape_source(n)
        if source is not None:
            found.append(source)
        elif n.op in ("call_function", "call_method"):
            stack.extend(m for m in n.all_input_nodes if not _is_tensor_node(m))
    return found


def _collect(chan, found: list) -> None:
    if isinstance(chan, Chan):
        found.append(chan)
    elif isinstance(chan, (tuple, list)):
        for c in chan:
            _collect(c, found)
    elif isinstance(chan, dict):
        for c in chan.values():
            _collect(c, found)


def opaque(state: ChannelState, value, reason: str, label: str):
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return None
        dim = 1 if value.dim() >= 2 else 0
        return Chan(dim, state.new_atoms(label, value.shape[dim], pin=reason))
    if isinstance(value, (tuple, list)):
        return type(value)(opaque(state, v, reason, label) for v in value) if not _is_namedtuple(value) else tuple(
            opaque(state, v, reason, label) for v in value
        )
    if isinstance(value, dict):
        return {k: opaque(state, v, reason, label) for k, v in value.items()}
    return None


def _is_namedtuple(value) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _ndim(value) -> int:
    return value.dim() if isinstance(value, torch.Tensor) else 0


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# ---------------------------------------------------------------------------
# Generic rules


def unknown(op: Op):
    op.pin_inputs("op not understood")
    return op.opaque("output of an op not understood")


def pin_all(why: str) -> Callable[[Op], Any]:
    def rule(op: Op):
        op.pin_inputs(why)
        return op.opaque(why)

    return rule


def model_output(op: Op):
    op.pin_inputs("model output")
    return None


def model_input(op: Op):
    return opaque(op.state, op.out, "model input", f"input '{op.node.name}'")


def constant(op: Op):
    return opaque(op.state, op.out, f"constant tensor '{op.node.target}'", str(op.node.target))


def no_channels(op: Op):
    """Shape queries (x.size(), x.dim()...) read no channel values."""
    return None


def passthrough(op: Op):
    """Element-wise on one tensor: channel i in, channel i out."""
    chan = op.chan(0, "input")
    if chan is None or not isinstance(op.out, torch.Tensor):
        return unknown(op) if chan is not None else op.opaque("created by an op")
    if op.out.dim() != _ndim(op.value(0, "input")):
        return unknown(op)
    return chan


def spatial(rank: int | None = None) -> Callable[[Op], Any]:
    """Ops over the trailing spatial dims of an (N, C, *spatial) tensor."""

    def rule(op: Op):
        chan, x = op.chan(0, "input"), op.value(0, "input")
        if chan is None:
            return op.opaque("created by an op")
        ndim = _ndim(x)
        expected = ndim if rank is None else rank + 2
        out = op.out[0] if isinstance(op.out, tuple) else op.out
        if chan.dim != 1 or ndim != expected or ndim < 3 or out.shape[1] != x.shape[1]:
            return unknown(op)
        return tuple(chan for _ in op.out) if isinstance(op.out, tuple) else chan

    return rule


def elementwise(op: Op):
    """add / sub / mul / div / where...: unite slot i of every full-size operand."""
    out = op.out
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return None if not op.all_chans() else unknown(op)
    operands = []
    for i, raw in enumerate(op.node.args):
        operands.append((raw, op.args[i]))
    for key in ("other", "input", "self"):
        if key in op.node.kwargs:
            operands.append((op.node.kwargs[key], op.kwargs[key]))
    tensors = [(op.chans.get(raw) if isinstance(raw, fx.Node) else None, val)
               for raw, val in operands if isinstance(val, torch.Tensor) and val.dim() > 0]
    ndim = out.dim()
    # the output keeps the tracked dim of the first operand that is full size there
    target = None
    for chan, val in tensors:
        if isinstance(chan, Chan):
            d = chan.dim + ndim - val.dim()
            if out.shape[d] == val.shape[chan.dim]:
                target = (d, chan)
                break
    if target is None:
        return unknown(op) if op.all_chans() else op.opaque("created by an op")
    out_dim, out_chan = target
    for chan, val in tensors:
        offset = ndim - val.dim()
        local = out_dim - offset
        size = val.shape[local] if local >= 0 else 1
        if size == 1 and out.shape[out_dim] != 1:
            continue  # broadcast along the channels: couples nothing
        if isinstance(chan, Chan) and chan.dim == local:
            op.state.unite_vectors(out_chan.atoms, chan.atoms)
        else:
            op.pin_inputs("mixed with a tensor whose channels are not tracked")
            return op.opaque("mixed with a tensor whose channels are not tracked")
    return Chan(out_dim, out_chan.atoms)


# ---------------------------------------------------------------------------
# Producers and per-channel parameter holders


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
    if groups == 1:
        out_atoms = state.producer_atoms(name, cout, kind, (weight_name, out_dim_w))
        state.add_slice(weight_name, in_dim_w, in_atoms)
        state.add_slice(weight_name, out_dim_w, out_atoms)
    elif groups == cin == cout:
        # depthwise: each channel keeps its unit, and this layer owns a filter of it
        out_atoms = in_atoms
        state.shared_producer(name, in_atoms, "depthwise", (weight_name, 0))
        state.add_slice(weight_name, 0, in_atoms)
        state.grouping[name] = ("depthwise", groups)
    elif cin_g > 1 and cout_g > 1:
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
# Ops along one dimension


def _softmax_dim(ndim: int) -> int:
    return 0 if ndim in (0, 1, 3) else 1


def along_dim(index: int, keyword: str = "dim", default=None, implicit=None):
    """softmax, cumsum, normalize...: mixing along ``dim`` pins when it is the channel dim."""

    def rule(op: Op):
        chan, x = op.chan(0, "input"), op.value(0, "input")
        if chan is None:
            return op.opaque("created by an op")
        if op.module is not None:
            dim = getattr(op.module, keyword, default)
        else:
            dim = op.value(index, keyword, default)
        if dim is None:
            dim = implicit(x.dim()) if implicit else None
        if dim is None or _norm_dim(dim, x.dim()) == chan.dim:
            op.pin_inputs("mixes channels")
            return op.opaque("mixes channels")
        return chan

    return rule


def softmax2d(op: Op):
    op.pin_inputs("mixes channels")
    return op.opaque("mixes channels")


def reduce(op: Op):
    """mean / sum / amax over some dims; pinned when the channel dim is reduced."""
    chan, x = op.chan(0, "input"), op.value(0, "input")
    second = op.value(1, "other")
    if isinstance(second, torch.Tensor):  # torch.max(a, b): element-wise
        return elementwise(op)
    if chan is None:
        return op.opaque("created by an op")
    dims = op.value(1, "dim")
    if dims is None:
        dims = op.kwargs.get("axis")
    keepdim = op.value(2, "keepdim", False)
    ndim = x.dim()
    if dims is None:
        dims = list(range(ndim))
    elif isinstance(dims, int):
        dims = [dims]
    dims = {_norm_dim(d, ndim) for d in dims}
    if chan.dim in dims:
        if op.live:  # a reduction that only steers Python runs with any channel count
            op.pin_inputs("reduces over channels")
        return op.opaque("reduced over channels")
    new_dim = chan.dim if keepdim else chan.dim - sum(d < chan.dim for d in dims)
    out = Chan(new_dim, chan.atoms)
    if isinstance(op.out, tuple):  # max(dim) -> (values, indices)
        return tuple(out for _ in op.out)
    return out


def cat(op: Op):
    tensors = op.value(0, "tensors")
    raws = op.raw(0, "tensors")
    dim = _norm_dim(op.value(1, "dim", 0), op.out.dim())
    chans = [op.chans.get(r) if isinstance(r, fx.Node) else None for r in raws]
    if any(c is None for c in chans):
        state = op.state
        chans = [c if c is not None else Chan(1 if t.dim() >= 2 else 0,
                                               state.new_atoms(op.name, t.shape[1 if t.dim() >= 2 else 0],
                                                               pin="created by an op"))
                 for c, t in zip(chans, tensors)]
    first = chans[0]
    if any(c.dim != first.dim for c in chans):
        return unknown(op)
    if dim == first.dim:
        return Chan(first.dim, tuple(a for c in chans for a in c.atoms))
    for c in chans[1:]:
        op.state.unite_vectors(first.atoms, c.atoms)
    return first


def stack(op: Op):
    raws = op.raw(0, "tensors")
    dim = _norm_dim(op.value(1, "dim", 0), op.out.dim())
    chans = [op.chans.get(r) if isinstance(r, fx.Node) else None for r in raws]
    if any(c is None for c in chans) or any(c.dim != chans[0].dim for c in chans):
        return unknown(op)
    for c in chans[1:]:
        op.state.unite_vectors(chans[0].atoms, c.atoms)
    return Chan(chans[0].dim + (dim <= chans[0].dim), chans[0].atoms)


def _pieces(op: Op, chan: Chan, sizes: list[int]):
    out, start = [], 0
    for size in sizes:
        out.append(Chan(chan.dim, chan.atoms[start:start + size]))
        start += size
    return tuple(out)


def split(op: Op):
    """split / tensor_split / chunk / unbind along a dim."""
    chan, x = op.chan(0, "input"), op.value(0, "input")
    if chan is None:
        return op.opaque("created by an op")
    method = op.node.target if op.node.op == "call_method" else op.node.target.__name__
    if method == "unbind":
        dim = _norm_dim(op.value(1, "dim", 0), x.dim())
        if dim == chan.dim:
            op.pin_inputs("splits channels apart")
            return op.opaque("split from pinned channels")
        return tuple(Chan(chan.dim - (dim < chan.dim), chan.atoms) for _ in op.out)
    dim_index = 2
    dim = _norm_dim(op.value(dim_index, "dim", 0), x.dim())
    if dim != chan.dim:
        return tuple(chan for _ in op.out)
    sizes = [t.shape[dim] for t in op.out]
    if method == "chunk" and len(set(sizes)) == 1:
        # equal chunks stay equal if each loses the same slots: unite them
        for piece in _pieces(op, chan, sizes)[1:]:
            op.state.unite_vectors(chan.atoms[:sizes[0]], piece.atoms)
        return _pieces(op, chan, sizes)
    op.state.pin(chan.atoms, f"split into fixed sizes ({op.label()})")
    return _pieces(op, chan, sizes)


def narrow(op: Op):
    chan, x = op.chan(0, "input"), op.value(0, "input")
    if chan is None:
        return op.opaque("created by an op")
    dim = _norm_dim(op.value(1, "dim"), x.dim())
    if dim != chan.dim:
        return chan
    start, length = op.value(2, "start"), op.value(3, "length")
    start = _norm_dim(int(start), x.shape[dim])
    op.state.pin(chan.atoms, f"sliced with fixed bounds ({op.label()})")
    return Chan(chan.dim, chan.atoms[start:start + int(length)])


def getitem(op: Op):
    container = op.chan(0)
    index = op.value(1)
    if isinstance(op.value(0), torch.Tensor):
        return _index_tensor(op, container, op.value(0), index)
    if isinstance(container, (tuple, list)):
        return container[index] if isinstance(index, (int, slice)) else unknown(op)
    if isinstance(container, dict):
        return container.get(index)
    if container is None:
        return None if not isinstance(op.out, torch.Tensor) else op.opaque("created by an op")
    return unknown(op)


def _index_tensor(op: Op, chan, x: torch.Tensor, index):
    if chan is None:
        return op.opaque("created by an op")
    if not isinstance(index, tuple):
        index = (index,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        return unknown(op)
    if sum(i is Ellipsis for i in index) > 1:
        return unknown(op)
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (x.dim() - consumed))
        else:
            expanded.append(i)
    in_dim, out_dim = 0, 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if in_dim == chan.dim:
            if isinstance(i, slice) and i == slice(None):
                return Chan(out_dim, chan.atoms)
            op.pin_inputs("indexes channels with fixed bounds")
            if isinstance(i, slice):
                return Chan(out_dim, chan.atoms[i])
            return op.opaque("indexed from pinned channels")
        if not isinstance(i, int):
            out_dim += 1
        in_dim += 1
    return Chan(out_dim + (chan.dim - in_dim), chan.atoms)


def _size_args(op: Op):
    sizes = op.node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    if not sizes:
        sizes = op.node.kwargs.get("shape", op.node.kwargs.get("size", ()))
    return list(sizes)


def _shape_source(node) -> tuple[fx.Node, int | None] | None:
    """(tensor, dim) when ``node`` reads a tensor's size: t.size(i), t.shape[i]; dim None for the whole shape."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return (node.args[0], dim) if isinstance(node.args[0], fx.Node) and isinstance(dim, (int, type(None))) else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return (node.args[0], None) if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        whole = _shape_source(node.args[0])
        return (whole[0], node.args[1]) if whole and whole[1] is None else None
    return None


def _requested_size(op: Op, out_dim: int, out_ndim: int):
    """What the code asked for at output dim ``out_dim``: an int, (tensor node, its dim), or None if unknown."""
    if op.node.target in ("view_as", "reshape_as", "expand_as"):
        other = op.raw(1, "other")
        return (other, out_dim) if isinstance(other, fx.Node) else None
    sizes = _size_args(op)
    if len(sizes) == 1 and isinstance(sizes[0], fx.Node):  # x.view(y.shape), x.expand(y.size())
        whole = _shape_source(sizes[0])
        return (whole[0], out_dim) if whole and whole[1] is None else None
    if len(sizes) != out_ndim:
        return None
    size = sizes[out_dim]
    if isinstance(size, int):
        return size
    source = _shape_source(size)
    return source if source and source[1] is not None else None


def _follow_size(op: Op, out_dim: int, atoms: tuple[int, ...], out_ndim: int) -> str | None:
    """Make the channel count a reshape or expand asks for follow the pruning; else the reason to pin.

    -1 follows by itself; a size read from a tensor (x.size(1), x.shape[1],
    view_as(x)) follows that tensor's channels, so they are united with these.
    """
    size = _requested_size(op, out_dim, out_ndim)
    if isinstance(size, int):
        return None if size == -1 else "hard-coded channel count"
    if size is not None:
        node, dim = size
        chan, shape = op.chans.get(node), node.meta.get("prunekit_shape")
        if (isinstance(chan, Chan) and isinstance(shape, tuple) and len(chan.atoms) == len(atoms)
                and _norm_dim(dim, len(shape)) == chan.dim):
            op.state.unite_vectors(tuple(atoms), chan.atoms)
            return None
    return "channel count taken from elsewhere"


def reshape(op: Op):
    """view / reshape / flatten / squeeze / unsqueeze, mapped from the real shapes.

    The channel dim may stay whole (possibly moving) or merge with the dims
    after it (flatten before a Linear: each channel becomes a block of
    features). Splitting it (channel shuffle) pins.
    """
    chan, x, out = op.chan(0, "input"), op.value(0, "input"), op.out
    if chan is None:
        return op.opaque("created by an op")
    d = chan.dim
    before = math.prod(x.shape[:d])
    size = x.shape[d]
    after_dims = list(x.shape[d + 1:])
    oshape = list(out.shape)
    j, prod = 0, 1
    while j < len(oshape) and prod < before:
        prod *= oshape[j]
        j += 1
    while j < len(oshape) and oshape[j] == 1 and size != 1 and prod == before:
        j += 1
    mapped = None
    if prod == before and j < len(oshape):
        if oshape[j] == size:
            mapped = Chan(j, chan.atoms)
        elif size and oshape[j] % size == 0:
            block = oshape[j] // size
            partial = 1
            for dim_size in after_dims:
                if partial == block:
                    break
                partial *= dim_size
            if partial == block:
                mapped = Chan(j, tuple(a for a in chan.atoms for _ in range(block)))
    if mapped is None:
        op.pin_inputs("reshapes channels")
        return op.opaque("reshaped from pinned channels")
    # a literal size at the channel position would break once channels go
    if op.node.target in _SIZED_RESHAPES:
        why = _follow_size(op, mapped.dim, mapped.atoms, len(oshape))
        if why:
            op.pin_inputs(f"reshaped to a {why}")
    return mapped


def permute(op: Op):
    chan, x = op.chan(0, "input"), op.value(0, "input")
    if chan is None:
        return op.opaque("created by an op")
    ndim = x.dim()
    target = op.node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if name == "permute":
        dims = op.args[1:] if op.node.op == "call_method" else (op.value(1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        dims = [_norm_dim(int(v), ndim) for v in dims]
        return Chan(dims.index(chan.dim), chan.atoms)
    if name in ("t", "T", "mT") or (name == "getattr"):
        a, b = ndim - 2, ndim - 1
    elif name in ("transpose", "swapaxes", "swapdims"):
        a, b = (_norm_dim(op.value(i), ndim) for i in (1, 2))
    elif name in ("movedim", "moveaxis"):
        src, dst = op.value(1), op.value(2)
        if not isinstance(src, int):
            return unknown(op)
        order = [i for i in range(ndim) if i != _norm_dim(src, ndim)]
        order.insert(_norm_dim(dst, ndim), _norm_dim(src, ndim))
        return Chan(order.index(chan.dim), chan.atoms)
    else:
        return unknown(op)
    d = chan.dim
    return Chan(b if d == a else a if d == b else d, chan.atoms)


def expand(op: Op):
    chan, x, out = op.chan(0, "input"), op.value(0, "input"), op.out
    if chan is None:
        return op.opaque("created by an op")
    d = chan.dim + out.dim() - x.dim()
    if out.shape[d] != x.shape[chan.dim]:
        return unknown(op)
    if op.node.target == "repeat":
        sizes = _size_args(op)
        if len(sizes) == out.dim() and sizes[d] != 1:
            return unknown(op)
    if op.node.target in ("expand", "expand_as"):
        why = _follow_size(op, d, chan.atoms, out.dim())
        if why:
            op.pin_inputs(f"expanded to a {why}")
    return Chan(d, chan.atoms)


def glu(op: Op):
    chan, x = op.chan(0, "input"), op.value(0, "input")
    if chan is None:
        return op.opaque("created by an op")
    dim = op.module.dim if op.module is not None else op.value(1, "dim", -1)
    if _norm_dim(dim, x.dim()) != chan.dim:
        return chan
    half = len(chan.atoms) // 2
    op.state.unite_vectors(chan.atoms[:half], chan.atoms[half:])
    return Chan(chan.dim, chan.atoms[:half])


def pad(op: Op):
    chan, x = op.chan(0, "input"), op.value(0, "input")
    if chan is None:
        return op.opaque("created by an op")
    padding = op.module.padding if op.module is not None else op.value(1, "pad")
    padded_dims = len(padding) // 2 if isinstance(padding, (tuple, list)) else x.dim() - 2
    if chan.dim >= x.dim() - padded_dims:
        return unknown(op)
    return chan


def interpolate(op: Op):
    return spatial(None)(op)


def attribute(op: Op):
    """getattr on a tensor: .T / .mT transpose, .data is the same channels, anything else has none."""
    name = op.value(1)
    if name in ("T", "mT"):
        return permute(op)
    if name in ("data", "real"):
        return passthrough(op)
    return None


# ---------------------------------------------------------------------------
# The tables

_ACTIVATIONS = [
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
]

MODULE_RULES: dict[type, Callable[[Op], Any]] = {
    **{t: conv_module for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
    nn.Linear: linear_module,
    **{t: batchnorm_module for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                     nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                                     nn.SyncBatchNorm)},
    nn.GroupNorm: groupnorm_module,
    nn.LayerNorm: layernorm_module,
    nn.PReLU: prelu_module,
    **{t: passthrough for t in _ACTIVATIONS},
    **{t: spatial(1) for t in (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d)},
    **{t: spatial(2) for t in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                               nn.LPPool2d, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)},
    **{t: spatial(3) for t in (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)},
    nn.Upsample: spatial(None),
    **{t: pad for t in (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                        nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
                        nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)},
    nn.Flatten: reshape,
    nn.Softmax: along_dim(0, implicit=_softmax_dim),
    nn.LogSoftmax: along_dim(0, implicit=_softmax_dim),
    nn.Softmin: along_dim(0, implicit=_softmax_dim),
    nn.Softmax2d: softmax2d,
    nn.GLU: glu,
    nn.PixelShuffle: pin_all("PixelShuffle moves channels into space"),
    nn.PixelUnshuffle: pin_all("PixelUnshuffle moves space into channels"),
    nn.ChannelShuffle: pin_all("channel shuffle reorders channels"),
}

_UNARY_FUNCTIONS = [
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.sigmoid, F.tanh, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.threshold,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt,
    torch.rsqrt, torch.clamp, torch.clip, torch.square, torch.dropout, torch.log, torch.sign,
    torch.nan_to_num, torch.erf, operator.neg, operator.pos, torch.clone, torch.detach,
    torch.isnan, torch.isfinite, torch.isinf, operator.invert, torch.logical_not,
]
_BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.pow, operator.floordiv, torch.add, torch.sub, torch.mul,
    torch.div, torch.true_divide, torch.maximum, torch.minimum, torch.pow, torch.where, torch.fmod,
    torch.sub, torch.rsub, torch.multiply, torch.subtract, torch.divide,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge,
]

FUNCTION_RULES: dict[Any, Callable[[Op], Any]] = {
    **{f: passthrough for f in _UNARY_FUNCTIONS},
    **{f: elementwise for f in _BINARY_FUNCTIONS},
    F.conv1d: conv_function(False), F.conv2d: conv_function(False), F.conv3d: conv_function(False),
    F.conv_transpose1d: conv_function(True), F.conv_transpose2d: conv_function(True),
    F.conv_transpose3d: conv_function(True),
    F.linear: linear_function,
    F.batch_norm: holder_function({"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4}),
    F.instance_norm: holder_function({"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4}),
    F.group_norm: pin_all("functional group_norm: num_groups is fixed in code"),
    F.prelu: holder_function({"weight": 1}),
    F.layer_norm: layernorm_function,
    **{f: spatial(1) for f in (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d,
                               torch.max_pool1d, torch.avg_pool1d, torch.adaptive_avg_pool1d)},
    **{f: spatial(2) for f in (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                               torch.max_pool2d, F.lp_pool2d)},
    **{f: spatial(3) for f in (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d,
                               torch.max_pool3d)},
    F.interpolate: interpolate, F.upsample: interpolate,
    F.upsample_nearest: interpolate, F.upsample_bilinear: interpolate,
    F.pad: pad,
    F.softmax: along_dim(1, implicit=_softmax_dim), F.log_softmax: along_dim(1, implicit=_softmax_dim),
    F.softmin: along_dim(1, implicit=_softmax_dim),
    torch.softmax: along_dim(1), torch.log_softmax: along_dim(1),
    torch.cumsum: along_dim(1), torch.cumprod: along_dim(1),
    F.normalize: along_dim(2, default=1),
    F.glu: glu,
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat, torch.stack: stack,
    torch.split: split, torch.chunk: split, torch.tensor_split: split, torch.unbind: split,
    torch.narrow: narrow,
    operator.getitem: getitem,
    torch.flatten: reshape, torch.reshape: reshape, torch.squeeze: reshape, torch.unsqueeze: reshape,
    torch.permute: permute, torch.transpose: permute, torch.swapaxes: permute, torch.movedim: permute,
    torch.moveaxis: permute, torch.t: permute,
    torch.mean: reduce, torch.sum: reduce, torch.amax: reduce, torch.amin: reduce, torch.max: reduce,
    torch.min: reduce, torch.any: reduce, torch.count_nonzero: reduce, torch.all: reduce, torch.std: reduce, torch.var: reduce, torch.logsumexp: reduce, torch.prod: reduce,
    torch.pixel_shuffle: pin_all("pixel shuffle moves channels into space"),
    torch.pixel_unshuffle: pin_all("pixel unshuffle moves space into channels"),
    torch.channel_shuffle: pin_all("channel shuffle reorders channels"),
    F.pixel_shuffle: pin_all("pixel shuffle moves channels into space"),
    F.pixel_unshuffle: pin_all("pixel unshuffle moves space into channels"),
    getattr: attribute, len: no_channels, torch.numel: no_channels,
    stochastic_depth: passthrough,  # drops whole samples, never channels
}

_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "rsqrt",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "contiguous", "float", "half", "double",
    "bfloat16", "to", "type", "type_as", "clone", "detach", "requires_grad_", "square", "log", "sign",
    "exp_", "hardtanh_", "nan_to_num", "erf", "cpu", "cuda", "isnan", "isfinite", "isinf", "logical_not",
]
_BINARY_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "maximum", "minimum",
    "pow", "pow_", "rsub", "fmod", "where", "eq", "ne", "lt", "le", "gt", "ge",
]

METHOD_RULES: dict[str, Callable[[Op], Any]] = {
    **{m: passthrough for m in _UNARY_METHODS},
    **{m: elementwise for m in _BINARY_METHODS},
    "softmax": along_dim(1), "log_softmax": along_dim(1), "cumsum": along_dim(1),
    "split": split, "chunk": split, "tensor_split": split, "unbind": split, "narrow": narrow,
    "view": reshape, "reshape": reshape, "flatten": reshape, "squeeze": reshape, "unsqueeze": reshape,
    "view_as": reshape, "reshape_as": reshape,
    "permute": permute, "transpose": permute, "t": permute, "swapaxes": permute, "movedim": permute,
    "expand": expand, "expand_as": expand, "repeat": expand,
    "mean": reduce, "sum": reduce, "amax": reduce, "amin": reduce, "max": reduce, "min": reduce,
    "std": reduce, "var": reduce, "logsumexp": reduce, "prod": reduce, "any": reduce, "all": reduce, "count_nonzero": reduce,
    "size": no_channels, "dim": no_channels, "numel": no_channels,
}

_SIZED_RESHAPES = {"view", "reshape", torch.reshape, "view_as", "reshape_as"}


# module rules whose output has the input's shape (see trace._meta_result)
SHAPE_KEEPING_RULES = {passthrough, batchnorm_module, prelu_module, groupnorm_module, layernorm_module}


def rule_for_target(kind: str, target, module: nn.Module | None) -> Callable[[Op], Any]:
    if kind == "call_module":
        return module_rule(module) or unknown
    if kind == "call_function":
        return FUNCTION_RULES.get(target, unknown)
    if kind == "call_method":
        return METHOD_RULES.get(target, unknown)
    if kind == "placeholder":
        return model_input
    if kind == "get_attr":
        return constant
    if kind == "output":
        return model_output
    return unknown


def rule_for(node: fx.Node, module: nn.Module | None) -> Callable[[Op], Any]:
    leaf = node.meta.get("prunekit_leaf")
    if leaf is not None:
        return pin_all(leaf)
    return rule_for_target(node.op, node.target, module)


# layers of other libraries, named so that importing prunekit imports none of them
NAMED_MODULE_RULES: dict[str, Callable[[Op], Any]] = {
    # stochastic depth drops whole samples in training, never channels
    "torchvision.ops.stochastic_depth.StochasticDepth": passthrough,
    "timm.layers.drop.DropPath": passthrough,
    "monai.networks.layers.drop_path.DropPath": passthrough,
}


def module_rule(module: nn.Module) -> Callable[[Op], Any] | None:
    kind = type(module)
    rule = MODULE_RULES.get(kind)
    if rule is None and kind.__module__.split(".")[0] in ("torchvision", "timm", "monai"):
        rule = NAMED_MODULE_RULES.get(f"{kind.__module__}.{kind.__qualname__}")
    return rule


def is_leaf_type(module: nn.Module) -> bool:
    return module_rule(module) is not None
