"""The public functions' checks of their arguments: each refuses a caller's mistake in one sentence
(an :class:`~prunekit.errors.ArgumentError`, a TypeError too, for an argument of the wrong kind)
before any work, instead of an error from deep inside torch, or a quiet reinterpretation."""

from __future__ import annotations

import difflib
import os

import torch
from torch import nn

from .errors import ArgumentError, UsageError


def check_model(model) -> None:
    """An nn.Module that prunekit can trace, or one sentence saying what ``model`` is instead."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ArgumentError("the model is a TorchScript module, whose code cannot be traced or resized; pass the "
                            "nn.Module it was scripted or traced from.")
    if isinstance(model, type):
        raise ArgumentError(f"the model must be a torch.nn.Module instance, got the class {model.__name__}; "
                            "build it first.")
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"the model must be a torch.nn.Module, got {type(model).__name__}.")


def check_path(value, name: str, optional: bool = False) -> None:
    """A file system path (a string or os.PathLike), or None when ``optional``."""
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentError(f"{name} must be a path (a string or pathlib.Path), got {type(value).__name__}.")


def check_leaf_modules(model: nn.Module, leaves, key: str = "leaf_modules") -> None:
    """Every name in ``leaves`` must be a submodule of ``model``: one that names nothing would make
    nothing a leaf, silently."""
    if isinstance(leaves, str):
        raise ArgumentError(f"{key} must be a list of submodule names, got the string {leaves!r}; write [{leaves!r}].")
    names = sorted(n for n, _ in model.named_modules() if n)
    for name in leaves:
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise UsageError(f"{key} names {name!r}, which is not a submodule of the model{hint}")
