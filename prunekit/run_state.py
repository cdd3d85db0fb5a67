"""What a pruning run keeps between steps: step records, kept candidates, model copies, checkpoints.

The loop (:mod:`prunekit.loop`) owns the model it cuts; a kept candidate shares its parameters (the
newest model is fine-tuned, so they are copied first: :func:`own_weights`) and copies its buffers. A
checkpoint holds each tensor once: the current model and the best candidate, often the same one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .artifacts import resize_to, width_changes
from .checkpoint import read_checkpoint, write_checkpoint
from .errors import PrunekitError
from .rundir import CHECKPOINT, RunDirError, RunWriter
from .surgery import copy_module


@dataclass
class StepRecord:
    step: int
    flops: int
    params: int
    flops_ratio: float
    params_ratio: float
    removed_units: int
    metric: float | None
    seconds: float
    latency_ratio: float | None = None  # measured after the cut, when the run has a latency target


@dataclass
class Candidate:
    step: int
    metric: float | None
    meets: bool
    state: dict | None  # None once another candidate ranks above it: it can never be the result
    widths: dict

    def rank(self):
        return (self.meets, -np.inf if self.metric is None else self.metric, self.step)


# Memory: the loop holds the caller's model, the current model, the best candidate's tensors (usually the
# current model's own) and, during a cut, the next model; it never copies a whole state to keep it. A
# model's parameters are not written once the loop has moved past it (a cut makes new tensors, and only
# the newest model is fine-tuned), so a kept state shares them; buffers, which a forward pass in train
# mode updates in place, are copied (they are small).


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters share its storage: the loop's model before its first cut."""
    memo: dict[int, object] = {id(p): nn.Parameter(p.detach(), p.requires_grad) for p in model.parameters()}
    return copy_with(model, memo)


def copy_with(model: nn.Module, memo: dict) -> nn.Module:
    """``copy_module(model, memo)``; tensors a hook recomputes (old-style weight_norm) are copied too."""
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
    return copy_module(model, memo)


def state_of(model: nn.Module) -> dict:
    """The model's state_dict on the CPU, parameters shared, buffers copied (see above)."""
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    return {k: v.detach().cpu().clone() if k in buffers else v.detach().cpu() for k, v in model.state_dict().items()}


def rebuild(run, widths: dict, state: dict) -> nn.Module:
    """The original model resized to ``widths``, holding ``state``'s tensors themselves (not copies)."""
    memo: dict[int, object] = {}
    for name, p in run.original.named_parameters(remove_duplicate=False):
        if isinstance(state.get(name), torch.Tensor):
            memo.setdefault(id(p), nn.Parameter(state[name], p.requires_grad))
    for name, b in run.original.named_buffers(remove_duplicate=False):
        if isinstance(state.get(name), torch.Tensor):
            memo.setdefault(id(b), state[name].clone())
    return resize_to(copy_with(run.original, memo), widths, state).eval()


def own_weights(model: nn.Module, candidates: list) -> None:
    """Give ``model`` its own copy of the parameters a kept candidate shares (those the last cut left
    whole), before fine-tuning writes to them."""
    kept = {v.untyped_storage().data_ptr() for c in candidates if c.state for v in c.state.values()}
    copies: dict[int, nn.Parameter] = {}
    for m in model.modules():
        for attr, p in m._parameters.items():
            if p is not None and p.untyped_storage().data_ptr() in kept:
                if id(p) not in copies:
                    copies[id(p)] = nn.Parameter(p.detach().clone(), p.requires_grad)
                m._parameters[attr] = copies[id(p)]


class CheckpointClock:
    """When a step's checkpoint is worth writing: once the work since the last one (or since the run
    started) took WORK_PER_WRITE times as long as writing one does (measured at the last write; before
    the first, estimated from the model's size). Checkpoints then cost at most a fifth of a run of cheap
    steps (no fine-tuning), an interruption loses little more than that, and a step that fine-tunes is
    followed by one; redone steps give the same result."""

    WORK_PER_WRITE = 4
    ESTIMATED_BYTES_PER_SECOND = 200e6  # a checkpoint's write before one has been timed

    def __init__(self, model: nn.Module) -> None:
        self.written_at = time.perf_counter()
        self.write_seconds = sum(t.numel() * t.element_size() for t in model.state_dict().values()) \
            / self.ESTIMATED_BYTES_PER_SECOND

    def due(self) -> bool:
        return time.perf_counter() - self.written_at >= self.WORK_PER_WRITE * self.write_seconds

    def save(self, *args) -> None:
        started = time.perf_counter()
        save_checkpoint(*args)
        self.written_at = time.perf_counter()
        self.write_seconds = self.written_at - started


def save_checkpoint(run, writer: RunWriter, step: int, model: nn.Module, history, candidates) -> None:
    """What resume needs, each tensor once: the current model and the best candidate (often the same one)."""
    writer.begin()
    best = candidates[0] if candidates else None
    state = best.state if best is not None and best.step == step else state_of(model)
    write_checkpoint(writer.checkpoint, run.identity(), {
        "step": step,
        "widths": json.dumps(width_changes(run.original_widths, model)),
        "state": state,
        "best_state": best.state if best is not None else None,
        "history": json.dumps([asdict(h) for h in history]),
        "candidates": [{"step": c.step, "metric": c.metric, "meets": c.meets, "widths": json.dumps(c.widths)}
                       for c in candidates],
        "latency_tables": run.gauge.tables.as_json() if run.gauge is not None else None,
    })
    writer.saved_checkpoint()


def load_checkpoint(run):
    """The saved state of an interrupted run, checked to belong to this model and config."""
    path = run.run_dir / CHECKPOINT
    payload = run.world.from_main(read_checkpoint, path, run.identity())  # rank 0's run directory
    run.saved_tables = payload.get("latency_tables")
    try:
        model = rebuild(run, json.loads(payload["widths"]), payload["state"])
        history = [StepRecord(**h) for h in json.loads(payload["history"])]
        candidates = [Candidate(c["step"], c["metric"], c["meets"], payload["best_state"] if i == 0 else None,
                                 json.loads(c["widths"])) for i, c in enumerate(payload["candidates"])]
        step = int(payload["step"])
    except PrunekitError:
        raise
    except Exception:  # noqa: BLE001 - a payload that does not hold what prunekit writes
        raise RunDirError(f"'{path}' is damaged: it does not hold a prunekit run's state.",
                          str(run.run_dir)) from None
    return step, model, history, candidates
