"""Measured latency: what a pruned model is for.

>>> import torchvision
>>> m = torchvision.models.resnet18()
>>> lat = measure_latency(m, torch.randn(1, 3, 64, 64), repeats=5, warmup=1)
>>> lat.median > 0 and lat.device == "cpu"
True

Models are timed under ``torch.inference_mode`` in eval mode. When several
models are compared (:func:`compare_latency`), their runs are interleaved
(A, B, A, B...) so that a machine that slows down or speeds up during the
measurement affects every model alike; ratios measured that way are far
steadier than those of back-to-back runs. :func:`time_calls` times any
zero-argument calls the same way (an ONNX Runtime session beside its model).
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from .data.devices import resolve_device
from .errors import PrunekitError
from .arguments import check_model
from .graphs.graph import as_inputs


@dataclass(frozen=True)
class Latency:
    """Seconds per forward pass: the median of the repeats and their interquartile range."""

    median: float
    spread: float
    repeats: int
    device: str
    threads: int
    torch: str

    def as_dict(self) -> dict:
        return asdict(self)


def measure_latency(model: nn.Module, example_inputs, device: str = "cpu", threads: int | None = None,
                    repeats: int = 30, warmup: int = 5, budget: float | None = None) -> Latency:
    """Median and spread of ``model``'s forward time on ``device`` (the model is not changed).

    ``threads``: intra-op threads on the CPU (default: torch's current setting). ``budget``: stop
    before ``repeats`` once the timed runs have taken this many seconds (never under
    :data:`MIN_REPEATS` runs), for a quick look at a slow model.
    """
    return compare_latency({"model": model}, example_inputs, device, threads, repeats, warmup, budget)["model"]


def compare_latency(models: Mapping[str, nn.Module], example_inputs, device: str = "cpu",
                    threads: int | None = None, repeats: int = 30, warmup: int = 5,
                    budget: float | None = None) -> dict[str, Latency]:
    """:func:`measure_latency` for several models, their runs interleaved."""
    target = resolve_device(device)
    _check_counts(repeats, warmup, threads, budget)
    for model in models.values():
        check_model(model)
    inputs = tuple(x.to(target) if isinstance(x, torch.Tensor) else x for x in as_inputs(example_inputs))
    placed = {name: _placed(m, target) for name, m in models.items()}
    try:
        return time_calls({name: functools.partial(m, *inputs) for name, m in placed.items()}, device, threads,
                          repeats, warmup, budget)
    except PrunekitError:
        raise
    except Exception as exc:  # noqa: BLE001 - the models' own error on this input, in one sentence
        from .graphs.trace import ExampleInputError

        raise ExampleInputError.raised(exc) from None


# a measurement cut short by its time budget still has this many runs of each call: a median of 3
# is robust to one outlier, and a model that takes seconds a run is not timed for half a minute
MIN_REPEATS = 3


def time_calls(calls: Mapping[str, Callable[[], object]], device: str = "cpu", threads: int | None = None,
               repeats: int = 30, warmup: int = 5, budget: float | None = None) -> dict[str, Latency]:
    """Median and spread of each zero-argument call, their runs interleaved as in :func:`compare_latency`
    (under ``torch.inference_mode``; ``device`` is the one to synchronise after each call)."""
    target = resolve_device(device)
    _check_counts(repeats, warmup, threads, budget)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with _threads(threads) as used, torch.inference_mode():
        for _ in range(warmup):
            for call in calls.values():
                call()
        _sync(target)
        names, spent = list(calls), 0.0
        for r in range(repeats):
            if budget is not None and r >= MIN_REPEATS and spent >= budget:
                break
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for name in order:
                start = time.perf_counter()
                calls[name]()
                _sync(target)
                samples[name].append(time.perf_counter() - start)
                spent += samples[name][-1]
    return {name: _summary(s, str(target), used) for name, s in samples.items()}


def _check_counts(repeats, warmup, threads, budget=None) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise PrunekitError(f"repeats must be a whole number of at least 1, got {repeats!r}.")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise PrunekitError(f"warmup must be a whole number of at least 0, got {warmup!r}.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PrunekitError(f"threads must be a whole number of at least 1, got {threads!r}.")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise PrunekitError(f"budget must be a positive number of seconds, got {budget!r}.")


def _summary(samples: list[float], device: str, threads: int) -> Latency:
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    return Latency(statistics.median(samples), q3 - q1, len(samples), device, threads, torch.__version__)


def _placed(model: nn.Module, target: torch.device) -> nn.Module:
    """The model in eval mode on ``target``; a copy whenever anything would change on the caller's."""
    on_target = all(t.device == target for t in [*model.parameters(), *model.buffers()])
    if on_target and not any(m.training for m in model.modules()):
        return model
    return copy.deepcopy(model).to(target).eval()


@contextmanager
def _threads(threads: int | None):
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
