"""Plain mappings checked against dataclass annotations, one sentence per problem.

:func:`build` turns a mapping (from YAML, or a dict) into a tree of dataclasses: each key must be
a field (an unknown one is named with the nearest valid one), each value must fit the field's
annotation (numbers, integers, strings, booleans, literals, unions, nested dataclasses,
callables), and a key path listed in ``checks`` must also pass its range predicate.

>>> from dataclasses import dataclass
>>> @dataclass
... class Steps:
...     count: int = 1
>>> build(Steps, {"count": 3}, {"count": (lambda v: v >= 1, "an integer >= 1")})
Steps(count=3)
>>> build(Steps, {"cout": 3})
Traceback (most recent call last):
...
prunekit.yamlfile.ConfigError: config key 'cout' does not exist; did you mean 'count'?
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Callable, Literal, Mapping, Union

from .yamlfile import ConfigError

Checks = Mapping[str, tuple[Callable[[Any], bool], str]]  # key path -> (predicate, what the value must be)


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false",
            dict: "a mapping", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def convert(value, tp, path: str, checks: Checks = {}):
    """Check ``value`` against the annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(value, option, path, checks)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        tried = [o for o in options if o is not type(None)]
        if isinstance(value, dict):  # a mapping is meant as the option that is one: keep its precise error
            for option, error in zip(tried, errors):
                if dataclasses.is_dataclass(option):
                    raise error
        raise ConfigError(f"config key '{path}' must be {type_name(tp)}, got {value!r}.", key=path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{path}' must be {type_name(tp)}, got {value!r}.", key=path)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}.", key=path)
        return build(tp, value, checks, path)
    if tp is Callable or origin is typing.get_origin(Callable):
        if callable(value):
            return value
        raise ConfigError(f"config key '{path}' must be callable.", key=path)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' must be a number, got {value!r}.", key=path)
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"config key '{path}' must be a finite number, got {value!r}.", key=path)
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}' must be an integer, got {value!r}.", key=path)
        return value
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{path}' must be true or false, got {value!r}.", key=path)
    if tp in (str, dict, list) and not isinstance(value, tp):
        raise ConfigError(f"config key '{path}' must be {type_name(tp)}, got {value!r}.", key=path)
    return value


def build(cls, raw: dict, checks: Checks = {}, prefix: str = ""):
    """An instance of the dataclass ``cls`` from ``raw``; ConfigError names the first bad key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            nearest = f"{prefix}.{close[0]}" if prefix and close else (close[0] if close else None)
            hint = f"; did you mean '{nearest}'?" if nearest else f"; valid keys here: {', '.join(names)}."
            raise ConfigError(f"config key '{path}' does not exist{hint}", key=path, suggestion=nearest)
        converted = convert(value, hints[key], path, checks)
        check = checks.get(path)
        if check and converted is not None and not check[0](converted):
            raise ConfigError(f"config key '{path}' must be {check[1]}, got {value!r}.", key=path)
        values[key] = converted
    return cls(**values)
