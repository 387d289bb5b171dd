"""What each simulated provider module provides (`SimulatedProvider`), and what they share.

A module answers exactly as its real API does: its paths, its auth headers, its status codes and
its error bodies. It is written from the real API's documentation and observed answers, never from
our client (`providers/`), so a client bug cannot hide behind a simulator that agrees with it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.provider_simulator.state import Rule

Gate = Callable[[str, str | None, str], Awaitable[JSONResponse | None]]
"""`gate(provider, key, endpoint)`: counts the call, waits a slow key's delay, and answers the
provider's refusal for the key's behaviour (or an outage), or None to let the call through. A
missing key is let through: each provider answers its own "no key" error."""


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
