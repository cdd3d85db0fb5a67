"""Pruned models as files that load without pickle: weights + a width manifest.

``manifest.json`` names the builder and its kwargs and lists, for every
module whose size changed, its original and pruned widths. Rebuilding is:
call the builder, set those widths, give every tensor the saved shape, load
the state_dict with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import PrunekitError

MANIFEST_FORMAT = "prunekit-manifest/1"
WIDTH_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
               "num_channels", "num_groups", "num_parameters")


def module_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    out = {}
    for name, m in model.named_modules():
        attrs = {a: getattr(m, a) for a in WIDTH_ATTRS if isinstance(getattr(m, a, None), int)}
        if attrs:
            out[name] = attrs
    return out


def width_changes(before: dict[str, dict[str, int]], model: nn.Module) -> dict[str, dict]:
    """Modules whose widths differ from ``before``: {name: {type, original, pruned}}."""
    changes = {}
    for name, m in model.named_modules():
        if name not in before:
            continue
        now = {a: getattr(m, a) for a in before[name]}
        if now != before[name]:
            changes[name] = {"type": type(m).__name__, "original": before[name], "pruned": now}
    return changes


def resize_to(model: nn.Module, widths: dict[str, dict], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Give ``model`` (in place) the widths and tensor shapes of a pruned state_dict, then load it."""
    for name, change in widths.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise PrunekitError(f"the manifest names module '{name}', which the built model does not have.") from None
        for attr, value in change["pruned"].items():
            setattr(module, attr, value)
    current = dict(model.named_parameters())
    current.update(model.named_buffers())
    for name, value in state_dict.items():
        old = current.get(name)
        if old is None or old.shape == value.shape:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        fresh = torch.empty(value.shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(fresh, requires_grad=old.requires_grad))
        else:
            owner._buffers[attr] = fresh
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise PrunekitError(f"the pruned weights do not fit the rebuilt model: {str(exc).splitlines()[0]}") from None
    return model


def load_pruned(run_dir, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a pruned model from ``run_dir`` (manifest.json + model.pt), without unpickling.

    ``model``: an unpruned instance to resize, needed when the run was started
    from a Python object rather than a builder; it is not modified.
    """
    import copy

    from .io import resolve_callable

    run = Path(run_dir)
    manifest_path, weights_path = run / "manifest.json", run / "model.pt"
    for path in (manifest_path, weights_path):
        if not path.is_file():
            raise PrunekitError(f"'{run}' is not a prunekit run directory: '{path.name}' is missing.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PrunekitError(f"'{manifest_path}' is not valid JSON.") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise PrunekitError(f"'{manifest_path}' is not a prunekit manifest.")
    if model is not None:
        base = copy.deepcopy(model)
    elif manifest.get("builder"):
        base = resolve_callable(manifest["builder"])(**manifest.get("kwargs", {}))
    else:
        raise PrunekitError("this run was started from a Python model with no builder; pass model= to load_pruned.")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception:
        raise PrunekitError(f"'{weights_path}' is not a readable state_dict.") from None
    return resize_to(base, manifest.get("modules", {}), state).eval()
