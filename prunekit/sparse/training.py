"""Sparse training from a config: the trainer's sparse mode and ``sparsify`` (train, bake, report)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from ..config import Sparsity
from ..errors import PrunekitError
from .masks import SparseTensor, select_tensors, unmatched_patterns
from .report import sparsity_report
from .topkast import TopKAST

__all__ = ["start_sparse", "sparse_tensors", "sparsify", "SparseResult", "exploration_steps"]


def exploration_steps(sparsity: Sparsity, iterations: int) -> int:
    """Steps that refresh the sets: the config's, else the first three quarters of training."""
    if sparsity.method == "magnitude":
        return 0
    return sparsity.exploration_steps if sparsity.exploration_steps is not None else (3 * iterations) // 4


def sparse_tensors(model: nn.Module, sparsity: Sparsity) -> list[SparseTensor]:
    """The tensors ``sparsity`` makes sparse in ``model``; a name or glob that matches nothing is an error."""
    for key, patterns in (("layers", sparsity.layers), ("exclude", sparsity.exclude)):
        missing = unmatched_patterns(model, patterns)
        if missing:
            raise PrunekitError(f"config key 'sparsity.{key}' names {missing[0]!r}, which matches no module of the "
                                "model.")
    tensors = select_tensors(model, sparsity.density, sparsity.backward_density, sparsity.layers, sparsity.exclude,
                             sparsity.include_bias, sparsity.include_norm)
    if not tensors:
        raise PrunekitError("sparsity leaves nothing to sparsify: the model has no conv or Linear weight outside "
                            "sparsity.exclude with a density below 1.")
    return tensors


def start_sparse(model: nn.Module, sparsity: Sparsity, iterations: int) -> TopKAST:
    """Put the masks on ``model`` for ``iterations`` steps of training (the trainer's sparse mode)."""
    return TopKAST(model, sparse_tensors(model, sparsity), scope=sparsity.scope,
                   refresh_every=sparsity.refresh_every, exploration_steps=exploration_steps(sparsity, iterations),
                   penalty=sparsity.penalty if sparsity.method == "topkast" else 0.0, method=sparsity.method)


@dataclass
class SparseResult:
    """A sparsely trained model (exact zeros outside A, ordinary parameters) and its report."""

    model: nn.Module
    report: dict
    losses: list = field(default_factory=list)
    seconds: float = 0.0


def sparsify(model: nn.Module, train: Iterable, sparsity: Sparsity, val: Iterable | None = None,
             task: str = "auto", seed: int = 0, progress: bool = True, augment: bool = True) -> SparseResult:
    """Train a copy of ``model`` sparse on ``train`` for ``sparsity.iterations`` steps; the caller's model
    is not changed. With ``val``, the report holds the metric before and after."""
    from ..data.trainer import evaluate, finetune

    net = copy.deepcopy(model)
    tensors = sparse_tensors(net, sparsity)  # checked before any training
    before = evaluate(net, val, task) if val is not None else None
    started = time.perf_counter()
    losses = finetune(net, train, sparsity.iterations, lr=sparsity.lr, task=task, use_augment=augment, seed=seed,
                      show_progress=progress, description=f"sparse training ({sparsity.method})", sparsity=sparsity)
    seconds = time.perf_counter() - started
    report = sparsity_report(net, tensors, sparsity.method)
    report["settings"] = {"density": sparsity.density, "backward_density": sparsity.backward_density,
                          "scope": sparsity.scope, "refresh_every": sparsity.refresh_every,
                          "exploration_steps": exploration_steps(sparsity, sparsity.iterations),
                          "penalty": sparsity.penalty, "iterations": sparsity.iterations, "lr": sparsity.lr}
    report["training_seconds"] = seconds
    if val is not None:
        report["metric"] = {"before": before, "after": evaluate(net, val, task)}
    return SparseResult(net.eval(), report, losses, seconds)
