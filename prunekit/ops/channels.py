"""Channel rules of ops that keep, unite, join or split channel vectors (element-wise,
pooling, concatenation, splits, reductions and ops along one dim)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from ..graphs.state import Chan
from .op import Op, _ndim, _norm_dim, unknown


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


def along_dims(index: int, keyword: str = "dims", default=None, varargs: bool = False):
    """roll / flip / rot90: moving values along some dims keeps the channels unless the channel dim is one
    of them (no dims: the tensor flattened). ``varargs``: the method form's dims may come one per argument."""

    def rule(op: Op):
        chan, x = op.chan(0, "input"), op.value(0, "input")
        if chan is None:
            return op.opaque("created by an op")
        dims = op.value(index, keyword, default)
        if varargs and isinstance(dims, int):
            dims = tuple(op.args[index:])
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims) \
                or chan.dim in {_norm_dim(d, _ndim(x)) for d in dims}:
            op.pin_inputs("moves values across channels")
            return op.opaque("moves values across channels")
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


def _sequence(op: Op) -> list:
    """The channel vectors of a list-of-tensors argument: listed one by one, or one node (a split's output)."""
    raws = op.raw(0, "tensors")
    if isinstance(raws, fx.Node):
        chans = op.chans.get(raws)
        return list(chans) if isinstance(chans, (tuple, list)) else [None] * len(op.value(0, "tensors"))
    return [op.chans.get(r) if isinstance(r, fx.Node) else None for r in raws]


def cat(op: Op):
    tensors = op.value(0, "tensors")
    dim = _norm_dim(op.value(1, "dim", 0), op.out.dim())
    chans = _sequence(op)
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
    dim = _norm_dim(op.value(1, "dim", 0), op.out.dim())
    chans = _sequence(op)
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


def _sub_pixel(factor: str, regroup: Callable[[Op, Chan, int], Any]) -> Callable[[Op], Any]:
    """Pixel (un)shuffle by the op's ``factor`` r, on channels at dim -3: ``regroup(op, chan, r * r)``."""

    def rule(op: Op):
        chan, x = op.chan(0, "input"), op.value(0, "input")
        if chan is None:
            return op.opaque("created by an op")
        if chan.dim != _ndim(x) - 3:
            return unknown(op)
        r = getattr(op.module, factor) if op.module is not None else op.value(1, factor)
        return regroup(op, chan, r * r)

    return rule


def _shuffled(op: Op, chan: Chan, block: int) -> Chan:
    """(*, C r^2, H, W) -> (*, C, H r, W r): output channel c is input channels c r^2 .. c r^2 + r^2 - 1,
    which therefore go together, as one unit, with it."""
    for start in range(0, len(chan.atoms), block):
        group = chan.atoms[start:start + block]
        op.state.unite_vectors(group[:1] * (block - 1), group[1:])
    return Chan(chan.dim, chan.atoms[::block])


def _unshuffled(op: Op, chan: Chan, block: int) -> Chan:
    """(*, C, H r, W r) -> (*, C r^2, H, W): input channel c becomes output channels c r^2 .. c r^2 + r^2 - 1,
    which leave with it."""
    return Chan(chan.dim, tuple(atom for atom in chan.atoms for _ in range(block)))


pixel_shuffle = _sub_pixel("upscale_factor", _shuffled)
pixel_unshuffle = _sub_pixel("downscale_factor", _unshuffled)


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
