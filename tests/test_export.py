"""`prunekit export` and export_onnx: ONNX Runtime gives the pruned model's outputs, refusals come first."""

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import prunekit
from prunekit import export as export_module
from prunekit.cli import main
from prunekit.export import ExportError, OnnxMismatchError, export_onnx
from prunekit.zoo import unet

KWARGS = {"in_channels": 1, "num_classes": 2, "width": 8, "depth": 3}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished prune run of the zoo U-Net (a tiny config: one l1 step to 60% of the FLOPs)."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    config = {
        "model": {"builder": "prunekit.zoo:unet", "kwargs": KWARGS},
        "input_shape": [1, 1, 32, 32],
        "targets": {"flops": 0.6},
        "importance": {"method": "l1"},
        "limits": {"layers": {"out": 0.0}},
        "schedule": {"steps": 1},
    }
    result = prunekit.prune(unet(**KWARGS), torch.randn(1, 1, 32, 32), config, run_dir=str(root / "run"),
                            progress=False)
    assert result.targets_met
    return root / "run"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class Heads(nn.Module):
    """Two inputs; a dict output holding a tuple."""

    def __init__(self):
        super().__init__()
        self.body, self.seg, self.aux = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1), nn.Conv2d(8, 1, 1)

    def forward(self, x, y):
        h = torch.relu(self.body(x)) + y
        return {"seg": self.seg(h), "aux": (self.aux(h), h.mean((2, 3)))}


class FixedBatch(nn.Module):
    """Reads the batch size as a Python number: an export with a 'dynamic' batch is wrong at any other."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).view(int(x.shape[0]), -1)


def test_cli_export_matches_pytorch_at_any_batch_size(run_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    result = run("export", run_dir, "--onnx", out, "--json", "--repeats", "3")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["exporter"] == "dynamo" and data["fallback_reason"] is None and data["checked"]
    assert data["input_shapes"] == [[1, 1, 32, 32]]  # the shape the run recorded
    assert data["max_abs_diff"] < 1e-4 and data["speedup"] > 0
    assert data["pytorch_latency"]["repeats"] == data["onnxruntime_latency"]["repeats"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # one file, no temporaries
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = prunekit.load_pruned(run_dir)
    x = torch.randn(3, 1, 32, 32)  # the batch dimension is free
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("exporter", ["auto", "torchscript"])
def test_dict_and_tuple_outputs_are_flattened_and_checked(tmp_path, exporter):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Heads().train()
    inputs = (torch.randn(2, 3, 16, 16), torch.randn(2, 8, 16, 16))
    result = export_onnx(model, inputs, tmp_path / "heads.onnx", exporter=exporter, repeats=2, warmup=0)
    assert result.exporter == ("dynamo" if exporter == "auto" else "torchscript")
    assert result.outputs == ["output.seg", "output.aux.0", "output.aux.1"]
    assert result.checked and result.max_abs_diff < 1e-4 and result.dynamic_batch
    assert model.training  # the caller's model keeps its mode
    assert result.as_dict()["speedup"] == result.speedup > 0


def test_a_batch_that_is_not_free_fails_the_check_and_keeps_the_file(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "fixed.onnx"
    with pytest.raises(OnnxMismatchError, match="--static-batch") as err:
        export_onnx(FixedBatch().eval(), torch.randn(1, 3, 8, 8), path, exporter="torchscript", repeats=0)
    assert err.value.batch == 2 and err.value.exit_code == 1 and path.is_file()
    fixed = export_onnx(FixedBatch().eval(), torch.randn(1, 3, 8, 8), path, exporter="torchscript",
                        dynamic_batch=False, repeats=0)
    assert fixed.checked and not fixed.dynamic_batch


def test_cli_mismatch_exits_1_and_keeps_the_file(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    real = export_module._session

    class Off:
        def __init__(self, session):
            self.session = session

        def get_inputs(self):
            return self.session.get_inputs()

        def run(self, names, feeds):
            return [y + 0.5 for y in self.session.run(names, feeds)]

    monkeypatch.setattr(export_module, "_session", lambda *a: Off(real(*a)))
    monkeypatch.setattr(export_module, "_dynamo_available", lambda: "not in this test")
    out = tmp_path / "model.onnx"
    result = run("export", run_dir, "--onnx", out)
    assert result.exit_code == 1, result.output
    assert "differs from PyTorch's by up to 0.5" in result.stderr and "Traceback" not in result.output
    assert out.is_file()


def test_fallback_to_torchscript_says_why_and_prints_the_table(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::something\nmore detail")

    monkeypatch.setattr(export_module, "_dynamo", broken)
    result = run("export", run_dir, "--onnx", tmp_path / "m.onnx", "--repeats", "2", "--threads", "1")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "torchscript exporter" in text
    assert "dynamo exporter was not used: unsupported operator aten::something." in text
    assert "ONNX Runtime matches PyTorch" in text and "batch sizes 1 and 2" in text
    assert "PyTorch" in text and "ONNX Runtime" in text and "speed-up" in text and "1 thread," in text


def test_without_onnxruntime_the_file_is_written_and_the_check_skipped(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    monkeypatch.setattr(export_module, "_dynamo_available", lambda: "not in this test")
    out = tmp_path / "m.onnx"
    result = run("export", run_dir, "--onnx", out, "--static-batch", "-i", "2,1,16,16")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "Check skipped: onnxruntime is not installed (pip install prunekit[onnx])." in text
    assert "fixed batch; input 2x1x16x16" in text and out.is_file()


def test_failed_exports_leave_nothing_behind(tmp_path, monkeypatch):
    def half_written(model, inputs, target, *rest):
        target.write_bytes(b"partial")
        raise RuntimeError("cannot export this")

    monkeypatch.setattr(export_module, "_dynamo", half_written)
    monkeypatch.setattr(export_module, "_torchscript", half_written)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"earlier")
    with pytest.raises(ExportError, match="the dynamo exporter: cannot export this; the torchscript") as err:
        export_onnx(FixedBatch().eval(), torch.randn(1, 3, 8, 8), path)
    assert set(err.value.reasons) == {"dynamo", "torchscript"}
    assert path.read_bytes() == b"earlier" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_bad_input_exits_2_before_any_work(run_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    (tmp_path / "not_a_run").mkdir()
    cases = [
        ([tmp_path / "missing", "--onnx", tmp_path / "a.onnx"], "does not exist"),
        ([tmp_path / "not_a_run", "--onnx", tmp_path / "a.onnx"], "not a prunekit run directory"),
        ([run_dir, "--onnx", run_dir / "model.pt"], "is the input"),
        ([run_dir, "--onnx", run_dir / "manifest.json"], "is the input"),
        ([run_dir / "model.pt", "--onnx", run_dir / "report.json"], "is the input"),
        ([run_dir, "--onnx", tmp_path / "no" / "dir" / "a.onnx"], "does not exist"),
        ([run_dir, "--onnx", tmp_path], "is a directory"),
        ([run_dir], "Missing option '--onnx'"),
        ([run_dir, "--onnx", tmp_path / "a.onnx", "-i", "1,x,3"], "shape"),
        ([run_dir, "--onnx", tmp_path / "a.onnx", "-i", "1,3,32,32"], "fails on the example input"),
        ([run_dir, "--onnx", tmp_path / "a.onnx", "--repeats", "-1"], "--repeats"),
        ([run_dir, "--onnx", tmp_path / "a.onnx", "--opset", "99"], "--opset must be a whole number from 7 to"),
        ([run_dir, "--onnx", tmp_path / "a.onnx", "--opset", "6"], "--opset"),
    ]
    for args, fragment in cases:
        result = run("export", *args)
        assert result.exit_code == 2, (args, result.output)
        assert fragment in result.stderr and "Traceback" not in result.output, (args, result.stderr)
    assert not (tmp_path / "a.onnx").exists()
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_an_opset_below_the_dynamo_exporters_own_is_written_as_asked_and_quietly(tmp_path, capfd):
    """Below its own opset the dynamo exporter converts, logs a traceback when it cannot, and keeps its
    own opset: the file must hold the opset asked for (from the TorchScript exporter if need be)."""
    pytest.importorskip("onnx")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    result = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "a.onnx", opset=9, repeats=0)
    assert result.opset == 9
    assert result.exporter == "torchscript" or result.fallback_reason is None
    assert capfd.readouterr().err == ""
    with pytest.raises(prunekit.PrunekitError, match="opset must be a whole number"):
        export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "b.onnx", opset=99)
    assert not (tmp_path / "b.onnx").exists()


def test_a_run_without_a_recorded_shape_needs_input_shape(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["input_shape"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run("export", copy, "--onnx", tmp_path / "a.onnx")
    assert result.exit_code == 2 and "pass --input-shape" in result.stderr


def test_a_file_onnxruntime_cannot_load_is_a_failed_check(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")

    def garbage(model, inputs, target, *rest):
        target.write_bytes(b"not an onnx model")

    monkeypatch.setattr(export_module, "_dynamo", garbage)
    path = tmp_path / "m.onnx"
    with pytest.raises(OnnxMismatchError, match="ONNX Runtime could not load") as err:
        export_onnx(FixedBatch().eval(), torch.randn(1, 3, 8, 8), path, repeats=0)
    assert err.value.exit_code == 1 and path.read_bytes() == b"not an onnx model"


def test_large_weights_go_to_a_data_file_beside_the_model(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.setattr(export_module, "_EXTERNAL_DATA_BYTES", 0)  # every model counts as large
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    result = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", repeats=0)
    assert result.exporter == "dynamo" and result.checked  # onnxruntime found the weights beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
