"""The flags of ``prune`` and ``init-config`` that set config keys (``--flops 0.5`` is
``targets.flops: 0.5``): declared once here, parsed into dotted-key overrides for
:func:`prunekit.configtools.with_overrides`."""

from __future__ import annotations

import functools
import os
import shlex
from dataclasses import dataclass
from typing import Any, Callable

import click

from .errors import UsageError


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    key: str  # the config key it sets
    kind: str  # str | float | int | json | shape | path | flag
    help: str
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.names[0].lstrip("-").replace("-", "_")


FLAGS = (
    Flag(("--builder", "-b"), "model.builder", "str", "Function that builds the model MODEL's weights fit "
         "(model.builder), e.g. torchvision.models:resnet50.", "PKG.MOD:FN"),
    Flag(("--kwargs", "-k"), "model.kwargs", "json", "Keyword arguments for the builder as a JSON object "
         "(model.kwargs), e.g. '{\"num_classes\": 2}'.", "JSON"),
    Flag(("--input-shape", "-i"), "input_shape", "shape", "Shape of the example input (input_shape), "
         "e.g. 1,3,256,256 or 1x3x256x256.", "SHAPE"),
    Flag(("--flops",), "targets.flops", "float", "Keep at most this fraction of the FLOPs (targets.flops), "
         "e.g. 0.5.", "RATIO"),
    Flag(("--params",), "targets.params", "float", "Keep at most this fraction of the parameters "
         "(targets.params).", "RATIO"),
    Flag(("--latency",), "targets.latency", "float", "Run in at most this fraction of the original's latency, "
         "measured on latency.device (targets.latency).", "RATIO"),
    Flag(("--method", "-m"), "importance.method", "str", "How filters are ranked (importance.method): ipad, l1, "
         "l2, bn_scale, group_l2, taylor, fisher, random or package.module:function.", "METHOD"),
    Flag(("--steps",), "schedule.steps", "int", "Pruning steps from the original to the targets "
         "(schedule.steps).", "N"),
    Flag(("--data",), "data.calibration", "path", "A folder of images to calibrate the importance scores on "
         "(data.calibration.images).", "DIR"),
    Flag(("--trusted",), "model.trusted_pickle", "flag", "MODEL is a whole pickled module (model.trusted_pickle); "
         "unpickling runs code from the file."),
)


def config_flags(exclude: tuple[str, ...] = ()) -> Callable:
    """Add the :data:`FLAGS` (less ``exclude``, by key) to a command; it receives them as one
    ``overrides`` argument: a :class:`Overrides`."""
    chosen = [f for f in FLAGS if f.key not in exclude]

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            raw = {f.dest: kwargs.pop(f.dest) for f in chosen}
            return fn(*args, overrides=Overrides(chosen, raw), **kwargs)

        if hasattr(wrapper, "__click_params__"):
            wrapper.__click_params__ = list(wrapper.__click_params__)
        for flag in reversed(chosen):
            if flag.kind == "flag":
                option = click.option(*flag.names, flag.dest, is_flag=True, default=None, help=flag.help)
            else:
                option = click.option(*flag.names, flag.dest, metavar=flag.metavar, help=flag.help)
            wrapper = option(wrapper)
        return wrapper

    return decorate


class Overrides:
    """The config flags a user gave: as dotted config keys, and as they were typed."""

    def __init__(self, flags: list[Flag], raw: dict[str, Any]):
        self.given = [(f, raw[f.dest]) for f in flags if raw.get(f.dest) not in (None, False)]

    @property
    def flags(self) -> dict[str, str]:
        """config key -> the flag that sets it (for error messages)."""
        return {f.key: f.names[0] for f, _ in self.given}

    def values(self) -> dict[str, Any]:
        """config key -> value, parsed; a value that does not parse is one sentence naming the flag."""
        return {f.key: _parse(f, text) for f, text in self.given}

    def argv(self) -> list[str]:
        """The flags as typed, to repeat the command (e.g. with --resume)."""
        out: list[str] = []
        for f, text in self.given:
            out += [f.names[0]] if f.kind == "flag" else [f.names[0], str(text)]
        return out

    def __bool__(self) -> bool:
        return bool(self.given)


def _parse(flag: Flag, text: Any) -> Any:
    from .builders import parse_kwargs
    from .loading import parse_input_shape

    name = flag.names[0]
    if flag.kind == "flag":
        return True
    if flag.kind in ("float", "int"):
        try:
            return float(text) if flag.kind == "float" else int(text)
        except ValueError:
            kind = "a number" if flag.kind == "float" else "a whole number"
            raise UsageError(f"{name} must be {kind}, got {text!r}.") from None
    if flag.kind == "json":
        return parse_kwargs(text)
    if flag.kind == "shape":
        return list(parse_input_shape(text))
    if flag.kind == "path":  # a command-line path is relative to where the command runs
        return {"images": os.path.abspath(text)}
    return text


def command_line(*parts: Any) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)
