"""Progress bars (rich) for long commands, on standard error and only on a terminal.

Scripts that read a command's standard output, or its standard error from a pipe,
see no bar: nothing of it is written when standard error is not a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

Advance = Callable[..., None]
"""``advance(steps=1, description=None)``: move the bar, optionally renaming the step."""


def shown(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


@contextmanager
def progress(
    description: str, total: float | None, *, stream: TextIO | None = None
) -> Iterator[Advance]:
    """A bar of ``total`` steps (None: unknown, a spinner); yields ``advance``."""
    if not shown(stream):

        def silent(steps: float = 1, description: str | None = None) -> None:
            return None

        yield silent
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(file=stream or sys.stderr)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(steps: float = 1, description: str | None = None) -> None:
            if description is None:
                bar.advance(task, steps)
            else:
                bar.update(task, advance=steps, description=description)

        yield advance
