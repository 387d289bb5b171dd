"""The CLI's side of the progress port (services.finance.progress): a rich progress bar."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichProgress:
    """The reconciliation's progress port, drawn as a rich progress bar on stderr."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.task: TaskID | None = None

    def start(self, total: int, description: str) -> None:
        self.task = self.bar.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self.task is not None:  # the use cases start the bar before they advance it
            self.bar.advance(self.task, n)


def progress_bar(quiet: bool, console: Console) -> Progress:
    """A transient bar of records read (disabled with `quiet`), drawn on `console`."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("records"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=quiet,
    )
