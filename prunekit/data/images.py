"""Image files to tensors: what one file holds (``probe``, header only), its pixels (``read_image``),
and the conversions to a model input (``image_tensor``) and to a class-id mask (``mask_tensor``).

Pixel values: 8-bit images are divided by 255 and 16-bit ones by 65535, so inputs are in [0, 1]
before ``normalize``; float images (TIFF) are taken as stored. Channels: a grey image feeds a
model of any channel count (repeated), a colour image feeds a 1-channel model as the mean of R, G
and B, an alpha channel is dropped for a 3-channel model; anything else is an error naming the
file. Masks hold one class id per pixel: an indexed (palette) PNG/TIFF's index is the class, and a
greyscale mask is its value, except that a 0/255 greyscale mask is binary (255 becomes 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PrunekitError
from ..safety import first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_TIFF = (".tif", ".tiff")


class DataError(PrunekitError):
    """Data that cannot be read or does not fit the model; ``key`` is the config key and ``path``
    the file or folder concerned, where there is one."""

    def __init__(self, message: str, key: str | None = None, path: str | None = None):
        super().__init__(message)
        self.key, self.path = key, path


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says: its size and channels, and whether it is indexed (palette)."""

    height: int
    width: int
    channels: int
    palette: bool = False


def _tifffile():
    try:
        import tifffile
    except ImportError:  # optional: Pillow reads most TIFFs
        return None
    return tifffile


def _unreadable(path: Path, exc: BaseException) -> DataError:
    if isinstance(exc, MemoryError):
        return DataError(f"cannot read image '{path}': it does not fit in memory.", path=str(path))
    return DataError(f"cannot read image '{path}': {first_line(exc) or type(exc).__name__}.", path=str(path))


def _not_2d(path: Path, shape) -> DataError:
    return DataError(f"image '{path}' has shape {tuple(shape)}; prunekit reads 2-D images, grey (H, W) or with "
                     "up to 4 channels (H, W, C), not stacks or volumes.", path=str(path))


def probe(path: Path) -> ImageInfo:
    """The header of one image file (no pixel data is decoded)."""
    tifffile = _tifffile() if path.suffix.lower() in _TIFF else None
    try:
        if tifffile is not None:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, palette = series.shape, tif.pages[0].photometric == 3  # 3: PALETTE
        else:
            from PIL import Image

            with Image.open(path) as image:
                frames, bits = getattr(image, "n_frames", 1), getattr(image, "tag_v2", {}).get(258)
                if frames > 1:
                    raise _not_2d(path, (frames, len(image.getbands()), image.height, image.width))
                if isinstance(bits, tuple) and len(bits) > 1 and max(bits) > 8:
                    raise DataError(f"image '{path}' is a {max(bits)}-bit colour TIFF, which Pillow reads wrongly; "
                                    "install tifffile (pip install tifffile) to read it.", path=str(path))
                bands = 1 if image.mode == "P" else len(image.getbands())
                shape, palette = (image.height, image.width, bands)[:2 if bands == 1 else 3], image.mode == "P"
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow and tifffile raise many types for bad files
        raise _unreadable(path, exc) from None
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] > 4) or 0 in shape:
        raise _not_2d(path, shape)
    return ImageInfo(shape[0], shape[1], 1 if len(shape) == 2 else shape[2], palette)


def read_image(path: Path, colours: bool = False) -> np.ndarray:
    """An image's pixels as an (H, W) or (H, W, C) array; a palette image as its indices, or as
    its colours when ``colours`` (inputs; masks keep the indices)."""
    tifffile = _tifffile() if path.suffix.lower() in _TIFF else None
    try:
        array = None
        if tifffile is not None:
            with tifffile.TiffFile(path) as tif:
                if not (colours and tif.pages[0].photometric == 3):  # a palette TIFF's colours: Pillow
                    array = np.asarray(tif.asarray())
        if array is None:
            from PIL import Image

            with Image.open(path) as image:
                if image.mode == "P" and colours:
                    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                elif image.mode == "1" or image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    image = image.convert("L" if image.mode == "1" else "RGB")
                array = np.asarray(image)
    except Exception as exc:  # noqa: BLE001 - a file whose header read but whose pixels do not
        raise _unreadable(path, exc) from None
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] > 4) or array.size == 0:
        raise _not_2d(path, array.shape)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == bool):
        raise DataError(f"image '{path}' holds {array.dtype} values, not numbers.", path=str(path))
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DataError(f"image '{path}' holds NaN or infinite values.", path=str(path))
    return array


def channel_problem(have: int, want: int) -> str | None:
    """Why an image with ``have`` channels cannot feed a model that takes ``want`` (None: it can)."""
    if have == want or have == 1 or (want == 1 and have in (2, 3, 4)) or (want == 3 and have == 4):
        return None
    return f"it has {have} channels and the model takes {want}"


def _scaled(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        top = 255.0 if array.dtype.itemsize == 1 else 65535.0 if array.dtype.itemsize == 2 else None
        if top is None:  # 32-bit integer pixels (Pillow's "I" mode): scale by the 16-bit range they almost always hold
            top = 65535.0 if array.max(initial=0) <= 65535 else float(np.iinfo(array.dtype).max)
        return array.astype(np.float32) / top
    return array.astype(np.float32)


def image_tensor(array: np.ndarray, channels: int, size, mean=None, std=None) -> torch.Tensor:
    """(C, H, W) float: scaled, with the model's channel count, resized to ``size`` when given (bilinear,
    antialiased) and normalised with ``mean``/``std`` (one value, or one per channel) when given."""
    t = torch.from_numpy(_scaled(array))
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    have = t.shape[0]
    if have != channels:
        if have == 1:
            t = t.expand(channels, -1, -1)
        elif channels == 1:
            t = t[:min(have, 3)].mean(0, keepdim=True) if have != 2 else t[:1]
        else:
            t = t[:channels]
    if size is not None and tuple(t.shape[1:]) != tuple(size):
        t = F.interpolate(t[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
    if mean is not None:
        m = torch.tensor(mean, dtype=t.dtype).view(-1, 1, 1)
        s = torch.tensor(std, dtype=t.dtype).view(-1, 1, 1)
        t = (t - m) / s
    return t.contiguous()


def mask_tensor(array: np.ndarray, size, palette: bool, path: Path) -> torch.Tensor:
    """(H, W) int64 class ids, resized to ``size`` by nearest neighbour when given."""
    if array.ndim == 3:
        colour = array[..., :3] if array.shape[-1] >= 3 else array[..., :1]
        if not (colour == colour[..., :1]).all():
            raise DataError(f"mask '{path}' is a colour image; save masks as indexed (palette) or greyscale "
                            "PNG/TIFF whose pixel values are the class ids.", path=str(path))
        array = colour[..., 0]
    if np.issubdtype(array.dtype, np.floating):
        if not (array == np.round(array)).all():
            raise DataError(f"mask '{path}' holds fractional values; a mask holds one class id per pixel.",
                            path=str(path))
    if not palette and array.size and set(np.unique(array).tolist()) <= {0, 255}:
        array = array > 0  # a 0/255 (black and white) mask is binary
    t = torch.from_numpy(array.astype(np.int64))
    if size is not None and tuple(t.shape) != tuple(size):
        t = F.interpolate(t[None, None].float(), size=tuple(size), mode="nearest")[0, 0].long()
    return t
