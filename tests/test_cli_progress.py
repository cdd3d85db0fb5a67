"""Progress without a terminal: plain lines on stderr when piped (CI, tee, nohup), not bars that
print nothing; one line per piece of work and per step, and a line every so often while it runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from prunekit import progress
from prunekit.cli import main
from prunekit.zoo import unet

ROOT = Path(__file__).resolve().parents[1]
KWARGS = {"in_channels": 1, "num_classes": 2, "width": 4, "depth": 2}


def test_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    assert not progress.console.is_terminal  # pytest captures stderr
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    with progress.progress_bar("fine-tune step 1", 3) as advance:
        for loss in (0.5, 0.4, 0.3):
            advance(loss=loss)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("fine-tune step 1: 3/3 in ") and lines[-1].endswith("loss 0.3")
    assert any(line.startswith("fine-tune step 1: 1/3 after ") for line in lines)  # while it runs


def test_one_line_per_piece_of_work_by_default(capsys):
    with progress.progress_bar("calibration", 50) as advance:
        for _ in range(50):
            advance()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calibration: 50/50 in ")


def test_nothing_when_disabled(capsys):
    with progress.progress_bar("train", 5, enabled=False) as advance:
        advance()
    assert capsys.readouterr().err == ""


def test_prune_piped_prints_every_step(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "unet.pt"
    torch.save(unet(**KWARGS).state_dict(), weights)
    result = CliRunner().invoke(main, ["prune", str(weights), "-b", "prunekit.zoo:unet", "-k", json.dumps(KWARGS),
                                       "-i", "1,1,32,32", "--method", "l1", "--steps", "2", "-o",
                                       str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    err = result.stderr.splitlines()
    assert [line.split(":")[0] for line in err if line.startswith("step ")] == ["step 1", "step 2"]
    assert any(line.startswith("final: step 2's model") for line in err)
    quiet = CliRunner().invoke(main, ["prune", str(weights), "-b", "prunekit.zoo:unet", "-k", json.dumps(KWARGS),
                                      "-i", "1,1,32,32", "--method", "l1", "--steps", "2", "-q", "-o",
                                      str(tmp_path / "quiet")])
    assert quiet.exit_code == 0 and quiet.stderr == ""


@pytest.mark.slow
def test_demo_piped_prints_progress(tmp_path):
    """`prunekit demo | tee log` (stdout and stderr both pipes) shows the training and every step."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    done = subprocess.run([sys.executable, "-m", "prunekit", "demo", "-o", str(tmp_path / "demo"), "--iterations",
                           "20"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    err = done.stderr.splitlines()
    assert any(line.startswith("train: 20/20 in ") for line in err), done.stderr
    assert sum(line.startswith("step ") for line in err) >= 4
    assert any(line.startswith("final fine-tune: 60/60") for line in err)
    assert "IoU (test)" in done.stdout and "latency" in done.stdout
