"""Grey / white matter segmentation on axial slices of the MNI152 2009c template (ships in the nilearn wheel).

    from mni import slices
    train = slices("train", batch_size=8)   # [(images (N, 1, 96, 112), labels (N, 96, 112)), ...]

The T1 template and its grey and white matter probability maps
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``, 197x233x189 at
1 mm) are read with nibabel, averaged over 2x2 in-plane blocks (2 mm pixels) and cropped to 96x112
around the centre. Labels: 1 grey, 2 white where that probability is the larger of the two and above
0.5, 0 elsewhere (background and CSF). Only axial slices with at least 2% grey or white matter pixels
are kept (140 slices: 72 train, 68 test). Split by blocks of 8 consecutive slices, alternately train and test (block 0
train, block 1 test, ...), so test slices are at least one slice away from train slices, and
every part of the brain is in both.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

from prunekit.data import DataError

FILES = {kind: f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")}
SIZE = (96, 112)  # after 2x2 averaging
BLOCK = 8
MIN_BRAIN = 0.02


def _folder() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the MNI152 template ships in the nilearn wheel; install nilearn and nibabel.")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    if not (folder / FILES["t1"]).is_file():
        raise DataError(f"{folder / FILES['t1']} is missing from the installed nilearn.")
    return folder


def _axial(path: Path) -> np.ndarray:
    """(slices, H, W) float32: 2x2 block means of every axial slice, centre-cropped to SIZE."""
    import nibabel

    v = np.asarray(nibabel.load(str(path)).get_fdata(dtype=np.float32))  # (x, y, z)
    v = np.moveaxis(v, 2, 0)  # (z, x, y)
    z, h, w = v.shape
    v = v[:, : h // 2 * 2, : w // 2 * 2].reshape(z, h // 2, 2, w // 2, 2).mean((2, 4))
    top, left = (v.shape[1] - SIZE[0]) // 2, (v.shape[2] - SIZE[1]) // 2
    return v[:, top:top + SIZE[0], left:left + SIZE[1]]


@functools.lru_cache(maxsize=1)
def _volume() -> tuple[np.ndarray, np.ndarray]:
    """Every kept slice: images in [0, 1] and labels 0/1/2."""
    try:
        import nibabel  # noqa: F401
    except ImportError:
        raise DataError("reading the MNI152 template needs nibabel (pip install nibabel).") from None
    folder = _folder()
    t1, gm, wm = (_axial(folder / FILES[k]) for k in ("t1", "gm", "wm"))
    gm, wm = gm / 255.0, wm / 255.0
    labels = np.where((gm >= wm) & (gm > 0.5), 1, np.where((wm > gm) & (wm > 0.5), 2, 0)).astype(np.int64)
    keep = (labels > 0).mean((1, 2)) >= MIN_BRAIN
    return (t1[keep] / max(float(t1.max()), 1e-6)).astype(np.float32), labels[keep]


def slices(split: str = "train", batch_size: int = 8) -> list:
    """Batches of (images (N, 1, 96, 112) in [0, 1], labels (N, 96, 112)); split train, test or all."""
    images, labels = _volume()
    block = np.arange(len(images)) // BLOCK
    chosen = {"train": block % 2 == 0, "test": block % 2 == 1, "all": np.ones(len(images), bool)}.get(split)
    if chosen is None:
        raise DataError(f"mni slices split must be 'train', 'test' or 'all', got {split!r}.")
    x = torch.from_numpy(images[chosen])[:, None]
    y = torch.from_numpy(labels[chosen])
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
