"""What prunekit runs and allocates on the user's behalf, and the one boundary around user code.

* :func:`call_user` runs a function the user supplied (scorer, validate
  function, data factory, fine-tune function) so that whatever it raises,
  ``sys.exit`` included, becomes one :class:`UserFunctionError`;
  :func:`user_number` checks what a validate function returned.
* :func:`check_input_memory` refuses an input shape that cannot be allocated,
  before anything is allocated.
* :func:`check_finite_weights` refuses a model with NaN or infinite weights.
* :func:`existing_objects_frozen` keeps the garbage collector off the objects a prune did not make.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import sys
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import PrunekitError, ResourceError, UserFunctionError

__all__ = ["call_user", "user_number", "check_input_memory",
           "check_finite_weights", "existing_objects_frozen", "first_line", "quiet_stdout"]

# How many bytes the example input may need, as a multiple of its own size: the activations of a
# CNN are several times its input (more channels), and tracing keeps a few of them alive.
ACTIVATION_FACTOR = 8


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without colour codes, at most 200 characters."""
    lines = str(exc).strip().splitlines()
    line = lines[0].strip() if lines else ""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if len(line) > 200:  # cut with an ellipsis that the stripped full stop leaves (callers add their own)
        line = line[:199].rstrip(" .") + "\u2026"
    return line.rstrip(".")


def describe(fn: Any, name: str | None = None) -> str:
    """A function's name as the user wrote it (``pkg.mod:fn``) or as Python knows it."""
    if name:
        return name
    module, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if qual:
        return f"{module}:{qual}" if module else qual
    return repr(fn)


def call_user(fn: Callable, role: str, name: str | None, *args, **kwargs):
    """``fn(*args, **kwargs)``; whatever it raises becomes one :class:`UserFunctionError`.

    ``role`` says what the function is for ("validate function"); Ctrl-C still interrupts.
    """
    shown = describe(fn, name)
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except UserFunctionError:
        raise
    except SystemExit as exc:
        problem = f"called sys.exit({exc.code!r})"
        raise UserFunctionError(f"your {role} {shown!r} {problem}.", shown, role, problem) from exc
    except RecursionError as exc:
        problem = "raised RecursionError (maximum recursion depth exceeded)"
        raise UserFunctionError(f"your {role} {shown!r} {problem}.", shown, role, problem) from exc
    except BaseException as exc:  # noqa: BLE001 - the boundary around user code
        text = first_line(exc)
        problem = f"raised {type(exc).__name__}" + (f": {text}" if text else "")
        raise UserFunctionError(f"your {role} {shown!r} {problem}.", shown, role, problem) from exc


def user_number(value: Any, role: str, name: str) -> float:
    """A finite float from what a user's function returned, or a :class:`UserFunctionError`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif hasattr(value, "item") and callable(value.item) and getattr(value, "size", 1) == 1:  # numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = repr(value) if len(repr(value)) < 60 else type(value).__name__
        problem = f"returned {shown}, not a number"
    elif not math.isfinite(value):
        problem = f"returned {value!r}, not a finite number"
    else:
        return float(value)
    raise UserFunctionError(f"your {role} {name!r} {problem}.", name, role, problem)


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@contextlib.contextmanager
def existing_objects_frozen():
    """Leave the objects that exist now (torch's, the model's, the caller's) out of garbage collections
    until the block ends (``gc.freeze``): each pruning step makes enough objects (its channel graph) to
    set off full collections, which would walk every object in the process: 0.2-0.4 s each for a
    torchvision model, a few milliseconds frozen. The block's own garbage is collected as it ends, so
    none builds up over many prunes; a caller that froze objects of its own is left alone."""
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.collect()  # the block's own garbage, while it is all there is to walk: none outlives the block
        gc.unfreeze()


def _bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def check_input_memory(shape: Sequence[int], what: str = "input shape", element_size: int = 4) -> None:
    """Refuse a shape whose tensor (and the activations it brings) cannot fit in memory."""
    numel = math.prod(int(d) for d in shape)
    need = numel * element_size * ACTIVATION_FACTOR
    shown = "x".join(str(d) for d in shape)
    if numel >= 2**62:
        raise ResourceError(f"an input of shape {shown} ({what}) has {numel:.3g} elements, more than a tensor can "
                            "hold.", size=need, reason="too large")
    free = available_memory()
    if free is not None and need > free:
        raise ResourceError(
            f"an input of shape {shown} ({what}) needs about {_bytes(need)} of memory for itself and its "
            f"activations, but only {_bytes(free)} is available; use a smaller input shape.", size=need,
            reason="memory")


def check_finite_weights(model: nn.Module, what: str = "the model") -> None:
    """Refuse a model whose parameters or buffers hold NaN or infinite values."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            # a NaN or infinity makes the L2 norm one too (and a finite norm proves every value finite);
            # the norm is ten times faster than isfinite().all() and overflows only for values near 1e19
            if (tensor.is_floating_point() and tensor.numel() and not torch.linalg.vector_norm(tensor).isfinite()
                    and not bool(torch.isfinite(tensor).all())):
                raise PrunekitError(
                    f"{what} has NaN or infinite values in its {kind} '{name}'; prunekit needs finite weights.")


@contextlib.contextmanager
def quiet_stdout():
    """Send what imported or called user code prints to stderr, so stdout stays ours (``--json``)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
