"""Batches for calibration, fine-tuning and validation, from folders or factories.

A batch is an input tensor, or a tuple/list whose first element is the input
(and, for training, whose second is the target). Folder data is read once
into memory: prunekit's data needs (calibration, short fine-tunes) are small.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataSource
from .errors import PrunekitError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class DataError(PrunekitError):
    """Data that cannot be read or does not fit the model."""


def read_image(path: Path) -> np.ndarray:
    """An image as an (H, W) or (H, W, C) array."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image)
    except Exception as exc:  # PIL and tifffile raise many types for bad files
        raise DataError(f"cannot read image '{path}': {exc}.") from None


def to_tensor(image: np.ndarray, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) float in [0, 1], with the model's channel count and spatial size."""
    array = image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        array /= float(np.iinfo(image.dtype).max)
    elif array.max() > 1:
        array /= array.max()
    t = torch.from_numpy(array)
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    if t.shape[0] != channels:
        t = t[:3].mean(0, keepdim=True).expand(channels, -1, -1) if channels != 3 or t.shape[0] < 3 \
            else t[:3]
    if tuple(t.shape[1:]) != tuple(size):
        t = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0]
    return t.contiguous()


def to_mask(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) class indices; 0/255 masks become 0/1, instance labels become foreground."""
    array = image if image.ndim == 2 else image[..., 0]
    values = np.unique(array)
    if set(values.tolist()) <= {0, 255}:
        array = (array > 0)
    elif len(values) > 2 and values.max() > 20:  # instance labels: foreground vs background
        array = (array > 0)
    t = torch.from_numpy(array.astype(np.int64))
    if tuple(t.shape) != tuple(size):
        t = F.interpolate(t[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return t


def _images(folder: str) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder '{folder}' does not exist.")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder '{folder}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return files


def _folder_tensors(source: DataSource, input_shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    channels, size = input_shape[1], tuple(input_shape[2:])
    files = _images(source.images)
    x = torch.stack([to_tensor(read_image(p), channels, size) for p in files])
    if source.masks:
        masks = {p.stem: p for p in _images(source.masks)}
        missing = [p.name for p in files if p.stem not in masks]
        if missing:
            raise DataError(f"no mask in '{source.masks}' for image '{missing[0]}' (masks match images by name).")
        return x, torch.stack([to_mask(read_image(masks[p.stem]), size) for p in files])
    if source.labels:
        path = Path(source.labels)
        if not path.is_file():
            raise DataError(f"label file '{path}' does not exist.")
        with path.open(newline="") as handle:
            rows = {r[0].strip(): r[1].strip() for r in csv.reader(handle) if len(r) >= 2}
        names = sorted(set(rows.values()))
        lookup = {n: int(n) if n.isdigit() else names.index(n) for n in names}
        missing = [p.name for p in files if p.name not in rows and p.stem not in rows]
        if missing:
            raise DataError(f"label file '{path}' has no label for '{missing[0]}'.")
        y = torch.tensor([lookup[rows.get(p.name, rows.get(p.stem))] for p in files])
        return x, y
    return x, None


class Batches:
    """A re-iterable source of batches: every pass yields the same data in the same order."""

    def __init__(self, make: Callable[[], Iterable], limit: int | None = None):
        self._make = make
        self.limit = limit

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(self._make()):
            if self.limit is not None and i >= self.limit:
                return
            yield batch

    def inputs(self) -> Iterator[torch.Tensor]:
        for batch in self:
            yield first_input(batch)


def first_input(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("image", batch.get("input")), torch.Tensor):
        return batch.get("image", batch.get("input"))
    raise DataError("a batch must be a tensor or a tuple/list whose first element is the input tensor.")


def tensor_batches(x: torch.Tensor, y: torch.Tensor | None, batch_size: int) -> Callable[[], Iterable]:
    def make():
        for start in range(0, len(x), batch_size):
            stop = start + batch_size
            yield x[start:stop] if y is None else (x[start:stop], y[start:stop])

    return make


def load_batches(source: DataSource | None, input_shape, what: str) -> Batches | None:
    """The batches a config's data source describes (None when not configured)."""
    if source is None:
        return None
    if source.factory:
        from .io import resolve_callable

        factory = resolve_callable(source.factory)
        try:
            produced = factory(**source.kwargs)
        except Exception as exc:
            raise DataError(f"data.{what}.factory '{source.factory}' failed: {exc}.") from None
        if produced is None or not hasattr(produced, "__iter__"):
            raise DataError(f"data.{what}.factory '{source.factory}' must return a DataLoader or an iterable of batches.")
        if iter(produced) is produced:  # a one-shot iterator: keep it for every pass
            produced = list(produced)
        batches = Batches(lambda: produced, source.limit)
    elif source.images:
        if input_shape is None:
            raise DataError("input_shape is needed to read images from a folder.")
        x, y = _folder_tensors(source, input_shape)
        batches = Batches(tensor_batches(x, y, source.batch_size), source.limit)
    else:
        raise DataError(f"data.{what} needs 'images' (a folder) or 'factory'.")
    first = next(iter(batches), None)
    if first is None:
        raise DataError(f"data.{what} yields no batches.")
    first_input(first)
    return batches
