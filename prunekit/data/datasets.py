"""Real data available offline, as data factories for configs.

- ``nuclei_tiles``: the DSB2018 nuclei image and its hand-drawn instance mask
  that ship inside the ``stardist`` wheel (``pip install --no-deps
  stardist==0.9.2``), cut into 16 tiles of 128x128; tiles 0-11 train, 12-15 test.
- ``fashion_mnist``: Fashion-MNIST IDX files, as Debian's
  ``dataset-fashion-mnist`` package installs them
  (/usr/share/datasets/fashion-mnist), or any folder in $PRUNEKIT_FASHION_MNIST.

Each returns a list of batches: ``(images, targets)`` tuples of tensors.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from .images import DataError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)


def _stardist_images() -> Path:
    spec = importlib.util.find_spec("stardist")  # locate only: importing stardist needs TensorFlow
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the nuclei data ships in the stardist wheel; install it with "
                        "`pip install --no-deps stardist==0.9.2`.")
    return Path(spec.submodule_search_locations[0]) / "data" / "images"


def nuclei_tiles(split: str = "train", tile: int = 128, batch_size: int = 4, channels: int = 1) -> list:
    """Nuclei segmentation tiles: images (N, channels, tile, tile) in [0, 1], masks (N, tile, tile) in {0, 1}."""
    import tifffile

    folder = _stardist_images()
    image = tifffile.imread(folder / "img2d.tif").astype(np.float32)
    mask = tifffile.imread(folder / "mask2d.tif") > 0
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
    rows, cols = image.shape[0] // tile, image.shape[1] // tile
    tiles = [(image[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile], mask[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
             for r in range(rows) for c in range(cols)]
    cut = len(tiles) * 3 // 4
    chosen = {"train": tiles[:cut], "test": tiles[cut:], "all": tiles}.get(split)
    if chosen is None:
        raise DataError(f"nuclei_tiles split must be 'train', 'test' or 'all', got {split!r}.")
    x = torch.from_numpy(np.stack([t for t, _ in chosen]))[:, None].expand(-1, channels, -1, -1).contiguous()
    y = torch.from_numpy(np.stack([m for _, m in chosen]).astype(np.int64))
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion_dir() -> Path:
    for candidate in filter(None, (os.environ.get("PRUNEKIT_FASHION_MNIST"), *FASHION_MNIST_DIRS)):
        if Path(candidate, "train-images-idx3-ubyte.gz").is_file():
            return Path(candidate)
    raise DataError("Fashion-MNIST not found; install Debian's dataset-fashion-mnist package or set "
                    "PRUNEKIT_FASHION_MNIST to a folder with its IDX files.")


def fashion_mnist(split: str = "train", limit: int | None = None, batch_size: int = 64, offset: int = 0) -> list:
    """Fashion-MNIST batches: images (N, 1, 28, 28) in [0, 1], labels (N,)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"fashion_mnist split must be 'train' or 'test', got {split!r}.")
    folder = _fashion_dir()
    images = _idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    stop = None if limit is None else offset + limit
    x = torch.from_numpy(images[offset:stop].astype(np.float32) / 255.0)[:, None]
    y = torch.from_numpy(labels[offset:stop].astype(np.int64))
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
