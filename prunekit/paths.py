"""Output paths checked before any work: never an input, never under a file, writable.

    check_output("groups.dot", inputs=["model.pt"], what="--dot")
    check_output("out/run", inputs=["model.pt", "config.yaml"], what="-o", directory=True)

Every refusal is an :class:`~prunekit.errors.OutputPathError` (or a
:class:`~prunekit.errors.ResourceError` for permissions) naming the path.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable

from .errors import OutputPathError, ResourceError

__all__ = ["check_output", "real", "is_within", "os_error"]


def real(path) -> Path:
    """The absolute path with every symbolic link that exists resolved."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def is_within(inner: Path, outer: Path) -> bool:
    """True when ``inner`` is ``outer`` or lies below it."""
    return inner == outer or outer in inner.parents


def _first_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path("/")


def check_output(path, inputs: Iterable = (), what: str = "output", directory: bool = False) -> Path:
    """``path`` as a Path if it can be written as an output; refuse it before any work otherwise.

    ``directory``: the output is a directory that a run fills (and ``--force`` may replace), so it must
    not be the current directory, hold it, or hold an input either.
    """
    text = os.fspath(path) if path is not None else ""
    if not str(text).strip():
        raise OutputPathError(f"the {what} {'directory ' if directory else ''}path is empty; name a "
                              f"{'directory' if directory else 'file'}.", path=str(text))
    p = Path(text)
    target = real(p)
    for item in inputs:
        if item is None:
            continue
        source = real(item)
        same = source == target or (os.path.exists(item) and os.path.exists(p) and os.path.samefile(item, p))
        if same:
            raise OutputPathError(f"the {what} path '{text}' is the input '{item}'; writing it would destroy "
                                  f"the input, so choose another path.", path=text, conflict=str(item))
        if directory and is_within(source, target):
            raise OutputPathError(f"the {what} directory '{text}' holds the input '{item}'; choose a directory "
                                  f"that holds no input.", path=text, conflict=str(item))
    if directory:
        here = real(os.getcwd())
        if is_within(here, target):
            raise OutputPathError(f"the {what} directory '{text}' is the current directory or holds it; "
                                  "choose a new directory for the run.", path=text, conflict=str(here))
    if os.path.islink(p) and not os.path.exists(p):
        raise OutputPathError(f"the {what} path '{text}' is a symbolic link to '{os.readlink(p)}', which does not "
                              "exist; remove the link or choose another path.", path=text)
    if p.exists():
        if directory and not p.is_dir():
            raise OutputPathError(f"the {what} directory '{text}' exists and is a file.", path=text)
        if not directory and p.is_dir():
            raise OutputPathError(f"the {what} path '{text}' is a directory, not a file.", path=text)
    anchor = _first_existing(Path(os.path.abspath(text)).parent if not p.exists() or not directory
                             else Path(os.path.abspath(text)))
    if anchor.is_symlink() and not anchor.exists():
        raise OutputPathError(f"the {what} path '{text}' lies under '{anchor}', a symbolic link to "
                              f"'{os.readlink(anchor)}', which does not exist.", path=text)
    if not anchor.is_dir():
        raise OutputPathError(f"the {what} path '{text}' cannot be created: '{anchor}' is a file, not a "
                              "directory.", path=text, conflict=str(anchor))
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ResourceError(f"cannot write the {what} path '{text}': '{anchor}' is not writable (permission "
                            "denied).", path=str(anchor), reason="permission")
    return p


_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.ENOENT: "a directory on the path does not exist",
    errno.EISDIR: "it is a directory",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EMFILE: "too many files are open",
}


def os_error(exc: OSError, action: str = "write", path=None) -> ResourceError:
    """One sentence for an OSError: what could not be done, to which path, and why."""
    where = path if path is not None else (exc.filename if exc.filename is not None else None)
    reason = _REASONS.get(exc.errno, exc.strerror or type(exc).__name__)
    target = f" '{where}'" if where is not None else ""
    return ResourceError(f"cannot {action}{target}: {reason}.", path=None if where is None else str(where),
                         reason=reason)
