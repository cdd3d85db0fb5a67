import json
import warnings
import os
import stat
import sys

import pytest
import torch
from torch import nn

from prunekit.errors import PrunekitError, UsageError
from prunekit.files import atomic_dir, atomic_save_torch, atomic_write_bytes, atomic_write_text, save_json
from prunekit.loading import load_model, parse_input_shape, parse_kwargs, resolve_callable
from prunekit.zoo import unet

UNET_KW = {"width": 2, "depth": 2, "num_classes": 3}


def _one_sentence(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg
    assert msg.endswith((".", "?"))
    return msg


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture
def trained_unet():
    torch.manual_seed(0)
    model = unet(**UNET_KW)
    # make BN statistics non-default so the round trip is meaningful
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


# ---------------------------------------------------------------- resolve_callable


def test_resolve_callable_ok():
    assert resolve_callable("prunekit.zoo:unet") is unet
    import torchvision.models

    assert resolve_callable("torchvision.models:resnet50") is torchvision.models.resnet50
    assert resolve_callable("os.path:join") is os.path.join
    assert resolve_callable("prunekit.zoo:UNet.forward") is resolve_callable("prunekit.zoo.unet:UNet").forward


@pytest.mark.parametrize("spec", ["prunekit.zoo.unet", "prunekit.zoo:", ":unet", "a b:c", "pkg:fn:x", "", "1mod:fn"])
def test_resolve_callable_bad_format(spec):
    with pytest.raises(UsageError) as ei:
        resolve_callable(spec)
    assert "package.module:function" in _one_sentence(ei)


def test_resolve_callable_missing_module():
    with pytest.raises(PrunekitError) as ei:
        resolve_callable("no_such_pkg_xyz.models:net")
    assert "'no_such_pkg_xyz.models'" in _one_sentence(ei) and "cannot be found" in str(ei.value)


def test_resolve_callable_missing_attribute_suggests():
    with pytest.raises(PrunekitError) as ei:
        resolve_callable("prunekit.zoo:unett")
    msg = _one_sentence(ei)
    assert "no attribute 'unett'" in msg and "did you mean 'unet'" in msg


def test_resolve_callable_not_callable():
    with pytest.raises(PrunekitError) as ei:
        resolve_callable("prunekit.loading:CHECKPOINT_KEYS")
    assert "not a function or class" in _one_sentence(ei)


def test_resolve_callable_broken_module(tmp_path, monkeypatch):
    (tmp_path / "broken_mod_pk.py").write_text("import not_installed_dep_pk\n")
    (tmp_path / "raising_mod_pk.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PrunekitError) as ei:
        resolve_callable("broken_mod_pk:f")
    assert "needs 'not_installed_dep_pk'" in _one_sentence(ei)
    with pytest.raises(PrunekitError) as ei:
        resolve_callable("raising_mod_pk:f")
    assert "boom at import" in _one_sentence(ei)
    sys.modules.pop("broken_mod_pk", None)
    sys.modules.pop("raising_mod_pk", None)


# ---------------------------------------------------------------- load_model


def test_state_dict_round_trip(tmp_path, trained_unet):
    path = tmp_path / "w.pt"
    torch.save(trained_unet.state_dict(), path)
    before = path.read_bytes()
    model = load_model(path, builder="prunekit.zoo:unet", kwargs=UNET_KW)
    assert isinstance(model, type(trained_unet)) and not model.training
    _same_weights(model, trained_unet)
    x = torch.randn(1, 3, 16, 16)
    trained_unet.eval()
    torch.testing.assert_close(model(x), trained_unet(x), rtol=0, atol=0)
    assert path.read_bytes() == before  # the input is never touched


def test_kwargs_as_json_string(tmp_path, trained_unet):
    path = tmp_path / "w.pth"
    torch.save(trained_unet.state_dict(), path)
    model = load_model(str(path), builder="prunekit.zoo:unet", kwargs=json.dumps(UNET_KW))
    _same_weights(model, trained_unet)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_checkpoint_wrappers(tmp_path, trained_unet, key):
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, key: trained_unet.state_dict(), "best_acc": 0.9}, path)
    _same_weights(load_model(path, "prunekit.zoo:unet", UNET_KW), trained_unet)


def test_dataparallel_prefix(tmp_path, trained_unet):
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in trained_unet.state_dict().items()}, path)
    _same_weights(load_model(path, "prunekit.zoo:unet", UNET_KW), trained_unet)


def test_safetensors(tmp_path, trained_unet):
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "w.safetensors"
    st.save_file({k: v.contiguous() for k, v in trained_unet.state_dict().items()}, str(path))
    _same_weights(load_model(path, "prunekit.zoo:unet", UNET_KW), trained_unet)
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(PrunekitError) as ei:
        load_model(path, "prunekit.zoo:unet", UNET_KW)
    assert "safetensors" in _one_sentence(ei)


@pytest.mark.parametrize("make", [lambda m: torch.jit.trace(m, torch.randn(1, 3, 16, 16)),
                                  lambda m: torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))])
def test_torchscript_is_named_not_called_corrupt(tmp_path, trained_unet, make):
    path = tmp_path / "scripted.pt"
    torch.jit.save(make(trained_unet.eval()), str(path))
    before = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing from torch.load's own TorchScript warning either
        with pytest.raises(PrunekitError) as ei:
            load_model(path, "prunekit.zoo:unet", UNET_KW, trusted=True)
    assert "is a TorchScript archive" in _one_sentence(ei) and "state_dict" in str(ei.value)
    assert path.read_bytes() == before


def test_torchvision_builder(tmp_path):
    import torchvision.models

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)
    model = load_model(path, builder="torchvision.models:resnet18", kwargs={"num_classes": 5})
    _same_weights(model, ref)


def test_pickled_module_refused_without_trusted(tmp_path, trained_unet):
    path = tmp_path / "whole.pt"
    torch.save(trained_unet, path)
    with pytest.raises(PrunekitError) as ei:
        load_model(path)
    msg = _one_sentence(ei)
    assert "pickled module" in msg and "prunekit.zoo.unet.UNet" in msg and "--trusted" in msg
    with pytest.raises(PrunekitError):  # a builder does not make it safe
        load_model(path, builder="prunekit.zoo:unet", kwargs=UNET_KW)


def test_pickled_module_loaded_with_trusted(tmp_path, trained_unet):
    path = tmp_path / "whole.pt"
    torch.save(trained_unet, path)
    model = load_model(path, trusted=True)
    assert isinstance(model, type(trained_unet)) and not model.training
    _same_weights(model, trained_unet)
    rebuilt = load_model(path, builder="prunekit.zoo:unet", kwargs=UNET_KW, trusted=True)
    assert rebuilt is not model
    _same_weights(rebuilt, trained_unet)


def test_checkpoint_with_objects_refused(tmp_path, trained_unet):
    import argparse

    path = tmp_path / "ckpt.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": trained_unet.state_dict()}, path)
    with pytest.raises(PrunekitError) as ei:
        load_model(path, "prunekit.zoo:unet", UNET_KW)
    msg = _one_sentence(ei)
    assert "argparse.Namespace" in msg and "--trusted" in msg
    _same_weights(load_model(path, "prunekit.zoo:unet", UNET_KW, trusted=True), trained_unet)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(PrunekitError) as ei:
        load_model(tmp_path / "nope.pt", "prunekit.zoo:unet")
    assert "does not exist" in _one_sentence(ei)
    with pytest.raises(PrunekitError) as ei:
        load_model(tmp_path, "prunekit.zoo:unet")
    assert "is a directory" in _one_sentence(ei)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a checkpoint at all" * 10, b"PK\x03\x04garbage", b"\x80\x02}q\x00(X"],
    ids=["empty", "text", "fake-zip", "truncated-pickle"],
)
def test_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(PrunekitError) as ei:
        load_model(path, "prunekit.zoo:unet")
    msg = _one_sentence(ei)
    assert "bad.pt" in msg and ("corrupt" in msg or "empty" in msg)


def test_truncated_checkpoint(tmp_path, trained_unet):
    path = tmp_path / "cut.pt"
    torch.save(trained_unet.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PrunekitError) as ei:
        load_model(path, "prunekit.zoo:unet", UNET_KW)
    assert "damaged or truncated" in _one_sentence(ei)


def test_state_dict_without_builder(tmp_path, trained_unet):
    path = tmp_path / "w.pt"
    torch.save(trained_unet.state_dict(), path)
    with pytest.raises(UsageError) as ei:
        load_model(path)
    assert "--builder" in _one_sentence(ei)


def test_mismatched_weights_one_sentence(tmp_path, trained_unet):
    path = tmp_path / "w.pt"
    torch.save(trained_unet.state_dict(), path)
    with pytest.raises(PrunekitError) as ei:  # wider model: shape mismatches
        load_model(path, "prunekit.zoo:unet", {**UNET_KW, "width": 4})
    msg = _one_sentence(ei)
    assert "shape mismatch" in msg and "is (2, 3, 3, 3) in the file but (4, 3, 3, 3) in the model" in msg
    with pytest.raises(PrunekitError) as ei:  # deeper model: missing keys
        load_model(path, "prunekit.zoo:unet", {**UNET_KW, "depth": 3})
    msg = _one_sentence(ei)
    assert "missing key" in msg and "enc3" in msg
    with pytest.raises(PrunekitError) as ei:  # other architecture: both kinds
        load_model(path, "prunekit.zoo:small_cnn")
    msg = _one_sentence(ei)
    assert "missing key" in msg and "unexpected key" in msg


def test_dict_without_weights(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 1, "lr": 0.1}, path)
    with pytest.raises(PrunekitError) as ei:
        load_model(path, "prunekit.zoo:unet")
    assert "'epoch'" in _one_sentence(ei)


def test_builder_problems(tmp_path):
    with pytest.raises(PrunekitError) as ei:
        load_model(None, builder="os.path:join")  # join() needs arguments
    assert "rejected its arguments" in _one_sentence(ei)
    with pytest.raises(PrunekitError) as ei:
        load_model(None, builder="builtins:dict")
    assert "not a torch.nn.Module" in _one_sentence(ei)
    with pytest.raises(PrunekitError) as ei:
        load_model(None, builder="prunekit.zoo:unet", kwargs={"upsampling": "cubic"})
    assert "ValueError" in _one_sentence(ei)
    with pytest.raises(PrunekitError) as ei:
        load_model(None, builder="prunekit.zoo:unet", kwargs={"no_such_arg": 1})
    assert "no_such_arg" in _one_sentence(ei)
    with pytest.raises(UsageError):
        load_model(None)
    with pytest.raises(UsageError):
        load_model(None, builder="prunekit.zoo:unet", kwargs="[1, 2]")
    with pytest.raises(UsageError):
        load_model(None, builder="prunekit.zoo:unet", kwargs="{width: 2}")


def test_random_init_from_builder():
    model = load_model(None, builder="prunekit.zoo:small_cnn", kwargs={"width": 4})
    assert isinstance(model, nn.Module) and model.fc1.in_features == 16 * 9


def test_parse_kwargs():
    assert parse_kwargs(None) == {} and parse_kwargs("") == {}
    assert parse_kwargs('{"a": 1, "b": [2]}') == {"a": 1, "b": [2]}
    assert parse_kwargs({"a": 1}) == {"a": 1}
    with pytest.raises(UsageError) as ei:
        parse_kwargs("{'a': 1}")
    assert "not valid JSON" in _one_sentence(ei)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "text,shape",
    [
        ("1,3,256,256", (1, 3, 256, 256)),
        ("1x3x256x256", (1, 3, 256, 256)),
        ("1X3X64X64", (1, 3, 64, 64)),
        (" 2, 1, 28, 28 ", (2, 1, 28, 28)),
        ("(1, 3, 32, 32)", (1, 3, 32, 32)),
        ("[4,16]", (4, 16)),
        ((1, 3, 8, 8), (1, 3, 8, 8)),
    ],
)
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "3", "1,3,,256", "1,3,a,256", "1.5,3,4,4", "1,3,0,4", "1,-3,4,4", "1;3;4;4"])
def test_parse_input_shape_errors(text):
    with pytest.raises(UsageError) as ei:
        parse_input_shape(text)
    _one_sentence(ei)


# ---------------------------------------------------------------- atomic writes


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_atomic_writes_success(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    atomic_save_torch({"w": torch.arange(3)}, tmp_path / "c.pt")
    save_json(tmp_path / "d.json", {"p": tmp_path, "t": torch.tensor(2.5), "s": {3, 1}, "n": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.arange(3))
    text = (tmp_path / "d.json").read_text()
    assert text.endswith("\n") and '\n  "t": 2.5' in text
    assert json.loads(text) == {"p": str(tmp_path), "t": 2.5, "s": [1, 3], "n": [1, 2]}
    assert _leftovers(tmp_path) == []
    mode = stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_atomic_write_replaces_existing(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and _leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_original(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("original")
    with pytest.raises(TypeError):
        save_json(path, {"bad": object()})
    with pytest.raises(Exception):
        atomic_save_torch(lambda: None, path)  # lambdas cannot be pickled
    assert path.read_text() == "original"
    assert _leftovers(tmp_path) == []


def test_atomic_write_missing_directory(tmp_path):
    with pytest.raises(PrunekitError) as ei:
        atomic_write_text(tmp_path / "no" / "f.txt", "x")
    assert "does not exist" in _one_sentence(ei)


def test_atomic_dir_success_and_failure(tmp_path):
    final = tmp_path / "runs" / "r1"
    with atomic_dir(final) as d:
        assert d.parent == final.parent and d != final and not final.exists()
        (d / "model.pt").write_bytes(b"x")
        (d / "sub").mkdir()
    assert (final / "model.pt").read_bytes() == b"x" and (final / "sub").is_dir()
    assert _leftovers(final.parent) == []

    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "runs" / "r2") as d:
            (d / "partial").write_text("half")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "runs" / "r2").exists()
    assert _leftovers(final.parent) == []


def test_atomic_dir_existing(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    with atomic_dir(final) as d:  # an empty directory is simply replaced
        (d / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(PrunekitError) as ei:
        with atomic_dir(final):
            pass
    assert "already exists" in _one_sentence(ei)
    with pytest.raises(ValueError):
        with atomic_dir(final, overwrite=True) as d:
            (d / "b").write_text("2")
            raise ValueError
    assert sorted(p.name for p in final.iterdir()) == ["a"]  # untouched on failure
    with atomic_dir(final, overwrite=True) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_small", "densenet121", "efficientnet_b0"])
def test_torchvision_zoo_round_trip(tmp_path, name):
    import torchvision.models

    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(num_classes=7).eval()
    path = tmp_path / f"{name}.pt"
    atomic_save_torch({"model": ref.state_dict(), "epoch": 90}, path)
    model = load_model(path, builder=f"torchvision.models:{name}", kwargs={"num_classes": 7})
    _same_weights(model, ref)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
