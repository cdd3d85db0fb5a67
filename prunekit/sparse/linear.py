"""A truly sparse weight gradient for Linear layers: only the entries of B are computed.

A Linear layer's weight gradient is ``grad_out^T @ input``; Top-KAST needs it only on B. A
sampled dense-dense matmul (``torch.sparse.sampled_addmm``, SDDMM) computes exactly those
entries, so the backward does ``|B|`` dot products instead of ``out * in``; it pays only for large
layers with a small B (:func:`pays_off`, measured), and is used there. It replaces the
module's forward on the instance (the class stays the user's) while Top-KAST is on; the input
gradient stays dense (the layer below needs all of it). Convolutions have no such kernel in
PyTorch: their weight gradient is computed dense and masked (see ``topkast.py``).

``benchmarks/sparse.py`` times both gradients of the small CNN's fc1.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["AUTO_MAX_BACKWARD_DENSITY", "AUTO_MIN_NUMEL", "pays_off", "SparseGradLinear", "install", "uninstall", "sampled_weight_grad", "csr_pattern", "has_sparse_gradient"]


def has_sparse_gradient(module: nn.Module, param: str) -> bool:
    """Whether Top-KAST computes this tensor's gradient on B only (a plain Linear's weight)."""
    return parametrize.type_before_parametrizations(module) is nn.Linear and param == "weight"


# where the sampled gradient was measured to beat a dense GEMM plus mask (benchmarks/sparse.py, one
# CPU thread): 1.7x on a 1024x4096 weight at B = 0.1 and 4.4x at 0.02, but break-even at 0.2 and slower
# on the small CNN's 64x576 fc1 at any B
AUTO_MAX_BACKWARD_DENSITY = 0.1
AUTO_MIN_NUMEL = 1 << 20


def pays_off(backward_density: float, numel: int) -> bool:
    """Whether ``sparse_backward="auto"`` computes this Linear weight's gradient on B only."""
    return backward_density <= AUTO_MAX_BACKWARD_DENSITY and numel >= AUTO_MIN_NUMEL


def csr_pattern(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B as a CSR matrix of ones: the positions SDDMM computes."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": said once per refresh otherwise
        warnings.simplefilter("ignore", UserWarning)
        return mask.to(dtype).to_sparse_csr()


def sampled_weight_grad(pattern: torch.Tensor, grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``(grad_out^T @ inputs)`` on the positions of ``pattern`` only, zero elsewhere (a dense tensor)."""
    go = grad_out.reshape(-1, grad_out.shape[-1])
    x = inputs.reshape(-1, inputs.shape[-1])
    return torch.sparse.sampled_addmm(pattern, go.t().contiguous(), x.contiguous(), beta=0.0).to_dense()


class SparseGradLinear(torch.autograd.Function):
    """``linear(x, where(A, w, 0), b)``; backward: dense input gradient, weight gradient on B only."""

    @staticmethod
    def forward(ctx, x, weight, bias, forward_mask, pattern):
        effective = torch.where(forward_mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
        ctx.save_for_backward(x, effective)
        ctx.pattern, ctx.has_bias = pattern, bias is not None
        return F.linear(x, effective, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, effective = ctx.saved_tensors
        grad_x = grad_out @ effective if ctx.needs_input_grad[0] else None
        grad_w = sampled_weight_grad(ctx.pattern, grad_out, x) if ctx.needs_input_grad[1] else None
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    holder = self.parametrizations.weight
    mask = holder[0]
    if torch.is_autocast_enabled() or mask.pattern is None:  # mixed precision: the masked dense path
        return F.linear(x, self.weight, self.bias)
    return SparseGradLinear.apply(x, holder.original, self.bias, mask.forward_mask, mask.pattern)


def install(module: nn.Linear) -> None:
    """Route ``module``'s forward through :class:`SparseGradLinear` (its weight already parametrised)."""
    module.forward = types.MethodType(_forward, module)


def uninstall(module: nn.Linear) -> None:
    if "forward" in vars(module):
        del module.forward
