"""Checks a pruning run makes before any work and before anything is written.

Each raises one :class:`~prunekit.errors.PrunekitError` sentence: per-layer limits
that match no layer, labels the model cannot
predict, a model that cannot run its data, a data-driven criterion without data
(:func:`calibration_source`); :func:`weights_hash` identifies the model a checkpoint
was started from, and
:func:`guard_scorer` puts a user's scorer behind the error boundary.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
from collections.abc import Mapping
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import DataError
from .errors import UserFunctionError
from .safety import call_user, first_line
from .data.trainer import check_classes, main_output
from .importance import SCORERS

__all__ = ["DATA_DRIVEN", "calibration_source", "check_labels", "check_limits_match",
           "weights_hash", "guard_scorer"]

# criteria that score filters by running data through the model: they never calibrate on noise unasked
DATA_DRIVEN = ("ipad", "taylor", "fisher")


def calibration_source(config) -> str | None:
    """What a run calibrates on: ``"data.calibration"``, ``"data.train"`` (its fallback), ``"random"``
    (``data.calibration: random``, asked for), ``"example input"`` (a custom scorer without data), or
    None (a built-in criterion that reads only the weights). A data-driven criterion without data is an
    error naming the key to add."""
    method, data = config.importance.method, config.data
    if data.calibration == "random":
        return "random"
    source = "data.calibration" if data.calibration is not None else "data.train" if data.train is not None else None
    if method == "taylor" and data.train is None:
        from .yamlfile import ConfigError

        raise ConfigError("importance method 'taylor' needs a loss: set data.train (images with masks or labels, "
                          "or a factory of (input, target) batches).", key="data.train")
    if (isinstance(method, str) and method in DATA_DRIVEN) or config.importance.allocation == "sensitivity":
        if source is None:
            from .yamlfile import ConfigError

            what = (f"importance method '{method}' scores filters" if method in DATA_DRIVEN
                    else "allocation 'sensitivity' measures each layer")
            raise ConfigError(f"{what} by running data through the model, but "
                              "the config has no data: set data.calibration (an image folder or a factory), or "
                              "data.calibration: random to calibrate on random inputs.", key="data.calibration")
        return source
    if isinstance(method, str) and method in SCORERS:
        return None
    return source or "example input"


def check_limits_match(model: nn.Module, layers, key: str = "limits.layers") -> None:
    """Every per-layer limit must name or match (as a glob) a module of the model: one that matches
    nothing would limit nothing, silently. The error names the nearest module names."""
    import fnmatch

    from .yamlfile import ConfigError

    names = [n for n, _ in model.named_modules() if n]
    for pattern in layers:
        if pattern in names or any(fnmatch.fnmatchcase(n, str(pattern)) for n in names):
            continue
        close = difflib.get_close_matches(str(pattern), names, n=3, cutoff=0.4)
        hint = (f"; the nearest layer names: {', '.join(repr(c) for c in close)}." if close
                else f"; the model's layers are named like {', '.join(repr(n) for n in names[:3])}.")
        raise ConfigError(f"{key} {pattern!r} matches no layer of the model, so it would limit nothing{hint}",
                          key=f"{key}.{pattern}", suggestion=close[0] if close else None)


def check_labels(model: nn.Module, batches, what: str) -> None:
    """Run the model on the first batch of ``batches``; integer targets must be classes it predicts."""
    if batches is None:
        return
    batch = next(iter(batches), None)
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[1], torch.Tensor):
        return
    x, y = batch[0], batch[1]
    training = model.training
    try:
        with torch.no_grad():
            output = main_output(model.eval()(x))
    except Exception as exc:  # noqa: BLE001 - the user's model on the user's data
        raise DataError(f"the model cannot run the first batch of data.{what} (input shape {tuple(x.shape)}): "
                        f"{type(exc).__name__}: {first_line(exc)}.") from None
    finally:
        model.train(training)  # the caller's model is left as it was
    check_classes(output, y, what)


def weights_hash(model: nn.Module) -> str:
    """A hash of every tensor in the model's state_dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def _check_scores(raw, role: str, name: str, producers=None) -> None:
    def fail(problem: str):
        raise UserFunctionError(f"your {role} {name!r} {problem}.", name, role, problem)

    if not isinstance(raw, Mapping):
        fail(f"returned {type(raw).__name__}, not a mapping of producer name to scores")
    for key, values in raw.items():
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu()
            if values.is_complex():
                fail(f"returned complex scores for {key!r}")
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            fail(f"returned scores for {key!r} that are not numbers ({type(values).__name__})")
        if array.ndim != 1:
            fail(f"returned scores of shape {array.shape} for {key!r}, not one score per output channel")
        if producers is not None:
            if key not in producers:
                fail(f"returned scores for {key!r}, which is not a producer in this model")
            if len(array) != len(producers[key]):
                fail(f"returned {len(array)} scores for {key!r}, which has {len(producers[key])} output channels")
        if not np.isfinite(array).all():
            fail(f"returned a score that is not finite (NaN or infinite) for {key!r}")


def guard_scorer(scorer: Callable, name: str) -> Callable:
    """``scorer`` behind the error boundary: what it raises or wrongly returns is one sentence."""
    role = "importance scorer"

    @functools.wraps(scorer)  # keeps the signature: options are passed by the names it declares
    def guarded(*args, **kwargs):
        raw = call_user(scorer, role, name, *args, **kwargs)
        graph = args[1] if len(args) > 1 else kwargs.get("graph")
        _check_scores(raw, role, name, getattr(graph, "producers", None))
        return raw

    return guarded
