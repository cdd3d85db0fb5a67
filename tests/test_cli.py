"""The report and graph commands: numbers, JSON, comparisons, Graphviz, and every bad input."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

import prunekit
from prunekit.cli import main
from prunekit.costs import fvcore_counts
from prunekit.zoo import unet

UNET_KW = {"width": 4, "depth": 2, "num_classes": 3}
UNET_SHAPE = (1, 3, 32, 32)
R18_SHAPE = (1, 3, 64, 64)


def _shape(shape) -> str:
    return ",".join(map(str, shape))


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(*args: str):
    result = _run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def _json(*args: str) -> dict:
    result = _ok(*args, "--json")
    assert result.stderr == ""
    return json.loads(result.stdout)  # JSON only on stdout


def _fingerprint(path: Path):
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Weights files of a small U-Net and of resnet18, plus a pruned U-Net as a whole pickled module."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    u = unet(**UNET_KW).eval()
    r18 = torchvision.models.resnet18().eval()
    torch.save(u.state_dict(), d / "unet.pt")
    torch.save(r18.state_dict(), d / "r18.pt")
    x = torch.randn(UNET_SHAPE)
    pruned = prunekit.remove_channels(u, x, {"enc1.block.0": [0, 1], "enc2.block.3": [0, 2, 4], "dec1.block.0": [3]})
    torch.save(pruned, d / "pruned.pt")
    torch.save(pruned.state_dict(), d / "pruned_weights.pt")
    torch.save(u, d / "unet_whole.pt")
    return {"dir": d, "unet": u, "r18": r18, "pruned": pruned}


def _unet_args(models, *extra):
    return ("report", models["dir"] / "unet.pt", "--builder", "prunekit.zoo:unet",
            "--kwargs", json.dumps(UNET_KW), "--input-shape", _shape(UNET_SHAPE), *extra)


def _r18_args(models, *extra):
    return ("report", models["dir"] / "r18.pt", "--builder", "torchvision.models:resnet18",
            "--input-shape", _shape(R18_SHAPE), *extra)


# --------------------------------------------------------------------------- report


@pytest.mark.parametrize("which", ["unet", "r18"])
def test_report_totals_match_library_and_fvcore(models, which):
    args = _unet_args(models) if which == "unet" else _r18_args(models)
    shape = UNET_SHAPE if which == "unet" else R18_SHAPE
    data = _json(*args)
    model, x = models[which], torch.randn(shape)
    expected = prunekit.count_flops_params(model, x)
    totals = data["totals"]
    assert totals["flops"] == expected["flops"] and totals["params"] == expected["params"]
    assert totals["params"] == sum(p.numel() for p in model.parameters())
    assert totals["flops_x2"] == 2 * totals["flops"]
    fv_total, skipped = fvcore_counts(model, x)
    assert data["fvcore"]["flops"] == fv_total == totals["flops"]
    assert data["fvcore"]["agrees"] is True
    assert data["fvcore"]["uncounted_ops"] == dict(skipped)
    assert "1 fused multiply-add = 1 flop" in data["convention"]
    rows = data["rows"]
    assert len(rows) > 5 and {"name", "type", "output_shape", "params", "flops", "flops_share"} <= set(rows[0])
    assert sum(r["flops"] for r in rows) == totals["flops"]
    assert sum(r["params"] for r in rows) == totals["params"]
    assert sum(r["flops_share"] for r in rows) == pytest.approx(100.0)
    by_name = {r["name"]: r for r in rows}
    if which == "r18":
        assert by_name["conv1"]["type"] == "Conv2d"
        assert by_name["conv1"]["output_shape"] == [1, 64, 32, 32]
        assert by_name["fc"]["params"] == 512 * 1000 + 1000
    else:
        assert by_name["enc1.block.0"]["output_shape"] == [1, 4, 32, 32]


def test_report_table(models):
    result = _ok(*_unet_args(models))
    out = result.stdout
    total = prunekit.count_flops_params(models["unet"], torch.randn(UNET_SHAPE))
    assert "enc1.block.0" in out and "Conv2d" in out and "Total" in out
    assert f"{total['flops']:,} flops" in out and f"{total['params']:,}" in out
    assert "1 fused multiply-add = 1 flop" in out
    assert "fvcore total" in out and "agrees" in out
    assert result.stderr == ""


@pytest.mark.parametrize("which", ["unet", "r18"])
def test_report_depth_aggregates(models, which):
    args = _unet_args(models) if which == "unet" else _r18_args(models)
    full = _json(*args)
    data = _json(*args, "--depth", "1")
    names = [r["name"] for r in data["rows"]]
    assert all("." not in n for n in names)
    assert len(names) == len(set(names)) and len(names) < len(full["rows"])
    assert sum(r["flops"] for r in data["rows"]) == data["totals"]["flops"] == full["totals"]["flops"]
    assert sum(r["params"] for r in data["rows"]) == data["totals"]["params"] == full["totals"]["params"]
    by_name = {r["name"]: r for r in data["rows"]}
    if which == "r18":
        assert {"layer1", "layer2", "layer3", "layer4"} <= set(names)
        assert by_name["layer1"]["type"] == "Sequential"
        assert by_name["layer4"]["output_shape"] == [1, 512, 2, 2]
        assert by_name["layer2"]["params"] == sum(p.numel() for p in models["r18"].layer2.parameters())
    else:
        assert by_name["enc1"]["type"] == "DoubleConv"
        assert by_name["enc1"]["flops"] == sum(r["flops"] for r in full["rows"] if r["name"].startswith("enc1."))
    if which == "unet":
        depth2 = _json(*args, "--depth", "2")
        assert sum(r["flops"] for r in depth2["rows"]) == full["totals"]["flops"]
        assert "enc1.block" in [r["name"] for r in depth2["rows"]]
        text = _ok(*args, "--depth", "1").stdout
        assert "depth 1" in text and "DoubleConv" in text and "Total" in text


def test_report_compare_pruned_module(models):
    before = _fingerprint(models["dir"] / "pruned.pt")
    data = _json(*_unet_args(models, "--compare", models["dir"] / "pruned.pt", "--trusted"))
    x = torch.randn(UNET_SHAPE)
    t = data["totals"]
    assert t["before"] == {**t["before"], **prunekit.count_flops_params(models["unet"], x)}
    assert t["after"] == {**t["after"], **prunekit.count_flops_params(models["pruned"], x)}
    assert 0 < t["flops_ratio"] < 1 and 0 < t["params_ratio"] < 1
    assert t["flops_ratio"] == pytest.approx(t["after"]["flops"] / t["before"]["flops"])
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["enc1.block.0"]["params_ratio"] == pytest.approx(2 / 4)
    assert rows["enc1.block.0"]["flops_ratio"] < 1
    assert rows["out"]["flops_ratio"] == 1.0
    assert sum(r["after"]["flops"] for r in data["rows"]) == t["after"]["flops"]
    assert data["fvcore"]["after"]["flops"] == t["after"]["flops"]
    text = _ok(*_unet_args(models, "--compare", models["dir"] / "pruned.pt", "--trusted", "--depth", "1")).stdout
    assert "After / before" in text and "ratio" in text
    assert f"{100 * t['flops_ratio']:.1f}%" in text
    assert _fingerprint(models["dir"] / "pruned.pt") == before


def test_report_compare_same_weights_is_all_ones(models):
    data = _json(*_unet_args(models, "--compare", models["dir"] / "unet.pt"))
    assert data["totals"]["flops_ratio"] == 1.0 and data["totals"]["params_ratio"] == 1.0
    assert all(r["flops_ratio"] in (None, 1.0) for r in data["rows"])


def test_compare_report_layers_on_one_side_only():
    from torch import nn

    from prunekit.reports import compare_report

    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    data = compare_report(a, b, torch.randn(1, 3, 8, 8), fvcore=False)
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["2"]["status"] == "before only"
    assert rows["2"]["after"]["flops"] == 0 and rows["2"]["flops_ratio"] == 0.0
    assert rows["0"]["flops_ratio"] == 1.0
    back = compare_report(b, a, torch.randn(1, 3, 8, 8), fvcore=False)
    rows = {r["name"]: r for r in back["rows"]}
    assert rows["2"]["status"] == "after only" and rows["2"]["flops_ratio"] is None
    assert [r["name"] for r in back["rows"]] == ["0", "1", "2"]


# --------------------------------------------------------------------------- graph


def test_graph_groups_and_dot(models, tmp_path):
    dot = tmp_path / "groups.dot"
    args = ("graph", models["dir"] / "unet.pt", "--builder", "prunekit.zoo:unet", "--kwargs", json.dumps(UNET_KW),
            "--input-shape", _shape(UNET_SHAPE))
    result = _ok(*args, "--dot", dot)
    out = result.stdout
    assert "enc1.block.0" in out and "prunable" in out and "pinned" in out and "model output" in out
    text = dot.read_text()
    assert text.startswith("digraph") and text.rstrip().endswith("}")
    assert "enc1.block.0" in text and "fillcolor=gray70" in text  # the pinned output head is shaded
    assert not [p for p in tmp_path.iterdir() if p.name != "groups.dot"]  # no temporary file left
    data = _json(*args)
    graph = prunekit.build_graph(models["unet"], torch.randn(UNET_SHAPE))
    assert len(data["groups"]) == len(graph.groups)
    assert data["totals"]["units"] == graph.num_units
    assert sum(g["size"] for g in data["groups"]) <= graph.num_units
    head = next(g for g in data["groups"] if g["producers"] == ["out"])
    assert head["status"] == "pinned" and head["prunable_units"] == 0 and head["reasons"]
    first = next(g for g in data["groups"] if g["producers"] == ["enc1.block.3"])
    assert first["status"] == "prunable" and first["size"] == 4 and "dec1.block.0" in first["consumers"]
    assert data["groups"][0]["producers"] == ["enc1.block.0"]  # model order
    assert {"source": "input 'x'", "channels": 3, "reason": "model input"} in data["pins"]


def test_graph_resnet_residual_group(models):
    data = _json("graph", models["dir"] / "r18.pt", "--builder", "torchvision.models:resnet18",
                 "--input-shape", _shape(R18_SHAPE))
    stage1 = next(g for g in data["groups"] if "conv1" in g["producers"])
    assert stage1["producers"] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert stage1["size"] == 64 and stage1["status"] == "prunable"


UNTRACEABLE = textwrap.dedent("""
    from torch import nn

    class Gate(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gate = Gate()
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.gate(self.conv(x)))

    def net():
        return Net()
""")


@pytest.fixture
def untraceable(tmp_path, monkeypatch):
    (tmp_path / "pk_cli_untraceable.py").write_text(UNTRACEABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("pk_cli_untraceable", None)
    import pk_cli_untraceable

    path = tmp_path / "net.pt"
    torch.save(pk_cli_untraceable.net().state_dict(), path)
    return path


def test_an_untraceable_module_becomes_a_leaf_and_is_reported(untraceable):
    args = (untraceable, "--builder", "pk_cli_untraceable:net", "--input-shape", "1,3,8,8")
    for named in ((), ("--leaf", "gate")):
        data = _json("graph", *args, *named)
        conv = next(g for g in data["groups"] if g["producers"] == ["conv"])
        assert conv["status"] == "pinned" and "gate" in conv["reasons"][0]
        report = _json("report", *args, *named)
        assert report["totals"]["params"] == 3 * 8 * 9 + 8 + 8 * 2 + 2
    fallbacks = _json("graph", *args)["tracing"]["fallbacks"]
    assert [(f["module"], f["type"]) for f in fallbacks] == [("gate", "Gate")]
    assert "tensor data" in fallbacks[0]["reason"] and fallbacks[0]["location"].endswith(".py:" + str(
        UNTRACEABLE.splitlines().index(next(l for l in UNTRACEABLE.splitlines() if "if x.sum()" in l)) + 1))
    assert fallbacks[0]["pinned_channels"] == 16
    shown = _run("graph", *args)
    assert shown.exit_code == 0 and "opaque leaf: 'gate' (Gate)" in " ".join(shown.output.split())


# --------------------------------------------------------------------------- bad input


def _bad_inputs(d: Path, dot_dir: Path):
    unet_pt, b = d / "unet.pt", ("--builder", "prunekit.zoo:unet", "--kwargs", json.dumps(UNET_KW))
    shape = ("--input-shape", _shape(UNET_SHAPE))
    return {
        "missing file": (["report", d / "nope.pt", *b, *shape], "does not exist"),
        "corrupt file": (["report", d / "garbage.pt", *b, *shape], "corrupt"),
        "truncated file": (["report", d / "truncated.pt", *b, *shape], "corrupt"),
        "pickle without --trusted": (["report", d / "pruned.pt", *shape], "--trusted"),
        "weights without builder": (["report", unet_pt, *shape], "--builder"),
        "missing builder module": (["report", unet_pt, "--builder", "nope_pkg.models:net", *shape], "cannot be found"),
        "missing builder function": (["report", unet_pt, "--builder", "prunekit.zoo:unett", *shape], "did you mean 'unet'"),
        "malformed builder": (["report", unet_pt, "--builder", "prunekit.zoo.unet", *shape], "package.module:function"),
        "bad shape text": (["report", unet_pt, *b, "--input-shape", "1,3,a"], "whole numbers"),
        "shape too short": (["graph", unet_pt, *b, "--input-shape", "3"], "two dimensions"),
        "bad JSON kwargs": (["report", unet_pt, "--builder", "prunekit.zoo:unet", "--kwargs", "{width: 4}", *shape],
                            "not valid JSON"),
        "kwargs not an object": (["report", unet_pt, "--builder", "prunekit.zoo:unet", "--kwargs", "[4]", *shape],
                                 "JSON object"),
        "kwargs the builder rejects": (["report", unet_pt, "--builder", "prunekit.zoo:unet", "--kwargs",
                                        '{"widht": 4}', *shape], "widht"),
        "weights that do not fit": (["report", unet_pt, "--builder", "prunekit.zoo:unet", *shape], "do not fit"),
        "wrong channel count": (["report", unet_pt, *b, "--input-shape", "1,4,32,32"], "example input"),
        "size the model cannot take": (["graph", unet_pt, *b, "--input-shape", "1,3,30,30"], "example input"),
        "depth 0": (["report", unet_pt, *b, *shape, "--depth", "0"], "depth"),
        "unknown leaf": (["graph", unet_pt, *b, *shape, "--leaf", "enc7"], "not a submodule"),
        "compare missing": (["report", unet_pt, *b, *shape, "--compare", d / "nope.pt"], "does not exist"),
        "compare pickle without --trusted": (["report", unet_pt, *b, *shape, "--compare", d / "pruned.pt"],
                                             "--trusted"),
        "compare pruned weights": (["report", unet_pt, *b, *shape, "--compare", d / "pruned_weights.pt"],
                                   "whole pickled module"),
        "compare corrupt": (["report", unet_pt, *b, *shape, "--compare", d / "garbage.pt", "--trusted"], "corrupt"),
        "compare model failing on the input": (["report", unet_pt, *b, *shape, "--compare", d / "gray_unet.pt",
                                                "--trusted"], "model to compare with"),
        "dot in a missing directory": (["graph", unet_pt, *b, *shape, "--dot", dot_dir / "no" / "g.dot"],
                                       "does not exist"),
        "dot is a directory": (["graph", unet_pt, *b, *shape, "--dot", dot_dir], "directory"),
    }


@pytest.fixture(scope="module")
def bad_files(models):
    d = models["dir"]
    (d / "garbage.pt").write_bytes(b"this is not a checkpoint\n" * 10)
    (d / "truncated.pt").write_bytes((d / "unet.pt").read_bytes()[:3000])
    torch.save(unet(in_channels=1, **UNET_KW).eval(), d / "gray_unet.pt")  # needs 1 input channel, not 3
    return d


BAD_CASES = list(_bad_inputs(Path("."), Path(".")))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_with_one_sentence(models, bad_files, tmp_path, case):
    d = bad_files
    args, needle = _bad_inputs(d, tmp_path)[case]
    files = sorted(p for p in d.iterdir() if p.is_file())
    before = {p: _fingerprint(p) for p in files}
    result = _run(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert isinstance(result.exception, SystemExit)  # not an uncaught exception
    err = result.stderr
    assert err.startswith("Error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and needle in err, err
    assert err.rstrip().endswith((".", "?")), err
    assert result.stdout == ""
    assert {p: _fingerprint(p) for p in files} == before  # inputs untouched
    assert sorted(p for p in d.iterdir() if p.is_file()) == files  # nothing new beside them
    assert not list(tmp_path.iterdir())  # no dot file, no temporary file


def test_failed_graph_keeps_an_existing_dot_file(models, tmp_path):
    dot = tmp_path / "groups.dot"
    dot.write_text("digraph old {}\n")
    before = _fingerprint(dot)
    result = _run("graph", models["dir"] / "unet.pt", "--builder", "prunekit.zoo:unet", "--kwargs",
                  json.dumps(UNET_KW), "--input-shape", "1,3,30,30", "--dot", dot)
    assert result.exit_code == 2
    assert _fingerprint(dot) == before and [p.name for p in tmp_path.iterdir()] == ["groups.dot"]


def test_missing_option_is_a_usage_error(models):
    result = _run("report", models["dir"] / "unet.pt", "--builder", "prunekit.zoo:unet")
    assert result.exit_code == 2 and "--input-shape" in result.stderr


# --------------------------------------------------------------------------- the installed script


def _script() -> str:
    script = Path(sys.executable).parent / "prunekit"
    if script.exists():
        return str(script)
    found = shutil.which("prunekit")
    if found is None:
        pytest.skip("the prunekit console script is not installed (pip install -e .)")
    return found


def test_installed_script(models):
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    ok = subprocess.run([_script(), *map(str, _unet_args(models, "--json", "--depth", "1"))],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert sum(r["flops"] for r in data["rows"]) == data["totals"]["flops"] > 0
    bad = subprocess.run([_script(), "report", str(models["dir"] / "unet_whole.pt"), "--input-shape", "1,3,32,32"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("Error: ") and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert "--trusted" in bad.stderr


def test_python_dash_m_runs_the_command_line(tmp_path):
    import subprocess

    for module in ("prunekit", "prunekit.cli"):
        done = subprocess.run([sys.executable, "-m", module, "prune", "--help"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert done.returncode == 0 and "Prune MODEL" in done.stdout, done.stderr


@pytest.mark.parametrize("module", ["numpy", "numpy.matrixlib"])
def test_ctrl_c_while_numpy_is_imported_stops_the_command(tmp_path, module):
    """torch imports numpy from C code that clears any exception: a Ctrl-C landing in that import was lost
    (the run went on) or left a half-imported numpy behind (a traceback later)."""
    weights = tmp_path / "unet.pt"
    torch.save(unet(in_channels=1, num_classes=2, width=4, depth=2).state_dict(), weights)
    script = textwrap.dedent(f"""
        import sys
        class CtrlC:  # Ctrl-C, pressed the moment {module} starts to import
            def find_spec(self, name, path=None, target=None):
                if name == {module!r}:
                    sys.meta_path.remove(self)
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, CtrlC())
        from prunekit.cli import main
        main()
    """)
    args = ["prune", str(weights), "-b", "prunekit.zoo:unet", "-k", '{"in_channels": 1, "num_classes": 2, '
            '"width": 4, "depth": 2}', "-i", "1,1,32,32", "--method", "l1", "-o", str(tmp_path / "run"), "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stderr.strip().splitlines() == ["Interrupted."]
    assert not (tmp_path / "run").exists()
