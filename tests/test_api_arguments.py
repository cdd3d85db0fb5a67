"""The public functions refuse a caller's mistake in one sentence (a PrunekitError naming what is wrong),
never with an error from deep inside torch or numpy, and never by quietly doing something else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import prunekit


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


X = torch.randn(1, 3, 16, 16)
GRAPH = prunekit.build_graph(net(), X)


def wider() -> nn.Sequential:
    model = net()
    model[0], model[1], model[3] = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)
    return model.eval()


CASES = {
    "input None": (lambda: prunekit.build_graph(net(), None), "example_inputs must be a tensor"),
    "input array": (lambda: prunekit.count_flops_params(net(), X.numpy()), "got ndarray"),
    "input dict": (lambda: prunekit.remove_channels(net(), {"x": X}, {"0": [0]}), "pass a dict input as (inputs,)"),
    "latency input": (lambda: prunekit.measure_latency(net(), None, repeats=3), "example_inputs"),
    "model None": (lambda: prunekit.build_graph(None, X), "must be a torch.nn.Module, got NoneType"),
    "model class": (lambda: prunekit.count_flops_params(nn.Conv2d, X), "got the class Conv2d"),
    "latency model": (lambda: prunekit.measure_latency(None, X, repeats=3), "got NoneType"),
    "scripted": (lambda: prunekit.build_graph(torch.jit.trace(net(), X), X), "TorchScript module"),
    "model fails": (lambda: prunekit.measure_latency(net(), torch.randn(1, 5, 16, 16), repeats=3),
                    "fails on the example input"),
    "index str": (lambda: GRAPH.coupled_channels("0", "1"), "whole numbers, got '1'"),
    "index float": (lambda: prunekit.remove_channels(net(), X, {"0": [1.5]}), "whole numbers, got 1.5"),
    "index bool": (lambda: GRAPH.coupled_channels("0", True), "whole numbers, got True"),
    "indices str": (lambda: prunekit.remove_channels(net(), X, {"0": "03"}), "must be a list of indices"),
    "indices int": (lambda: prunekit.remove_channels(net(), X, {"0": 3}), "must be a list of indices"),
    "nested": (lambda: prunekit.remove_channels(net(), X, {"0": [[0, 1]]}), "whole numbers, got [0, 1]"),
    "not a mapping": (lambda: prunekit.remove_channels(net(), X, [("0", [0])]), "must map producer names"),
    "name None": (lambda: GRAPH.coupled_channels(None, 0), "named by a string"),
    "graph of another model": (lambda: prunekit.remove_channels(wider(), X, {"0": [12]}, graph=GRAPH),
                               "graph was built from another model"),
    "graph of another input": (lambda: prunekit.count_flops_params(net(), torch.randn(1, 3, 32, 32), graph=GRAPH),
                               "built for an input of shape [1, 3, 16, 16]"),
    "graph str": (lambda: prunekit.count_flops_params(net(), X, graph="g"), "must be a ChannelGraph"),
    "leaf typo": (lambda: prunekit.build_graph(net(), X, leaf_modules=["conv9"]), "not a submodule"),
    "leaf string": (lambda: prunekit.build_graph(net(), X, leaf_modules="30"), "write ['30']"),
    "rtol": (lambda: prunekit.export_onnx(net(), X, "never.onnx", rtol=-1, repeats=0), "rtol must be"),
    "run_dir": (lambda: prunekit.prune(net(), X, {"importance": {"method": "l1"}}, run_dir=123, progress=False),
                "run_dir must be a path"),
    "load None": (lambda: prunekit.load_pruned(None), "run_dir must be a path"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mistake_is_one_sentence(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    call, fragment = CASES[case]
    with pytest.raises(prunekit.PrunekitError) as info:
        call()
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    assert not list(tmp_path.iterdir())  # nothing written


def test_argument_errors_are_type_errors_too():
    with pytest.raises(TypeError):
        prunekit.build_graph(net(), None)


def test_numpy_indices_are_indices():
    small = prunekit.remove_channels(net(), X, {"0": np.array([0, 3])})
    assert small[0].out_channels == 6


def test_channels_last_weights_stay_channels_last():
    model = net().to(memory_format=torch.channels_last)
    small = prunekit.remove_channels(model, X, {"0": [0, 1]})
    assert small[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert small[0].weight.shape == (6, 3, 3, 3)
