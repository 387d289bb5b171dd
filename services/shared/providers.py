"""What this system knows about each LLM provider's HTTP API, shared by the chat and validation services.

Everything here is pure (no I/O) except `list_models` and `chat_completion`, which take the caller's
`httpx.AsyncClient` so the caller owns connection pooling and timeouts.

- `ProviderSettings`: base URLs from the environment (`OPENAI_BASE_URL`, `ANTHROPIC_BASE_URL`,
  `GROQ_BASE_URL`, `GEMINI_BASE_URL`); defaults are the real providers. Each base URL follows the
  provider SDK's convention (OpenAI's includes `/v1`; the others are the bare host), and the
  provider's real paths are appended to it (see `models_path` / `chat_path`).
- `auth_headers(provider, key)`: the provider's real auth scheme.
- `normalize_key`, `key_shape_problem`: local shape checks (a malformed key never costs a call).
- `key_hint(key)`: the only form of a key that may be shown, logged or stored (`sk-…a1b2`).
- `classify_error(provider, http_status, body, headers)`: a provider error answer mapped to a
  `KeyCheckStatus` and a sentence a user can act on. `unavailable(provider, reason)` for timeouts
  and network failures ("could not verify", never "invalid").
- `chat_completion(...)`: one non-streaming chat call, answering a `ChatReply` with token usage,
  or raising `ProviderError` (which carries the classified status and message).
- `provider_http_client(...)`: the client for both; a call that fails before any response byte (a
  pooled connection the provider had closed) is sent once more, on a fresh connection.

A key is never put in an exception message, a log line or a repr by this module.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from urllib.parse import quote

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.events import MODEL_ID_PATTERN, KeyCheckStatus, Provider

ANTHROPIC_VERSION = "2023-06-01"
# Longest key we accept at all; real keys are at most ~200 characters.
MAX_KEY_LENGTH = 512


class ProviderSettings(BaseSettings):
    """Provider base URLs (env `OPENAI_BASE_URL`, ...); the defaults are the real providers."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    openai_base_url: str = "https://api.openai.com/v1"
    anthropic_base_url: str = "https://api.anthropic.com"
    groq_base_url: str = "https://api.groq.com"
    gemini_base_url: str = "https://generativelanguage.googleapis.com"
    anthropic_version: str = ANTHROPIC_VERSION

    def base_url(self, provider: Provider | str) -> str:
        return getattr(self, f"{Provider(provider).value}_base_url").rstrip("/")

    def models_url(self, provider: Provider | str) -> str:
        """URL of the provider's model list: the cheapest authenticated call that proves a key."""
        return self.base_url(provider) + models_path(provider)

    def chat_url(self, provider: Provider | str, model: str) -> str:
        return self.base_url(provider) + chat_path(provider, model)


# --- per-provider facts -----------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderInfo:
    name: str  # as shown to a user
    prefixes: tuple[str, ...]  # a well-formed key starts with one of these (longest first)
    charset: str  # regex character class of the rest of the key
    min_length: int
    keys_url: str  # where a user manages keys
    billing_url: str


INFO: dict[Provider, ProviderInfo] = {
    Provider.OPENAI: ProviderInfo(
        "OpenAI",
        ("sk-proj-", "sk-svcacct-", "sk-admin-", "sk-"),
        r"[A-Za-z0-9_\-]",
        20,
        "https://platform.openai.com/api-keys",
        "https://platform.openai.com/settings/organization/billing",
    ),
    Provider.ANTHROPIC: ProviderInfo(
        "Anthropic",
        ("sk-ant-",),
        r"[A-Za-z0-9_\-]",
        20,
        "https://console.anthropic.com/settings/keys",
        "https://console.anthropic.com/settings/billing",
    ),
    Provider.GROQ: ProviderInfo(
        "Groq",
        ("gsk_",),
        r"[A-Za-z0-9]",
        20,
        "https://console.groq.com/keys",
        "https://console.groq.com/settings/billing",
    ),
    Provider.GEMINI: ProviderInfo(
        "Gemini",
        ("AIza",),
        r"[A-Za-z0-9_\-]",
        30,
        "https://aistudio.google.com/app/apikey",
        "https://aistudio.google.com/app/plan_information",
    ),
}


def models_path(provider: Provider | str) -> str:
    """The provider's real model-list path, relative to its base URL."""
    return {
        Provider.OPENAI: "/models",
        Provider.GROQ: "/openai/v1/models",
        Provider.ANTHROPIC: "/v1/models",
        Provider.GEMINI: "/v1beta/models",
    }[Provider(provider)]


class InvalidModelId(ValueError):
    """A model id that could leave its URL path segment; it is never sent."""


def model_segment(model: str) -> str:
    """`model` as one URL path segment: only a well-formed model id, and escaped all the same."""
    if not isinstance(model, str) or not re.fullmatch(MODEL_ID_PATTERN, model):
        raise InvalidModelId("a model id is 1 to 100 letters, digits, '.', '_', ':' or '-'")
    return quote(model, safe=":")


def chat_path(provider: Provider | str, model: str) -> str:
    """The provider's real (non-streaming) chat path, relative to its base URL."""
    provider = Provider(provider)
    if provider is Provider.GEMINI:  # the only provider with the model in the path
        return f"/v1beta/models/{model_segment(model)}:generateContent"
    return {
        Provider.OPENAI: "/chat/completions",
        Provider.GROQ: "/openai/v1/chat/completions",
        Provider.ANTHROPIC: "/v1/messages",
    }[provider]


def auth_headers(
    provider: Provider | str, api_key: str, *, anthropic_version: str = ANTHROPIC_VERSION
) -> dict[str, str]:
    """The request headers that authenticate `api_key` with `provider`."""
    provider = Provider(provider)
    if provider in (Provider.OPENAI, Provider.GROQ):
        return {"Authorization": f"Bearer {api_key}"}
    if provider is Provider.ANTHROPIC:
        return {"x-api-key": api_key, "anthropic-version": anthropic_version}
    return {"x-goog-api-key": api_key}


# --- key shape and hint -----------------------------------------------------------------------


def normalize_key(api_key: str) -> str:
    """The key as the user meant it: surrounding whitespace (a pasted newline) removed."""
    return api_key.strip()


def _owner_of(api_key: str) -> Provider | None:
    # Anthropic's prefix starts with OpenAI's, so test the more specific ones first.
    for provider in (Provider.ANTHROPIC, Provider.GROQ, Provider.GEMINI, Provider.OPENAI):
        if api_key.startswith(INFO[provider].prefixes):
            return provider
    return None


def _a(name: str) -> str:
    return ("an " if name[0] in "AEIOU" else "a ") + name


def key_shape_problem(provider: Provider | str, api_key: str) -> str | None:
    """None when `api_key` (normalized) looks like a `provider` key, else a message saying what is wrong.

    Purely local: a key that fails here is answered `malformed` without any network call.
    """
    provider = Provider(provider)
    info = INFO[provider]
    if not api_key:
        return f"The {info.name} key is empty. Paste the key from {info.keys_url}."
    if len(api_key) > MAX_KEY_LENGTH:
        return f"This is too long to be {_a(info.name)} key. Paste only the key itself, from {info.keys_url}."
    owner = _owner_of(api_key)
    if owner is not None and owner is not provider:
        return (
            f"This looks like {_a(INFO[owner].name)} key, not {_a(info.name)} key. "
            f"Choose {INFO[owner].name} as the provider, or paste {_a(info.name)} key."
        )
    prefix = next((p for p in info.prefixes if api_key.startswith(p)), None)
    if prefix is None:
        starts = " or ".join(f"'{p}'" for p in info.prefixes[-1:] + info.prefixes[:-1][:1])
        return f"This does not look like {_a(info.name)} key: {info.name} keys start with {starts}. Copy it again from {info.keys_url}."
    if re.search(r"\s", api_key):
        return f"The {info.name} key contains spaces or line breaks. Copy it again as one piece from {info.keys_url}."
    if not re.fullmatch(f"{info.charset}+", api_key[len(prefix) :]) or len(api_key) < info.min_length:
        return f"This {info.name} key looks cut short or contains characters keys never have. Copy the whole key again from {info.keys_url}."
    return None


def key_hint(api_key: str) -> str | None:
    """The shown form of a key: its well-known prefix and last four characters (`sk-…a1b2`).

    None for a key too short to hint at without giving most of it away.
    """
    api_key = normalize_key(api_key)
    if len(api_key) < 16:
        return None
    owner = _owner_of(api_key)
    prefix = next((p for p in INFO[owner].prefixes if api_key.startswith(p)), "") if owner else ""
    return f"{prefix}…{api_key[-4:]}"


# --- error mapping ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyVerdict:
    """A key-check status with the sentence a user can act on."""

    status: KeyCheckStatus
    message: str
    retry_after_s: float | None = None


def valid(provider: Provider | str) -> KeyVerdict:
    return KeyVerdict(KeyCheckStatus.VALID, f"Your {INFO[Provider(provider)].name} key works.")


def malformed(provider: Provider | str, problem: str) -> KeyVerdict:
    return KeyVerdict(KeyCheckStatus.MALFORMED, problem)


def unavailable(provider: Provider | str, reason: str = "did not answer in time") -> KeyVerdict:
    """The provider could not be asked (timeout, network, 5xx): never a verdict on the key."""
    name = INFO[Provider(provider)].name
    return KeyVerdict(
        KeyCheckStatus.PROVIDER_UNAVAILABLE,
        f"We could not verify your key because {name} {reason}. The key may well be fine: try again in a minute.",
    )


def _error_fields(body: Any) -> tuple[str, str, str, list]:
    """(type, code, message, details) from any provider's error body, '' when absent."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body or b"{}")
        except ValueError:
            return "", "", "", []
    if not isinstance(body, Mapping):
        return "", "", "", []
    error = body.get("error")
    if not isinstance(error, Mapping):
        return "", "", "", []
    kind = str(error.get("type") or error.get("status") or "")
    code = str(error.get("code") or "")
    message = str(error.get("message") or "")
    details = error.get("details") if isinstance(error.get("details"), list) else []
    return kind, code, message, details


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
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


def _rate_limited(name: str, retry_after: float | None) -> KeyVerdict:
    wait = f"about {math.ceil(retry_after)} seconds" if retry_after else "a minute"
    return KeyVerdict(
        KeyCheckStatus.RATE_LIMITED,
        f"{name} is rate-limiting this key right now. Wait {wait} and try again.",
        retry_after,
    )


_REVOKED_WORDS = re.compile(r"revoked|deactivated|disabled|expired|deleted", re.I)
_QUOTA_WORDS = re.compile(r"quota|credit balance|billing|insufficient funds", re.I)
_PERMISSION_WORDS = re.compile(r"permission|not allowed|missing scopes", re.I)


def classify_error(
    provider: Provider | str,
    http_status: int,
    body: bytes | str | Mapping | None,
    headers: Mapping[str, str] | None = None,
) -> KeyVerdict:
    """Map a provider's non-2xx answer (status, error body, headers) to a verdict on the key.

    Works for the model-list check and for chat calls alike. Unknown 4xx answers are reported as
    `provider_unavailable` with the provider's status, never as `invalid`: only an explicit
    authentication refusal condemns a key.
    """
    provider = Provider(provider)
    info = INFO[provider]
    name = info.name
    kind, code, message, details = _error_fields(body)
    reasons = {str(d.get("reason", "")) for d in details if isinstance(d, Mapping)}
    quota_ids = " ".join(
        str(v.get("quotaId", ""))
        for d in details
        if isinstance(d, Mapping)
        for v in d.get("violations", []) or []
        if isinstance(v, Mapping)
    )
    retry_after = _retry_after(headers)
    revoked = KeyVerdict(
        KeyCheckStatus.REVOKED_OR_EXPIRED,
        f"This {name} key has been revoked or has expired. Create a new key at {info.keys_url} and paste it here.",
    )
    invalid = KeyVerdict(
        KeyCheckStatus.INVALID,
        f"{name} does not recognise this key. Check that you copied the whole key, or create a new one at {info.keys_url}.",
    )
    denied = KeyVerdict(
        KeyCheckStatus.PERMISSION_DENIED,
        f"{name} accepted this key but it is not allowed to use the API (restricted key, project or region). "
        f"Check the key's permissions at {info.keys_url}, or use an unrestricted key.",
    )
    quota = KeyVerdict(
        KeyCheckStatus.QUOTA_EXHAUSTED,
        f"This {name} key works but its account has no quota or credit left. Add credit or raise the limit "
        f"at {info.billing_url}, then try again.",
    )

    if http_status >= 500 or http_status in (408, 529):
        return unavailable(provider, f"is having problems right now (HTTP {http_status})")

    if provider is Provider.GEMINI:
        if "API_KEY_EXPIRED" in reasons or (http_status == 400 and "expired" in message.lower()):
            return revoked
        if "API_KEY_INVALID" in reasons or (http_status == 400 and "api key not valid" in message.lower()):
            return invalid
        if http_status == 429 or kind == "RESOURCE_EXHAUSTED":
            # Gemini words both cases alike ("You exceeded your current quota..."); only the violated
            # quota tells them apart: a per-day quota will not come back within minutes.
            if "PerDay" in quota_ids:
                return quota
            return _rate_limited(name, retry_after)
        if "BILLING_DISABLED" in reasons:
            return quota
        if http_status in (401, 403) or kind in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
            return denied
    elif provider is Provider.ANTHROPIC:
        if http_status == 401 or kind == "authentication_error":
            return revoked if _REVOKED_WORDS.search(message) else invalid
        if http_status == 403 or kind == "permission_error":
            return denied
        if http_status == 429 or kind == "rate_limit_error":
            return _rate_limited(name, retry_after)
        if http_status in (400, 402) and _QUOTA_WORDS.search(message):
            return quota
    else:  # OpenAI and Groq share OpenAI's error format
        if code == "insufficient_quota" or kind == "insufficient_quota":
            return quota
        if http_status == 429 or code == "rate_limit_exceeded":
            return _rate_limited(name, retry_after)
        if http_status == 401 and _PERMISSION_WORDS.search(message):
            return denied  # a restricted OpenAI key lacking a scope answers 401 "insufficient permissions"
        if code == "account_deactivated" or (http_status == 401 and _REVOKED_WORDS.search(message)):
            return revoked
        if http_status == 401 or code == "invalid_api_key":
            return invalid
        if http_status == 403:
            return denied
    return unavailable(provider, f"answered with an unexpected error (HTTP {http_status})")


# --- calls ------------------------------------------------------------------------------------


class ProviderError(Exception):
    """A provider refused or failed a call; `verdict` says what it means for the user's key."""

    def __init__(self, provider: Provider, verdict: KeyVerdict, http_status: int | None = None):
        super().__init__(f"{provider.value}: {verdict.status.value} (HTTP {http_status})")
        self.provider, self.verdict, self.http_status = provider, verdict, http_status


@dataclass(frozen=True)
class ChatReply:
    text: str
    input_tokens: int
    output_tokens: int
    model: str


async def list_models(
    client: httpx.AsyncClient, settings: ProviderSettings, provider: Provider | str, api_key: str
) -> httpx.Response:
    """GET the provider's model list with `api_key` (retried only as `provider_http_client` does)."""
    provider = Provider(provider)
    return await client.get(
        settings.models_url(provider),
        headers=auth_headers(provider, api_key, anthropic_version=settings.anthropic_version),
    )


def chat_body(provider: Provider | str, model: str, messages: Sequence[Mapping[str, str]], max_tokens: int) -> dict:
    """The provider's request body for `messages` ([{role, content}], roles user/assistant/system)."""
    provider = Provider(provider)
    if provider in (Provider.OPENAI, Provider.GROQ):
        return {"model": model, "messages": [dict(m) for m in messages], "max_tokens": max_tokens}
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if provider is Provider.ANTHROPIC:
        body: dict = {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": m["role"], "content": m["content"]} for m in rest],
        }
        if system:
            body["system"] = system
        return body
    body = {
        "contents": [
            {"role": "model" if m["role"] == "assistant" else "user", "parts": [{"text": m["content"]}]} for m in rest
        ],
        "generationConfig": {"maxOutputTokens": max_tokens},
    }
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    return body


def parse_chat_reply(provider: Provider | str, model: str, body: Mapping) -> ChatReply:
    """Text and token usage from a provider's successful chat answer."""
    provider = Provider(provider)
    if provider in (Provider.OPENAI, Provider.GROQ):
        usage = body.get("usage") or {}
        text = body["choices"][0]["message"].get("content") or ""
        return ChatReply(
            text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)), body.get("model", model)
        )
    if provider is Provider.ANTHROPIC:
        usage = body.get("usage") or {}
        text = "".join(part.get("text", "") for part in body.get("content", []) if part.get("type") == "text")
        return ChatReply(
            text, int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0)), body.get("model", model)
        )
    usage = body.get("usageMetadata") or {}
    parts = (body.get("candidates") or [{}])[0].get("content", {}).get("parts", [])
    text = "".join(p.get("text", "") for p in parts)
    return ChatReply(
        text,
        int(usage.get("promptTokenCount", 0)),
        int(usage.get("candidatesTokenCount", 0)),
        body.get("modelVersion", model),
    )


async def chat_completion(
    client: httpx.AsyncClient,
    settings: ProviderSettings,
    provider: Provider | str,
    api_key: str,
    model: str,
    messages: Sequence[Mapping[str, str]],
    *,
    max_tokens: int = 1024,
) -> ChatReply:
    """One non-streaming chat call. Raises `ProviderError` on any failure (timeouts and network
    errors become `provider_unavailable`); retried only as `provider_http_client` does."""
    provider = Provider(provider)
    try:
        response = await client.post(
            settings.chat_url(provider, model),
            headers=auth_headers(provider, api_key, anthropic_version=settings.anthropic_version),
            json=chat_body(provider, model, messages, max_tokens),
        )
    except httpx.TimeoutException:
        raise ProviderError(provider, unavailable(provider, "did not answer in time")) from None
    except httpx.HTTPError as exc:
        raise ProviderError(provider, unavailable(provider, f"could not be reached ({type(exc).__name__})")) from None
    if response.status_code >= 400:
        raise ProviderError(
            provider,
            classify_error(provider, response.status_code, response.content, response.headers),
            response.status_code,
        )
    try:
        return parse_chat_reply(provider, model, response.json())
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise ProviderError(
            provider, unavailable(provider, "sent an answer we could not read"), response.status_code
        ) from None


class FreshConnectionRetry(httpx.AsyncBaseTransport):
    """A pooled transport that sends a request once more, on a new connection, when it failed before
    any response came back.

    A kept-alive connection can be closed by the provider (its idle timeout) just as a request goes
    out on it: the request then fails with "server disconnected without sending a response" or a
    reset, although the provider never saw it and the key is fine. One more attempt on a connection
    opened for it settles that; a timeout is not retried (the provider may be working on the call),
    nor is anything after the response's status line arrived.
    """

    RETRIED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

    def __init__(self, limits: httpx.Limits):
        self.pooled = httpx.AsyncHTTPTransport(limits=limits)
        # Keeps no connection: every request it sends goes out on a new one.
        self.fresh = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=limits.max_connections, max_keepalive_connections=0)
        )
        self.retries = 0  # how many requests needed the second attempt (for tests and metrics)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self.pooled.handle_async_request(request)
        except self.RETRIED:
            if not isinstance(request.stream, httpx.ByteStream):
                raise  # a streamed body cannot be sent twice
            self.retries += 1
            return await self.fresh.handle_async_request(request)

    async def aclose(self) -> None:
        await self.pooled.aclose()
        await self.fresh.aclose()


def provider_http_client(
    *, timeout: httpx.Timeout | float, limits: httpx.Limits, follow_redirects: bool = False
) -> httpx.AsyncClient:
    """An httpx client for calls to providers, shared by every user's calls.

    Its cookie jar keeps nothing: one client serves all users, so a cookie a provider set on one
    user's call (a session or load-balancer cookie) must not ride along on another user's call.
    A call that fails before any response byte is sent once more on a fresh connection
    (`FreshConnectionRetry`).
    """
    return httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=follow_redirects,
        transport=FreshConnectionRetry(limits),
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )
