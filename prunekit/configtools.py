"""Configs without writing YAML by hand: command-line flags over a config, and the commented
starting config that ``prunekit init-config`` writes.

>>> config = with_overrides(None, {"targets.flops": 0.5, "importance.method": "l1"})
>>> config.targets.flops, config.importance.method
(0.5, 'l1')

:func:`config_template` walks the config dataclasses, so the file it writes holds every key
there is; each key's comment is the one beside its field in :mod:`prunekit.config` (or the
entry of :data:`NOTES`, which wins).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import tokenize
import typing
from typing import Any

import yaml

from . import config as config_module
from .config import Config, load_config, read_config_file
from .yamlfile import ConfigError

__all__ = ["with_overrides", "config_template", "config_keys", "NOTES", "OPTIONAL_SECTIONS"]


def with_overrides(source, overrides: dict[str, Any], flags: dict[str, str] | None = None) -> Config:
    """The config from ``source`` (a YAML path, a dict, or None for the defaults) with ``overrides``
    (``{"targets.flops": 0.5}``: dotted key -> value) put over it, validated as a whole.

    ``flags``: dotted key -> the command-line flag that set it, so an error names the flag
    (``--flops must be a ratio in (0, 1], got 2.0.``) instead of the key.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return load_config(source if source is not None else {})
    folder = None  # where the config's relative data paths start: a YAML file's own folder
    if source is None:
        raw: dict = {}
    elif isinstance(source, dict):
        raw = json.loads(json.dumps(source))  # a copy; the caller's dict stays as it was
    else:
        raw, folder = read_config_file(source)
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    try:
        return load_config(raw, folder=folder)
    except ConfigError as exc:
        flag = (flags or {}).get(exc.key or "")
        if flag is None:
            raise
        text = str(exc).replace(f"config key '{exc.key}'", flag, 1)
        raise ConfigError(text[0].upper() + text[1:] if text.startswith("config") else text, key=exc.key) from None


# --------------------------------------------------------------------------- the commented template

# Sections that are off (null) by default; the template shows them as commented-out blocks with
# every key, ready to switch on, holding these values (by key path, or by the section's class name).
OPTIONAL_SECTIONS = {
    "schedule.finetune": {"iterations": 20, "lr": 0.001},
    "schedule.final_finetune": {"iterations": 60, "lr": 0.0005},
    "data.calibration": {"images": "path/to/images"},
    "data.train": {"images": "path/to/images", "masks": "path/to/masks"},
    "data.val": {"images": "path/to/val/images", "masks": "path/to/val/masks"},
    "Normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},  # by class, wherever it sits
}

# Comments that say more than the field's own comment in config.py (or that a field lacks there).
NOTES = {
    "model": "the model MODEL's weights are for",
    "model.kwargs": "keyword arguments for the builder",
    "input_shape": "the example input: batch, channels, then the spatial sizes",
    "targets": "fractions of the original model to keep",
    "importance": "how filters are ranked (lowest pruned first)",
    "importance.method": "ipad (default) | l1 | l2 | bn_scale | group_l2 | taylor | fisher | random | "
                         "package.module:function",
    "importance.normalize": "rank (position within the layer, 0..1) | mean (score / the layer's mean)",
    "targets.priority": "flops | params | latency: what sizes the steps (null: latency with a latency target)",
    "limits": "how much of each layer may go",
    "limits.layers": "module name or glob -> max fraction removed; 0 = never touch, e.g. {out: 0.0, 'dec1.*': 0.25}",
    "schedule": "how many steps, and the fine-tuning between them",
    "schedule.steps": "pruning steps from the original to the targets",
    "schedule.finetune": "fine-tune after every step (needs data.train); null: none",
    "schedule.final_finetune": "fine-tune the delivered model once more after the last step; null: none",
    "data": "where batches come from; each source: an image folder (+ masks or labels) or a factory",
    "data.calibration": "images the importance scores are computed on (ipad, taylor, fisher)",
    "data.train": "(input, target) batches for fine-tuning and the taylor loss",
    "data.val": "batches the metric is measured on after every step (when no validate function)",
    "latency": "where latency is measured (a latency target, round_to: auto, the run report)",
    "latency.device": "cpu or a torch device string",
    "latency.warmup": "untimed runs before each measurement",
    "keep_best": "candidates kept across steps; the best one that meets the targets is delivered",
    "seed": "for scoring, fine-tuning and the example input",
    "finetune.iterations": "optimizer steps",
    "finetune.lr": "learning rate (Adam)",
    "finetune.weight_decay": "weight decay in [0, 1]",
    "finetune.task": "auto | classification | segmentation (auto: from the model's output and the targets)",
    "finetune.augment": "random flips and shifted crops (masks alike) while fine-tuning",
    "source.kwargs": "keyword arguments for the factory",
    "source.batch_size": "images per batch (image folders)",
}


def _field_comments(cls) -> dict[str, str]:
    """The comment written on the line of each field of dataclass ``cls`` in its source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        line = lines[token.start[0] - 1].strip()
        name = line.split(":", 1)[0].strip()
        if name in names and not line.startswith("#"):
            comments[name] = token.string.lstrip("#").strip()
    return comments


def _note_key(path: str, cls) -> list[str]:
    """The NOTES keys that may describe ``path`` (a field of ``cls``): its own, then its class's."""
    name = path.rsplit(".", 1)[-1]
    generic = {config_module.Finetune: "finetune", config_module.DataSource: "source"}.get(cls)
    return [path] + ([f"{generic}.{name}"] if generic else [])


def _comment(path: str, cls, name: str) -> str:
    for key in _note_key(path, cls):
        if key in NOTES:
            return NOTES[key]
    return _field_comments(cls).get(name, "")


def _dataclass_of(tp):
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def config_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every key path of the config (``targets.flops``, ``data.train.images``, ...), in file order,
    sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        keys.append(path)
        inner = _dataclass_of(hints[f.name])
        if inner is not None:
            keys += config_keys(inner, path + ".")
    return keys


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):  # plain when YAML reads it back as the same string, quoted otherwise
        try:
            plain = yaml.safe_load(value) == value and "#" not in value and not value.startswith(("{", "["))
        except yaml.YAMLError:
            plain = False
        return value if plain else json.dumps(value)
    return json.dumps(value)  # lists and mappings in flow style (JSON is YAML)


def _emit(lines: list[str], cls, values: dict, prefix: str, indent: int, commented: int | None) -> None:
    """``commented``: None, or the column of the ``#`` that comments out this block (the indent of
    the section it belongs to), so deleting ``# `` switches the block on as it stands."""
    hints = typing.get_type_hints(cls)
    pad = " " * indent if commented is None else " " * commented + "# " + " " * (indent - commented)
    mark = ""
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        comment = _comment(path, cls, f.name)
        inner = _dataclass_of(hints[f.name])
        value = values.get(f.name)
        example = None if inner is None else {**_defaults(inner), **OPTIONAL_SECTIONS.get(
            path, OPTIONAL_SECTIONS.get(inner.__name__, {}))}
        if inner is not None and (isinstance(value, dict) or (value is None and commented is not None)):
            # a section that is on, or an optional one inside a block that is already commented out
            lines.append(_line(f"{pad}{mark}{f.name}:", comment))
            _emit(lines, inner, _fields_of(value) if isinstance(value, dict) else example, path + ".", indent + 2,
                  commented)
        elif inner is not None:  # an optional section that is off: null, then every key commented out
            lines.append(_line(f"{pad}{mark}{f.name}: null", comment))
            lines.append(f"{pad}# {f.name}:")
            _emit(lines, inner, example, path + ".", indent + 2, indent)
        else:
            lines.append(_line(f"{pad}{mark}{f.name}: {_yaml_value(_plain(value))}", comment))


def _defaults(cls) -> dict:
    """The fields' declared defaults (before a ``__post_init__`` fills in what depends on others:
    ``targets.flops: null`` stays null, which means 0.5, or 1.0 with a latency target)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            made = f.default_factory()  # type: ignore[misc]
            values[f.name] = _defaults(type(made)) if dataclasses.is_dataclass(made) else made
        else:
            values[f.name] = None
    return values


def _fields_of(value) -> dict:
    return _defaults(value) if isinstance(value, type) else dict(value)


def _plain(value):
    if callable(value) and not isinstance(value, type):
        return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', '?')}"
    return value


def _line(text: str, comment: str) -> str:
    if not comment:
        return text
    return f"{text:<40}  # {comment}" if len(text) < 40 else f"{text}  # {comment}"


def config_template(values: dict[str, Any] | None = None, flags: dict[str, str] | None = None) -> str:
    """A commented YAML config holding every key: the defaults, with ``values`` (dotted key ->
    value, e.g. ``{"model.builder": "torchvision.models:resnet18"}``) put over them.

    Sections that are off by default (fine-tuning, data sources) are ``null`` with every key of
    theirs written out below in comments. The text loads with :func:`~prunekit.config.load_config`.
    """
    values = {k: v for k, v in (values or {}).items() if v is not None}
    with_overrides(None, values, flags)  # the values are checked as a config's are (``flags``: as for that)
    raw = _defaults(Config)
    for key, value in values.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    lines = ["# prunekit pruning config: every key, with its default. Use it with",
             "#   prunekit prune MODEL --config THIS_FILE -o RUN_DIR",
             "# Keys may be left out (their default applies); an unknown key is an error naming the nearest one.",
             "# A section that is null is off; to switch it on, delete its null line and the '# ' of the block",
             "# written below it."]
    _emit(lines, Config, raw, "", 0, None)
    return "\n".join(lines) + "\n"
