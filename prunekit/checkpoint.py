"""The checkpoint file of a run: what it holds and the checks that it belongs to this run.

    write_checkpoint(path, identity, state)        # atomically, after a finished step
    state = read_checkpoint(path, identity)        # refuses another model, config or format

``identity`` is ``{"fingerprint": ..., "model_hash": ...}``: the config and example
input (:meth:`prunekit.run_context.Run.identity`) and the weights
(:func:`prunekit.checks.weights_hash`) the run was started from. The file is
read with ``weights_only=True``: tensors, numbers and strings only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .files import atomic_save_torch
from .rundir import RunDirError

__all__ = ["CHECKPOINT_FORMAT", "write_checkpoint", "read_checkpoint"]

CHECKPOINT_FORMAT = "prunekit-checkpoint/3"


def write_checkpoint(path: Path, identity: dict, state: dict) -> None:
    """Save ``state`` (step, widths, weights, history, candidates) with the run's identity.

    A tensor that appears twice in ``state`` (the current model's weights, which are also the best
    candidate's) is stored once: ``torch.save`` writes each storage once, and streams it to the file.
    """
    atomic_save_torch({"format": CHECKPOINT_FORMAT, **identity, **state}, path)


def read_checkpoint(path: Path, identity: dict) -> dict:
    """The saved state, once it is known to be a prunekit checkpoint of this model, config and input."""
    run_dir = str(Path(path).parent)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any damage to the file
        raise RunDirError(f"'{path}' is not a readable prunekit checkpoint.", run_dir) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(f"'{path}' was not written by this version of prunekit; start a new run.", run_dir)
    if payload.get("model_hash") != identity["model_hash"]:
        raise RunDirError(f"'{run_dir}' was started from a different model (its weights differ); resume it with the "
                          "same model file, or start a new run.", run_dir)
    if payload.get("fingerprint") != identity["fingerprint"]:
        raise RunDirError(f"'{run_dir}' was started with a different config or input shape; resume it with the "
                          "same one.", run_dir)
    return payload
