"""Hostile and careless inputs: each is refused with exit code 2, one sentence on stderr (no
traceback), and no file created, changed or deleted anywhere in the working directory.

Organised by the classes of broken promise they guard against:

A. code runs from a data file          E. checked too late
B. --force destroys what is not a run  F. silently wrong
C. an output overwrites an input       G. runs that collide or die early
D. a traceback instead of one sentence

The CLI runs in-process (click's CliRunner); the working directory is a fresh copy of a small U-Net's
weights, its config and a finished run directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import prunekit
from helpers import interrupt_scoring
from prunekit.cli import main
from prunekit.errors import PrunekitError, UnsafeInputError
from prunekit.zoo import unet

KW = {"in_channels": 1, "num_classes": 2, "width": 4, "depth": 2}
SHAPE = "1,1,32,32"
CONFIG = {
    "model": {"builder": "prunekit.zoo:unet", "kwargs": KW},
    "input_shape": [1, 1, 32, 32],
    "targets": {"flops": 0.6},
    "importance": {"method": "l1"},
    "limits": {"layers": {"out": 0.0}},
    "schedule": {"steps": 2},
}
HERE = "tests.test_hostile"
EVIDENCE = "EVIL_BUILDER_RAN"  # a builder that must never run leaves this file in the current directory


# --------------------------------------------------------------------------- user functions used by the cases


def evil_builder(**kwargs):
    with open(EVIDENCE, "a") as fh:
        fh.write("ran\n")
    return unet(**KW)


def evil_ran() -> int:
    return len(Path(EVIDENCE).read_text().splitlines()) if Path(EVIDENCE).exists() else 0


def printing_builder(**kwargs):
    print("hello from a builder")
    warnings.warn("a warning\nspread over\nthree lines", FutureWarning)
    return unet(**kwargs)


def exiting_builder(**kwargs):
    sys.exit(3)


def oom_builder(**kwargs):
    raise MemoryError


def raising(*args, **kwargs):
    raise ValueError("something inside went wrong")


def exiting(*args, **kwargs):
    sys.exit(0)


def returns_none(*args, **kwargs):
    return None


def returns_text(*args, **kwargs):
    return "0.9"


def returns_nan(*args, **kwargs):
    return float("nan")


def nan_scores(model, graph, batches):
    return {name: [math.nan] * len(units) for name, units in graph.producers.items()}


def text_scores(model, graph, batches):
    return {name: ["high"] * len(units) for name, units in graph.producers.items()}


def short_scores(model, graph, batches):
    return {name: [1.0] for name in graph.producers}


def list_scores(model, graph, batches):
    return [1.0, 2.0]


def batches_with_labels(labels: list, channels: int = 1, dtype: str = "float32", nan: bool = False):
    x = torch.rand(2, channels, 32, 32).to(getattr(torch, dtype))
    if nan:
        x[0, 0, 0, 0] = float("nan")
    y = torch.tensor(labels).view(-1, 1, 1).expand(-1, 32, 32).contiguous()
    return [(x, y)]


def broken_generator():
    def gen():
        raise RuntimeError("disk read failed in the loader")
        yield  # pragma: no cover

    return gen()


def string_batches():
    return ["not a tensor"]


def empty_batches():
    return []


# --------------------------------------------------------------------------- the working directory


def snapshot(root: Path) -> dict:
    """Every path under ``root`` with its kind and content hash (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            elif not p.is_file():  # a pipe: never read it
                out[rel] = ("special", p.stat().st_mode)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    """Weights, config and a finished run directory, made once; every case works on a copy."""
    d = tmp_path_factory.mktemp("master")
    torch.manual_seed(0)
    torch.save(unet(**KW).state_dict(), d / "unet.pt")
    (d / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    result = CliRunner().invoke(main, ["prune", str(d / "unet.pt"), "-c", str(d / "config.yaml"), "-o",
                                       str(d / "done"), "-q"])
    assert result.exit_code == 0, result.output
    return d


@pytest.fixture
def ws(master, tmp_path, monkeypatch):
    """A fresh working directory (the current directory while the case runs)."""
    work = tmp_path / "ws"
    shutil.copytree(master, work, symlinks=True)
    monkeypatch.chdir(work)
    return work


def write_config(path: Path, **changes) -> Path:
    config = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(config))
    return path


def refused(ws: Path, args, fragment: str | None = None, code: int = 2, **invoke):
    """Run the CLI; it must exit with ``code``, say one line on stderr without a traceback, and leave
    the working directory exactly as it was."""
    before = snapshot(ws)
    result = CliRunner().invoke(main, [str(a) for a in args], **invoke)
    err = result.stderr
    assert result.exit_code == code, (result.exit_code, result.stdout, err, result.exception)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Traceback" not in result.stdout
    if code == 2:
        assert lines[0].startswith("Error: ") and lines[0].endswith((".", "?")), lines[0]
    if fragment is not None:
        assert fragment in lines[0], lines[0]
    assert snapshot(ws) == before, "the working directory changed"
    return lines[0]


def prune_args(config="config.yaml", out="run", model="unet.pt", *extra):
    return ["prune", model, "-c", config, "-o", out, "-q", *extra]


def report_args(model="done", *extra):
    return ["report", model, "-i", SHAPE, *extra]


def set_manifest(run: Path, **changes) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(changes)
    (run / "manifest.json").write_text(json.dumps(manifest))


def first_module(run: Path) -> str:
    return next(iter(json.loads((run / "manifest.json").read_text())["modules"]))


def set_pruned(run: Path, attr: str, value) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    name = next(iter(manifest["modules"]))
    manifest["modules"][name]["pruned"][attr] = value
    (run / "manifest.json").write_text(json.dumps(manifest))


# =========================================================================== A. code runs from a data file


@pytest.mark.parametrize("builder, kwargs", [
    ("os:system", {"command": "touch PWNED"}),
    ("subprocess:run", {"args": ["touch", "PWNED"]}),
    ("builtins:exec", {"source": "open('PWNED', 'w')"}),
    (f"{HERE}:evil_builder", {}),
    ("torchvision.models:resnet.torch.hub.load", {"repo_or_dir": "x/y", "model": "m"}),
    ("prunekit.zoo.unet:torch.load", {"f": "unet.pt"}),
    ("torchvision.models:__builtins__.exec", {}),
    (["prunekit.zoo:unet"], {}),
])
@pytest.mark.parametrize("command", ["report", "graph"])
def test_a_manifest_builders_never_run(ws, builder, kwargs, command):
    set_manifest(ws / "done", builder=builder, kwargs=kwargs)
    refused(ws, [command, "done", "-i", SHAPE])
    assert not (ws / "PWNED").exists() and evil_ran() == 0


def test_a_manifest_beside_a_model_in_the_current_directory(ws):
    shutil.copy(ws / "done" / "model.pt", ws / "model.pt")
    shutil.copy(ws / "done" / "manifest.json", ws / "manifest.json")
    set_manifest(ws, builder="os:system", kwargs={"command": "touch PWNED"})
    refused(ws, report_args("model.pt"), "os:system")
    assert not (ws / "PWNED").exists()


def test_a_load_pruned_refuses_and_accepts_what_the_caller_names(ws):
    set_manifest(ws / "done", builder=f"{HERE}:evil_builder", kwargs={})
    with pytest.raises(UnsafeInputError, match="--trusted"):
        prunekit.load_pruned(ws / "done")
    assert evil_ran() == 0
    set_manifest(ws / "done", builder="prunekit.zoo:unet", kwargs=KW)
    assert isinstance(prunekit.load_pruned(ws / "done"), torch.nn.Module)  # prunekit's own: allowed
    with pytest.raises(PrunekitError, match="not 'torchvision"):
        prunekit.load_pruned(ws / "done", builder="torchvision.models:resnet18")


def test_a_named_or_trusted_builder_is_used(ws):
    set_manifest(ws / "done", builder=f"{HERE}:evil_builder", kwargs={})
    prunekit.load_pruned(ws / "done", builder=f"{HERE}:evil_builder")
    prunekit.load_pruned(ws / "done", trusted=True)
    assert evil_ran() == 2
    result = CliRunner().invoke(main, report_args("done", "--builder", f"{HERE}:evil_builder", "--json"))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("attr, value, fragment", [
    ("eps", 1e9, "not a width attribute"),
    ("__class__", "os.system", "not a width attribute"),
    ("padding_mode", "circular", "not a width attribute"),
    ("forward", 1, "not a width attribute"),
    ("out_channels", True, "positive integers"),
    ("out_channels", -4, "positive integers"),
    ("out_channels", "3", "positive integers"),
    ("out_channels", 1, "do not match the manifest"),
])
def test_a_manifest_sets_only_widths_that_fit_the_weights(ws, attr, value, fragment):
    set_pruned(ws / "done", attr, value)
    refused(ws, report_args("done"), fragment)


def test_a_compare_with_a_run_applies_only_widths(ws):
    set_pruned(ws / "done", "eps", 0.5)
    refused(ws, ["report", "unet.pt", "-i", SHAPE, "-b", "prunekit.zoo:unet", "-k", json.dumps(KW),
                 "--compare", "done"], "not a width attribute")


def test_a_weights_that_do_not_match_the_manifest(ws):
    shutil.copy(ws / "unet.pt", ws / "done" / "model.pt")  # the unpruned weights under a pruned manifest
    refused(ws, report_args("done"), "do not match the manifest")


def test_a_manifest_for_other_kwargs(ws):
    set_manifest(ws / "done", kwargs={**KW, "width": 8})
    refused(ws, report_args("done"), "before pruning")


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid JSON"),
    ('{"format": "something-else"}', "not a prunekit manifest"),
    ('{"format": "prunekit-manifest/1", "builder": "prunekit.zoo:unet", "kwargs": [1]}', "kwargs"),
    ('[' * 100000, "not valid JSON"),
])
def test_a_damaged_manifests(ws, text, fragment):
    (ws / "done" / "manifest.json").write_text(text)
    refused(ws, report_args("done"), fragment)


def test_a_pickle_in_place_of_weights_is_not_run(ws):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    torch.save({"w": Boom()}, ws / "done" / "model.pt")
    refused(ws, report_args("done"))
    assert not (ws / "PWNED").exists()


# =========================================================================== B. --force destroys what is not a run


def test_b_force_never_empties_a_foreign_directory(ws):
    (ws / "theirs").mkdir()
    (ws / "theirs" / "manifest.json").write_text('{"format": "prunekit-manifest/1"}')
    (ws / "theirs" / "checkpoint.pt").write_bytes(b"mine")
    refused(ws, prune_args("config.yaml", "theirs", "unet.pt", "--force"), "not a prunekit run directory")


@pytest.mark.parametrize("out", [".", "", "..", "./", "ws/..", "sub/.."])
def test_b_force_never_replaces_the_current_directory_or_above(ws, out):
    (ws / "sub").mkdir()
    refused(ws, prune_args("config.yaml", out, "unet.pt", "--force"))


def test_b_force_never_replaces_a_directory_holding_the_model(ws):
    shutil.copy(ws / "unet.pt", ws / "done" / "unet.pt")
    refused(ws, prune_args("config.yaml", "done", "done/unet.pt", "--force"), "holds the input")


def test_b_force_never_replaces_a_directory_holding_the_config(ws):
    shutil.copy(ws / "config.yaml", ws / "done" / "config.yaml")
    refused(ws, prune_args("done/config.yaml", "done", "unet.pt", "--force"), "holds the input")


def test_b_force_never_replaces_a_parent_of_an_input(ws):
    (ws / "models" / "deep").mkdir(parents=True)
    shutil.copy(ws / "unet.pt", ws / "models" / "deep" / "unet.pt")
    refused(ws, prune_args("config.yaml", "models", "models/deep/unet.pt", "--force"), "holds the input")


def test_b_force_never_replaces_a_directory_holding_the_data(ws):
    (ws / "done" / "images").mkdir()
    write_config(ws / "c.yaml", **{"data.calibration": {"images": "done/images"}})
    refused(ws, prune_args("c.yaml", "done", "unet.pt", "--force"), "holds the input")


def test_b_a_failing_forced_run_keeps_the_finished_one(ws):
    write_config(ws / "c.yaml", validate=f"{HERE}:raising")
    refused(ws, prune_args("c.yaml", "done", "unet.pt", "--force"), "your validate function")


def test_b_force_onto_a_file(ws):
    (ws / "out.txt").write_text("keep me")
    refused(ws, prune_args("config.yaml", "out.txt", "unet.pt", "--force"), "is a file")


def test_b_force_never_replaces_through_a_symbolic_link(ws):
    os.symlink("done", ws / "latest")
    refused(ws, prune_args("config.yaml", "latest", "unet.pt", "--force"), "symbolic link")


@pytest.mark.parametrize("target", ["/nonexistent/run", "missing"])
def test_b_run_directory_that_is_a_dangling_link(ws, target):
    os.symlink(target, ws / "run")
    refused(ws, prune_args("config.yaml", "run"), "does not exist")


def test_b_force_replaces_a_run_only_when_the_new_one_is_complete(ws):
    old = (ws / "done" / "model.pt").read_bytes()
    write_config(ws / "c.yaml", **{"targets.flops": 0.8})
    result = CliRunner().invoke(main, prune_args("c.yaml", "done", "unet.pt", "--force"))
    assert result.exit_code == 0, result.output
    assert (ws / "done" / "model.pt").read_bytes() != old
    assert json.loads((ws / "done" / ".prunekit-run").read_text())["status"] == "complete"
    assert sorted(p.name for p in ws.iterdir() if p.name.startswith(".")) == []  # no staging, no lock left


# =========================================================================== C. an output overwrites an input


@pytest.mark.parametrize("dot", ["unet.pt", "./unet.pt", "link.pt", "hard.pt"])
def test_c_dot_never_overwrites_the_model(ws, dot):
    os.symlink("unet.pt", ws / "link.pt")
    os.link(ws / "unet.pt", ws / "hard.pt")
    refused(ws, ["graph", "unet.pt", "-i", SHAPE, "-b", "prunekit.zoo:unet", "-k", json.dumps(KW), "--dot", dot],
            "is the input")


@pytest.mark.parametrize("dot", ["done/manifest.json", "done/model.pt"])
def test_c_dot_never_overwrites_a_run_it_reads(ws, dot):
    refused(ws, ["graph", "done", "-i", SHAPE, "--dot", dot], "is the input")


@pytest.mark.parametrize("out, fragment", [
    ("unet.pt", "is the input"),
    ("config.yaml", "is the input"),
    ("unet.pt/run", "is a file"),
    ("config.yaml/run", "is a file"),
])
def test_c_run_directory_is_never_an_input(ws, out, fragment):
    refused(ws, prune_args("config.yaml", out, "unet.pt", "--force"), fragment)


@pytest.mark.parametrize("dot, fragment", [
    ("unet.pt/groups.dot", "is a file"),
    ("done", "is a directory"),
    ("dangling.dot", "does not exist"),
    ("", "empty"),
])
def test_c_unwritable_dot_paths(ws, dot, fragment):
    os.symlink("/nonexistent/dir/groups.dot", ws / "dangling.dot")
    refused(ws, ["graph", "unet.pt", "-i", SHAPE, "-b", "prunekit.zoo:unet", "-k", json.dumps(KW), "--dot", dot],
            fragment)


# =========================================================================== D. a traceback instead of one sentence


@pytest.mark.parametrize("text, fragment", [
    ('a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f'{c}: &{c} [{",".join(["*" + p] * 9)}]\n' for p, c in zip("abcdefgh", "bcdefghi")), "expands to more"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than"),
    ("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 60)) + "  " * 60 + "v: 1\n", "nested more than"),
    ("seed: 1\nseed: 2\n", "twice"),
    ("targets: {flops: 0.5, flops: 0.4}\n", "twice"),
    ("a: [1, 2\n", "not valid YAML"),
    ("# padding\n" * 200_000, "at most"),
])
def test_d_yaml_with_limits(ws, text, fragment):
    (ws / "bad.yaml").write_text(text)
    refused(ws, prune_args("bad.yaml"), fragment)


def test_d_yaml_that_is_not_text(ws):
    (ws / "bad.yaml").write_bytes(b"\xff\xfe\x00garbage")
    refused(ws, prune_args("bad.yaml"), "UTF-8")


@pytest.mark.parametrize("key, value, fragment", [
    ("seed", 2**70, "'seed'"),
    ("seed", -1, "'seed'"),
    ("input_shape", [True, 1, 32, 32], "'input_shape'"),
    ("input_shape", [1, 1, 32.5, 32], "'input_shape'"),
    ("input_shape", [1, 1, 100000, 100000], "memory"),
    ("input_shape", [1, 1, 2**40, 2**40], "'input_shape'"),
    ("keep_best", 0, "keep_best"),
    ("schedule.steps", "two", "schedule.steps"),
    ("data.calibration", {"factory": f"{HERE}:batches_with_labels", "kwargs": {"labels": [0, 1]}, "limit": 0},
     "limit"),
])
def test_d_config_values(ws, key, value, fragment):
    write_config(ws / "c.yaml", **{key: value})
    refused(ws, prune_args("c.yaml"), fragment)


@pytest.mark.parametrize("shape, fragment", [
    ("1x3x100000x100000", "memory"),
    ("99999999999999999999999,3", "more than a tensor"),
    ("1,1,32", None),
    ("true,1,32,32", "whole numbers"),
])
def test_d_input_shapes_checked_before_allocation(ws, shape, fragment):
    refused(ws, ["report", "unet.pt", "-i", shape, "-b", "prunekit.zoo:unet", "-k", json.dumps(KW)], fragment)


@pytest.mark.parametrize("key, spec, fragment", [
    ("importance.method", f"{HERE}:raising", "raised ValueError: something inside went wrong"),
    ("importance.method", f"{HERE}:exiting", "called sys.exit(0)"),
    ("importance.method", f"{HERE}:returns_none", "returned NoneType, not a mapping"),
    ("importance.method", f"{HERE}:list_scores", "not a mapping"),
    ("importance.method", f"{HERE}:nan_scores", "not finite"),
    ("importance.method", f"{HERE}:text_scores", "not numbers"),
    ("importance.method", f"{HERE}:short_scores", "output channels"),
    ("validate", f"{HERE}:raising", "your validate function"),
    ("validate", f"{HERE}:exiting", "called sys.exit(0)"),
    ("validate", f"{HERE}:returns_none", "returned None, not a number"),
    ("validate", f"{HERE}:returns_text", "returned '0.9', not a number"),
    ("validate", f"{HERE}:returns_nan", "not a finite number"),
])
def test_d_user_functions_become_one_sentence(ws, key, spec, fragment):
    write_config(ws / "c.yaml", **{key: spec})
    line = refused(ws, prune_args("c.yaml"), fragment)
    assert spec in line  # the sentence names the user's function


@pytest.mark.parametrize("factory, kwargs, fragment", [
    ("raising", {}, "your data factory"),
    ("exiting", {}, "called sys.exit(0)"),
    ("returns_none", {}, "returned NoneType"),
    ("returns_text", {}, "returned str"),
    ("broken_generator", {}, "disk read failed in the loader"),
    ("string_batches", {}, "must be a tensor"),
    ("empty_batches", {}, "yields no batches"),
    ("batches_with_labels", {"labels": [0, 1], "channels": 3}, "channels"),
    ("batches_with_labels", {"labels": [0, 1], "dtype": "int64"}, "needs floats"),
    ("batches_with_labels", {"labels": [0, 1], "nan": True}, "NaN"),
    ("batches_with_labels", {"labels": [0, -1]}, "negative label -1"),
    ("batches_with_labels", {"labels": [0, 7]}, "label 7"),
])
def test_d_data_factories(ws, factory, kwargs, fragment):
    source = {"factory": f"{HERE}:{factory}", "kwargs": kwargs}
    write_config(ws / "c.yaml", **{"data.calibration": source, "data.train": source})
    refused(ws, prune_args("c.yaml"), fragment)


def batches_with_a_late_label(label: int):
    """Two batches of masks: the first fine, the second with ``label`` (255: a common 'ignore' id)."""
    good, = batches_with_labels([0, 1])
    late = torch.tensor([0, label]).view(-1, 1, 1).expand(-1, 32, 32).contiguous()
    return [good, (good[0], late)]


def test_d_a_label_past_the_classes_in_a_later_batch(ws):
    source = {"factory": f"{HERE}:batches_with_a_late_label", "kwargs": {"label": 255}}
    write_config(ws / "c.yaml", **{"data.train": source, "schedule.finetune": {"iterations": 3}})
    refused(ws, prune_args("c.yaml"), "data.train has the label 255 in a later batch")


def test_d_finetune_function_that_raises(ws):
    source = {"factory": f"{HERE}:batches_with_labels", "kwargs": {"labels": [0, 1]}}
    write_config(ws / "c.yaml", **{"data.train": source,
                                   "schedule.finetune": {"iterations": 1, "function": f"{HERE}:raising"}})
    refused(ws, prune_args("c.yaml"), "your fine-tune function")


@pytest.mark.parametrize("builder, fragment", [
    (f"{HERE}:exiting_builder", "sys.exit(3)"),
    (f"{HERE}:oom_builder", "out of memory"),
    (f"{HERE}:raising", "something inside went wrong"),
])
def test_d_builders_that_fail(ws, builder, fragment):
    refused(ws, ["report", "unet.pt", "-i", SHAPE, "-b", builder], fragment)


def _tiff(path: Path, array) -> None:
    import tifffile

    tifffile.imwrite(path, array)


@pytest.mark.parametrize("array, fragment", [
    (lambda np: np.zeros((2, 3, 32, 32), dtype=np.uint8), "not stacks or volumes"),
    (lambda np: np.zeros((32, 32, 7), dtype=np.uint8), "not stacks or volumes"),
    (lambda np: np.full((32, 32), np.nan, dtype=np.float32), "NaN"),
])
def test_d_images_that_cannot_be_inputs(ws, array, fragment):
    import numpy as np

    (ws / "images").mkdir()
    _tiff(ws / "images" / "a.tif", array(np))
    write_config(ws / "c.yaml", **{"data.calibration": {"images": "images"}})
    refused(ws, prune_args("c.yaml"), fragment)


def test_d_negative_labels_in_a_csv(ws):
    import numpy as np

    (ws / "images").mkdir()
    _tiff(ws / "images" / "a.tif", np.zeros((32, 32), dtype=np.uint8))
    (ws / "labels.csv").write_text("a.tif,-1\n")
    write_config(ws / "c.yaml", **{"data.calibration": {"images": "images", "labels": "labels.csv"}})
    refused(ws, prune_args("c.yaml"), "negative label")


@pytest.mark.parametrize("err, fragment", [
    (errno.ENOSPC, "the disk is full"),
    (errno.EROFS, "read-only"),
    (errno.EACCES, "permission denied"),
    (errno.EDQUOT, "quota"),
])
def test_d_resource_errors_name_the_path(ws, monkeypatch, err, fragment):
    import prunekit.loading as pio

    def failing_fsync(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(pio.os, "fsync", failing_fsync)
    line = refused(ws, ["graph", "unet.pt", "-i", SHAPE, "-b", "prunekit.zoo:unet", "-k", json.dumps(KW),
                        "--dot", "groups.dot", "--json"], fragment)
    assert "groups.dot" in line


def test_d_unwritable_directory(ws, monkeypatch):
    import prunekit.paths as paths

    (ws / "locked").mkdir()
    real_access = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode: False if str(p).endswith("locked") else
                        real_access(p, mode))
    refused(ws, prune_args("config.yaml", "locked/run"), "permission denied")


def test_d_full_disk_during_a_run_names_the_file(ws, monkeypatch):
    import prunekit.loading as pio

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pio.os, "fsync", full)
    line = refused(ws, prune_args("config.yaml", "run"), "the disk is full")
    assert "run" in line


def test_d_ctrl_c_during_start_up_is_one_line(ws, monkeypatch):
    import prunekit.loading as pio

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pio, "load_model", interrupted)
    refused(ws, prune_args(), "Interrupted", code=130)


def test_d_debug_shows_the_traceback(ws):
    write_config(ws / "c.yaml", validate=f"{HERE}:raising")
    result = CliRunner().invoke(main, ["--debug", *prune_args("c.yaml")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "something inside went wrong" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: your validate function")


# =========================================================================== E. checked too late


@pytest.mark.parametrize("key, value, fragment", [
    ("schedule.finetune", {"iterations": 1, "lr": float("inf")}, "finite"),
    ("schedule.finetune", {"iterations": 1, "lr": float("nan")}, "finite"),
    ("schedule.finetune", {"iterations": 1, "lr": 1e300}, "at most 10"),
    ("schedule.finetune", {"iterations": 1, "weight_decay": -1}, "weight_decay"),
    ("schedule.finetune", {"iterations": 1, "weight_decay": float("nan")}, "finite"),
    ("targets.flops", float("nan"), "finite"),
    ("targets.flops", 1e400, "finite"),
    ("schedule.final_finetune", {"iterations": 1, "weight_decay": 2}, "weight_decay"),
])
def test_e_optimiser_and_target_values_are_checked_before_work(ws, key, value, fragment):
    source = {"factory": f"{HERE}:batches_with_labels", "kwargs": {"labels": [0, 1]}}
    write_config(ws / "c.yaml", **{key: value, "data.train": source})
    refused(ws, prune_args("c.yaml", "run"), fragment)


@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_e_latency_device_is_checked_before_work(ws, device):
    """The report's latency row is measured at the end: a device that is not there must stop the run first."""
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    write_config(ws / "c.yaml", **{"latency.device": device})
    refused(ws, prune_args("c.yaml", "run"), f"latency.device '{device}'")


@pytest.mark.parametrize("what, fragment", [
    ("folder", "is a directory"),
    ("missing.pt", "does not exist"),
    ("started", "has not finished"),
])
def test_e_what_model_is_comes_before_asking_for_an_input_shape(ws, what, fragment):
    (ws / "folder").mkdir()
    (ws / "started").mkdir()
    (ws / "started" / ".prunekit-run").write_text(json.dumps({"format": "prunekit-run/1", "status": "running"}))
    for command in ("report", "graph"):
        refused(ws, [command, what], fragment)


def test_e_nan_model_is_refused_before_anything_is_written(ws):
    state = torch.load(ws / "unet.pt", weights_only=True)
    next(iter(state.values()))[0] = float("nan")
    torch.save(state, ws / "nan.pt")
    refused(ws, prune_args("config.yaml", "run", "nan.pt"), "NaN")


def test_e_config_path_that_is_a_directory(ws):
    (ws / "cfgdir").mkdir()
    refused(ws, prune_args("cfgdir"), "is a directory")
    refused(ws, prune_args("newdir/"), "does not exist")


def test_e_unknown_leaf_modules(ws):
    write_config(ws / "c.yaml", **{"model.leaf_modules": ["enc9"]})
    refused(ws, prune_args("c.yaml"), "enc9")


def test_e_a_scorer_with_the_wrong_shape_leaves_no_checkpoint(ws):
    write_config(ws / "c.yaml", **{"importance.method": f"{HERE}:short_scores"})
    refused(ws, prune_args("c.yaml", "run"))
    assert not (ws / "run").exists()


# =========================================================================== F. silently wrong


def _interrupted_run(ws: Path, monkeypatch) -> None:
    """``ws/cut``: a run interrupted after its first step."""
    import prunekit.loop as pruner

    original = interrupt_scoring(monkeypatch, at=2)
    result = CliRunner().invoke(main, prune_args("config.yaml", "cut"))
    assert result.exit_code == 130 and "--resume" in result.stderr, result.output
    monkeypatch.setattr(pruner, "score_units", original)


def test_f_resume_with_another_model_is_refused(ws, monkeypatch):
    _interrupted_run(ws, monkeypatch)
    torch.manual_seed(1)
    torch.save(unet(**KW).state_dict(), ws / "other.pt")
    refused(ws, prune_args("config.yaml", "cut", "other.pt", "--resume"), "different model")


def test_f_resume_with_another_config_is_refused(ws, monkeypatch):
    _interrupted_run(ws, monkeypatch)
    write_config(ws / "c.yaml", **{"targets.flops": 0.7})
    refused(ws, prune_args("c.yaml", "cut", "unet.pt", "--resume"), "different config")


def test_f_an_interrupted_run_is_not_silently_replaced(ws, monkeypatch):
    _interrupted_run(ws, monkeypatch)
    refused(ws, prune_args("config.yaml", "cut"), "--resume")
    refused(ws, report_args("cut"), "has not finished")


def test_f_json_output_is_not_polluted_by_a_builder(ws):
    with warnings.catch_warnings():  # as outside pytest, whose own warning capture would take it
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, ["report", "unet.pt", "-i", SHAPE, "-b", f"{HERE}:printing_builder",
                                           "-k", json.dumps(KW), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["totals"]["flops"] > 0
    assert "hello from a builder" in result.stderr
    warning_lines = [line for line in result.stderr.splitlines() if line.startswith("Warning")]
    assert warning_lines == ["Warning: FutureWarning: a warning"]  # one line, not three


def test_f_json_is_strict():
    from prunekit.files import strict_json

    text = strict_json({"metric": float("nan"), "ratio": [1.0, float("inf")]})
    assert json.loads(text) == {"metric": None, "ratio": [1.0, None]}
    assert "NaN" not in text and "Infinity" not in text


def test_f_load_pruned_checks_weights_against_the_manifest(ws):
    state = torch.load(ws / "done" / "model.pt", weights_only=True)
    name = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    state[name] = state[name][:-1]
    torch.save(state, ws / "done" / "model.pt")
    with pytest.raises(PrunekitError):
        prunekit.load_pruned(ws / "done")


# =========================================================================== G. runs that collide or die early


@pytest.mark.parametrize("out, flags", [("run", ()), ("done", ("--force",)), ("done", ("--resume",)),
                                         ("done", ())])
def test_g_a_locked_run_directory_is_refused(ws, out, flags):
    from prunekit.rundir import RunLock

    lock = RunLock(ws / out)
    lock.acquire()
    try:
        refused(ws, prune_args("config.yaml", out, "unet.pt", *flags), "another prunekit run is writing")
    finally:
        lock.release()
    assert not (ws / f".{out}.prunekit-lock").exists()


def test_g_ctrl_c_before_the_first_checkpoint_writes_nothing(ws, monkeypatch):
    import prunekit.loop as pruner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pruner, "score_units", interrupted)
    line = refused(ws, prune_args("config.yaml", "run"), "nothing was written", code=130)
    assert "--resume" not in line


def test_g_ctrl_c_in_a_forced_run_keeps_the_earlier_run(ws, monkeypatch):
    import prunekit.loop as pruner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pruner, "score_units", interrupted)
    refused(ws, prune_args("config.yaml", "done", "unet.pt", "--force"), "still holds the earlier run", code=130)


def test_g_a_run_killed_before_its_first_checkpoint_is_replaced(ws):
    killed = ws / "killed"
    killed.mkdir()
    (killed / ".prunekit-run").write_text(json.dumps({"format": "prunekit-run/1", "status": "running"}))
    (killed / ".checkpoint.pt.abcd1234.tmp").write_bytes(b"half a checkpoint")
    (ws / ".killed.prunekit-new-xyz").mkdir()  # the staging of a forced run killed before its swap
    result = CliRunner().invoke(main, prune_args("config.yaml", "killed"))
    assert result.exit_code == 0, result.output
    assert not (killed / ".checkpoint.pt.abcd1234.tmp").exists()
    assert not (ws / ".killed.prunekit-new-xyz").exists()
    a = torch.load(killed / "model.pt", weights_only=True)
    b = torch.load(ws / "done" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_g_resume_of_a_run_killed_before_its_first_checkpoint_starts_again(ws):
    killed = ws / "killed"
    killed.mkdir()
    (killed / ".prunekit-run").write_text(json.dumps({"format": "prunekit-run/1", "status": "running"}))
    result = CliRunner().invoke(main, prune_args("config.yaml", "killed", "unet.pt", "--resume"))
    assert result.exit_code == 0, result.output
    assert (killed / "model.pt").read_bytes() == (ws / "done" / "model.pt").read_bytes()


def test_g_an_interrupted_run_resumes_to_the_same_result(ws, monkeypatch):
    _interrupted_run(ws, monkeypatch)
    result = CliRunner().invoke(main, prune_args("config.yaml", "cut", "unet.pt", "--resume"))
    assert result.exit_code == 0, result.output
    a = torch.load(ws / "cut" / "model.pt", weights_only=True)
    b = torch.load(ws / "done" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_g_resume_of_a_complete_run_without_a_checkpoint_is_refused(ws):
    """A run of cheap steps may complete without writing a checkpoint (they are cheaper to redo than to
    save): there is nothing to continue, and saying so beats a 'damaged' or 'missing' file."""
    done = ws / "done"
    (done / "checkpoint.pt").unlink(missing_ok=True)
    refused(ws, prune_args("config.yaml", "done", "unet.pt", "--resume"), "nothing to resume")


def test_g_resume_without_a_run(ws):
    refused(ws, prune_args("config.yaml", "nowhere", "unet.pt", "--resume"), "cannot resume")


def test_g_unreachable_target_keeps_the_best_model(ws):
    """The documented exception: exit 2 with one sentence, and the best model reached is written."""
    write_config(ws / "c.yaml", **{"targets.flops": 0.05, "limits.default": 0.3})
    result = CliRunner().invoke(main, prune_args("c.yaml", "run"))
    assert result.exit_code == 2 and "limits stop pruning" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (ws / "run" / "model.pt").is_file()
    assert isinstance(prunekit.load_pruned(ws / "run"), torch.nn.Module)


def validate_fails_after_the_first_step(model):
    """A validate function that works twice (the original, then the first step), then returns NaN."""
    marker = Path("validated")
    calls = int(marker.read_text()) if marker.exists() else 0
    if calls >= 2:
        return float("nan")
    marker.write_text(str(calls + 1))
    return 0.5


def test_g_a_function_failing_after_a_checkpoint_keeps_the_run_resumable(ws):
    write_config(ws / "c.yaml", validate=f"{HERE}:validate_fails_after_the_first_step")
    result = CliRunner().invoke(main, prune_args("c.yaml", "run"))
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and "returned nan, not a finite number" in line and "--resume" in line
    assert (ws / "run" / "checkpoint.pt").is_file() and not (ws / "run" / "model.pt").exists()
    again = CliRunner().invoke(main, prune_args("c.yaml", "run"))
    assert again.exit_code == 2 and "interrupted run" in again.stderr


def test_g_a_swap_killed_between_its_renames_loses_no_run(ws):
    """A forced run killed after moving the old run aside and before moving the new one in."""
    (ws / ".done.prunekit-new-abc").mkdir()
    staged = ws / ".done.prunekit-new-abc"
    for p in (ws / "done").iterdir():
        shutil.copy(p, staged / p.name)
    (ws / ".done.prunekit-old-def").mkdir()
    os.replace(ws / "done", ws / ".done.prunekit-old-def" / "run")
    refused_line = CliRunner().invoke(main, prune_args("config.yaml", "done")).stderr
    assert "already exists" in refused_line  # the finished new run is back in place, not overwritten
    assert (ws / "done" / "model.pt").is_file() and prunekit.load_pruned(ws / "done") is not None
    assert not [p for p in ws.iterdir() if p.name.startswith(".done.")]


# =========================================================================== the same promises from Python


@pytest.mark.parametrize("run_dir, fragment", [
    (".", "holds the input"),
    ("..", "holds the input"),
    ("unet.pt", "is the input"),
    ("done/sub/..", None),
])
def test_api_prune_refuses_what_the_cli_refuses(ws, run_dir, fragment):
    model = unet(**KW)
    model.load_state_dict(torch.load(ws / "unet.pt", weights_only=True))
    before = snapshot(ws)
    with pytest.raises(PrunekitError) as info:
        prunekit.prune(model, torch.rand(1, 1, 32, 32), CONFIG, run_dir=run_dir, force=run_dir != "done/sub/..",
                       progress=False, input_files=["unet.pt"])
    if run_dir in (".", ".."):
        with pytest.raises(PrunekitError, match="current directory"):  # even when it holds no input
            prunekit.prune(model, torch.rand(1, 1, 32, 32), CONFIG, run_dir=run_dir, force=True, progress=False)
    assert fragment is None or fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert snapshot(ws) == before


def test_api_prune_refuses_a_nan_model_and_leaves_it_as_it_was(ws):
    model = unet(**KW)
    with torch.no_grad():
        model.enc1.block[0].weight[0, 0, 0, 0] = float("inf")
    model.train()
    with pytest.raises(PrunekitError, match="NaN or infinite"):
        prunekit.prune(model, torch.rand(1, 1, 32, 32), CONFIG, run_dir="run", progress=False)
    assert model.training and not (ws / "run").exists()


def test_model_files_that_are_not_regular_files(ws):
    os.mkfifo(ws / "pipe.pt")
    os.symlink("missing.pt", ws / "dangling.pt")
    for name, fragment in (("pipe.pt", "not a regular file"), ("dangling.pt", "symbolic link")):
        refused(ws, ["report", name, "-i", SHAPE, "-b", "prunekit.zoo:unet", "-k", json.dumps(KW)], fragment)


@pytest.mark.parametrize("args, fragment", [
    (["report", "unet.pt", "-i", SHAPE, "--depth", "abc"], "'abc' is not a valid integer"),
    (["prune", "unet.pt", "-o", "run"], "prune needs input_shape"),
    (["prune", "unet.pt"], "Missing option"),
    (["prnue", "unet.pt"], "No such command"),
    (["graph", "unet.pt", "-i", SHAPE, "--dott", "x.dot"], "No such option"),
    (["demo", "-o", "."], "current directory"),
    (["demo", "-o", "done/.."], "current directory"),
])
def test_d_usage_errors_are_one_line(ws, args, fragment):
    refused(ws, args, fragment)


def test_d_demo_never_overwrites_someone_elses_files(ws):
    (ws / "mine").mkdir()
    (ws / "mine" / "unet.pt").write_bytes(b"my own model")
    refused(ws, ["demo", "-o", "mine"], "did not write")


def test_a_a_library_name_shadowed_by_a_file_in_the_run_directory(ws, monkeypatch):
    (ws / "done" / "timm.py").write_text("open('PWNED', 'w').close()\ndef create_model(**kw): pass\n")
    monkeypatch.syspath_prepend(str(ws / "done"))  # as if the run directory were the current directory
    monkeypatch.delitem(sys.modules, "timm", raising=False)  # another test may have imported the real one
    set_manifest(ws / "done", builder="timm:create_model", kwargs={})
    refused(ws, report_args("done"), "well-known model library")
    assert not (ws / "PWNED").exists()


@pytest.mark.parametrize("content, fragment", [
    (b"garbage", "not a readable prunekit checkpoint"),
    ({"format": "prunekit-checkpoint/1", "state": {}}, "not written by this version"),
    ("pickle", "not a readable prunekit checkpoint"),
])
def test_f_a_damaged_checkpoint_is_refused_on_resume(ws, monkeypatch, content, fragment):
    _interrupted_run(ws, monkeypatch)
    path = ws / "cut" / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "pickle":
        class Boom:
            def __reduce__(self):
                return (os.system, ("touch PWNED",))

        torch.save({"format": "prunekit-checkpoint/2", "state": Boom()}, path)
    else:
        torch.save(content, path)
    refused(ws, prune_args("config.yaml", "cut", "unet.pt", "--resume"), fragment)
    assert not (ws / "PWNED").exists()


def test_e_a_run_failing_in_its_first_step_leaves_no_parent_directories(ws):
    write_config(ws / "c.yaml", validate=f"{HERE}:returns_nan")
    refused(ws, prune_args("c.yaml", "new/deep/run"), "not a finite number")
    assert not (ws / "new").exists()


def test_f_a_limit_that_matches_no_module_is_an_error_naming_the_nearest_layers(ws):
    write_config(ws / "c.yaml", **{"limits.layers": {"out": 0.0, "dec9.*": 0.0}})
    result = CliRunner().invoke(main, prune_args("c.yaml", "run"))
    assert result.exit_code == 2, result.output
    assert "'dec9.*' matches no layer" in result.stderr and "nearest layer names" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (ws / "run").exists()


def test_a_cut_message_says_it_was_cut():
    """A long first line is cut to 200 characters with an ellipsis the caller's full stop does not
    swallow (it read as a whole sentence: "make sure your Internet connect.")."""
    from prunekit.safety import first_line

    cut = first_line(RuntimeError("word " * 100))
    assert len(cut) <= 200 and cut.endswith("\u2026")
    assert first_line(RuntimeError("short message.\nmore")) == "short message"
