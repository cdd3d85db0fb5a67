"""The built-in fine-tuner: classification or segmentation, on (input, target) batches.

Classification: cross-entropy on (N, K) logits and (N,) labels. Segmentation:
cross-entropy plus soft Dice on (N, K, H, W) logits and (N, H, W) masks.
Light augmentation (random flips and a random shifted crop) applied to input
and mask alike. Metrics: accuracy, or mean foreground IoU.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrunekitError
from ..progress import progress_bar
from .images import DataError


def task_of(output: torch.Tensor, target: torch.Tensor) -> str:
    if target.dim() == 1 and output.dim() == 2:
        return "classification"
    if target.dim() == output.dim() - 1 and output.dim() >= 3:
        return "segmentation"
    raise PrunekitError(f"cannot tell the task from output {tuple(output.shape)} and target "
                        f"{tuple(target.shape)}; set schedule.finetune.task.")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = (0,) + tuple(range(2, logits.dim()))
    inter = (probs * onehot).sum(dims)
    union = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + eps) / (union + eps)).mean()


def loss_for(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if task == "classification":
        return F.cross_entropy
    return lambda logits, target: F.cross_entropy(logits, target) + dice_loss(logits, target)


def main_output(output):
    """The main prediction of a model that returns a tuple, dict or namedtuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output.get("out", next(iter(output.values())))
    return output[0]


def augment(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, task: str):
    """Random flips and a random shifted crop (zero padded), applied to masks alike."""
    segmentation = task == "segmentation"
    for dim in (-1, -2):
        if torch.rand((), generator=generator) < 0.5:
            x = x.flip(dim)
            y = y.flip(dim) if segmentation else y
    if x.dim() == 4:
        h, w = x.shape[-2:]
        pad = max(1, min(h, w) // 8)
        dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        x = F.pad(x, (pad, pad, pad, pad))[..., dy:dy + h, dx:dx + w]
        if segmentation:
            y = F.pad(y, (pad, pad, pad, pad))[..., dy:dy + h, dx:dx + w]
    return x, y


def _pairs(batches: Iterable):
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise PrunekitError("training batches must be (input, target) pairs.")
        yield batch[0], batch[1]


def _cycle(batches: Iterable):
    """(input, target) pairs from ``batches``, pass after pass (a re-iterable), or nothing if it is empty."""
    while True:
        empty = True
        for pair in _pairs(batches):
            empty = False
            yield pair
        if empty:
            return


def finetune(model: nn.Module, batches: Iterable, iterations: int, lr: float = 1e-3,
             weight_decay: float = 0.0, task: str = "auto", use_augment: bool = True, seed: int = 0,
             show_progress: bool = True, description: str = "fine-tune", amp: bool = False,
             sparsity=None) -> list[float]:
    """Train ``model`` in place for ``iterations`` batches (cycling the data); returns the losses.

    ``amp``: mixed precision (float16 autocast, gradient scaling) when the model is on CUDA.
    ``sparsity``: a :class:`~prunekit.config.Sparsity`: train sparse (Top-KAST or fixed magnitude
    masks, its exploration loss added) and leave exact zeros outside the kept weights.
    """
    if iterations <= 0:
        return []
    sparse = None
    if sparsity is not None:  # before the optimizer: the dense values move into the parametrisation
        from ..sparse import start_sparse

        sparse = start_sparse(model, sparsity, iterations)
    try:
        return _train(model, batches, iterations, lr, weight_decay, task, use_augment, seed, show_progress,
                      description, amp, sparse)
    finally:
        if sparse is not None:
            sparse.bake()


def _train(model, batches, iterations, lr, weight_decay, task, use_augment, seed, show_progress, description, amp,
           sparse) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay)
    model.train()
    losses = []
    if isinstance(batches, Iterator):  # a one-shot iterator: keep it for every pass
        batches = list(batches)
    stream = _cycle(batches)  # a re-iterable is read again on every pass, never held whole in memory
    first = next(stream, None)
    if first is None:
        raise PrunekitError("fine-tuning needs training batches; data.train yields none.")
    if task == "auto":
        with torch.no_grad():
            task = task_of(main_output(model(first[0])), first[1])
    loss_fn = loss_for(task)
    stream = itertools.chain([first], stream)
    mixed = amp and next(model.parameters()).is_cuda
    scaler = torch.amp.GradScaler("cuda") if mixed else None
    with progress_bar(description, iterations, show_progress) as advance:
        for _ in range(iterations):
            x, y = next(stream)
            if use_augment:
                x, y = augment(x, y, generator, task)
            with torch.autocast("cuda", dtype=torch.float16) if mixed else contextlib.nullcontext():
                output = main_output(model(x))
                check_classes(output, y, "train", " in a later batch")
                loss = loss_fn(output, y)
                if sparse is not None:
                    loss = loss + sparse.penalty()
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            if sparse is not None:
                sparse.step()
            losses.append(loss.item())
            advance(loss=losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def check_classes(output, y: torch.Tensor, what: str, where: str = "") -> None:
    """Integer targets must be classes the model predicts (two at least: a one-logit binary output).
    A run checks its first batch before any work (``checks.check_labels``) and fine-tuning every batch
    (``where``: " in a later batch"), since one mask with an id past the classes can come late."""
    if y.is_floating_point() or not isinstance(output, torch.Tensor) or output.dim() < 2 or not y.numel():
        return
    classes = max(output.shape[1], 2)
    highest = int(y.max())
    if highest >= classes:
        raise DataError(f"data.{what} has the label {highest}{where}, but the model predicts {output.shape[1]} "
                        f"classes (labels 0 to {classes - 1}).")


def evaluate(model: nn.Module, batches: Iterable, task: str = "auto", combine=None) -> float:
    """Accuracy (classification) or mean foreground IoU (segmentation), over all batches.

    ``combine``: sums the counts of every process before the metric is taken (``World.summed`` of
    ``prunekit.distributed``), so ranks that each read a shard get the metric of all the data.
    """
    model.eval()
    correct = total = 0
    inter = union = None
    for x, y in _pairs(batches):
        output = main_output(model(x))
        kind = task_of(output, y) if task == "auto" else task
        prediction = output.argmax(1)
        if kind == "classification":
            correct += int((prediction == y).sum())
            total += y.numel()
            continue
        classes = torch.arange(1, max(output.shape[1], 2), device=y.device)
        p = prediction.unsqueeze(0) == classes.view(-1, *([1] * y.dim()))
        t = y.unsqueeze(0) == classes.view(-1, *([1] * y.dim()))
        i, u = (p & t).flatten(1).sum(1), (p | t).flatten(1).sum(1)
        inter, union = (i, u) if inter is None else (inter + i, union + u)
    if combine is not None:
        counts = combine({"correct": correct, "total": total, "inter": inter, "union": union})
        correct, total, inter, union = counts["correct"], counts["total"], counts["inter"], counts["union"]
    if inter is not None:
        present = union > 0
        return float((inter[present].double() / union[present]).mean()) if present.any() else 1.0
    return correct / max(total, 1)
