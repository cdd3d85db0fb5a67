"""Where the model computes: ``device: auto | cpu | cuda | cuda:N`` and moving batches there.

The loop keeps the model on the CPU for what only reads its structure (tracing,
surgery, checkpoints) and places it on the device for what runs it (calibration
and scoring, fine-tuning, validation): one move each way per phase, which costs
far less than the phase itself. Batches are moved as they are used.

    device = resolve_device("auto")          # cuda when one is available, else cpu
    with placed(model, device):
        finetune(model, OnDevice(batches, device), ...)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..errors import UsageError


def resolve_device(name: str, key: str = "device") -> torch.device:
    """The device ``name`` means here; ``auto`` is CUDA when available. Refused in one sentence, naming
    the config ``key`` that asked for it, when absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"{key} '{name}' is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{key} '{name}' was asked for, but this machine has no CUDA device "
                             f"(use {key}: auto to fall back to the CPU).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{key} '{name}' was asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s).")
    elif device.type != "cpu":
        raise UsageError(f"{key} '{name}' is not supported; use auto, cpu, cuda or cuda:N.")
    return device


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (tuples, lists and dicts too) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple):
        return type(batch)(*(to_device(b, device) for b in batch)) if hasattr(batch, "_fields") \
            else tuple(to_device(b, device) for b in batch)
    if isinstance(batch, list):
        return [to_device(b, device) for b in batch]
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class OnDevice:
    """A re-iterable source of batches that yields them on ``device`` (the source itself is unchanged)."""

    def __init__(self, batches: Iterable, device: torch.device):
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            yield to_device(batch, self.device)


def on_device(batches: Iterable | None, device: torch.device) -> Iterable | None:
    """``batches`` as they are on the CPU; wrapped in :class:`OnDevice` elsewhere."""
    if batches is None or device.type == "cpu":
        return batches
    return OnDevice(batches, device)


@contextmanager
def placed(model: nn.Module, device: torch.device):
    """``model`` on ``device`` for the block, back on the CPU after it (a no-op on the CPU)."""
    if device.type == "cpu":
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")
