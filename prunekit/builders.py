"""Builder specs: ``package.module:function`` names, their JSON keyword arguments, the call, and
:func:`check_builder`, which decides whether a builder named by a *file* (a run directory's manifest) may
be imported: prunekit's own, a well-known model library (:data:`TRUSTED_BUILDER_MODULES`), the builder
the user named, or anything when the user said ``trusted``.

Every problem raises :class:`~prunekit.errors.PrunekitError` (or :class:`~prunekit.errors.UsageError`)
with a one-sentence message; what user code prints while it is imported or called is kept off stdout.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from prunekit.errors import PrunekitError, ResourceError, UnsafeInputError, UsageError
from prunekit.safety import first_line, quiet_stdout

__all__ = ["TRUSTED_BUILDER_MODULES", "resolve_callable", "parse_kwargs", "build_model", "check_builder"]

_SPEC_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def _first_line(exc: BaseException) -> str:
    return first_line(exc) or type(exc).__name__


def resolve_callable(spec: str) -> Callable[..., Any]:
    """Return the callable named by ``"package.module:attr"`` (``attr`` may be dotted).

    Raises :class:`UsageError` for a malformed spec and :class:`PrunekitError`
    when the module cannot be imported, the attribute is missing, or it is not
    callable.
    """
    if not isinstance(spec, str) or not _SPEC_RE.match(spec.strip()):
        raise UsageError(
            f"{spec!r} is not a valid callable name; use the form package.module:function, "
            "for example torchvision.models:resnet50."
        )
    module_name, attr_path = spec.strip().split(":", 1)
    try:
        with quiet_stdout():  # what an imported module prints must not reach --json output
            obj: Any = importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise PrunekitError(
                f"Module {module_name!r} in {spec!r} cannot be found; check the spelling "
                "and that its package is installed."
            ) from None
        raise PrunekitError(
            f"Importing module {module_name!r} for {spec!r} failed because it needs "
            f"{missing!r}, which is not installed."
        ) from None
    except SystemExit as exc:
        raise PrunekitError(
            f"Importing module {module_name!r} for {spec!r} failed: it called sys.exit({exc.code!r})."
        ) from exc
    except BaseException as exc:  # noqa: BLE001 - any import-time failure of user code
        raise PrunekitError(
            f"Importing module {module_name!r} for {spec!r} failed: {type(exc).__name__}: {_first_line(exc)}."
        ) from exc
    where = f"Module {module_name!r}"
    done: list[str] = []
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise PrunekitError(f"{where} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
        done.append(part)
        where = repr(f"{module_name}:{'.'.join(done)}")
    if not callable(obj):
        raise PrunekitError(
            f"{spec!r} names a {type(obj).__name__}, not a function or class that can be called."
        )
    return obj


def parse_kwargs(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Parse builder keyword arguments given as a JSON object (or pass a mapping through)."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    if not isinstance(text, str):
        raise UsageError(f"Builder keyword arguments must be a JSON object, not {type(text).__name__}.")
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"Builder keyword arguments {text!r} are not valid JSON ({exc.msg} at character {exc.pos}); "
            'write them like \'{"num_classes": 3}\'.'
        ) from None
    if not isinstance(value, dict):
        raise UsageError(
            f"Builder keyword arguments must be a JSON object like '{{\"num_classes\": 3}}', "
            f"not a {type(value).__name__}."
        )
    return value


def build_model(builder: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Call the builder named by ``builder`` with ``kwargs`` and check it returns an ``nn.Module``."""
    fn = resolve_callable(builder)
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise UsageError(
            f"Builder keyword arguments must be a mapping (a JSON object), not {type(kwargs).__name__}."
        )
    kw = dict(kwargs or {})
    try:
        with quiet_stdout():
            model = fn(**kw)
    except KeyboardInterrupt:
        raise
    except TypeError as exc:
        raise PrunekitError(f"Builder {builder!r} rejected its arguments {kw!r}: {_first_line(exc)}.") from exc
    except MemoryError as exc:
        raise ResourceError(f"Builder {builder!r} ran out of memory building the model with {kw!r}.",
                            reason="memory") from exc
    except SystemExit as exc:
        raise PrunekitError(f"Builder {builder!r} called sys.exit({exc.code!r}).") from exc
    except BaseException as exc:  # noqa: BLE001 - user code
        raise PrunekitError(f"Builder {builder!r} failed with {type(exc).__name__}: {_first_line(exc)}.") from exc
    if not isinstance(model, nn.Module):
        raise PrunekitError(
            f"Builder {builder!r} returned a {type(model).__name__}, not a torch.nn.Module."
        )
    return model


# Builders a manifest may name without the user saying so: prunekit's reference models and the
# model zoos of well-known libraries. Only a plain name directly in one of these modules (or below)
# whose object is defined there counts: ``torchvision.models:resnet50``, ``timm:create_model``.
TRUSTED_BUILDER_MODULES = ("prunekit.zoo", "torchvision.models", "timm", "segmentation_models_pytorch",
                           "monai.networks")

_PLAIN_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def _under(module: str, prefixes: Sequence[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _shadowed(module: str, source: str) -> bool:
    """True when the package ``module`` would be imported from the directory the file came with (a ``timm.py``
    sent along with a run directory), not from where the library is installed."""
    import importlib.util
    from pathlib import Path

    try:
        found = importlib.util.find_spec(module.split(".")[0])  # the top level only: imports nothing
    except (ImportError, ValueError):
        return False
    origin = getattr(found, "origin", None) or next(iter(getattr(found, "submodule_search_locations", None) or []),
                                                    None)
    if not origin:
        return False
    folder = Path(os.path.realpath(os.path.dirname(os.path.abspath(source))))
    return folder in Path(os.path.realpath(origin)).parents


def check_builder(spec: Any, source: str, allowed: Sequence[str] = (), trusted: bool = False) -> str:
    """``spec`` if a builder named by the file ``source`` may be imported and called; else raise.

    ``allowed``: builder specs the user named themselves (command line, config, argument).
    """
    if not isinstance(spec, str):
        raise UnsafeInputError(f"'{source}' names a builder that is not a string ({type(spec).__name__}).",
                               path=str(source))
    if trusted or spec in allowed:
        return spec
    module = spec.split(":", 1)[0]
    if _PLAIN_SPEC.match(spec) and _under(module, TRUSTED_BUILDER_MODULES) and not _shadowed(module, source):
        obj = resolve_callable(spec)
        defined_in = getattr(obj, "__module__", None) or ""
        if _under(defined_in, TRUSTED_BUILDER_MODULES):
            return spec
    raise UnsafeInputError(
        f"'{source}' names the builder {spec!r}, which is neither prunekit's own nor from a well-known model "
        f"library, and loading it would run its code; name it yourself (--builder {spec}, or builder= in "
        "Python) or pass --trusted (trusted=True) if you trust where the files came from.",
        path=str(source), name=spec)
