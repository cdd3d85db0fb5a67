"""Batches for calibration, fine-tuning and validation, from folders or factories.

A batch is an input tensor, or a tuple/list whose first element is the input
(and, for training, whose second is the target). Folder data is read once
into memory: prunekit's data needs (calibration, short fine-tunes) are small.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataSource
from ..errors import PrunekitError
from ..safety import call_user, first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class DataError(PrunekitError):
    """Data that cannot be read or does not fit the model."""


def read_image(path: Path) -> np.ndarray:
    """An image as an (H, W) or (H, W, C) array."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image)
    except MemoryError:
        raise DataError(f"cannot read image '{path}': it does not fit in memory.") from None
    except Exception as exc:  # PIL and tifffile raise many types for bad files
        raise DataError(f"cannot read image '{path}': {first_line(exc)}.") from None
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] > 4) or array.size == 0:
        raise DataError(f"image '{path}' has shape {tuple(array.shape)}; prunekit reads 2-D images, grey (H, W) "
                        "or with up to 4 channels (H, W, C), not stacks or volumes.")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == bool):
        raise DataError(f"image '{path}' holds {array.dtype} values, not numbers.")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DataError(f"image '{path}' holds NaN or infinite values.")
    return array


def to_tensor(image: np.ndarray, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) float in [0, 1], with the model's channel count and spatial size."""
    array = image.astype(np.float32)
    if image.dtype == bool:
        pass
    elif np.issubdtype(image.dtype, np.integer):
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
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                rows = {r[0].strip(): r[1].strip() for r in csv.reader(handle) if len(r) >= 2}
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"label file '{path}' cannot be read as a CSV of file,label: {first_line(exc)}.") \
                from None
        names = sorted(set(rows.values()))
        numeric = [n for n in names if re.fullmatch(r"[+-]?\d+", n)]
        if numeric and len(numeric) != len(names):
            raise DataError(f"label file '{path}' mixes numeric labels and names ({numeric[0]!r} and "
                            f"{next(n for n in names if n not in numeric)!r}); use one kind.")
        negative = [n for n in numeric if int(n) < 0]
        if negative:
            raise DataError(f"label file '{path}' has the negative label {negative[0]}; class labels are 0, 1, ...")
        lookup = {n: int(n) if numeric else names.index(n) for n in names}
        missing = [p.name for p in files if p.name not in rows and p.stem not in rows]
        if missing:
            raise DataError(f"label file '{path}' has no label for '{missing[0]}'.")
        y = torch.tensor([lookup[rows.get(p.name, rows.get(p.stem))] for p in files])
        return x, y
    return x, None


_END = object()


class Batches:
    """A re-iterable source of batches: every pass yields the same data in the same order.

    ``origin``: the user's data factory when the batches come from one; whatever reading its
    batches raises is then reported as that function's error.
    """

    def __init__(self, make: Callable[[], Iterable], limit: int | None = None, origin: str | None = None):
        self._make = make
        self.limit = limit
        self.origin = origin

    def __iter__(self) -> Iterator:
        if self.origin is None:
            for i, batch in enumerate(self._make()):
                if self.limit is not None and i >= self.limit:
                    return
                yield batch
            return
        items = call_user(lambda: iter(self._make()), "data factory", self.origin)
        i = 0
        while self.limit is None or i < self.limit:
            batch = call_user(next, "data factory", self.origin, items, _END)
            if batch is _END:
                return
            yield batch
            i += 1

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
        from ..builders import resolve_callable

        factory = resolve_callable(source.factory)
        role = "data factory"
        produced = call_user(factory, role, source.factory, **source.kwargs)
        if produced is None or isinstance(produced, (str, bytes)) or not hasattr(produced, "__iter__"):
            from ..errors import UserFunctionError

            problem = f"returned {type(produced).__name__}, not a DataLoader or an iterable of batches"
            raise UserFunctionError(f"your {role} {source.factory!r} (data.{what}.factory) {problem}.",
                                    source.factory, role, problem)
        if call_user(iter, role, source.factory, produced) is produced:  # one-shot: keep it for every pass
            produced = call_user(list, role, source.factory, produced)
        batches = Batches(lambda: produced, source.limit, origin=source.factory)
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
    check_batch(first, input_shape, what)
    return batches


def check_batch(batch, input_shape, what: str) -> None:
    """The first batch of a data source fits the model's input: a float tensor with the input's number of
    dimensions and channels, and (when it has targets) labels that are not negative."""
    try:
        x = first_input(batch)
    except DataError:
        raise DataError(f"data.{what}: a batch must be a tensor or a tuple/list whose first element is the input "
                        f"tensor, got {type(batch).__name__}.") from None
    if not x.is_floating_point():
        raise DataError(f"data.{what}: the first batch's input is a {x.dtype} tensor; the model needs floats.")
    if input_shape is not None:
        if x.dim() != len(input_shape):
            raise DataError(f"data.{what}: the first batch's input has shape {tuple(x.shape)}, but the model's "
                            f"input_shape {list(input_shape)} has {len(input_shape)} dimensions.")
        if x.shape[1] != input_shape[1]:
            raise DataError(f"data.{what}: the first batch's input has {x.shape[1]} channels (shape "
                            f"{tuple(x.shape)}), but the model takes {input_shape[1]}.")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"data.{what}: the first batch's input holds NaN or infinite values.")
    target = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    if isinstance(target, torch.Tensor) and not target.is_floating_point() and target.numel():
        if int(target.min()) < 0:
            raise DataError(f"data.{what}: the first batch has the negative label {int(target.min())}; class "
                            "labels are 0, 1, ...")
