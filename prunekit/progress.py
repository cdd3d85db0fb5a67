"""Progress bars for long work (calibration, scoring, fine-tuning), via rich."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yields ``advance(**fields)``; shows a bar on stderr when ``enabled`` and stderr is a terminal."""
    if not enabled or not console.is_terminal:
        yield lambda **fields: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(**fields):
            status = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            progress.update(task, advance=1, status=status)

        yield advance
