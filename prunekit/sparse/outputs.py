"""``prunekit sparsify`` as a library call: check everything, train sparse, write the output directory.

The directory holds ``model.pt`` (an ordinary state dict with exact zeros), ``manifest.json``
(prunekit's width manifest, so ``prunekit.load_pruned`` and ``prunekit report`` read it even after
dead filters were cut), and ``sparsity.json`` / ``sparsity.md``. It is built beside its final place
and renamed when complete: a run that fails leaves nothing behind.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ..artifacts import MANIFEST_FORMAT, module_widths, width_changes
from ..config import Config
from ..errors import PrunekitError
from ..rundir import input_paths, run_dir_of
from .dead import remove_dead_filters
from .report import render_sparsity_markdown, sparsity_report
from .training import SparseResult, sparse_tensors, sparsify

__all__ = ["FILES", "sparsify_to_dir", "builder_widths", "load_for_sparsify"]

FILES = ("model.pt", "manifest.json", "sparsity.json", "sparsity.md")


def sparsify_to_dir(model: nn.Module, config: Config, run_dir, *, force: bool = False,
                    remove_dead: bool = False, progress: bool = True, inputs=(),
                    original_widths: dict | None = None) -> SparseResult:
    """Train ``model`` sparse as ``config.sparsity`` says on ``config.data.train`` (metric on
    ``config.data.val`` when set), optionally cut its dead filters, and write ``run_dir``.

    ``original_widths``: the widths the builder makes (``artifacts.module_widths``) when ``model`` is
    already pruned, so the manifest records every cut from the builder's model; default: ``model``'s.

    Everything that can be checked is checked before training: the output directory, the data's
    first batches and labels, the layers the sparsity section names.
    """
    from ..checks import check_labels
    from ..data.batches import load_batches
    from ..data.devices import on_device, placed, resolve_device
    from ..files import atomic_dir, atomic_save_torch, atomic_write_text, save_json
    from ..paths import check_output

    sparsity = config.sparsity
    if sparsity is None:
        raise PrunekitError("sparsify needs a sparsity section in the config (or --density).")
    target = check_output(run_dir, inputs, what="output", directory=True)
    if target.is_dir() and any(target.iterdir()) and not force:
        raise PrunekitError(f"'{run_dir}' already exists and is not empty; pass --force to replace it or choose "
                            "another directory.")
    if config.input_shape is None:
        raise PrunekitError("sparsify needs input_shape (the example input's shape): pass --input-shape, e.g. "
                            "1,1,28,28, or set input_shape in the config.")
    shape, root = config.input_shape, config.data.root
    train = load_batches(config.data.train, shape, "train", root)
    if train is None:
        raise PrunekitError("sparsify trains the model: set data.train in the config (an image folder or a "
                            "factory).")
    val = load_batches(config.data.val, shape, "val", root)
    check_labels(model, train, "train")
    check_labels(model, val, "val")
    sparse_tensors(copy.deepcopy(model), sparsity)  # names in layers / exclude that match nothing
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    example = torch.rand(shape)
    graph = _channel_graph(model, example, config, required=remove_dead)  # an untraceable model fails here, not after
    original_widths = original_widths or module_widths(model)
    with placed(model, device):
        result = sparsify(model, on_device(train, device), sparsity, on_device(val, device), seed=config.seed,
                          progress=progress)
    result.model.to("cpu")
    if remove_dead:
        smaller, dead = remove_dead_filters(result.model, example, graph)
        if dead.units:  # the report describes the model that is saved: the smaller one
            kept = {k: result.report[k] for k in ("settings", "training_seconds", "metric") if k in result.report}
            result.report = {**sparsity_report(smaller, sparse_tensors(smaller, sparsity), sparsity.method), **kept}
        result.report["dead_filters"] = {**dead.counts(), "removed": sum(map(len, dead.removable.values())),
                                         "channels": dead.removable}
        result.model = smaller
        if val is not None and dead.units:
            with placed(smaller, device):
                from ..data.trainer import evaluate

                result.report["metric"]["after_removal"] = evaluate(smaller, on_device(val, device))
    elif graph is not None:  # offered, not cut
        from .dead import dead_filters

        dead = dead_filters(result.model, example, graph)
        result.report["dead_filters"] = {**dead.counts(), "removed": None, "channels": dead.removable}
    manifest = {"format": MANIFEST_FORMAT, "builder": config.model.builder, "kwargs": config.model.kwargs,
                "input_shape": list(shape), "modules": width_changes(original_widths, result.model),
                "sparsity": {"method": sparsity.method, "density": sparsity.density}}
    with atomic_dir(run_dir, overwrite=force) as work:
        work = Path(work)
        atomic_save_torch(result.model.state_dict(), work / "model.pt")
        save_json(work / "manifest.json", manifest)
        save_json(work / "sparsity.json", result.report)
        atomic_write_text(work / "sparsity.md", render_sparsity_markdown(result.report))
    return result


def _channel_graph(model: nn.Module, example: torch.Tensor, config: Config, required: bool):
    """The channel graph dead filters are found on (training changes weights, not structure); without
    ``required``, a model the graph cannot take just gets no dead-filter analysis."""
    from ..graphs import build_graph

    try:
        return build_graph(model, example, leaf_modules=config.model.leaf_modules)
    except PrunekitError:
        if required:
            raise
        return None


def builder_widths(model: nn.Module, manifest: dict) -> dict:
    """The widths of the builder's unpruned model, from a pruned ``model`` and its run's manifest."""
    widths = module_widths(model)
    for name, change in (manifest.get("modules") or {}).items():
        if name in widths and isinstance(change, dict):
            widths[name] = {**widths[name], **(change.get("original") or {})}
    return widths


def load_for_sparsify(model_path: str, config_path: str | None, values: dict, flags: dict):
    """What ``prunekit sparsify`` works on: ``(model, config, builder widths or None, input files)``.

    ``values`` (dotted key -> value, from the flags) go over the config file. MODEL may be a prunekit
    run directory: its pruned model, with the builder, kwargs and input shape of its manifest where
    neither the flags nor the config set them. Without a config or a sparsity flag, the sparsity
    section's defaults apply.
    """
    from ..artifacts import load_pruned, read_manifest
    from ..configtools import with_overrides
    from ..loading import load_model

    values = dict(values)
    if config_path is None and not any(k.startswith("sparsity.") for k in values):
        values["sparsity.density"] = 0.1  # the section's defaults, switched on
    inputs = input_paths(model_path) + ([config_path] if config_path else [])
    run = run_dir_of(model_path)
    manifest = read_manifest(run / "manifest.json") if run is not None else {}
    for key, field in (("model.builder", "builder"), ("model.kwargs", "kwargs"), ("input_shape", "input_shape")):
        if manifest.get(field) and key not in values and not _in_config(config_path, key):
            values[key] = manifest[field]
    config = with_overrides(config_path, values, flags)
    where = f"the config '{config_path}'" if config_path else "the config"
    if config.sparsity is None:
        raise PrunekitError(f"sparsify needs a sparsity section in {where}, or --density.")
    if config.model.builder is None and not config.model.trusted_pickle:
        raise PrunekitError(f"sparsify needs model.builder (the function that builds the model): pass --builder "
                            f"package.module:function or set model.builder in {where} (or --trusted for a whole "
                            "pickled module).")
    if run is not None:
        net = load_pruned(run, builder=config.model.builder, trusted=config.model.trusted_pickle)
        return net, config, builder_widths(net, manifest), inputs
    net = load_model(model_path, builder=config.model.builder, kwargs=config.model.kwargs,
                     trusted=config.model.trusted_pickle)
    return net, config, None, inputs


def _in_config(path: str | None, key: str) -> bool:
    """Whether the YAML config at ``path`` sets the dotted ``key``."""
    if path is None:
        return False
    from ..yamlfile import read_yaml

    node = read_yaml(path) or {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return node is not None

