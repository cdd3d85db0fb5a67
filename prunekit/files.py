"""Files written atomically (a temporary file beside the target, fsync, rename) and strict JSON.

On any failure the target is left as it was and the temporary file is removed; an OSError
(disk full, read-only file system, permission denied) becomes one
:class:`~prunekit.errors.ResourceError` naming the path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from prunekit.errors import PrunekitError
from prunekit.paths import os_error

__all__ = ["atomic_writer", "atomic_write_bytes", "atomic_write_text", "atomic_save_torch", "atomic_dir",
           "save_json", "strict_json"]

PathLike = str | os.PathLike


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    if mode not in ("wb", "w"):
        raise ValueError("atomic_writer supports mode 'wb' or 'w'")
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise PrunekitError(f"Cannot write {str(path)!r}: its directory {str(directory)!r} does not exist.")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise os_error(exc, "write", path) from None
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise os_error(exc, "write", path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    with atomic_writer(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


class _Recording:
    """A file's ``write`` that keeps the OSError it raised: ``torch.save`` reports it as a RuntimeError."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_save_torch(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` atomically, streamed to the temporary file (no copy in memory); a full
    disk is an OSError, as for every other write."""
    with atomic_writer(path, "wb") as fh:
        out = _Recording(fh)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise


@contextlib.contextmanager
def atomic_dir(final_dir: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a sibling temporary directory and rename it to ``final_dir`` on success.

    Yields the temporary directory's path; write everything there.  On an
    exception the temporary directory is deleted and ``final_dir`` is not
    touched.  An existing non-empty ``final_dir`` is an error unless
    ``overwrite`` is true, in which case it is replaced only once the new one
    is complete.
    """
    final = Path(final_dir)
    parent = final.parent
    if final.exists() and not final.is_dir():
        raise PrunekitError(f"Output directory {str(final)!r} exists and is a file.")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise PrunekitError(
            f"Output directory {str(final)!r} already exists and is not empty; choose another or remove it."
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrunekitError(f"Cannot create the directory {str(parent)!r}: {exc.strerror or exc}.") from None
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if final.is_dir() and any(final.iterdir()):
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)  # also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def save_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty JSON (2-space indent, trailing newline) to ``path`` atomically.

    Paths, tensors, sets, dataclasses and numpy values are converted.
    """
    atomic_write_text(path, strict_json(obj, indent=2) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_json(obj: Any, indent: int | None = 2) -> str:
    """JSON that every parser reads: NaN and infinities become null (JSON has no such numbers)."""
    converted = json.loads(json.dumps(obj, default=_json_default, allow_nan=True))
    return json.dumps(_finite(converted), indent=indent, allow_nan=False)
