"""Image folders as a streaming torch Dataset: every file is listed and its header checked before any
work, and its pixels are read only when a batch needs them.

Three layouts (``data.<source>``):

- ``images: imgs/`` with ``masks: masks/``: segmentation; a mask has its image's file stem.
- ``images: imgs/`` with ``labels: labels.csv``: classification; rows of ``file,label`` (file name or
  stem; an optional ``file,label`` header), labels all numbers (class ids) or all names (sorted into ids).
- ``images: root/`` holding ``root/<class>/*.png``: classification, torchvision's ImageFolder layout
  (class ids are the sorted folder names' positions).

A flat folder alone gives inputs without targets: enough for calibration, not for training.
Relative paths start at ``data.root`` (the config file's folder for a YAML config).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import NORMALIZE_PRESETS, DataSource
from ..safety import first_line
from .images import IMAGE_SUFFIXES, DataError, ImageInfo, channel_problem, image_tensor, mask_tensor, probe, \
    read_image

_HEADER_WORDS = {"file", "filename", "file_name", "image", "images", "name", "path", "id", "image_id"}


def resolve(text: str, root: str | None) -> Path:
    """``text`` as an absolute path: relative ones start at ``root`` (or the current directory)."""
    path = os.path.expanduser(text)
    return Path(os.path.abspath(path if os.path.isabs(path) else os.path.join(root or os.getcwd(), path)))


def shown(text: str, root: str | None) -> str:
    """A path as the user wrote it, and where it resolved to when that differs."""
    resolved = resolve(text, root)
    return f"'{text}'" if str(resolved) == text else f"'{text}' (resolved to {resolved})"


def source_paths(source: DataSource, root: str | None) -> list[Path]:
    """The folders and files a data source reads."""
    return [resolve(getattr(source, k), root) for k in ("images", "masks", "labels") if getattr(source, k)]


@dataclass
class Item:
    image: Path
    info: ImageInfo
    mask: Path | None = None
    mask_info: ImageInfo | None = None
    label: int | None = None


class FolderDataset(torch.utils.data.Dataset):
    """Images (and masks or labels) from disk, one item at a time: ``x`` or ``(x, y)`` with x a (C, H, W)
    float tensor and y an (H, W) mask or a class id."""

    def __init__(self, items: list[Item], channels: int, size, mean=None, std=None):
        self.items, self.channels, self.size, self.mean, self.std = items, channels, size, mean, std

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        x = image_tensor(read_image(item.image, colours=True), self.channels, self.size, self.mean, self.std)
        if item.mask is not None:
            return x, mask_tensor(read_image(item.mask), self.size, item.mask_info.palette, item.mask)
        if item.label is not None:
            return x, item.label
        return x


def _image_files(folder: Path, recursive: bool = False) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                  and p.is_file())


def _folder(text: str, root, key: str, what: str) -> Path:
    path = resolve(text, root)
    if not path.is_dir():
        problem = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataError(f"{what} folder {shown(text, root)} {problem} ({key}).", key=key, path=str(path))
    return path


def _unique_stems(files: list[Path], text: str, root, key: str) -> dict[str, Path]:
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise DataError(f"folder {shown(text, root)} holds both '{stems[p.stem].name}' and '{p.name}'; files "
                            f"are matched by stem, so each stem may appear once ({key}).", key=key, path=str(p))
        stems[p.stem] = p
    return stems


def _few(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(repr(s) for s in names[:n]) + more


def _with_masks(images: list[Path], source: DataSource, root, key: str) -> list[Path]:
    """Each image's mask: the file of the same stem in the mask folder."""
    folder = _folder(source.masks, root, f"{key}.masks", "mask")
    files = _image_files(folder)
    if not files:
        raise DataError(f"mask folder {shown(source.masks, root)} holds no images ({', '.join(IMAGE_SUFFIXES)}) "
                        f"({key}.masks).", key=f"{key}.masks", path=str(folder))
    masks = _unique_stems(files, source.masks, root, f"{key}.masks")
    missing = [p.stem for p in images if p.stem not in masks]
    if missing:
        spare = sorted(set(masks) - {p.stem for p in images})
        hint = f"; masks without an image: {_few(spare)}" if spare else ""
        raise DataError(f"{len(missing)} of {len(images)} images have no mask of the same file stem in "
                        f"{shown(source.masks, root)}: {_few(missing)}{hint} ({key}.masks).", key=f"{key}.masks",
                        path=str(folder))
    return [masks[p.stem] for p in images]


def _csv_labels(images: list[Path], source: DataSource, root, key: str) -> list[int]:
    path, text = resolve(source.labels, root), shown(source.labels, root)
    if not path.is_file():
        raise DataError(f"label file {text} does not exist ({key}.labels).", key=f"{key}.labels", path=str(path))
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [(n, [c.strip() for c in r]) for n, r in enumerate(csv.reader(handle), 1)
                    if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"label file {text} cannot be read as a CSV of file,label: {first_line(exc)}.",
                        key=f"{key}.labels", path=str(path)) from None
    if rows and rows[0][1][0].lower() in _HEADER_WORDS:
        rows = rows[1:]
    by_name = {p.name: p for p in images} | {p.stem: p for p in images}
    labels: dict[Path, str] = {}
    for line, row in rows:
        if len(row) < 2 or not row[1]:
            raise DataError(f"label file {text} line {line} is not file,label: {','.join(row)!r}.",
                            key=f"{key}.labels", path=str(path))
        image = by_name.get(row[0]) or by_name.get(Path(row[0]).name)
        if image is None:
            raise DataError(f"label file {text} line {line} names '{row[0]}', which is not an image in "
                            f"{shown(source.images, root)} ({key}.labels).", key=f"{key}.labels", path=str(path))
        labels[image] = row[1]
    unlabelled = [p.name for p in images if p not in labels]
    if unlabelled:
        raise DataError(f"label file {text} has no label for {len(unlabelled)} images: {_few(unlabelled)} "
                        f"({key}.labels).", key=f"{key}.labels", path=str(path))
    names = sorted(set(labels.values()))
    numeric = [n for n in names if re.fullmatch(r"[+-]?\d+", n)]
    if numeric and len(numeric) != len(names):
        raise DataError(f"label file {text} mixes numeric labels and names ({numeric[0]!r} and "
                        f"{next(n for n in names if n not in numeric)!r}); use one kind.", key=f"{key}.labels")
    negative = [n for n in numeric if int(n) < 0]
    if negative:
        raise DataError(f"label file {text} has the negative label {negative[0]}; class labels are 0, 1, ...",
                        key=f"{key}.labels")
    lookup = {n: int(n) if numeric else names.index(n) for n in names}
    return [lookup[labels[p]] for p in images]


def _class_folders(folder: Path, text: str, root, key: str) -> tuple[list[Path], list[int]]:
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for index, sub in enumerate(classes):
        found = _image_files(sub, recursive=True)
        if not found:
            raise DataError(f"class folder '{sub.name}' in {shown(text, root)} holds no images; remove it or add "
                            f"images (class ids follow the sorted folder names) ({key}.images).",
                            key=f"{key}.images", path=str(sub))
        files += found
        labels += [index] * len(found)
    return files, labels


def _normalization(source: DataSource, channels: int, key: str):
    """``(mean, std)`` of ``normalize`` for a model with ``channels`` inputs, or (None, None)."""
    norm = source.normalize
    if norm is None:
        return None, None
    mean, std = NORMALIZE_PRESETS[norm] if isinstance(norm, str) else (norm.mean, norm.std)
    for values in (mean, std):
        if len(values) not in (1, channels):
            named = f"'{norm}' has" if isinstance(norm, str) else "has"
            raise DataError(f"{key}.normalize {named} {len(values)} values per channel, but the model takes "
                            f"{channels}; give one value per channel (or one for all).", key=f"{key}.normalize")
    return mean, std


def _checked(path: Path, channels: int, expected, size, key: str) -> ImageInfo:
    """An input image's header, checked to feed the model (its channels, and its size unless resized)."""
    info = probe(path)
    problem = channel_problem(3 if info.palette else info.channels, channels)
    if problem:
        raise DataError(f"image '{path}' cannot feed the model: {problem} ({key}.images).", key=f"{key}.images",
                        path=str(path))
    if size is None and (info.height, info.width) != expected:
        raise DataError(f"image '{path}' is {info.height}x{info.width}, but the input_shape is {expected[0]}x"
                        f"{expected[1]}; set {key}.size: [{expected[0]}, {expected[1]}] to resize the images "
                        "(prunekit never resizes unasked).", key=f"{key}.size", path=str(path))
    return info


def _paired_mask(image: Path, info: ImageInfo, mask: Path, key: str) -> ImageInfo:
    mask_info = probe(mask)
    if (mask_info.height, mask_info.width) != (info.height, info.width):
        raise DataError(f"mask '{mask}' is {mask_info.height}x{mask_info.width}, but its image '{image.name}' is "
                        f"{info.height}x{info.width} ({key}.masks).", key=f"{key}.masks", path=str(mask))
    return mask_info


def folder_dataset(source: DataSource, input_shape, what: str, root: str | None) -> FolderDataset:
    """The dataset an image-folder source describes, every file listed, paired and its header checked."""
    key = f"data.{what}"
    if input_shape is None or len(input_shape) != 4:
        raise DataError(f"{key}.images: image folders feed models with an [N, C, H, W] input_shape, not "
                        f"{input_shape}; for volumes or other inputs, set {key}.factory to a package.module:function "
                        "that returns the batches.", key=f"{key}.images")
    channels, expected = input_shape[1], tuple(input_shape[2:])
    mean, std = _normalization(source, channels, key)
    folder = _folder(source.images, root, f"{key}.images", "image")
    files, labels = _image_files(folder), None
    if not files and not source.masks and not source.labels:
        files, labels = _class_folders(folder, source.images, root, key)
    if not files:
        layouts = "" if source.masks or source.labels else " and no class sub-folders of images"
        raise DataError(f"image folder {shown(source.images, root)} holds no images ({', '.join(IMAGE_SUFFIXES)})"
                        f"{layouts} ({key}.images).", key=f"{key}.images", path=str(folder))
    if what in ("train", "val") and labels is None and not source.masks and not source.labels:
        raise DataError(f"{key} has images but no targets: add {key}.masks (a folder of masks named like the "
                        f"images) or {key}.labels (a CSV of file,label), or put the images in class sub-folders "
                        f"({source.images}/<class>/*.png).", key=f"{key}.masks")
    if source.masks or source.labels:  # both pair files by stem
        _unique_stems(files, source.images, root, f"{key}.images")
    masks = _with_masks(files, source, root, key) if source.masks else None
    if source.labels:
        labels = _csv_labels(files, source, root, key)
    size = tuple(source.size) if source.size else None
    items = []
    for i, path in enumerate(files):
        item = Item(path, _checked(path, channels, expected, size, key), label=None if labels is None else labels[i])
        if masks is not None:
            item.mask, item.mask_info = masks[i], _paired_mask(path, item.info, masks[i], key)
        items.append(item)
    return FolderDataset(items, channels, size, mean, std)
