"""Checkpoints and the loop's memory: each tensor stored once, nothing shared that is written later.

The loop keeps no whole-model copies (see the note above ``prunekit.loop._shared_copy``): these
tests check what that must never change. The caller's model is left alone and shares nothing with
the result; a kept best candidate is not changed by later fine-tuning; a checkpoint holds about
one copy of the model, and resuming from it gives the uninterrupted run's model bit for bit.
"""

from __future__ import annotations

import errno
import importlib
import io

import pytest
import torch

import prunekit
import prunekit.files as files
import prunekit.loop as loop
from prunekit.errors import ResourceError
from helpers import interrupt_scoring
from tests.test_pruner import make_unet, unet_config

WIDE = {"in_channels": 1, "num_classes": 2, "width": 16, "depth": 2}
SEEN: dict[int, dict] = {}  # parameter count -> the weights the validate function saw


def bigger_is_better(model) -> float:
    """A validate function that ranks the least-pruned step best (its model is kept to the end)."""
    count = sum(p.numel() for p in model.parameters())
    SEEN[count] = {k: v.clone() for k, v in model.state_dict().items()}
    return float(count)


def _bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _storages(model) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in model.state_dict().values() if t.numel()}


def _checkpoint_every_step(monkeypatch) -> None:
    """For a test that reads the checkpoint of a given step: one after every step, whatever the
    CheckpointClock would decide from how long steps and writes took on this machine."""
    from prunekit import run_state

    monkeypatch.setattr(run_state.CheckpointClock, "due", lambda clock: True)


@pytest.mark.parametrize("keep_best", [1, 3])
def test_a_checkpoint_holds_one_copy_of_the_model(tmp_path, keep_best, monkeypatch):
    _checkpoint_every_step(monkeypatch)  # the last checkpoint is the delivered model's step
    torch.manual_seed(0)
    model = prunekit.zoo.unet(**WIDE).eval()
    cfg = unet_config(model={"kwargs": WIDE}, keep_best=keep_best, importance={"method": "l1"})
    result = prunekit.prune(model, torch.rand(1, 1, 32, 32), cfg, run_dir=tmp_path / "run", progress=False)
    size = (tmp_path / "run" / "checkpoint.pt").stat().st_size
    pruned = _bytes(result.model.state_dict())
    assert size < 1.3 * pruned, (size, pruned)  # the best model is the current one: stored once


def test_the_result_and_the_callers_model_share_nothing():
    model = make_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(1, 1, 32, 32)
    for cfg in (unet_config(limits={"layers": {"out": 0.0, "enc1.*": 0.0}}),  # enc1 is never cut
                unet_config(targets={"flops": 1.0, "params": 1.0})):  # met before any step
        result = prunekit.prune(model, x, cfg, progress=False)
        assert not _storages(result.model) & _storages(model)
        with torch.no_grad():
            for p in result.model.parameters():
                p.add_(1.0)
        assert _same(model.state_dict(), before)


def test_a_scorer_that_runs_the_model_in_train_mode_leaves_the_callers_model_alone():
    model = make_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def scorer(model, graph, batches):
        model.train()
        for batch in batches:
            model(batch)  # BatchNorm running statistics move
        return {name: torch.rand(len(units)) for name, units in graph.producers.items()}

    result = prunekit.prune(model, torch.rand(1, 1, 32, 32), unet_config(importance={"method": scorer}),
                            progress=False)
    assert result.targets_met and _same(model.state_dict(), before)


def _kept_best_config():
    return unet_config(  # targets out of reach: no step meets them, so the metric alone ranks the steps
        targets={"flops": 0.01, "params": 0.01},
        schedule={"steps": 6, "finetune": {"iterations": 2}},
        limits={"layers": {"out": 0.0, "enc1.*": 0.0}},  # enc1's weights stay whole: shared until fine-tuned
        data={"calibration": {"factory": "tests.test_pruner:seg_batches"},
              "train": {"factory": "tests.test_pruner:seg_batches"}},
        validate="tests.test_checkpoint:bigger_is_better", keep_best=2)


def test_a_kept_best_candidate_is_not_changed_by_later_fine_tuning():
    seen = importlib.import_module("tests.test_checkpoint").SEEN  # the module the config names
    seen.clear()
    result = prunekit.prune(make_unet(), torch.rand(1, 1, 32, 32), _kept_best_config(), progress=False)
    assert result.best_step == 1 and len(result.history) >= 3 and not result.targets_met
    count = sum(p.numel() for p in result.model.parameters())
    assert _same(result.model.state_dict(), seen[count])  # step 1's weights, as validated


def test_resuming_with_an_earlier_best_candidate_gives_the_same_model(tmp_path, monkeypatch):
    _checkpoint_every_step(monkeypatch)  # the interrupted run's checkpoint is step 2's
    x = torch.rand(1, 1, 32, 32)
    full = prunekit.prune(make_unet(), x, _kept_best_config(), run_dir=tmp_path / "full", progress=False)
    original = interrupt_scoring(monkeypatch, at=3)
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(make_unet(), x, _kept_best_config(), run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(loop, "score_units", original)
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2 and saved["state"] is not saved["best_state"]  # current and best: both kept
    resumed = prunekit.prune(make_unet(), x, _kept_best_config(), run_dir=tmp_path / "cut", resume=True,
                             progress=False)
    assert resumed.best_step == full.best_step == 1
    assert _same(resumed.model.state_dict(), full.model.state_dict())


def test_a_full_disk_while_saving_tensors_is_one_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"earlier")

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode, **kwargs: FullDisk(fd, "wb"))
    with pytest.raises(ResourceError, match="disk is full") as caught:
        files.atomic_save_torch({"w": torch.zeros(10_000)}, path)
    assert "model.pt" in str(caught.value)
    assert path.read_bytes() == b"earlier" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]



def test_checkpoints_are_written_when_the_work_since_the_last_outweighs_writing_one(monkeypatch):
    from prunekit import run_state

    monkeypatch.undo()  # the clock's own estimate, not the one conftest pins
    now = {"t": 0.0}
    monkeypatch.setattr(run_state.time, "perf_counter", lambda: now["t"])
    monkeypatch.setattr(run_state, "save_checkpoint", lambda *args: now.update(t=now["t"] + 0.5))  # 0.5 s to write
    model = torch.nn.Linear(1000, 250, bias=False)  # 1 MB of weights: a write estimated at 1e6 / 200e6 = 5 ms
    clock, written = run_state.CheckpointClock(model), []
    assert clock.write_seconds == pytest.approx(0.005)
    for step, seconds in enumerate([0.01, 0.015, 0.5, 0.5, 0.5, 0.4, 3.0, 0.1, 2.5], start=1):
        now["t"] += seconds  # the step's work
        if clock.due():
            clock.save()
            written.append(step)
    # 20 ms of work outweighs the estimate 4 times over; then 4 x 0.5 s of work must pile up between writes
    assert written == [2, 7, 9]


def test_a_run_of_cheap_steps_skips_checkpoints_and_still_resumes_bit_for_bit(tmp_path, monkeypatch):
    from prunekit import run_state

    cfg = unet_config(schedule={"steps": 4}, importance={"method": "l1"})
    x = torch.rand(1, 1, 32, 32)
    full = prunekit.prune(make_unet(), x, cfg, run_dir=tmp_path / "full", progress=False)
    saved, real_save = [], run_state.CheckpointClock.save

    def slow_save(clock, run, writer, step, *rest):
        real_save(clock, run, writer, step, *rest)
        saved.append(step)
        clock.write_seconds = 1e9  # as if writing took far longer than any step

    monkeypatch.setattr(run_state.CheckpointClock, "save", slow_save)
    real_score = interrupt_scoring(monkeypatch, at=4)
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(make_unet(), x, cfg, run_dir=tmp_path / "cut", progress=False)
    assert saved == [1]  # writing costs more than the cheap steps 2 and 3: resume redoes them
    monkeypatch.setattr(loop, "score_units", real_score)
    resumed = prunekit.prune(make_unet(), x, cfg, run_dir=tmp_path / "cut", resume=True, progress=False)
    assert [h.flops for h in resumed.history] == [h.flops for h in full.history]
    assert _same(full.model.state_dict(), resumed.model.state_dict())
