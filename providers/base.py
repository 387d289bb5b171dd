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
    """A provider refused or failed a call; `verdict` says what it means for the user's key.

    `timed_out`: the provider did not answer, or stopped sending in the middle of a streamed answer,
    within the client's timeout (the call ended by timeout, not by the provider's refusal)."""

    def __init__(
        self, provider: Provider, verdict: KeyVerdict, http_status: int | None = None, *, timed_out: bool = False
    ):
        super().__init__(
            f"{provider.value}: {verdict.status.value} (HTTP {http_status}){' timed out' if timed_out else ''}"
        )
        self.provider, self.verdict, self.http_status, self.timed_out = provider, verdict, http_status, timed_out


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event: its `event:` name ('' when none was given) and its `data:` lines joined."""

    event: str
    data: str


@dataclass(frozen=True)
class StreamPiece:
    """What one event of a streamed chat answer says, in the provider's terms made common.

    `text`: a text delta ('' if none). `input_tokens` / `output_tokens`: usage, when the event carries
    it (None otherwise; a later event's figure replaces an earlier one). `model`: the model that
    answers, when named. `done`: the provider's own end of a complete answer (OpenAI's `[DONE]`,
    Anthropic's `message_stop`, Gemini's candidate with a `finishReason`). `error`: the body of an
    error the provider sent in the stream (the answer failed midway)."""

    text: str = ""
    input_tokens: int | None = None
    output_tokens: int | None = None
    model: str | None = None
    done: bool = False
    error: Mapping[str, Any] | None = None


IGNORED = StreamPiece()
"""An event that says nothing we use (Anthropic's `ping`, a role-only delta, ...)."""


class SseDecoder:
    """Server-sent events from a byte stream fed in chunks of any size (the WHATWG rules: lines end
    in CRLF, LF or CR; `data:` lines of one event are joined with LF; a blank line ends an event;
    lines starting with ':' are comments; one space after the colon is dropped).

    Pure and incremental: `feed(chunk)` returns the events the chunk completed; `close()` those a
    stream ending without a final blank line leaves (none, for a well-formed stream). A line longer
    than `max_line` raises ValueError: no provider sends one, and it must not grow without bound."""

    def __init__(self, max_line: int = 4 * 1024 * 1024):
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._max_line = max_line
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        events: list[SseEvent] = []
        buffer = self._buffer + chunk
        if self._skip_lf and buffer[:1] == b"\n":
            buffer = buffer[1:]
        self._skip_lf = False
        start = 0
        while True:
            ends = [i for i in (buffer.find(b"\r", start), buffer.find(b"\n", start)) if i >= 0]
            if not ends:
                break
            end = min(ends)
            if buffer[end : end + 1] == b"\r":
                if end + 1 == len(buffer):
                    self._skip_lf = True  # a CR at the end of a chunk: a LF may follow in the next one
                    step = 1
                else:
                    step = 2 if buffer[end + 1 : end + 2] == b"\n" else 1
            else:
                step = 1
            event = self._line(buffer[start:end].decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
            start = end + step
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max_line:
            raise ValueError("a server-sent event line is too long")
        return events

    def close(self) -> list[SseEvent]:
        """The event a stream that ended without its final blank line leaves, if any."""
        events: list[SseEvent] = []
        if self._buffer:
            event = self._line(self._buffer.decode("utf-8", errors="replace"))
            self._buffer = b""
            if event is not None:
                events.append(event)
        event = self._line("")
        if event is not None:
            events.append(event)
        return events

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = SseEvent(self._event, "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None  # `id:` and `retry:` mean nothing to a chat call


def json_object(data: str) -> Mapping[str, Any]:
    """The JSON object of an event's data (ValueError when it is not one)."""
    value = json.loads(data)
    if not isinstance(value, Mapping):
        raise ValueError("an event's data is not a JSON object")
    return value


def token_count(value: Any) -> int | None:
    """A usage figure as an int, None when absent."""
    return None if value is None else int(value)


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
        """Model ids that start with one of these are this provider's (its own naming: `gpt-`,
        `claude`, ...). No two providers claim overlapping prefixes (a test holds them to it)."""
        ...

    @property
    def models(self) -> tuple[str, ...]:
        """The catalog: the models the page and `GET /v1/models` offer for this provider, in the page's
        order (any model id is accepted over the API). Each is this provider's by exact id."""
        ...

    @property
    def hosted_models(self) -> tuple[str, ...]:
        """Other models this provider runs and owns by exact id although no prefix of its own names
        them (another maker's name, e.g. Groq's `mistral-saba-24b`), so the prefix stays free for the
        maker's own provider. Not offered by the catalog."""
        ...

    @property
    def base_url_setting(self) -> str:
        """The field of `registry.ProviderSettings` (env name, lowercased) holding the base URL."""
        ...

    @property
    def api_key_setting(self) -> str:
        """The field of `registry.PlatformKeySettings` (env name, lowercased) holding the platform's own key."""
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

    def key_pattern(self) -> str:
        """A regular expression matching anything shaped like this provider's key, even cut short (12
        characters after its prefix, or half its shortest length if more): what the logs mask
        (`services.shared.logging`)."""
        ...

    def sample_key(self, marker: str) -> str:
        """A key of this provider's shape carrying `marker` (a behaviour word of the provider simulator,
        e.g. `valid`), ending in `a1b2`: for tests and local defaults, never a real key."""
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

    def classify_error(
        self, http_status: int, body: ErrorBody, headers: Mapping[str, str] | None = None, *, call: bool = False
    ) -> KeyVerdict:
        """A non-2xx answer (model list or chat) as a verdict on the key. Only an explicit
        authentication refusal condemns a key; anything unknown is `provider_unavailable`, worded as a
        key check that could not be made (`unavailable`) or, with `call`, as a call that failed
        (`call_failed`)."""
        ...

    # --- streaming (the pure parts; the call is `providers.client.chat_stream`) ---

    def stream_path(self, model: str) -> str:
        """The real streaming chat path (with its query, if any), relative to the base URL."""
        ...

    def stream_body(self, model: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
        """The request body that asks for `messages` answered as a stream, usage included."""
        ...

    def parse_stream_event(self, event: SseEvent) -> StreamPiece:
        """What one server-sent event of the answer says (raises ValueError/KeyError/TypeError/... when
        unreadable)."""
        ...

    def classify_stream_error(self, body: Mapping[str, Any]) -> KeyVerdict:
        """An error the provider sent in the middle of a stream (HTTP 200 already sent), as a verdict
        worded for a call."""
        ...

    def cut_off(self, reason: str) -> KeyVerdict:
        """A streamed answer that broke off (closed early, or stopped sending): never a verdict on the key."""
        ...

    def valid(self) -> KeyVerdict: ...

    def unavailable(self, reason: str = "did not answer in time") -> KeyVerdict:
        """A key check the provider could not answer (timeout, network, 5xx): never a verdict on the key."""
        ...

    def call_failed(self, reason: str = "did not answer in time") -> KeyVerdict:
        """A call the provider could not answer (timeout, network, 5xx, an unreadable answer): the call
        did not complete, and it says nothing about the key (nothing was being verified)."""
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
    models: ClassVar[tuple[str, ...]]
    hosted_models: ClassVar[tuple[str, ...]] = ()
    keys_url: ClassVar[str]
    billing_url: ClassVar[str]
    base_url_setting: ClassVar[str]  # the settings field (env name, lowercased) of the base URL
    api_key_setting: ClassVar[str]  # the settings field of the platform's own key

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

    def key_pattern(self) -> str:
        # At least 12 characters after the prefix, so words such as `task-scheduler` stay readable;
        # a key cut to half its shortest length is still masked.
        tails = ((p, max(12, (self.key_min_length - len(p)) // 2)) for p in self.key_prefixes)
        return "|".join(f"{re.escape(p)}{self.key_charset}{{{n},}}" for p, n in tails)

    def sample_key(self, marker: str) -> str:
        separator = "-" if re.fullmatch(self.key_charset, "-") else ""
        zeros = max(20, self.key_min_length - len(self.key_prefixes[0]) - len(separator) - 4)
        return f"{self.key_prefixes[0]}{marker}{separator}{'0' * zeros}a1b2"

    def base_url(self, settings: BaseSettings) -> str:
        return str(getattr(settings, self.base_url_setting)).rstrip("/")

    # --- errors ---

    def classify_error(
        self, http_status: int, body: ErrorBody, headers: Mapping[str, str] | None = None, *, call: bool = False
    ) -> KeyVerdict:
        unavailable = self.call_failed if call else self.unavailable
        if http_status >= 500 or http_status in (408, 529):
            return unavailable(f"is having problems right now (HTTP {http_status})")
        verdict = self.classify_refusal(http_status, error_fields(body), retry_after(headers))
        return verdict or unavailable(f"answered with an unexpected error (HTTP {http_status})")

    def classify_refusal(self, http_status: int, error: ErrorFields, retry_after_s: float | None) -> KeyVerdict | None:
        """A 4xx answer as a verdict on the key, from the provider's own error body; None when unknown."""
        raise NotImplementedError

    def classify_stream_error(self, body: Mapping[str, Any]) -> KeyVerdict:
        return self.classify_error(self.stream_error_status(error_fields(body)), body, call=True)

    def stream_error_status(self, error: ErrorFields) -> int:
        """The HTTP status an error sent mid-stream stands for (the stream itself answered 200): the
        same error answered before the stream started would have had it. Unknown: 500."""
        return 500

    # --- what a user reads ---

    def valid(self) -> KeyVerdict:
        return KeyVerdict(KeyCheckStatus.VALID, f"Your {self.name} key works.")

    def unavailable(self, reason: str = "did not answer in time") -> KeyVerdict:
        return KeyVerdict(
            KeyCheckStatus.PROVIDER_UNAVAILABLE,
            f"We could not verify your key because {self.name} {reason}. The key may well be fine: try again in a minute.",
        )

    def call_failed(self, reason: str = "did not answer in time") -> KeyVerdict:
        return KeyVerdict(
            KeyCheckStatus.PROVIDER_UNAVAILABLE,
            f"{self.name} {reason}, so this call did not complete. This says nothing about your key: "
            "try again in a minute.",
        )

    def cut_off(self, reason: str) -> KeyVerdict:
        return KeyVerdict(
            KeyCheckStatus.PROVIDER_UNAVAILABLE,
            f"{self.name} {reason}, so the answer was cut off. This says nothing about your key: try again in a minute.",
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
