"""Model files and example-input shapes: how prunekit reads the user's model (builders: :mod:`prunekit.builders`).

Every problem with the user's input raises :class:`~prunekit.errors.PrunekitError`
(or its subclass :class:`~prunekit.errors.UsageError`) with a one-sentence
message; nothing here prints.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.builders import build_model, parse_kwargs, resolve_callable  # noqa: F401 - part of this module's API
from prunekit.errors import PrunekitError, UsageError
from prunekit.safety import first_line

__all__ = [
    "resolve_callable",
    "parse_kwargs",
    "build_model",
    "load_state",
    "load_model",
    "read_weights",
    "parse_input_shape",
]

PathLike = str | os.PathLike

# Keys under which training checkpoints commonly keep the model's weights.
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")

# --------------------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    return first_line(exc) or type(exc).__name__


def check_file(path: Path, what: str = "Model file") -> None:
    """A file that can be read, or one sentence saying what ``path`` is instead."""
    if not path.exists():
        if path.is_symlink():
            raise PrunekitError(f"{what} {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does "
                                "not exist.")
        raise PrunekitError(f"{what} {str(path)!r} does not exist.")
    if path.is_dir():
        raise PrunekitError(f"{what} {str(path)!r} is a directory, not a file.")
    if not path.is_file():  # a pipe or a device would block or never end
        raise PrunekitError(f"{what} {str(path)!r} is not a regular file.")
    if not os.access(path, os.R_OK):
        raise PrunekitError(f"{what} {str(path)!r} cannot be read (permission denied).")


def _top_level_class(path: Path) -> str | None:
    """Name the class of the top-level pickled object, without unpickling anything.

    Reads the opcodes of the archive's data.pkl with :mod:`pickletools`; returns
    ``"module.Class"`` when the top-level object is built from a global, ``None``
    for a plain dict (or when the file is not a readable torch zip archive).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if not names:
                return None
            data = zf.read(min(names, key=len))
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("PROTO", "FRAME"):
                continue
            if op.name == "GLOBAL" and isinstance(arg, str):
                return arg.replace(" ", ".")
            return None
    except Exception:  # noqa: BLE001 - best effort only
        return None
    return None


def _looks_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save's archive: compiled code and constants beside the data (torch.save writes neither)."""
    if not _looks_like_zip(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _read_file(path: Path, trusted: bool) -> Any:
    """Read a weights file (torch or safetensors); unpickle objects only when trusted."""
    check_file(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise PrunekitError(
                f"Reading {str(path)!r} needs the safetensors package; install it with pip install safetensors."
            ) from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001
            raise PrunekitError(
                f"{str(path)!r} is not a readable safetensors file ({_first_line(exc)})."
            ) from None
    if path.stat().st_size == 0:
        raise PrunekitError(f"Model file {str(path)!r} is empty.")
    if _is_torchscript(path):
        raise PrunekitError(f"{str(path)!r} is a TorchScript archive, which cannot be pruned: save the module's "
                            "state_dict (torch.save(model.state_dict(), path)) and pass its builder.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = _UNSUPPORTED_GLOBAL.search(str(exc))
        if match is None:
            raise PrunekitError(
                f"{str(path)!r} is corrupt or not a PyTorch file (it could not be unpickled)."
            ) from None
        offending = match.group(1)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for bad files
        if _looks_like_zip(path):
            raise PrunekitError(
                f"{str(path)!r} is corrupt: it is a damaged or truncated PyTorch archive."
            ) from None
        raise PrunekitError(
            f"{str(path)!r} is corrupt or not a PyTorch file ({type(exc).__name__}: {_first_line(exc)})."
        ) from None
    # The file holds pickled Python objects beyond tensors and plain containers.
    if not trusted:
        top = _top_level_class(path)
        if top is not None and top != "collections.OrderedDict":
            raise PrunekitError(
                f"{str(path)!r} is a pickled module ({top}), and loading it would run code from the file; "
                "pass --trusted only if you trust where the file came from."
            )
        raise PrunekitError(
            f"{str(path)!r} holds pickled Python objects besides weights ({offending}), and loading it would "
            "run code from the file; pass --trusted only if you trust where the file came from."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - user pickles can fail in any way
        raise PrunekitError(
            f"{str(path)!r} could not be unpickled even as a trusted file ({type(exc).__name__}: {_first_line(exc)})."
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
        and all(isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in obj.items())
    )


def _unwrap(obj: Any, path: Path) -> nn.Module | Mapping[str, Any]:
    """Return the module or state_dict held by a loaded object (possibly a checkpoint dict)."""
    if isinstance(obj, nn.Module) or _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or _is_state_dict(inner):
                return inner
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise PrunekitError(
            f"{str(path)!r} holds a dict without model weights (its keys: {keys}); expected a state_dict "
            f"or a checkpoint with the weights under one of {', '.join(repr(k) for k in CHECKPOINT_KEYS)}."
        )
    raise PrunekitError(
        f"{str(path)!r} holds a {type(obj).__name__}, not a state_dict or an nn.Module."
    )


def read_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from ``path``, read without unpickling any object."""
    path = Path(path)
    obj = _read_file(path, trusted=False)
    if not _is_state_dict(obj):
        raise PrunekitError(f"{str(path)!r} is not a state_dict of weights.")
    return dict(obj)


def _fmt_names(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


def with_versions(state: Mapping[str, Any], model: nn.Module) -> Mapping[str, Any]:
    """``state`` carrying module versions (``_metadata``): its own, else those of ``model`` as built.
    A module that converts older layouts on load (torchvision's MNASNet) refuses a state_dict
    without them, and a plain dict of tensors (a copy, a safetensors file) has none."""
    if getattr(state, "_metadata", None) is not None:
        return state
    versioned = OrderedDict(state)
    versioned._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    return versioned


def load_state(model: nn.Module, state: Mapping[str, Any], source: str = "the file", target: str = "the model") -> None:
    """Load ``state`` into ``model`` strictly, explaining any mismatch in one sentence.

    A state_dict saved from ``nn.DataParallel`` (every key prefixed ``module.``)
    is accepted when the model's own keys lack that prefix.
    """
    expected = model.state_dict()
    state = dict(state)
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} is {tuple(state[k].shape)} in the file but {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in state
        and isinstance(state[k], torch.Tensor)
        and isinstance(expected[k], torch.Tensor)
        and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key{'s' * (len(missing) != 1)} ({_fmt_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)} ({_fmt_names(unexpected)})")
    if mismatched:
        problems.append(
            f"{len(mismatched)} shape mismatch{'es' * (len(mismatched) != 1)} ({_fmt_names(mismatched, 2)})"
        )
    if problems:
        raise PrunekitError(f"The weights in {source} do not fit {target}: {'; '.join(problems)}.")
    try:
        model.load_state_dict(with_versions(state, model), strict=True)
    except Exception as exc:  # noqa: BLE001
        raise PrunekitError(f"The weights in {source} do not fit {target}: {_first_line(exc)}.") from None


def load_model(
    path: PathLike | None,
    builder: str | None = None,
    kwargs: Mapping[str, Any] | str | None = None,
    trusted: bool = False,
) -> nn.Module:
    """Load a model for pruning or reporting, returned in eval mode on the CPU.

    * ``path`` is a state_dict (``torch.save``, or ``.safetensors``) and
      ``builder`` (``"package.module:fn"``, called with ``kwargs``) builds the
      architecture; the weights load with ``strict=True``. A checkpoint dict
      with the weights under ``"state_dict"``, ``"model"`` or
      ``"model_state_dict"`` is accepted too.
    * ``path`` is a whole pickled ``nn.Module``: read only when ``trusted``
      (``torch.load`` with ``weights_only=False`` runs code from the file).
      With a builder as well, the module's weights are loaded into the built model.
    * ``path`` is ``None``: the builder's model with its random initialisation.
    """
    kw = parse_kwargs(kwargs)
    if builder is None and kw:
        raise UsageError("Builder keyword arguments were given without a builder (--builder package.module:function).")
    if path is None:
        if builder is None:
            raise UsageError("Give a model file, a builder (package.module:function), or both.")
        return build_model(builder, kw).eval()
    path = Path(path)
    obj = _unwrap(_read_file(path, trusted), path)
    if builder is None:
        if isinstance(obj, nn.Module):
            return obj.eval()
        raise UsageError(
            f"{str(path)!r} holds only weights (a state_dict); name the architecture that builds it "
            "with --builder package.module:function."
        )
    model = build_model(builder, kw)
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    load_state(model, state, source=repr(str(path)), target=f"the model built by {builder!r}")
    return model.eval()


# --------------------------------------------------------------------------- shapes


def parse_input_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse ``"1,3,256,256"`` or ``"1x3x256x256"`` (or a sequence of ints) into a shape tuple.

    The shape needs at least two dimensions (batch and channels), all positive.
    """
    if isinstance(text, Sequence) and not isinstance(text, str):
        parts: list[Any] = list(text)
        shown = ",".join(str(p) for p in parts)
    elif isinstance(text, str):
        shown = text.strip()
        body = shown.strip("()[] ")
        parts = [p.strip() for p in re.split(r"\s*[,xX]\s*|\s+", body)] if body else []
    else:
        raise UsageError(f"An input shape must be text like 1,3,256,256, not {type(text).__name__}.")
    dims: list[int] = []
    for p in parts:
        if isinstance(p, bool):
            p = str(p)
        if isinstance(p, int):
            dims.append(p)
            continue
        if not isinstance(p, str) or not re.fullmatch(r"[+-]?\d+", p):
            raise UsageError(
                f"Input shape {shown!r} is not a list of whole numbers; write it like 1,3,256,256."
            )
        dims.append(int(p))
    if len(dims) < 2:
        raise UsageError(
            f"Input shape {shown!r} needs at least two dimensions (batch and channels), like 1,3,256,256."
        )
    if any(d <= 0 for d in dims):
        raise UsageError(f"Input shape {shown!r} has a dimension that is not positive; every size must be at least 1.")
    return tuple(dims)
