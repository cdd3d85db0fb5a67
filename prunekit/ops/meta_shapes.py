"""Output shapes of ops, so that tracing on meta tensors need not run their meta kernels, many of which
are slow Python code or import parts of torch on first use. Each takes the op's ``(args, module,
kwargs)`` and returns the output shape, or None: work it out by running the op (which also raises
torch's own error for an input the op refuses)."""

from __future__ import annotations

import torch
from torch import nn


def conv_shape(args: tuple, m: nn.Module, kwargs: dict | None = None) -> tuple | None:
    x = args[0]
    rank = m.weight.dim() - 2
    cin = m.weight.shape[0] if m.transposed else m.weight.shape[1] * m.groups
    if x.dim() == rank + 2 and x.shape[1] != cin:  # (some meta kernels let this pass)
        raise RuntimeError(f"{type(m).__name__} expects {cin} input channels, got {x.shape[1]}")
    if len(args) != 1 or isinstance(m.padding, str) or x.dim() != rank + 2:
        return None
    out = m.weight.shape[1] * m.groups if m.transposed else m.weight.shape[0]
    sizes = []
    for i, n in enumerate(x.shape[2:]):
        k, s, p, d = m.kernel_size[i], m.stride[i], m.padding[i], m.dilation[i]
        if m.transposed:
            sizes.append((n - 1) * s - 2 * p + d * (k - 1) + m.output_padding[i] + 1)
        else:
            sizes.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return (x.shape[0], out, *sizes)


def linear_shape(args: tuple, m: nn.Module, kwargs: dict | None = None) -> tuple | None:
    if len(args) != 1 or args[0].dim() < 1 or args[0].shape[-1] != m.weight.shape[1]:
        return None
    return (*args[0].shape[:-1], m.weight.shape[0])


def adaptive_pool_shape(rank: int):
    def shape(args: tuple, m: nn.Module | None, kwargs: dict | None = None) -> tuple | None:
        x = args[0]
        size = m.output_size if m is not None else (args[1] if len(args) > 1 else None)
        if size is None or getattr(m, "return_indices", False) or x.dim() < rank + 1:
            return None
        size = (size,) * rank if isinstance(size, int) else tuple(size)
        kept = x.shape[-rank:]
        return (*x.shape[:-rank], *(k if s is None else s for s, k in zip(size, kept)))

    return shape


def pool_shape(rank: int):
    """nn.MaxPoolNd / nn.AvgPoolNd output shape (torch's pooling_output_shape). Their meta kernels
    import torch's symbolic shapes on first use, a third of a second before the first trace."""
    def shape(args: tuple, m: nn.Module, kwargs: dict | None = None) -> tuple | None:
        x = args[0]
        if len(args) != 1 or kwargs or x.dim() not in (rank + 1, rank + 2) or getattr(m, "return_indices", False):
            return None
        dims = [_per_dim(getattr(m, name, default), rank)
                for name, default in (("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1))]
        kernel, stride, padding, dilation = dims[0], dims[1] or dims[0], dims[2], dims[3]
        sizes = []
        for n, k, s, p, d in zip(x.shape[-rank:], kernel, stride, padding, dilation):
            if not (s > 0 and d > 0 and 0 <= 2 * p <= k):
                return None  # torch's own error
            out = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if m.ceil_mode else 0)) // s + 1
            if m.ceil_mode and (out - 1) * s >= n + p:
                out -= 1  # the last window must start inside the input or its left padding
            if out < 1:
                return None
            sizes.append(out)
        return (*x.shape[:-rank], *sizes)

    return shape


def _per_dim(value, rank: int) -> tuple | None:
    if value is None or (isinstance(value, (tuple, list)) and len(value) == 0):
        return None
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


def cat_shape(args: tuple, m: None, kwargs: dict | None = None) -> tuple | None:
    """torch.cat's output shape: the inputs' sizes summed along ``dim`` (one rank, one dtype; anything
    else, torch's own kernel decides). Its meta kernel would import torch._dynamo on first use."""
    kwargs = kwargs or {}
    if len(args) > 2 or "out" in kwargs or not isinstance(args[0], (list, tuple)) or not args[0]:
        return None
    tensors, dim = args[0], args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
    if not all(isinstance(t, torch.Tensor) for t in tensors) or not isinstance(dim, int):
        return None
    first, rank = tensors[0], tensors[0].dim()
    if rank == 0 or not -rank <= dim < rank or any(t.dim() != rank or t.dtype != first.dtype for t in tensors):
        return None
    dim %= rank
    if any(t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1:] != first.shape[dim + 1:] for t in tensors):
        return None  # torch raises its own error
    return (*first.shape[:dim], sum(t.shape[dim] for t in tensors), *first.shape[dim + 1:])
