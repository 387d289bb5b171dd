"""What an entry point asks the call use case for: one user action's call, from the page's `POST /chat`
or from the OpenAI-compatible `POST /v1/chat/completions` (one code path for both)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from schemas.events import Feature


@dataclass(frozen=True)
class CallRequest:
    feature: Feature
    # The conversation as the provider gets it (the page puts the feature's prompt first).
    messages: Sequence[Mapping[str, str]]
    # The model asked for (the gateway); None: the user's saved chat settings decide (the page).
    model: str | None = None
    # The user's own key for this call only (the gateway's X-Provider-Key): never stored or shown.
    own_key: str | None = field(default=None, repr=False)
    max_tokens: int = 1024
    # Where it came from: the same Idempotency-Key on another route is another request.
    route: str = "chat"
    # What the page showed for the call (key source, model, credits): the call runs only on that route.
    shown: tuple[str, str, int | None] | None = None

    def digest(self) -> str:
        """What makes two requests with one key the same call: everything but the key (never hashed,
        so a reused key with another own key is the same call rather than a probe of the key)."""
        body: dict[str, object] = {
            "route": self.route,
            "feature": self.feature.value,
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": [dict(m) for m in self.messages],
        }
        if self.shown is not None:  # digests of requests without it stay what they were
            body["shown"] = list(self.shown)
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
