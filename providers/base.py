"""What every provider module shares: the protocol it implements, the verdicts, replies and errors it
answers with, and the pure helpers its rules are written with.

`ProviderApi` is the contract a provider module fulfils; `ProviderBase` gives the parts that are the
same for every provider today (the key-shape check and the sentences a user reads, all worded with the
provider's own name and pages), so a module states only what is its own. A key is never put in an
exception message, a log line or a repr by this package.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from urllib.parse import quote

from pydantic_settings import BaseSettings

from schemas.events import MODEL_ID_PATTERN, KeyCheckStatus, Provider

# Longest key we accept at all; real keys are at most ~200 characters.
MAX_KEY_LENGTH = 512

Messages = Sequence[Mapping[str, str]]
"""A conversation: [{role, content}], roles user / assistant / system."""

ErrorBody = bytes | str | Mapping[str, Any] | None
"""A provider's error answer as received (raw bytes or text) or already parsed."""

# Words in an authentication refusal that say the key existed but is gone, not mistyped.
REVOKED_WORDS = re.compile(r"revoked|deactivated|disabled|expired|deleted", re.I)


# --- what a check or a call answers ---------------------------------------------------------------


@dataclass(frozen=True)
class KeyVerdict:
    """A key-check status with the sentence a user can act on."""

    status: KeyCheckStatus
    message: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class ChatReply:
    text: str
    input_tokens: int
    output_tokens: int
    model: str


class ProviderError(Exception):
    """A provider refused or failed a call; `verdict` says what it means for the user's key."""

    def __init__(self, provider: Provider, verdict: KeyVerdict, http_status: int | None = None):
        super().__init__(f"{provider.value}: {verdict.status.value} (HTTP {http_status})")
        self.provider, self.verdict, self.http_status = provider, verdict, http_status


class InvalidModelId(ValueError):
    """A model id that could leave its URL path segment; it is never sent."""


# --- pure helpers ---------------------------------------------------------------------------------


def normalize_key(api_key: str) -> str:
    """The key as the user meant it: surrounding whitespace (a pasted newline) removed."""
    return api_key.strip()


def model_segment(model: str) -> str:
    """`model` as one URL path segment: only a well-formed model id, and escaped all the same."""
    if not isinstance(model, str) or not re.fullmatch(MODEL_ID_PATTERN, model):
        raise InvalidModelId("a model id is 1 to 100 letters, digits, '.', '_', ':' or '-'")
    return quote(model, safe=":")


def a_or_an(name: str) -> str:
    return ("an " if name[0] in "AEIOU" else "a ") + name


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait, from `Retry-After` or OpenAI's `x-ratelimit-reset-requests` ("20s"); None if absent."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in ("retry-after", "x-ratelimit-reset-requests"):
        value = lowered.get(name)
        if value:
            try:
                return max(0.0, float(value.rstrip("s")))
            except ValueError:
                continue
    return None


@dataclass(frozen=True)
class ErrorFields:
    """The fields of an `{"error": {...}}` body, '' (or empty) where absent. Every provider nests its
    error under `error`; which fields it fills differs (`type`/`code` at OpenAI, `type` at Anthropic,
    `status`/`details` at Google)."""

    kind: str = ""  # error.type, or error.status (Google's gRPC status name)
    code: str = ""
    message: str = ""
    details: list[Any] = field(default_factory=list)

    @property
    def reasons(self) -> set[str]:
        """`reason` of each detail (Google's `ErrorInfo`)."""
        return {str(d.get("reason", "")) for d in self.details if isinstance(d, Mapping)}

    @property
    def quota_ids(self) -> str:
        """The violated quotas' ids (Google's `QuotaFailure`), space-separated."""
        return " ".join(
            str(v.get("quotaId", ""))
            for d in self.details
            if isinstance(d, Mapping)
            for v in d.get("violations", []) or []
            if isinstance(v, Mapping)
        )


def error_fields(body: ErrorBody) -> ErrorFields:
    """The `ErrorFields` of any provider's error body; all empty when it is not JSON of that shape."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body or b"{}")
        except ValueError:
            return ErrorFields()
    if not isinstance(body, Mapping):
        return ErrorFields()
    error = body.get("error")
    if not isinstance(error, Mapping):
        return ErrorFields()
    details = error.get("details")
    return ErrorFields(
        kind=str(error.get("type") or error.get("status") or ""),
        code=str(error.get("code") or ""),
        message=str(error.get("message") or ""),
        details=details if isinstance(details, list) else [],
    )


# --- the protocol -------------------------------------------------------------------------------


class ProviderApi(Protocol):
    """One provider's HTTP API as this system uses it: key shape, URLs, auth, chat format, errors.

    Implemented once per provider in `providers/<name>.py` and registered in `providers/registry.py`.
    Everything is pure; the calls themselves are in `providers/client.py`.
    """

    @property
    def provider(self) -> Provider: ...

    @property
    def name(self) -> str:
        """As shown to a user."""
        ...

    @property
    def key_prefixes(self) -> tuple[str, ...]:
        """A well-formed key starts with one of these (longest first)."""
        ...

    @property
    def model_prefixes(self) -> tuple[str, ...]:
        """Model ids that are this provider's start with one of these (the compatibility route's guess)."""
        ...

    @property
    def keys_url(self) -> str:
        """Where a user manages keys."""
        ...

    @property
    def billing_url(self) -> str: ...

    def key_shape_problem(self, api_key: str, owner: ProviderApi | None) -> str | None:
        """None when `api_key` (normalized) looks like this provider's key, else what is wrong with it.

        `owner` is the provider whose key prefix `api_key` carries, if any (it may be another one).
        """
        ...

    def key_prefix_of(self, api_key: str) -> str | None:
        """The prefix of `api_key` among this provider's key prefixes (the longest), or None."""
        ...

    def base_url(self, settings: BaseSettings) -> str:
        """The configured base URL (its setting's default is the real provider), without a trailing '/'."""
        ...

    def models_path(self) -> str:
        """The real model-list path, relative to the base URL: the cheapest call that proves a key."""
        ...

    def chat_path(self, model: str) -> str:
        """The real (non-streaming) chat path, relative to the base URL."""
        ...

    def auth_headers(self, api_key: str, settings: BaseSettings | None = None) -> dict[str, str]:
        """The request headers that authenticate `api_key`."""
        ...

    def chat_body(self, model: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
        """The request body for `messages`."""
        ...

    def parse_chat_reply(self, model: str, body: Mapping[str, Any]) -> ChatReply:
        """Text and token usage of a successful chat answer (raises KeyError/TypeError/... when unreadable)."""
        ...

    def classify_error(self, http_status: int, body: ErrorBody, headers: Mapping[str, str] | None = None) -> KeyVerdict:
        """A non-2xx answer (model list or chat) as a verdict on the key. Only an explicit
        authentication refusal condemns a key; anything unknown is `provider_unavailable`."""
        ...

    def valid(self) -> KeyVerdict: ...

    def unavailable(self, reason: str = "did not answer in time") -> KeyVerdict:
        """The provider could not be asked (timeout, network, 5xx): never a verdict on the key."""
        ...


class ProviderBase:
    """Defaults shared by the provider modules: the key-shape check and the sentences a user reads.

    A subclass sets the class attributes and implements the paths, auth, chat format and
    `classify_refusal`; it overrides a message where its provider needs other words.
    """

    provider: ClassVar[Provider]
    name: ClassVar[str]
    key_prefixes: ClassVar[tuple[str, ...]]
    key_charset: ClassVar[str]  # regex character class of the rest of the key
    key_min_length: ClassVar[int]
    model_prefixes: ClassVar[tuple[str, ...]]
    keys_url: ClassVar[str]
    billing_url: ClassVar[str]
    base_url_setting: ClassVar[str]  # the settings field (env name, lowercased) of the base URL

    # --- key shape ---

    def key_shape_problem(self, api_key: str, owner: ProviderApi | None) -> str | None:
        name, keys_url = self.name, self.keys_url
        if not api_key:
            return f"The {name} key is empty. Paste the key from {keys_url}."
        if len(api_key) > MAX_KEY_LENGTH:
            return f"This is too long to be {a_or_an(name)} key. Paste only the key itself, from {keys_url}."
        if owner is not None and owner.provider is not self.provider:
            return (
                f"This looks like {a_or_an(owner.name)} key, not {a_or_an(name)} key. "
                f"Choose {owner.name} as the provider, or paste {a_or_an(name)} key."
            )
        prefix = self.key_prefix_of(api_key)
        if prefix is None:
            prefixes = self.key_prefixes
            starts = " or ".join(f"'{p}'" for p in prefixes[-1:] + prefixes[:-1][:1])
            return f"This does not look like {a_or_an(name)} key: {name} keys start with {starts}. Copy it again from {keys_url}."
        if re.search(r"\s", api_key):
            return f"The {name} key contains spaces or line breaks. Copy it again as one piece from {keys_url}."
        if not re.fullmatch(f"{self.key_charset}+", api_key[len(prefix) :]) or len(api_key) < self.key_min_length:
            return f"This {name} key looks cut short or contains characters keys never have. Copy the whole key again from {keys_url}."
        return None

    def key_prefix_of(self, api_key: str) -> str | None:
        """The prefix of `api_key` among this provider's key prefixes (the longest), or None."""
        return next((p for p in self.key_prefixes if api_key.startswith(p)), None)

    def base_url(self, settings: BaseSettings) -> str:
        return str(getattr(settings, self.base_url_setting)).rstrip("/")

    # --- errors ---

    def classify_error(self, http_status: int, body: ErrorBody, headers: Mapping[str, str] | None = None) -> KeyVerdict:
        if http_status >= 500 or http_status in (408, 529):
            return self.unavailable(f"is having problems right now (HTTP {http_status})")
        verdict = self.classify_refusal(http_status, error_fields(body), retry_after(headers))
        return verdict or self.unavailable(f"answered with an unexpected error (HTTP {http_status})")

    def classify_refusal(self, http_status: int, error: ErrorFields, retry_after_s: float | None) -> KeyVerdict | None:
        """A 4xx answer as a verdict on the key, from the provider's own error body; None when unknown."""
        raise NotImplementedError

    # --- what a user reads ---

    def valid(self) -> KeyVerdict:
        return KeyVerdict(KeyCheckStatus.VALID, f"Your {self.name} key works.")

    def unavailable(self, reason: str = "did not answer in time") -> KeyVerdict:
        return KeyVerdict(
            KeyCheckStatus.PROVIDER_UNAVAILABLE,
            f"We could not verify your key because {self.name} {reason}. The key may well be fine: try again in a minute.",
        )

    def revoked(self) -> KeyVerdict:
        return KeyVerdict(
            KeyCheckStatus.REVOKED_OR_EXPIRED,
            f"This {self.name} key has been revoked or has expired. Create a new key at {self.keys_url} and paste it here.",
        )

    def invalid(self) -> KeyVerdict:
        return KeyVerdict(
            KeyCheckStatus.INVALID,
            f"{self.name} does not recognise this key. Check that you copied the whole key, or create a new one at {self.keys_url}.",
        )

    def denied(self) -> KeyVerdict:
        return KeyVerdict(
            KeyCheckStatus.PERMISSION_DENIED,
            f"{self.name} accepted this key but it is not allowed to use the API (restricted key, project or region). "
            f"Check the key's permissions at {self.keys_url}, or use an unrestricted key.",
        )

    def quota_exhausted(self) -> KeyVerdict:
        return KeyVerdict(
            KeyCheckStatus.QUOTA_EXHAUSTED,
            f"This {self.name} key works but its account has no quota or credit left. Add credit or raise the limit "
            f"at {self.billing_url}, then try again.",
        )

    def rate_limited(self, retry_after_s: float | None) -> KeyVerdict:
        wait = f"about {math.ceil(retry_after_s)} seconds" if retry_after_s else "a minute"
        return KeyVerdict(
            KeyCheckStatus.RATE_LIMITED,
            f"{self.name} is rate-limiting this key right now. Wait {wait} and try again.",
            retry_after_s,
        )
