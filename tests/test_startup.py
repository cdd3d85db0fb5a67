"""What starting prunekit imports: the command line's help needs no torch, pruning a model of
prunekit's own zoo never imports torchvision (its layers are in the op table by name only), and the
first trace imports none of torch's compiler machinery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "matplotlib", "fvcore", "numpy")


def _imported_after(code: str, modules=HEAVY) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported once ``code`` ran."""
    script = f"{code}\nimport sys, json\nprint(json.dumps(sorted(m for m in {tuple(modules)!r} if m in sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["prune", "--help"], ["report", "--help"]])
def test_help_imports_no_torch(args):
    code = f"from prunekit.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass"
    assert _imported_after(code) == []


def test_pruning_a_zoo_model_imports_no_torchvision():
    code = """
import torch, prunekit
from prunekit.zoo import unet
model = unet(in_channels=1, num_classes=2, width=4, depth=2).eval()
config = {"targets": {"flops": 0.5}, "importance": {"method": "l1"}, "limits": {"layers": {"out": 0.0}}}
result = prunekit.prune(model, torch.rand(1, 1, 32, 32), config, progress=False)
assert result.targets_met
prunekit.build_graph(result.model, torch.rand(1, 1, 32, 32))
"""
    imported = _imported_after(code)
    assert "torch" in imported and "torchvision" not in imported and "matplotlib" not in imported


def test_a_torchvision_layer_is_known_by_name_once_torchvision_is_there():
    torchvision = pytest.importorskip("torchvision")
    from prunekit.ops import module_spec
    from prunekit.ops.table import NAMED_MODULES

    depth = torchvision.ops.StochasticDepth(0.1, "row")
    assert module_spec(depth) is NAMED_MODULES["torchvision.ops.stochastic_depth.StochasticDepth"]


def test_the_first_trace_runs_no_slow_meta_kernel():
    """Pooling and concatenation shapes come from the op table: their meta kernels would import torch's
    symbolic shapes and dynamo, a third of a second or more before the first trace of a U-Net."""
    code = """
import torch, prunekit
from prunekit.zoo import unet
prunekit.build_graph(unet(in_channels=1, num_classes=2, width=4, depth=2).eval(), torch.rand(1, 1, 32, 32))
"""
    assert _imported_after(code, ("torch.fx.experimental.symbolic_shapes", "torch._dynamo")) == []

