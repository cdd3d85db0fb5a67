"""Top-KAST (Jayakumar et al., NeurIPS 2020): training that stays sparse, as a reparametrisation.

Each sparse tensor keeps its dense values (``parametrizations.<param>.original``); the layer sees
``where(A, w, 0)``, A being the top ``density`` fraction of the tensor by |w|. The backward pass
lets the gradient through to the larger set B (the top ``backward_density``), so weights just
outside A keep learning and can enter it at the next refresh; everything outside B gets a zero
gradient. The exploration loss is an L2 term on B, with the part outside A scaled by 1/D::

    penalty * ( sum_{i in A} w_i^2  +  sum_{i in B \\ A} w_i^2 / D )

A and B are recomputed every ``refresh_every`` optimizer steps for ``exploration_steps`` steps,
then frozen (one last refresh, B = A) for the rest: the refinement phase trains A alone.

Compute is dense: the forward runs dense kernels on the masked weights, and a conv's kernel
computes its whole weight gradient, which is then masked to B. A Linear weight's gradient is
computed on B alone (a sampled matmul, ``linear.py``). The forward saves no FLOPs; the point is
weights that are sparse when delivered.

One-shot magnitude pruning is the same machinery with the sets frozen from the first step
(``method="magnitude"``, scope "global" by default).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import linear
from .masks import SparseTensor, masks_for

__all__ = ["TopKAST", "MaskedWeight"]


class _MaskedGrad(torch.autograd.Function):
    """Forward: the weight with zeros outside A. Backward: the gradient with zeros outside B."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, forward_mask: torch.Tensor, backward_mask: torch.Tensor):
        ctx.save_for_backward(backward_mask)
        return torch.where(forward_mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (backward_mask,) = ctx.saved_tensors
        return torch.where(backward_mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None, None


class MaskedWeight(nn.Module):
    """The parametrisation of one sparse tensor: the masks are buffers (not saved in a state dict)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        full = torch.ones_like(weight, dtype=torch.bool)
        self.register_buffer("forward_mask", full, persistent=False)
        self.register_buffer("backward_mask", full.clone(), persistent=False)
        self.pattern = None  # B as CSR when the layer computes its weight gradient on B only (linear.py)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _MaskedGrad.apply(weight, self.forward_mask, self.backward_mask)


class TopKAST:
    """Top-KAST on the ``tensors`` of ``model`` (in place; the module classes stay the user's).

    >>> from prunekit.sparse.masks import select_tensors
    >>> model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 3))
    >>> sparse = TopKAST(model, select_tensors(model, 0.1, 0.2), refresh_every=100, exploration_steps=750)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # made after TopKAST: see below
    >>> x, y = torch.randn(8, 20), torch.randint(0, 3, (8,))
    >>> for _ in range(3):
    ...     optimizer.zero_grad()
    ...     loss = nn.functional.cross_entropy(model(x), y) + sparse.penalty()
    ...     loss.backward(); optimizer.step(); sparse.step()
    >>> _ = sparse.bake()   # exact zeros outside A, ordinary parameters again
    >>> int((model[0].weight != 0).sum()), model[0].weight.numel()  # 10% of the weights
    (100, 1000)

    ``sparse_backward``: compute Linear weight gradients on B only: True, False, or "auto" (where
    it was measured to pay, :func:`prunekit.sparse.linear.pays_off`).

    Create the optimizer after this object: the dense values live in the parametrisation's
    ``original`` parameters.
    """

    def __init__(self, model: nn.Module, tensors: Sequence[SparseTensor], scope: str = "layer",
                 refresh_every: int = 100, exploration_steps: int = 0, penalty: float = 0.0,
                 method: str = "topkast", sparse_backward: bool | str = "auto"):
        if not tensors:
            raise ValueError("no tensors to sparsify")
        self.model, self.tensors, self.scope, self.method = model, list(tensors), scope, method
        self.refresh_every, self.exploration_steps, self.penalty_scale = refresh_every, exploration_steps, penalty
        self.steps = self.refreshes = 0
        self.frozen = False
        modules = dict(model.named_modules())
        self._masks: list[MaskedWeight] = []
        self._sparse_grad: list[bool] = []
        self._coefs: list[torch.Tensor] = []
        for t in self.tensors:
            module = modules[t.module]
            mask = MaskedWeight(getattr(module, t.param))
            parametrize.register_parametrization(module, t.param, mask)
            self._masks.append(mask)
            # a Linear weight's gradient can be computed on B alone (SDDMM); a conv's is computed dense
            use = linear.pays_off(t.backward, getattr(module, t.param).numel()) if sparse_backward == "auto" \
                else bool(sparse_backward)
            self._sparse_grad.append(use and linear.has_sparse_gradient(module, t.param))
            if self._sparse_grad[-1]:
                linear.install(module)
        self.frozen = method == "magnitude" or exploration_steps <= 0  # one-shot: the first sets are the last
        self.refresh()

    # -- the sets -------------------------------------------------------

    def originals(self) -> list[torch.Tensor]:
        """The dense values of each sparse tensor (the parameters the optimizer updates)."""
        modules = dict(self.model.named_modules())
        return [getattr(modules[t.module].parametrizations, t.param).original for t in self.tensors]

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute A and B from the current magnitudes (B = A once frozen)."""
        weights = self.originals()
        a = masks_for(weights, [t.density for t in self.tensors], self.scope)
        b = a if self.frozen else masks_for(weights, [t.backward for t in self.tensors], self.scope)
        self._coefs = []
        for mask, fa, fb, t, sparse_grad, w in zip(self._masks, a, b, self.tensors, self._sparse_grad, weights):
            fb = fb | fa  # B holds A even when ranks tie at its border
            mask.forward_mask.copy_(fa)
            mask.backward_mask.copy_(fb)
            if sparse_grad:
                mask.pattern = linear.csr_pattern(fb, w.dtype)
            # the exploration loss weights: 1 on A, 1/D on B \ A, 0 elsewhere
            self._coefs.append(fa.to(fb.device, torch.float32) + (fb & ~fa).float() / t.density)
        self.refreshes += 1

    def freeze(self) -> None:
        """End exploration: one last refresh, then B = A for good."""
        if not self.frozen:
            self.frozen = True
            self.refresh()

    def step(self) -> None:
        """Call after every optimizer step: refreshes on schedule, freezes when exploration ends."""
        self.steps += 1
        if self.frozen:
            return
        if self.steps >= self.exploration_steps:
            self.freeze()
        elif self.steps % self.refresh_every == 0:
            self.refresh()

    def forward_masks(self) -> list[torch.Tensor]:
        return [m.forward_mask for m in self._masks]

    def backward_masks(self) -> list[torch.Tensor]:
        return [m.backward_mask for m in self._masks]

    # -- the loss and the result ----------------------------------------

    def penalty(self) -> torch.Tensor:
        """The exploration loss: ``penalty * sum(coef * w^2)`` with coef 1 on A, 1/D on B \\ A, 0 elsewhere."""
        weights = self.originals()
        if self.penalty_scale == 0:
            return weights[0].new_zeros(())
        total = sum((c.to(w.dtype) * w * w).sum() for c, w in zip(self._coefs, weights))
        return self.penalty_scale * total

    def bake(self) -> nn.Module:
        """Remove the parametrisations, leaving ``where(A, w, 0)`` as ordinary parameters: exact zeros
        outside A, and a state dict that loads into the user's own classes."""
        modules = dict(self.model.named_modules())
        for t, sparse_grad in zip(self.tensors, self._sparse_grad):
            if sparse_grad:
                linear.uninstall(modules[t.module])
            parametrize.remove_parametrizations(modules[t.module], t.param, leave_parametrized=True)
        return self.model

    def sparse_gradients(self) -> list[str]:
        """The tensors whose weight gradient is computed on B only (Linear weights); the others are
        computed dense and masked."""
        return [t.name for t, s in zip(self.tensors, self._sparse_grad) if s]

    def density(self) -> float:
        """The fraction of the sparse tensors' entries in A."""
        kept = sum(int(m.forward_mask.sum()) for m in self._masks)
        return kept / sum(m.forward_mask.numel() for m in self._masks)
