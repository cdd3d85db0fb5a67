"""Interrupt a small prune at random moments, with Ctrl-C (SIGINT) and with kill -9 (SIGKILL).

Each time the run directory must be either resumable to a bit-identical result (the same
model.pt tensors as an uninterrupted run) or clearly refused, never silently corrupt; and no
temporary file, staging directory or lock may be left once the run is resumed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from prunekit.cli import main
from prunekit.rundir import inspect
from prunekit.zoo import unet

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KW = {"in_channels": 1, "num_classes": 2, "width": 4, "depth": 2}
CONFIG = {
    "model": {"builder": "prunekit.zoo:unet", "kwargs": KW},
    "input_shape": [1, 1, 32, 32],
    "targets": {"flops": 0.3},
    "importance": {"method": "l1"},
    "limits": {"layers": {"out": 0.0}, "default": 0.9},
    "schedule": {"steps": 6, "finetune": {"iterations": 8}},
    "data": {"train": {"factory": "tests.test_faults:seg_batches"}},
}
# what the prunekit script runs; one thread everywhere (OMP_NUM_THREADS below, set_num_threads in
# process), so the interrupted part, the resumed part and the reference compute alike
CLI = "from prunekit.cli import main; main()"
TRIALS = 10


def seg_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g)
    return [(x, (x[:, 0] > 0.5).long())]


def _spawn(work: Path, *extra: str, config: str = "config.yaml") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CLI, "prune", "unet.pt", "-c", config, "-o", "run",
                             "-q", *extra], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _tensors(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _in_process(work: Path, *extra: str, config: str = "config.yaml"):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        return CliRunner().invoke(main, ["prune", "unet.pt", "-c", config, "-o", "run", "-q", *extra])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def _workspace(root: Path, name: str) -> Path:
    work = root / name
    work.mkdir()
    torch.manual_seed(0)
    torch.save(unet(**KW).state_dict(), work / "unet.pt")
    (work / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return work


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run in a subprocess: its model.pt, and when the run directory appeared and the run ended."""
    work = _workspace(tmp_path_factory.mktemp("faults"), "reference")
    started = time.monotonic()
    proc = _spawn(work)
    appeared = None
    while proc.poll() is None:
        if appeared is None and (work / "run").exists():
            appeared = time.monotonic() - started
        time.sleep(0.005)
    total = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.read()
    return {"model": _tensors(work / "run" / "model.pt"), "appeared": appeared or total * 0.8, "total": total,
            "run": work / "run"}


def test_interrupted_runs_resume_to_the_same_model_or_are_refused(tmp_path, reference):
    rng = random.Random(20261201)
    outcomes = []
    for trial in range(TRIALS):
        sig = signal.SIGINT if trial % 2 == 0 else signal.SIGKILL
        work = _workspace(tmp_path, f"trial{trial}")
        proc = _spawn(work)
        if trial in (2, 7):  # in start-up or during the first step, before anything is written
            delay = rng.uniform(0.3, reference["appeared"])
            time.sleep(delay)
        else:  # while the run works and writes: from its first checkpoint to its last output file
            deadline = time.monotonic() + 120
            while not (work / "run").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            delay = rng.uniform(0, reference["total"] - reference["appeared"])
            time.sleep(delay)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hang is a failure
            proc.kill()
            pytest.fail(f"trial {trial}: the run did not stop after {sig.name}")
        code = proc.returncode
        run = work / "run"
        state = inspect(run)
        lines = err.strip().splitlines()
        if sig == signal.SIGINT and code == 130:
            assert "Traceback" not in err and lines[-1].startswith("Interrupted"), err
        if code not in (0, 130, -signal.SIGKILL):
            # Ctrl-C outside prunekit's boundary: before the command started or after it finished
            assert sig == signal.SIGINT and state in ("absent", "complete"), (trial, code, state, err)
        assert state != "foreign", f"trial {trial}: {sig.name} after {delay:.2f}s left an unrecognised directory"
        if code == 0:
            assert state == "complete" and _same(_tensors(run / "model.pt"), reference["model"])
        resumed = _in_process(work, "--resume")
        if state in ("absent", "empty"):
            # nothing to continue: clearly refused, and a new run starts cleanly
            assert resumed.exit_code == 2 and "cannot resume" in resumed.stderr, resumed.output
            assert len(resumed.stderr.strip().splitlines()) == 1
            resumed = _in_process(work)
        assert resumed.exit_code == 0, (trial, sig.name, state, resumed.output)
        assert _same(_tensors(run / "model.pt"), reference["model"]), f"trial {trial}: a different model"
        assert inspect(run) == "complete"
        assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
        assert not [p.name for p in work.iterdir() if p.name.startswith(".run.")]  # no staging or lock left
        outcomes.append((sig.name, round(delay, 2), code, state))
    states = {state for *_, state in outcomes}
    assert len(states) >= 2, outcomes  # the moments were spread over the run, not all before or after it
    print(outcomes)


def test_interrupted_forced_runs_keep_the_earlier_run(tmp_path, reference):
    """--force over a finished run, interrupted at random moments: the directory always holds a complete run,
    the earlier one or the new one, never a partial one."""
    rng = random.Random(7)
    other = {**CONFIG, "targets": {"flops": 0.5}}
    base = _workspace(tmp_path, "new-reference")
    (base / "other.yaml").write_text(yaml.safe_dump(other))
    assert _in_process(base, config="other.yaml").exit_code == 0
    new = _tensors(base / "run" / "model.pt")
    assert not _same(new, reference["model"])
    for trial in range(4):
        sig = signal.SIGINT if trial % 2 == 0 else signal.SIGKILL
        work = _workspace(tmp_path, f"forced{trial}")
        (work / "other.yaml").write_text(yaml.safe_dump(other))
        shutil.copytree(reference["run"], work / "run")
        proc = _spawn(work, "--force", config="other.yaml")
        deadline = time.monotonic() + 120
        while not list(work.glob(".run.prunekit-new-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, reference["total"] - reference["appeared"]))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert inspect(work / "run") == "complete", (trial, proc.returncode, err)
        kept = _tensors(work / "run" / "model.pt")
        assert _same(kept, reference["model"]) or _same(kept, new), f"trial {trial}: a model from neither run"
        again = _in_process(work, "--force", config="other.yaml")
        assert again.exit_code == 0, again.output
        assert _same(_tensors(work / "run" / "model.pt"), new)
        assert not [p.name for p in work.iterdir() if p.name.startswith(".run.")]


def test_two_runs_into_one_directory(tmp_path, reference):
    work = _workspace(tmp_path, "both")
    first, second = _spawn(work), _spawn(work)
    results = [(p.wait(timeout=120), p.stderr.read()) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2).strip().splitlines()
    assert len(refusal) == 1 and ("another prunekit run" in refusal[0] or "already exists" in refusal[0])
    assert _same(_tensors(work / "run" / "model.pt"), reference["model"])
    assert not [p.name for p in work.iterdir() if p.name.startswith(".run.")]
