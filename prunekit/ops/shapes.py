"""Channel rules of ops that move dims around: indexing, reshapes, permutes, expands."""

from __future__ import annotations

import math

import torch
from torch import fx

from ..graphs.state import Chan
from .channels import passthrough
from .op import Op, _norm_dim, _shape_source, unknown


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
    if op.node.target in SIZED_RESHAPES:
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


def attribute(op: Op):
    """getattr on a tensor: .T / .mT transpose, .data is the same channels, anything else has none."""
    name = op.value(1)
    if name in ("T", "mT"):
        return permute(op)
    if name in ("data", "real"):
        return passthrough(op)
    return None


SIZED_RESHAPES = {"view", "reshape", torch.reshape, "view_as", "reshape_as"}
