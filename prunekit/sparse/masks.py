"""Which weights a sparse layer keeps: the k largest by absolute value, ties broken by position.

``torch.topk`` picks among equal magnitudes in an unspecified order; a stable sort on |w| (largest
first) keeps the lower flat index first among equals, so the same weights give the same mask on
every run and every machine.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["SPARSE_LAYERS", "NORM_LAYERS", "SparseTensor", "keep_count", "top_mask", "masks_for", "select_tensors"]

# the layers whose weights prunekit sparsifies: every convolution and transposed convolution, and Linear
SPARSE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.Linear)
# left dense unless include_norm: a norm layer's per-channel scale is a handful of numbers per filter
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class SparseTensor:
    """One tensor kept sparse: ``module.<param>`` with forward density ``density`` (set A) and backward
    density ``backward`` (set B, a superset of A)."""

    module: str
    param: str
    density: float
    backward: float

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}" if self.module else self.param


def keep_count(numel: int, density: float) -> int:
    """How many of ``numel`` weights a density keeps: the nearest whole number, at least one."""
    return min(numel, max(1, int(round(density * numel))))


def top_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of ``magnitudes``' shape holding its ``k`` largest entries (lower index first on ties)."""
    flat = magnitudes.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:k]] = True
    return mask.view_as(magnitudes)


def masks_for(weights: Sequence[torch.Tensor], densities: Sequence[float], scope: str) -> list[torch.Tensor]:
    """The top masks of ``weights`` by |w|: each tensor its own ``densities[i]`` (scope "layer"), or one
    ranking over all of them at ``densities[0]`` (scope "global", ties by tensor order, then index)."""
    with torch.no_grad():
        if scope == "layer":
            return [top_mask(w.detach().abs(), keep_count(w.numel(), d)) for w, d in zip(weights, densities)]
        flat = torch.cat([w.detach().abs().reshape(-1).float() for w in weights])
        mask = top_mask(flat, keep_count(flat.numel(), densities[0]))
        pieces = torch.split(mask, [w.numel() for w in weights])
        return [p.view_as(w) for p, w in zip(pieces, weights)]


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    return next((p for p in patterns if name == p or fnmatch.fnmatchcase(name, p)), None)


def select_tensors(model: nn.Module, density: float, backward: float, layers: Mapping[str, float] | None = None,
                   exclude: Iterable[str] = (), include_bias: bool = False, include_norm: bool = False
                   ) -> list[SparseTensor]:
    """The tensors of ``model`` to keep sparse, in module order.

    Every conv, transposed conv and Linear weight (their biases with ``include_bias``, norm layers'
    weights with ``include_norm``); a module named in ``exclude`` (name or glob) stays dense;
    ``layers`` maps a name or glob to its own forward density (1.0: dense), the backward margin
    (``backward - density``) added to it.
    """
    layers, exclude = dict(layers or {}), list(exclude)
    chosen, seen = [], set()
    for name, module in model.named_modules():
        kinds = SPARSE_LAYERS + (NORM_LAYERS if include_norm else ())
        if not isinstance(module, kinds) or _matches(name, exclude):
            continue
        pattern = _matches(name, layers)
        d = float(layers[pattern]) if pattern is not None else density
        if d >= 1.0:
            continue
        b = min(1.0, d + (backward - density))
        params = ["weight"] + (["bias"] if include_bias else [])
        for param in params:
            tensor = getattr(module, param, None)
            if not isinstance(tensor, nn.Parameter) or id(tensor) in seen:  # a tied weight is sparsified once
                continue
            seen.add(id(tensor))
            chosen.append(SparseTensor(name, param, d, b))
    return chosen


def unmatched_patterns(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """The names or globs of ``patterns`` that match no module of ``model`` (a typo, most likely)."""
    names = [n for n, _ in model.named_modules() if n]
    return [p for p in patterns if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]
