"""What each simulated provider module provides (`SimulatedProvider`), and what they share.

A module answers exactly as its real API does: its paths, its auth headers, its status codes and
its error bodies. It is written from the real API's documentation and observed answers, never from
our client (`providers/`), so a client bug cannot hide behind a simulator that agrees with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from services.provider_simulator.state import DEFAULT_STREAM_SLOW_CHUNKS, Rule

Json = dict[str, Any]
"""A JSON object, as the simulated APIs send and read them."""

Answer = Response | Json
"""What a simulated route returns: a response it built (an error, a stream) or a JSON body. Routes
returning it say `response_model=None`, so FastAPI sends the body as it is (no model to check it by)."""

Gate = Callable[[str, str | None, str], Awaitable[JSONResponse | Rule]]
"""`gate(provider, key, endpoint)`: counts the call, waits a slow key's delay, and answers the
provider's refusal for the key's behaviour (or an outage), or the key's `Rule` to let the call
through (a stream behaviour's rule says how its stream goes). A missing key is let through: each
provider answers its own "no key" error."""


class SimulatedProvider(Protocol):
    name: str  # the provider's value (`openai`, ...), as in the control API
    mount: str  # where it lives on the simulator (`/openai`)
    base_url_env: str  # the setting that points a service at it (`OPENAI_BASE_URL`)
    base_url_path: str  # what that setting is, below the simulator's root (`/openai/v1`)
    models: list[str]

    def refusal(self, rule: Rule) -> JSONResponse | None:
        """The provider's error answer for a key of this behaviour, or None (`valid`, `slow`)."""
        ...

    def router(self, gate: Gate) -> APIRouter:
        """The provider's model-list and chat routes, relative to `mount`."""
        ...


def tokens(text: str) -> int:
    return max(1, len(text) // 4)


def reply_text(model: str, said: str) -> str:
    """The simulated answer: it repeats the gist of the user's last message."""
    words = said.split()
    gist = " ".join(words[:8]) + ("…" if len(words) > 8 else "")
    return f"[{model} simulated] You said: {gist}"


# --- streams: each provider writes its own events; how a stream goes (pieces, pauses, a failure
# midway, a cut) is the same for all, from the key's rule ---


@dataclass(frozen=True)
class Pause:
    """Send nothing for `seconds` (the connection stays open)."""

    seconds: float


class Cut:
    """Stop here without ending the body: the server closes the connection midway."""


Frame = bytes | Pause | Cut


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: `event:` (if named) and `data:` lines, then a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return ((f"event: {event}\n" if event else "") + f"data: {text}\n\n").encode()


def stream_pieces(text: str, rule: Rule) -> list[str]:
    """`text` as the deltas of a streamed answer: a word each (with the space after it), or
    `rule.chunks` pieces (`stream_slow`: 40 by default), padded with words when the text is shorter."""
    words = re.findall(r"\S+\s*", text) or [text]
    count = rule.chunks or (DEFAULT_STREAM_SLOW_CHUNKS if rule.behaviour == "stream_slow" else None)
    if count is None:
        return words
    if len(words) < count:
        words[-1] = words[-1].rstrip() + " "
        words += ["and so on " for _ in range(count - len(words))]
        words[-1] = words[-1].rstrip()
    bounds = [len(words) * i // count for i in range(count + 1)]  # exactly `count` pieces, none empty
    return ["".join(words[bounds[i] : bounds[i + 1]]) for i in range(count)]


def stream_script(
    rule: Rule,
    pieces: Sequence[str],
    *,
    head: list[bytes],
    delta: Callable[[str], bytes],
    tail: list[bytes],
    error: bytes,
) -> list[Frame]:
    """The frames of a streamed answer: `head`, a `delta` per piece, `tail`; halfway through, the
    key's stream behaviour: `stream_fail` sends the provider's `error` event and ends the body,
    `stream_cut` closes the connection, `stream_stall` pauses `delay_ms`; `stream_slow` pauses
    `delay_ms` between pieces."""
    frames: list[Frame] = list(head)
    midway = max(1, len(pieces) // 2)
    delay_s = rule.delay_ms / 1000
    for i, piece in enumerate(pieces):
        if i == midway:
            if rule.behaviour == "stream_fail":
                return [*frames, error]
            if rule.behaviour == "stream_cut":
                return [*frames, Cut()]
            if rule.behaviour == "stream_stall":
                frames.append(Pause(delay_s))
        if i and rule.behaviour == "stream_slow" and delay_s:
            frames.append(Pause(delay_s))
        frames.append(delta(piece))
    if len(pieces) <= midway and rule.behaviour in ("stream_fail", "stream_cut"):
        return [*frames, error if rule.behaviour == "stream_fail" else Cut()]
    return [*frames, *tail]


class EventStream(Response):
    """A `text/event-stream` answer that plays its frames as they come, pausing and cutting as told.

    It listens for the client going away meanwhile: a pause ends at once and nothing more is sent,
    so a caller that stops (the chat's Stop) ends the stream here too."""

    media_type = "text/event-stream"

    def __init__(self, frames: list[Frame], headers: dict[str, str] | None = None, *, fails: bool = False):
        # Not Response.__init__: it would announce a Content-Length of 0 (the body is chunked).
        self.status_code, self.background, self.frames, self.fails = 200, None, frames, fails
        self.init_headers({"cache-control": "no-cache", "content-type": "text/event-stream", **(headers or {})})

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        gone = asyncio.Event()
        outcome = "abandoned"

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        listener = asyncio.create_task(listen())
        try:
            for frame in self.frames:
                if gone.is_set():
                    return
                if isinstance(frame, Pause):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(gone.wait(), frame.seconds)
                elif isinstance(frame, Cut):
                    outcome = "cut"
                    return  # the body never ends: the server closes the connection
                else:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                outcome = "failed" if self.fails else "completed"
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            app = scope.get("app")
            if app is not None and hasattr(app.state, "sim"):
                app.state.sim._count_stream(outcome)
