"""Image folders as data: the three layouts, lazy reading, normalisation, resizing only when asked,
paths relative to the config file, and every bad folder refused before any work, naming the key."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import prunekit
from prunekit.config import DataSource
from prunekit.data import FolderDataset, load_batches
from prunekit.data import folders as folders_module
from prunekit.data.images import DataError

SHAPE = [1, 3, 16, 16]


def rgb(path, size=(16, 16), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return array


def indexed_mask(path, classes, size=(16, 16), seed=0):
    """A palette ('P' mode) mask whose palette index is the class id; its colours are arbitrary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(seed).integers(0, classes, size, dtype=np.uint8)
    image = Image.fromarray(ids, mode="P")
    image.putpalette([0, 0, 0, 200, 30, 30, 30, 200, 30, 30, 30, 200])
    image.save(path)
    return ids


def segmentation(root, n=5, suffix=".png", classes=3):
    ids = {}
    for i in range(n):
        rgb(root / "imgs" / f"im{i}.png", seed=i)
        ids[f"im{i}"] = indexed_mask(root / "masks" / f"im{i}{suffix}", classes, seed=100 + i)
    return ids


def batches(root, what="train", shape=SHAPE, **source):
    return load_batches(DataSource(**source), shape, what, str(root))


def refused(root, fragment, what="train", shape=SHAPE, **source):
    with pytest.raises(DataError) as info:
        batches(root, what, shape, **source)
    assert fragment in str(info.value), str(info.value)
    return info.value


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_indexed_masks_give_class_ids_and_images_stream(tmp_path, suffix, monkeypatch):
    ids = segmentation(tmp_path, suffix=suffix)
    reads = []
    real = folders_module.read_image
    monkeypatch.setattr(folders_module, "read_image", lambda p, **kw: reads.append(p.name) or real(p, **kw))
    data = batches(tmp_path, images="imgs", masks="masks", batch_size=2)
    assert isinstance(data.dataset, FolderDataset) and len(data.dataset) == 5  # a Dataset read by a DataLoader
    assert len(reads) == 4  # the check read the first batch (2 images, 2 masks), nothing more
    got = list(data)
    assert [len(x) for x, _ in got] == [2, 2, 1] and data.length == 3
    masks = torch.cat([y for _, y in got])
    assert masks.dtype == torch.int64
    assert torch.equal(masks, torch.from_numpy(np.stack([ids[f"im{i}"] for i in range(5)]).astype(np.int64)))
    assert set(masks.unique().tolist()) == {0, 1, 2}  # the palette index, not its colour


def test_pixels_scaled_and_normalized(tmp_path):
    array = rgb(tmp_path / "imgs" / "a.png")
    (x,) = list(batches(tmp_path, "calibration", images="imgs"))
    assert torch.allclose(x[0], torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    (n,) = list(batches(tmp_path, "calibration", images="imgs", normalize="imagenet"))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(n[0], (x[0] - mean.view(3, 1, 1)) / std.view(3, 1, 1), atol=1e-6)
    custom = prunekit.config.Normalize(mean=[0.5], std=[0.25])
    (c,) = list(batches(tmp_path, "calibration", images="imgs", normalize=custom))
    assert torch.allclose(c, (x - 0.5) / 0.25, atol=1e-6)
    refused(tmp_path, "normalize 'imagenet' has 3 values per channel, but the model takes 1", "calibration",
            [1, 1, 16, 16], images="imgs", normalize="imagenet")


def test_sixteen_bit_and_grey_images(tmp_path):
    grey = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 250)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(grey).save(tmp_path / "imgs" / "a.png")
    (x,) = list(batches(tmp_path, "calibration", images="imgs"))  # grey feeds 3 channels, repeated
    assert x.shape == (1, 3, 16, 16)
    assert torch.allclose(x[0, 2], torch.from_numpy(grey.astype(np.float32) / 65535))


def test_resizes_only_when_asked(tmp_path):
    rgb(tmp_path / "imgs" / "a.png", size=(20, 24))
    indexed_mask(tmp_path / "masks" / "a.png", 2, size=(20, 24))
    error = refused(tmp_path, "is 20x24, but the input_shape is 16x16; set data.train.size: [16, 16]",
                    images="imgs", masks="masks")
    assert "a.png" in str(error) and error.key == "data.train.size"
    ((x, y),) = list(batches(tmp_path, images="imgs", masks="masks", size=[16, 16]))
    assert x.shape == (1, 3, 16, 16) and y.shape == (1, 16, 16) and set(y.unique().tolist()) <= {0, 1}
    indexed_mask(tmp_path / "masks" / "a.png", 2, size=(10, 12))
    refused(tmp_path, "is 10x12, but its image 'a.png' is 20x24", images="imgs", masks="masks", size=[16, 16])


def test_class_subfolders_are_labels(tmp_path):
    for name, count in (("dog", 2), ("cat", 3)):
        for i in range(count):
            rgb(tmp_path / "root" / name / f"{name}{i}.jpg", seed=i)
    ((x, y),) = list(batches(tmp_path, images="root", batch_size=8))
    assert x.shape == (5, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1]  # cat = 0, dog = 1: sorted names
    (tmp_path / "root" / "empty").mkdir()
    refused(tmp_path, "class folder 'empty'", images="root")


def test_labels_from_a_csv(tmp_path):
    for i in range(3):
        rgb(tmp_path / "imgs" / f"im{i}.png", seed=i)
    (tmp_path / "labels.csv").write_text("file,label\nim0.png,zebra\nim1,ant\nim2.png,zebra\n")
    ((_, y),) = list(batches(tmp_path, images="imgs", labels="labels.csv"))
    assert y.tolist() == [1, 0, 1]  # names sorted into ids; rows by file name or stem; a header is skipped
    (tmp_path / "labels.csv").write_text("im0.png,1\nim1.png,0\nim2.png,1\nim9.png,0\n")
    refused(tmp_path, "line 4 names 'im9.png', which is not an image in 'imgs'", images="imgs", labels="labels.csv")
    (tmp_path / "labels.csv").write_text("im0.png,1\n")
    refused(tmp_path, "has no label for 2 images: 'im1.png', 'im2.png'", images="imgs", labels="labels.csv")
    refused(tmp_path, "label file 'nope.csv' (resolved to", images="imgs", labels="nope.csv")


def test_train_without_targets_names_masks_and_labels(tmp_path):
    rgb(tmp_path / "imgs" / "a.png")
    error = refused(tmp_path, "data.train has images but no targets: add data.train.masks", images="imgs")
    assert "data.train.labels" in str(error) and error.key == "data.train.masks"
    refused(tmp_path, "data.val has images but no targets", "val", images="imgs")
    assert len(list(batches(tmp_path, "calibration", images="imgs"))) == 1  # calibration needs no targets


def test_masks_that_do_not_pair_name_the_stems(tmp_path):
    segmentation(tmp_path, n=3)
    (tmp_path / "masks" / "im1.png").rename(tmp_path / "masks" / "im1_mask.png")
    refused(tmp_path, "1 of 3 images have no mask of the same file stem in 'masks' (resolved to "
            f"{tmp_path / 'masks'}): 'im1'; masks without an image: 'im1_mask'", images="imgs", masks="masks")
    (tmp_path / "empty").mkdir()
    refused(tmp_path, "mask folder 'empty'", images="imgs", masks="empty")


@pytest.mark.parametrize("make, fragment", [
    (lambda root: None, "image folder 'imgs' (resolved to"),
    (lambda root: (root / "imgs").mkdir(), "holds no images"),
    (lambda root: (root / "imgs").write_text("x"), "is a file, not a folder"),
    (lambda root: ((root / "imgs").mkdir(), (root / "imgs" / "c.png").write_bytes(b"not a png")),
     "cannot read image"),
    (lambda root: rgb(root / "imgs" / "c.png", (16, 16)) is None or Image.fromarray(
        np.zeros((16, 16, 3), np.uint8)).save(root / "imgs" / "c.jpg"), "holds both 'c.jpg' and 'c.png'"),
])
def test_bad_folders_are_one_sentence(tmp_path, make, fragment):
    make(tmp_path)
    (tmp_path / "labels.csv").write_text("c.png,0\n")
    refused(tmp_path, fragment, images="imgs", labels="labels.csv")


def test_paths_start_at_the_config_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    segmentation(project / "data", n=2)
    config = {"input_shape": SHAPE, "data": {"train": {"images": "data/imgs", "masks": "data/masks"}}}
    (project / "configs").mkdir()
    (project / "configs" / "c.yaml").write_text(yaml.safe_dump(
        {**config, "data": {**config["data"], "root": ".."}}))
    (project / "plain.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)  # neither file's folder
    for path in (project / "plain.yaml", "project/configs/c.yaml"):
        cfg = prunekit.load_config(path)
        assert cfg.data.root == str(project)
        assert len(list(load_batches(cfg.data.train, SHAPE, "train", cfg.data.root))) == 1
    cfg = prunekit.load_config(config)  # a dict: relative to the current directory
    with pytest.raises(DataError, match=f"'data/imgs' \\(resolved to {tmp_path}/data/imgs\\) does not exist"):
        load_batches(cfg.data.train, SHAPE, "train", cfg.data.root)
    monkeypatch.chdir(project)
    assert len(list(load_batches(cfg.data.train, SHAPE, "train", cfg.data.root))) == 1


@pytest.mark.parametrize("source, fragment", [
    ({"images": "a", "factory": "m:f"}, "sets both images and factory"),
    ({"images": "a", "masks": "m", "labels": "l.csv"}, "sets both masks"),
    ({"factory": "m:f", "normalize": "imagenet"}, "'data.train.normalize' applies to an image folder"),
    ({"images": "a", "kwargs": {"x": 1}}, "'data.train.kwargs' applies to a factory"),
    ({"batch_size": 2}, "needs images (a folder) or factory"),
    ({"images": "a", "normalize": {"mean": [0.5, 0.5], "std": [1, 1, 1]}}, "2 means and 3 standard deviations"),
    ({"images": "a", "normalize": {"mean": [0.5], "std": [0]}}, "each above 0"),
    ({"images": "a", "normalize": "imagenett"}, "must be a mapping or 'imagenet'"),
    ({"images": "a", "size": [16]}, "two positive integers"),
    ({"images": "a", "workers": -1}, "'data.train.workers' must be"),
])
def test_data_config_checks(source, fragment):
    with pytest.raises(prunekit.PrunekitError, match=None) as info:
        prunekit.load_config({"data": {"train": source}})
    assert fragment in str(info.value)


def test_unknown_source_key_keeps_its_suggestion():
    with pytest.raises(prunekit.PrunekitError, match="did you mean 'data.calibration.images'"):
        prunekit.load_config({"data": {"calibration": {"imgs": "x"}}})


def test_worker_processes_read_and_their_errors_stay_one_sentence(tmp_path):
    for i in range(4):
        rgb(tmp_path / "imgs" / f"im{i}.png", seed=i)
    data = batches(tmp_path, "calibration", images="imgs", batch_size=1, workers=2)
    serial = batches(tmp_path, "calibration", images="imgs", batch_size=1)
    assert all(torch.equal(a, b) for a, b in zip(data, serial, strict=True))
    (tmp_path / "imgs" / "im3.png").write_bytes(b"\x89PNG truncated")  # its header read, its pixels do not
    with pytest.raises(DataError) as info:
        list(data)
    assert str(info.value).startswith("cannot read image") and "\n" not in str(info.value)


def test_a_volume_model_is_pointed_to_a_factory(tmp_path):
    rgb(tmp_path / "imgs" / "a.png")
    error = refused(tmp_path, "not [1, 1, 8, 8, 8]; for volumes or other inputs, set data.calibration.factory",
                    "calibration", [1, 1, 8, 8, 8], images="imgs")
    assert error.key == "data.calibration.images"
