"""The event loop every service runs on: uvloop, as uvicorn gives the chat.

The credit service and the validation worker start their loop themselves (their consumer starts before
the HTTP server), and `asyncio.run` gave them the standard loop: a quarter more CPU per hold than the
chat's uvloop spends per request on the same work (issue 22). uvloop comes with uvicorn[standard];
where it is missing (not a Linux or macOS build) the standard loop runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new uvloop loop (the standard one without uvloop), as asyncio.run."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships for every platform the services run on
        return asyncio.run(main)
    return uvloop.run(main)
