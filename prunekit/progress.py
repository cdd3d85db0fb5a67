"""Progress for long work (calibration, scoring, fine-tuning) on stderr.

On a terminal: a rich bar that disappears when the work is done. Anywhere else (piped,
``tee``, CI, ``nohup``), where a bar would print nothing until the end: plain lines, one when
the work is done (``fine-tune step 2: 20/20 in 3.1 s, loss 0.213``) and one every
:data:`PLAIN_EVERY` seconds while it runs, so a log never goes quiet for minutes.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)

PLAIN_EVERY = 15.0  # seconds between plain progress lines while one piece of work runs


def _status(fields: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yields ``advance(**fields)``; shows progress on stderr when ``enabled``: a bar on a terminal,
    plain lines otherwise (see the module doc)."""
    if not enabled:
        yield lambda **fields: None
        return
    if not console.is_terminal:
        with _plain_lines(description, total) as advance:
            yield advance
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(**fields):
            progress.update(task, advance=1, status=_status(fields))

        yield advance


@contextmanager
def _plain_lines(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    started = last = time.monotonic()
    state = {"done": 0, "fields": {}}

    def line(final: bool) -> None:
        count = f"{state['done']}/{total}" if total else str(state["done"])
        status = _status(state["fields"])
        print(f"{description}: {count} {'in' if final else 'after'} {time.monotonic() - started:.1f} s"
              + (f", {status}" if status else ""), file=sys.stderr, flush=True)

    def advance(**fields):
        nonlocal last
        state["done"] += 1
        state["fields"] = fields or state["fields"]
        now = time.monotonic()
        if now - last >= PLAIN_EVERY and (total is None or state["done"] < total):
            last = now
            line(final=False)

    yield advance
    line(final=True)
