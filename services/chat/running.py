"""A call running on this instance, as its readers see it: the text so far, then its outcome.

A streamed call is stopped when its last reader goes away (the page's Stop is the client closing the
stream); a plain call runs on whoever waits for it (DESIGN "The call lifecycle").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from services.chat.call_store import Outcome


class RunningCall:
    """A call this instance is running: the text so far, who follows it, and its outcome once it ends."""

    def __init__(self, stream: bool, event_id: str = "", model: str = ""):
        loop = asyncio.get_running_loop()
        # What the call is known by before it ends: its event id, and the model that runs it.
        self.stream, self.event_id, self.model = stream, event_id, model
        self.deltas: list[str] = []
        self.outcome: asyncio.Future[Outcome] = loop.create_future()
        self._changed: asyncio.Future[None] = loop.create_future()
        self.listeners = 0
        self.stopping = False
        self.task: asyncio.Task[Any] | None = None

    def push(self, text: str) -> None:
        self.deltas.append(text)
        self._notify()

    def finish(self, outcome: Outcome) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    def stop(self) -> None:
        """Stop the call (the user pressed Stop, or went away from a stream)."""
        if self.task is not None and not self.outcome.done():
            self.stopping = True
            self.task.cancel()

    async def follow(self, idle_s: float = 15.0) -> AsyncIterator[str | Outcome | None]:
        """The text from the start, then the outcome; None after `idle_s` without news (a keep-alive).
        A streamed call whose last follower leaves is stopped."""
        self.listeners += 1
        try:
            seen = 0
            while True:
                while seen < len(self.deltas):
                    seen += 1
                    yield self.deltas[seen - 1]
                if self.outcome.done():
                    yield self.outcome.result()
                    return
                try:
                    await asyncio.wait_for(asyncio.shield(self._changed), idle_s)
                except TimeoutError:
                    yield None
        finally:
            self.listeners -= 1
            if self.listeners == 0 and self.stream:
                self.stop()

    async def result(self) -> Outcome:
        """The outcome, waited for without stopping the call if the waiter goes away."""
        self.listeners += 1
        try:
            return await asyncio.shield(self.outcome)
        finally:
            self.listeners -= 1
