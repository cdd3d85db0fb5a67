"""Pruned models as files that load without pickle: weights + a width manifest.

``manifest.json`` names the builder and its kwargs and lists, for every
module whose size changed, its original and pruned widths. Rebuilding is:
call the builder, set those widths, give every tensor the saved shape, load
the state_dict with ``weights_only=True``, and check that every module's
widths agree with its tensors.

A run directory is data, like a state dict: :func:`load_pruned` imports only a
builder that is prunekit's own, from a well-known model library, named by the
caller, or ``trusted`` (see :func:`prunekit.builders.check_builder`), and a
manifest may set nothing but the width attributes in :data:`WIDTH_ATTRS`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import PrunekitError
from .ops import width_attributes

MANIFEST_FORMAT = "prunekit-manifest/1"
PICKLED_MODULE = "module.pt"  # a run from a trusted whole pickled module: the pruned module itself
WIDTH_ATTRS = width_attributes()  # every size attribute the op table's resizes rewrite


class ManifestError(PrunekitError):
    """A manifest or its weights that cannot describe a pruned model; ``path`` and ``key`` say where."""

    def __init__(self, message: str, path: str | None = None, key: str | None = None):
        super().__init__(message)
        self.path, self.key = path, key


def _width(m: nn.Module, attr: str):
    """The module's own integer attribute ``attr``; a property (timm's ConvNormAct.in_channels reads its
    conv's) is no width of its own: it follows the layers it reads, and has no setter."""
    value = vars(m).get(attr)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _derived(m: nn.Module, attr: str) -> bool:
    return isinstance(getattr(type(m), attr, None), property)


def module_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    out = {}
    for name, m in model.named_modules():
        attrs = {a: _width(m, a) for a in WIDTH_ATTRS if _width(m, a) is not None}
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


def _tensor_widths(m: nn.Module) -> dict[str, int]:
    """What a module's own tensors say its width attributes must be (only those they determine)."""
    weight = m._parameters.get("weight")
    if isinstance(m, nn.modules.conv._ConvNd) and weight is not None:
        groups = m.groups
        if m.transposed:
            return {"in_channels": weight.shape[0], "out_channels": weight.shape[1] * groups}
        return {"out_channels": weight.shape[0], "in_channels": weight.shape[1] * groups}
    if isinstance(m, nn.Linear) and weight is not None:
        return {"out_features": weight.shape[0], "in_features": weight.shape[1]}
    if isinstance(m, nn.modules.batchnorm._NormBase):
        tensor = weight if weight is not None else m._buffers.get("running_mean")
        return {"num_features": tensor.shape[0]} if tensor is not None else {}
    if isinstance(m, nn.GroupNorm) and weight is not None:
        return {"num_channels": weight.shape[0]}
    if isinstance(m, nn.PReLU) and weight is not None:
        return {"num_parameters": weight.numel()}
    return {}


def check_widths(model: nn.Module, source: str = "the weights") -> None:
    """Every module's width attributes agree with its tensors' shapes (and groups divide channels)."""
    for name, m in model.named_modules():
        for attr, value in _tensor_widths(m).items():
            if getattr(m, attr) != value:
                raise ManifestError(f"{source} do not match the manifest: module '{name}' has {attr} "
                                    f"{getattr(m, attr)} but its weights have {value}.", key=name)
        groups = _width(m, "groups") if isinstance(m, nn.modules.conv._ConvNd) else _width(m, "num_groups")
        channels = (m.in_channels, m.out_channels) if isinstance(m, nn.modules.conv._ConvNd) else \
            (_width(m, "num_channels"),)
        if groups is not None and any(c is not None and c % groups for c in channels):
            raise ManifestError(f"{source} do not match the manifest: module '{name}' has {groups} groups, "
                                f"which do not divide its {', '.join(str(c) for c in channels)} channels.", key=name)


def _check_block(name, change, source: str) -> dict[str, int]:
    """The ``pruned`` widths of one manifest entry, refusing anything but width attributes."""
    where = f"'{source}' module '{name}'"
    if not isinstance(change, dict) or not isinstance(change.get("pruned"), dict):
        raise ManifestError(f"{where} needs a 'pruned' mapping of width attributes.", source, str(name))
    for part in ("original", "pruned"):
        for attr, value in (change.get(part) or {}).items():
            if attr not in WIDTH_ATTRS:
                raise ManifestError(f"{where} sets {attr!r}, which is not a width attribute; a manifest may only "
                                    f"set {', '.join(WIDTH_ATTRS)}.", source, str(name))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ManifestError(f"{where} gives {attr} as {value!r}; widths are positive integers.",
                                    source, str(name))
    return change["pruned"]


def resize_to(model: nn.Module, widths: dict[str, dict], state_dict: dict[str, torch.Tensor],
              source: str = "the manifest") -> nn.Module:
    """Give ``model`` (in place) the widths and tensor shapes of a pruned state_dict, then load it."""
    if not isinstance(widths, dict):
        raise ManifestError(f"'{source}' 'modules' must be a mapping of module names.", source, "modules")
    for name, change in widths.items():
        pruned = _check_block(name, change, source)
        try:
            module = model.get_submodule(name) if isinstance(name, str) else None
        except AttributeError:
            module = None
        if module is None:
            raise ManifestError(f"the manifest names module '{name}', which the built model does not have.",
                                source, str(name))
        for attr, value in (change.get("original") or {}).items():
            if _derived(module, attr):  # recorded by an earlier prunekit: it follows the layers it reads
                continue
            if _width(module, attr) != value:
                raise ManifestError(f"the manifest says module '{name}' had {attr} {value} before pruning, but "
                                    f"the builder makes it {getattr(module, attr, None)!r}; the builder or its "
                                    "kwargs are not the ones the run used.", source, str(name))
        for attr, value in pruned.items():
            if _derived(module, attr):
                continue
            if _width(module, attr) is None:
                raise ManifestError(f"the manifest sets {attr} of module '{name}' ({type(module).__name__}), "
                                    "which has no such width.", source, str(name))
            setattr(module, attr, value)
    current = dict(model.named_parameters())
    current.update(model.named_buffers())
    for name, value in state_dict.items():
        old = current.get(name)
        if old is None or not isinstance(value, torch.Tensor) or old.shape == value.shape:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        fresh = torch.empty(value.shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(fresh, requires_grad=old.requires_grad))
        else:
            owner._buffers[attr] = fresh
    from .loading import with_versions

    try:
        model.load_state_dict(with_versions(state_dict, model))
    except RuntimeError as exc:
        raise ManifestError(f"the pruned weights do not fit the rebuilt model: {str(exc).splitlines()[0]}",
                            source) from None
    check_widths(model, "the pruned weights")
    return model


def read_manifest(path: Path) -> dict:
    try:
        if path.stat().st_size > 16 * 2**20:
            raise ManifestError(f"'{path}' is larger than 16 MB; it is not a prunekit manifest.", str(path))
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ManifestError(f"'{path}' is not valid JSON.", str(path)) from None
    except OSError as exc:
        from .paths import os_error

        raise os_error(exc, "read", path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"'{path}' is not a prunekit manifest.", str(path))
    if manifest.get("builder") is not None and not isinstance(manifest["builder"], str):
        raise ManifestError(f"'{path}' gives a builder that is not a string.", str(path), "builder")
    if not isinstance(manifest.get("kwargs", {}) or {}, dict):
        raise ManifestError(f"'{path}' gives kwargs that are not a mapping.", str(path), "kwargs")
    return manifest


def load_pruned(run_dir, model: nn.Module | None = None, *, builder: str | None = None,
                trusted: bool = False) -> nn.Module:
    """Rebuild a pruned model from ``run_dir`` (manifest.json + model.pt), without unpickling.

    ``model``: an unpruned instance to resize (then no builder is imported), needed when the run was
    started from a Python object rather than a builder; it is not modified. ``builder``: the builder
    you expect the manifest to name; only then, or with ``trusted=True``, is a builder outside
    prunekit's zoo and the well-known model libraries imported (a run directory is data and never
    runs code you did not name).
    """
    import copy

    from .builders import check_builder
    from .arguments import check_model, check_path
    from .loading import build_model, read_weights

    check_path(run_dir, "run_dir")
    if model is not None:
        check_model(model)
    run = Path(run_dir)
    manifest_path, weights_path = run / "manifest.json", run / "model.pt"
    for path in (manifest_path, weights_path):
        if not path.is_file():
            raise PrunekitError(f"'{run}' is not a prunekit run directory: '{path.name}' is missing.")
    manifest = read_manifest(manifest_path)
    named = manifest.get("builder")
    if model is None and builder is not None and named is not None and builder != named:
        raise ManifestError(f"'{manifest_path}' names the builder {named!r}, not {builder!r}.",
                            str(manifest_path), "builder")
    if model is not None:
        base = copy.deepcopy(model)
    elif named or builder:
        spec = check_builder(named or builder, str(manifest_path), allowed=(builder,) if builder else (),
                             trusted=trusted)
        base = build_model(spec, manifest.get("kwargs") or {})
    elif (run / PICKLED_MODULE).is_file():
        return _pickled_module(run, read_weights(weights_path), trusted)
    else:
        raise PrunekitError("this run was started from a Python model with no builder; pass model= to load_pruned.")
    state = read_weights(weights_path)
    return resize_to(base, manifest.get("modules") or {}, state, str(manifest_path)).eval()


def _pickled_module(run: Path, state: dict, trusted: bool) -> nn.Module:
    """The pruned module a run from a trusted whole pickled module keeps, holding model.pt's weights."""
    from .errors import UnsafeInputError
    from .loading import load_model, with_versions
    from .safety import first_line

    path = run / PICKLED_MODULE
    if not trusted:
        raise UnsafeInputError(f"'{run}' was pruned from a whole pickled module, kept pruned in '{path.name}'; "
                               "reading it runs code from the file: pass --trusted (trusted=True) if you trust it.",
                               str(path))
    module = load_model(path, trusted=True)
    try:
        module.load_state_dict(with_versions(state, module))
    except RuntimeError as exc:
        raise ManifestError(f"'{path}' does not hold the weights of 'model.pt' beside it ({first_line(exc)}).",
                            str(path), "model.pt") from None
    return module.eval()


def recorded_input_shape(run_dir) -> list[int] | None:
    """The example input shape a run directory's manifest records (its first input), or None."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        return None
    shape = read_manifest(path).get("input_shape")
    if isinstance(shape, list) and shape and all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                                 for s in shape):
        return shape
    return None
