"""Run directories: what is one, who may write it, and how a new run replaces an old one.

A run directory is a prunekit run when it holds the marker file ``.prunekit-run``
(written by prunekit, never trusted from a ``manifest.json`` alone)::

    out/run/.prunekit-run      {"format": "prunekit-run/1", "status": "running" | "complete"}
    out/run/checkpoint.pt      after finished steps (resume from here; see run_state.CheckpointClock)
    out/run/model.pt, manifest.json, report.*, *.png    when the run completes

Its states (:func:`inspect`): ``absent``, ``empty`` (nothing but prunekit's stray temporary
files), ``started`` (killed before its first checkpoint: replaced without ``--force``),
``interrupted`` (a checkpoint, not complete: ``--resume`` or ``--force``), ``complete``
(``--force`` to replace, ``--resume`` to finish again) and ``foreign`` (anything else: never
touched).

While a run writes, ``.NAME.prunekit-lock`` beside the directory is locked (``fcntl.flock``), so a
second run into the same directory is refused. A run that replaces an earlier one (``--force``)
writes into ``.NAME.prunekit-new-*`` beside it and swaps it in only once it is complete: a run that
fails or is interrupted leaves the earlier one as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import PrunekitError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the lock file's existence is the lock (O_EXCL)
    fcntl = None
from .paths import check_output, os_error

__all__ = ["MARKER", "CHECKPOINT", "RunDirError", "Interrupted", "inspect", "plan", "RunWriter"]

MARKER = ".prunekit-run"
MARKER_FORMAT = "prunekit-run/1"
CHECKPOINT = "checkpoint.pt"
OUTPUTS = ("model.pt", "manifest.json", "report.json", "report.md", "trajectory.png", "widths.png", "sparsity.json",
           "sparsity.md")
KNOWN = (MARKER, CHECKPOINT, *OUTPUTS)
# what prunekit's atomic writer leaves when killed mid-write: .NAME.XXXXXXXX.tmp
_STRAY = re.compile(r"^\.(" + "|".join(re.escape(n) for n in KNOWN) + r")\.[^/]+\.tmp$")


class RunDirError(PrunekitError):
    """The run directory cannot be used as asked; ``path`` names it."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


def _strays(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if _STRAY.match(p.name)] if path.is_dir() else []


def _siblings(path: Path, kind: str) -> list[Path]:
    parent = path.parent
    if not parent.is_dir():
        return []
    prefix = f".{path.name}.prunekit-{kind}-"
    return [p for p in parent.iterdir() if p.name.startswith(prefix)]


def inspect(path) -> str:
    """``absent``, ``empty``, ``started``, ``interrupted``, ``complete`` or ``foreign`` (see the module doc)."""
    path = Path(path)
    if not os.path.lexists(path):
        return "absent"
    if not path.is_dir():
        return "foreign"
    try:
        names = {p.name for p in path.iterdir()} - {p.name for p in _strays(path)}
    except OSError:
        return "foreign"
    if not names:
        return "empty"
    if MARKER not in names:
        return "foreign"
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return "foreign"
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return "foreign"
    if marker.get("status") == "complete" and "model.pt" in names and "manifest.json" in names:
        return "complete"
    return "interrupted" if CHECKPOINT in names else "started"


def plan(path, resume: bool, force: bool, inputs: Iterable = (), *, locked: bool = False) -> str:
    """How a run may use ``path``, decided before anything is written.

    Returns ``"fresh"`` (write the directory from scratch), ``"resume"`` (continue its checkpoint)
    or ``"replace"`` (write beside it, swap in when complete); refuses everything else.
    """
    check_output(path, inputs, what="run", directory=True)
    shown = os.fspath(path)
    if not locked:  # a run being written is neither resumed nor replaced (``locked``: we hold its lock)
        RunLock(Path(os.path.abspath(shown))).check_free()
    state = inspect(path)
    if state == "foreign":
        raise RunDirError(f"'{shown}' already exists and is not a prunekit run directory (it has no {MARKER} "
                          "marker); prunekit never overwrites it, so choose a new or empty directory.", shown)
    if resume:
        if state == "interrupted" or (state == "complete" and (Path(path) / CHECKPOINT).is_file()):
            return "resume"
        if state == "complete":
            raise RunDirError(f"'{shown}' holds a complete run without a {CHECKPOINT} (its steps were cheaper to "
                              "redo than to save): there is nothing to resume; pass --force to run it again.", shown)
        if state == "started":
            return "fresh"  # killed before its first checkpoint: nothing to continue, start again
        raise RunDirError(f"cannot resume: '{shown}' holds no {CHECKPOINT}; start the run without --resume.",
                          shown)
    if state in ("absent", "empty", "started"):
        return "fresh"
    if not force:
        if state == "interrupted":
            raise RunDirError(f"run directory '{shown}' holds an interrupted run; pass --resume to continue it "
                              "or --force to replace it.", shown)
        raise RunDirError(f"run directory '{shown}' already exists; pass --force to overwrite it or --resume to "
                          "continue it.", shown)
    if os.path.islink(path):
        raise RunDirError(f"'{shown}' is a symbolic link; --force replaces a run directory itself, so give the "
                          f"directory it points to ('{os.path.realpath(path)}').", shown)
    return "replace"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run that writes ``run_dir``: whether ``--resume`` can continue it, and what was kept."""

    def __init__(self, run_dir: str, resumable: bool, mode: str):
        if resumable:
            text = f"interrupted; continue with --resume from '{run_dir}'."
        elif mode == "replace":
            text = f"interrupted before the new run was complete; '{run_dir}' still holds the earlier run."
        else:
            text = "interrupted before the first step was finished; nothing was written."
        super().__init__(text)
        self.run_dir, self.resumable, self.mode = run_dir, resumable, mode


class RunLock:
    """``.NAME.prunekit-lock`` beside a run directory, held with ``fcntl.flock`` while a run writes."""

    def __init__(self, run_dir: Path):
        self.path = run_dir.parent / f".{run_dir.name}.prunekit-lock"
        self.run_dir = run_dir
        self.fd: int | None = None

    def _busy(self) -> "RunDirError":
        return RunDirError(f"another prunekit run is writing '{self.run_dir}' (it holds '{self.path}'); wait for it "
                           "to finish or choose another directory.", str(self.run_dir))

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise self._busy() from None
            except OSError as exc:
                raise os_error(exc, "create the lock file", self.path) from None
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise os_error(exc, "create the lock file", self.path) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            try:  # the file may have been unlinked by its last holder between our open and our lock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return
            os.close(fd)

    def check_free(self) -> None:
        """Refuse now, without taking the lock or creating anything, if another run holds it."""
        if fcntl is None:  # pragma: no cover
            if os.path.exists(self.path):
                raise self._busy()
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file: nobody writes the directory
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy() from None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def _write_marker(directory: Path, status: str) -> None:
    from .files import atomic_write_text

    atomic_write_text(directory / MARKER, json.dumps({"format": MARKER_FORMAT, "status": status}) + "\n")


class RunWriter:
    """The one writer of a run directory, as a context manager around the whole run.

        with RunWriter("out/run", "fresh") as writer:
            ...                                   # nothing is written before the first checkpoint
            writer.begin()                        # creates the directory and its marker
            save(writer.work / CHECKPOINT)
            ... write outputs into writer.work ...
            writer.complete()                     # marks it complete; a replacing run is swapped in

    On an exception before :meth:`begin`, nothing is left behind (not even the parent directories it
    created for the lock); after it, a fresh or resumed run stays resumable, and a replacing run's
    new directory is deleted, leaving the earlier run as it was.
    """

    def __init__(self, run_dir, mode: str, inputs: Iterable = ()):
        self.final = Path(os.path.abspath(os.fspath(run_dir)))
        self.shown = os.fspath(run_dir)
        self.mode, self.inputs = mode, list(inputs)
        self.lock = RunLock(self.final)
        self.work: Path = self.final
        self.created: list[Path] = []
        self.began = False
        self.checkpointed = False

    # -- entering: parents, lock, re-check, clean up ---------------------------------------

    def __enter__(self) -> "RunWriter":
        missing = [p for p in (self.final.parent, *self.final.parent.parents) if not p.exists()]
        try:
            for directory in reversed(missing):
                directory.mkdir()
                self.created.append(directory)
        except OSError as exc:
            self._remove_created()
            raise os_error(exc, "create the directory", exc.filename or self.final.parent) from None
        try:
            self.lock.acquire()
            self._recover()
            self._clean_strays()  # no other run holds the lock: what other runs left half-written is garbage
            # another run may have changed the directory between the check and the lock
            again = plan(self.final, self.mode == "resume", self.mode == "replace", self.inputs, locked=True)
            if again != self.mode and not (self.mode == "replace" and again == "fresh"):
                raise RunDirError(f"run directory '{self.shown}' changed while this run started; run it again.",
                                  self.shown)
            self.mode = again
        except BaseException:
            self.lock.release()
            self._remove_created()
            raise
        return self

    def _recover(self) -> None:
        """Finish the swap of a replacing run killed between its two renames, so no finished run is lost."""
        if os.path.lexists(self.final):
            return
        for staged in sorted(_siblings(self.final, "new"), key=lambda p: p.stat().st_mtime, reverse=True):
            if inspect(staged) == "complete":
                os.replace(staged, self.final)
                return
        for old in _siblings(self.final, "old"):
            if inspect(old / "run") in ("complete", "interrupted"):
                os.replace(old / "run", self.final)
                return

    def _clean_strays(self) -> None:
        for stray in _strays(self.final):
            with contextlib.suppress(OSError):
                stray.unlink()
        for kind in ("new", "old"):
            for leftover in _siblings(self.final, kind):  # staging of runs killed before their swap
                shutil.rmtree(leftover, ignore_errors=True)

    def _remove_created(self) -> None:
        for directory in reversed(self.created):
            with contextlib.suppress(OSError):
                directory.rmdir()
        self.created = []

    # -- writing ---------------------------------------------------------------------------

    @property
    def checkpoint(self) -> Path:
        return self.work / CHECKPOINT

    def begin(self) -> None:
        """Create the directory the run writes (and its marker); called before the first checkpoint."""
        if self.began:
            return
        try:
            if self.mode == "replace":
                self.work = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.prunekit-new-"))
                os.chmod(self.work, 0o777 & ~_umask())
            elif self.mode == "fresh":
                if self.final.is_dir():
                    for name in KNOWN:  # a run killed before its first checkpoint
                        with contextlib.suppress(FileNotFoundError):
                            (self.final / name).unlink()
                else:
                    self.final.mkdir()
                    self.created.append(self.final)
            self.began = True
            if self.mode != "resume":
                _write_marker(self.work, "running")
        except OSError as exc:
            raise os_error(exc, "create the run directory", exc.filename or self.final) from None

    def saved_checkpoint(self) -> None:
        self.checkpointed = True

    def complete(self) -> None:
        """Mark the run complete; a replacing run takes the earlier one's place now."""
        _write_marker(self.work, "complete")
        if self.mode != "replace":
            return
        old = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.prunekit-old-"))
        os.replace(self.final, old / "run")
        try:
            os.replace(self.work, self.final)
        except BaseException:
            os.replace(old / "run", self.final)
            raise
        self.work = self.final
        shutil.rmtree(old, ignore_errors=True)

    # -- leaving ---------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                if self.mode == "replace" and self.work != self.final:
                    shutil.rmtree(self.work, ignore_errors=True)
                elif self.mode == "fresh" and self.began and not self.checkpointed:
                    for name in KNOWN:
                        with contextlib.suppress(OSError):
                            (self.final / name).unlink()
                    for stray in _strays(self.final):
                        with contextlib.suppress(OSError):
                            stray.unlink()
                if self.checkpointed and self.mode != "replace":
                    self.created = []  # a resumable run keeps its directory
        finally:
            self.lock.release()
        if exc_type is not None:
            self._remove_created()  # after the lock file is gone, so the directories are empty

    @property
    def resumable(self) -> bool:
        """Whether a run that stopped now can be continued with ``--resume``."""
        return self.mode == "resume" or (self.mode == "fresh" and self.checkpointed)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_dir_of(path: str) -> Path | None:
    """The prunekit run directory that ``path`` is, or whose model.pt it is."""
    candidate = Path(path)
    run_dir = candidate if candidate.is_dir() else candidate.parent
    if (run_dir / "manifest.json").is_file() and (candidate.is_dir() or candidate.name == "model.pt"):
        return run_dir
    return None


def input_paths(path: str) -> list[str]:
    """The files a MODEL argument reads: the file, or a run directory's manifest and weights."""
    run_dir = run_dir_of(path)
    if run_dir is None:
        return [path]
    return [path, str(run_dir / "manifest.json"), str(run_dir / "model.pt")]
