"""The offline datasets and the demo's configuration."""

import importlib.util

from pathlib import Path

import pytest
import torch

import prunekit
import prunekit.data.datasets
from prunekit.demo import demo_config

needs_stardist = pytest.mark.skipif(importlib.util.find_spec("stardist") is None,
                                    reason="the stardist wheel (make venv installs it) carries the nuclei data")


@needs_stardist
def test_nuclei_tiles_split_and_shapes():
    train = prunekit.data.datasets.nuclei_tiles("train", tile=64, batch_size=8)
    test = prunekit.data.datasets.nuclei_tiles("test", tile=64, batch_size=8)
    assert sum(len(x) for x, _ in train) == 48 and sum(len(x) for x, _ in test) == 16
    x, y = train[0]
    assert x.shape == (8, 1, 64, 64) and y.shape == (8, 64, 64)
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and set(y.unique().tolist()) <= {0, 1}
    big = prunekit.data.datasets.nuclei_tiles("all", tile=128)
    assert sum(len(x) for x, _ in big) == 16
    assert 0.05 < float(torch.cat([y for _, y in big]).float().mean()) < 0.5  # nuclei cover ~20%


def test_fashion_mnist_missing_is_one_sentence(monkeypatch, tmp_path):
    monkeypatch.setattr(prunekit.data.datasets, "FASHION_MNIST_DIRS", (str(tmp_path),))
    monkeypatch.delenv("PRUNEKIT_FASHION_MNIST", raising=False)
    with pytest.raises(prunekit.PrunekitError, match="Fashion-MNIST not found"):
        prunekit.data.datasets.fashion_mnist("train", limit=10)


def test_demo_config_is_the_shipped_unet_config():
    from prunekit.demo import CONFIG

    assert CONFIG.resolve() == Path("configs/unet.yaml").resolve()
    raw = demo_config()
    from_dict = prunekit.load_config({**raw, "data": {**raw["data"], "root": str(CONFIG.parent)}})
    assert from_dict == prunekit.load_config("configs/unet.yaml")  # a YAML file's data paths start at its folder


@pytest.mark.slow
@needs_stardist
def test_demo_end_to_end(tmp_path):
    from prunekit.demo import run_demo

    lines = []
    numbers = run_demo(tmp_path / "demo", train_iterations=60, progress=False, echo=lines.append)
    assert numbers["targets_met"]
    assert numbers["after"]["flops"] <= 0.5 * numbers["before"]["flops"]
    assert numbers["after"]["iou"] > 0.5
    assert prunekit.load_pruned(tmp_path / "demo" / "run")(torch.rand(1, 1, 64, 64)).shape == (1, 2, 64, 64)
