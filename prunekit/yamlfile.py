"""YAML config files read with limits: size, nesting depth, alias expansion, duplicate keys.

``yaml.safe_load`` runs no code, but a few hundred bytes of nested aliases expand to
billions of nodes (a "billion laughs" bomb), deep nesting overflows Python's stack,
and a key written twice silently keeps the last value. :func:`read_yaml` refuses all
of these with one sentence naming the file (a :class:`ConfigError`).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from .errors import PrunekitError

__all__ = ["ConfigError", "read_yaml", "MAX_BYTES", "MAX_DEPTH", "MAX_NODES"]

MAX_BYTES = 1_000_000  # a pruning config is a few kB
MAX_DEPTH = 32  # nesting levels of mappings and lists
MAX_NODES = 100_000  # scalars, lists and mappings after expanding every alias


class ConfigError(PrunekitError):
    """A config file or dict that does not fit the schema; ``path`` and ``key`` say where, and
    ``suggestion`` the nearest valid key when the key does not exist."""

    def __init__(self, message: str, path: str | None = None, key: str | None = None,
                 suggestion: str | None = None):
        super().__init__(message)
        self.path, self.key, self.suggestion = path, key, suggestion


class _Loader(yaml.SafeLoader):
    """A safe loader that refuses a key written twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: let PyYAML say so
                    continue
                if first is not key_node:
                    raise _Duplicate(key, key_node.start_mark.line + 1, first.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


class _Duplicate(Exception):
    def __init__(self, key, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


def _measure(node, path: str) -> None:
    """Refuse a document nested deeper than MAX_DEPTH or larger than MAX_NODES once aliases expand."""
    sizes: dict[int, int] = {}

    def size(n, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise ConfigError(f"config file '{path}' is nested more than {MAX_DEPTH} levels deep.", path)
        key = id(n)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # a node that contains itself counts once
        total = 1
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k, depth + 1) + size(v, depth + 1)
        elif isinstance(n, yaml.SequenceNode):
            for v in n.value:
                total += size(v, depth + 1)
        if total > MAX_NODES:
            raise ConfigError(f"config file '{path}' expands to more than {MAX_NODES:,} values (aliases that "
                              "repeat aliases); a pruning config is far smaller.", path)
        sizes[key] = total
        return total

    if node is not None:
        size(node, 0)


def read_yaml(source) -> object:
    """The data in the YAML file ``source``, read with the limits above."""
    path = Path(source)
    shown = os.fspath(source)
    if not os.path.lexists(path):
        raise ConfigError(f"config file '{shown}' does not exist.", shown)
    if path.is_dir():
        raise ConfigError(f"config file '{shown}' is a directory, not a YAML file.", shown)
    if not path.exists():
        raise ConfigError(f"config file '{shown}' is a symbolic link to '{os.readlink(path)}', which does not "
                          "exist.", shown)
    if not path.is_file():
        raise ConfigError(f"config file '{shown}' is not a regular file.", shown)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"config file '{shown}' is {size:,} bytes; a config may be at most {MAX_BYTES:,}.",
                              shown)
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise ConfigError(f"config file '{shown}' cannot be read (permission denied).", shown) from None
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"config file '{shown}' cannot be read as UTF-8 text.", shown) from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        _measure(node, shown)
        return loader.construct_document(node) if node is not None else None
    except _Duplicate as dup:
        raise ConfigError(f"config file '{shown}' sets the key {dup.key!r} twice (lines {dup.first} and "
                          f"{dup.line}); keep one.", shown, str(dup.key)) from None
    except RecursionError:
        raise ConfigError(f"config file '{shown}' is nested more than {MAX_DEPTH} levels deep.", shown) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{shown}' is not valid YAML{where}.", shown) from None
    finally:
        loader.dispose()
