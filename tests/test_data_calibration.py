"""No silent noise: a data-driven criterion without data is refused naming the key, random inputs only
when asked (and recorded); every bad data config exits 2 from the CLI before a run directory exists."""

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

import prunekit
from prunekit.cli import main
from prunekit.data.trainer import finetune
from prunekit.zoo import unet

KW = {"in_channels": 1, "num_classes": 2, "width": 4, "depth": 2}
X = torch.rand(1, 1, 32, 32)


def seg_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g)
    return [(x, (x[:, 0] > 0.5).long())]


def config(**changes):
    cfg = {"model": {"builder": "prunekit.zoo:unet", "kwargs": KW}, "input_shape": [1, 1, 32, 32],
           "targets": {"flops": 0.7}, "limits": {"layers": {"out": 0.0}}, "schedule": {"steps": 1}}
    cfg.update(changes)
    return cfg


def model():
    torch.manual_seed(0)
    return unet(**KW).eval()


@pytest.mark.parametrize("method, key", [("ipad", "data.calibration"), ("taylor", "data.train")])
def test_data_driven_criterion_without_data_names_the_key(tmp_path, method, key):
    with pytest.raises(prunekit.PrunekitError) as info:
        prunekit.prune(model(), X, config(importance={"method": method}), run_dir=tmp_path / "run", progress=False)
    assert info.value.key == key and key in str(info.value)
    assert not (tmp_path / "run").exists()
    if method == "ipad":
        assert "data.calibration: random" in str(info.value)


def test_random_calibration_only_when_asked_and_recorded():
    runs = [prunekit.prune(model(), X, config(data={"calibration": "random"}), progress=False) for _ in range(2)]
    assert runs[0].calibration == "random"
    assert runs[0].manifest["modules"] == runs[1].manifest["modules"]  # seeded: the same noise every time


@pytest.mark.parametrize("changes, calibration", [
    ({"data": {"train": {"factory": "tests.test_data_calibration:seg_batches"}}}, "data.train"),
    ({"data": {"calibration": {"factory": "tests.test_data_calibration:seg_batches"}}}, "data.calibration"),
    ({"importance": {"method": "l1"}}, None),
    ({"importance": {"method": "tests.test_data_calibration:ones"}}, "example input"),
])
def test_what_a_run_calibrated_on(changes, calibration):
    assert prunekit.prune(model(), X, config(**changes), progress=False).calibration == calibration


def ones(model, graph, batches):
    assert len(list(batches)) == 1  # the example input
    return {name: [1.0] * len(units) for name, units in graph.producers.items()}


def test_finetune_reads_the_data_again_on_every_pass():
    passes = []

    class Source:
        def __iter__(self):
            passes.append(1)
            return iter(seg_batches())

    torch.manual_seed(0)
    net = unet(**KW)
    finetune(net, Source(), 3, show_progress=False)
    assert len(passes) == 3  # one batch per pass: never listed whole
    finetune(net, iter(seg_batches()), 3, show_progress=False)  # a one-shot iterator still works


# -- the command line: every data error before any work, exit 2, no run directory -------------------


def write_images(folder, n=2, size=32, mode="L"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)).save(folder / f"im{i}.png")


def write_masks(folder, n=2, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        mask = Image.fromarray((np.random.default_rng(i).random((size, size)) > 0.5).astype(np.uint8), mode="P")
        mask.putpalette([0, 0, 0, 255, 255, 255])
        mask.save(folder / f"im{i}.png")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A model file, images and masks under tmp_path/project, the config in project/configs, run from tmp_path."""
    root = tmp_path / "project"
    (root / "configs").mkdir(parents=True)
    torch.save(model().state_dict(), root / "unet.pt")
    write_images(root / "data" / "imgs")
    write_masks(root / "data" / "masks")
    monkeypatch.chdir(tmp_path)
    return root


def prune_cli(root, cfg):
    (root / "configs" / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = root / "fresh" / "run"
    result = CliRunner().invoke(main, ["prune", str(root / "unet.pt"), "-c", str(root / "configs" / "c.yaml"),
                                       "-o", str(out), "-q"])
    return result, out


def test_cli_prunes_from_folders_relative_to_the_config(project):
    data = {"images": "../data/imgs", "masks": "../data/masks", "batch_size": 2}
    cfg = config(data={"calibration": data, "train": data, "val": data},
                 schedule={"steps": 1, "finetune": {"iterations": 2}})
    result, out = prune_cli(project, cfg)
    assert result.exit_code == 0, result.output
    assert (out / "model.pt").is_file()


def corrupt(root):
    (root / "data" / "imgs" / "im1.png").write_bytes(b"\x89PNG broken")


@pytest.mark.parametrize("data, prepare, fragment", [
    ({}, None, "set data.calibration"),
    ({"train": {"images": "../data/imgs"}}, None, "add data.train.masks"),
    ({"calibration": {"images": "../data/nope"}}, None,
     "image folder '../data/nope' (resolved to {root}/data/nope) does not exist"),
    ({"calibration": {"images": "../data/empty"}}, lambda r: (r / "data" / "empty").mkdir(), "holds no images"),
    ({"calibration": {"images": "../data/imgs"}}, corrupt, "cannot read image '{root}/data/imgs/im1.png'"),
    ({"train": {"images": "../data/imgs", "masks": "../data/masks"}},
     lambda r: (r / "data" / "masks" / "im0.png").rename(r / "data" / "masks" / "x.png"), "'im0'"),
    ({"train": {"images": "../data/imgs", "labels": "../labels.csv"}},
     lambda r: (r / "labels.csv").write_text("im0.png,0\nim1.png,1\nim7.png,0\n"), "names 'im7.png'"),
    ({"calibration": {"images": "../data/imgs"}}, lambda r: write_images(r / "data" / "imgs", 3, 24),
     "is 24x24, but the input_shape is 32x32"),
    ({"calibration": {"images": "../data/imgs", "normalize": "imagenet"}}, None, "normalize 'imagenet' has 3"),
])
def test_cli_data_errors_exit_2_and_leave_no_directory(project, data, prepare, fragment):
    if prepare is not None:
        prepare(project)
    result, out = prune_cli(project, config(data=data, importance={"method": "ipad"}))
    assert result.exit_code == 2, result.output
    assert fragment.format(root=project) in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (project / "fresh").exists()


def test_random_batches_follow_the_example_structure():
    from prunekit.data import random_batches

    ids = torch.arange(4)
    data = random_batches((torch.zeros(2, 3), {"ids": ids, "x": torch.zeros(5)}), 7)
    first, second = list(data), list(data)
    assert first[0].shape == (2, 3) and float(first[0].std()) > 0 and first[1]["ids"] is ids
    assert torch.equal(first[1]["x"], second[1]["x"])  # the same noise on every pass
