"""Progress of long commands (sim, replay, ingest, demo): a live line on a terminal, quiet elsewhere.

The plain functions in `apbatch.script` take a ``progress(message)`` callback and know nothing of
terminals; the click commands pass one from :func:`progress`. On a terminal it is a rich progress
line (count, elapsed time, the latest item) redrawn in place; when stderr is a file or a pipe (cron,
CI, a batch job's log) it writes nothing, so logs keep only what the command prints at the end.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = ["progress"]


def _quiet(_message: str) -> None:
    return None


@contextlib.contextmanager
def progress(label: str, total: int | None = None, *, stream: TextIO | None = None,
             force: bool | None = None) -> Iterator[Callable[[str], None]]:
    """A ``progress(message)`` callback counting items under ``label``.

    Parameters
    ----------
    label : `str`
        What is being done (``"simulating"``, ``"replaying"``).
    total : `int`, optional
        Number of items expected; without it the line shows a spinner and the count.
    stream : file, optional
        Where to draw (default: ``sys.stderr``).
    force : `bool`, optional
        Draw (`True`) or stay quiet (`False`) whatever the stream is; default: draw only when
        ``stream`` is a terminal.

    Yields
    ------
    step : callable
        ``step(message)``: one item done, ``message`` names it.
    """
    stream = sys.stderr if stream is None else stream
    live = stream.isatty() if force is None else force
    if not live:
        yield _quiet
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total:
        columns += [BarColumn(), MofNCompleteColumn()]
    else:
        columns += [TextColumn("{task.completed:.0f} done")]
    columns += [TimeElapsedColumn(), TextColumn("[dim]{task.fields[item]}")]
    console = Console(file=stream, force_terminal=True if force else None)
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total, item="")

        def step(message: str) -> None:
            bar.update(task, advance=1, item=message)

        yield step
