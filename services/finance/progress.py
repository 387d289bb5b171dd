"""The progress port: where long reads report how far they are (a rich progress bar in the CLI)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Where long reads report how far they are (a rich progress bar in the CLI)."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, n: int) -> None: ...


class NoProgress:
    """Reports nowhere: the default of the use cases, and what tests pass."""

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass
