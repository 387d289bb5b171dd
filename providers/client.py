"""The calls this system makes to a provider, over the caller's HTTP client (`ProviderHttp`): the model
list (a key check), a chat completion, and a streamed chat completion.

The client is a port: the services pass `services.shared.provider_http.ProviderClient` (aiohttp, with
pooling, timeouts and the retry of a stale connection); tests may pass an in-process adapter
(`tests.fakes.InProcessHttp`). This module names no HTTP library, so the provider rules stay free of
transport details.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from providers.base import ChatReply, Messages, ProviderApi, ProviderError, SseDecoder
from providers.registry import ProviderSettings, of
from schemas.events import Provider

# An error answer is read whole to classify it; no provider's is anywhere near this long.
MAX_ERROR_BODY = 256 * 1024


@dataclass(frozen=True)
class HttpAnswer:
    """A provider's answer: status, raw body and headers (case-insensitive in every adapter)."""

    status_code: int
    content: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.content)


class ProviderUnreachable(Exception):
    """No answer from the provider: a timeout (`timed_out`) or a network failure. Never a verdict on
    the key. The message names the failure's kind, never a URL or a header."""

    def __init__(self, kind: str, timed_out: bool = False):
        super().__init__(kind)
        self.kind, self.timed_out = kind, timed_out


@dataclass(frozen=True)
class HttpStream:
    """A provider's answer as it arrives: status and headers at once, the body in `chunks` (bytes, of
    whatever size the network gives). Iterating `chunks` raises `ProviderUnreachable` when the body
    breaks off before its end (`timed_out` when nothing came for the client's idle timeout); it ends
    when the provider ends the body."""

    status_code: int
    headers: Mapping[str, str]
    chunks: AsyncIterator[bytes]

    async def read(self, limit: int = MAX_ERROR_BODY) -> bytes:
        """The rest of the body, at most `limit` bytes (for an error answer)."""
        body = b""
        async for chunk in self.chunks:
            body += chunk
            if len(body) >= limit:
                return body[:limit]
        return body


class ProviderHttp(Protocol):
    """Port: HTTP requests to a provider; each raises `ProviderUnreachable` when no answer came."""

    async def get(self, url: str, headers: Mapping[str, str]) -> HttpAnswer: ...

    async def post_json(self, url: str, headers: Mapping[str, str], body: Any) -> HttpAnswer: ...

    def post_stream(self, url: str, headers: Mapping[str, str], body: Any) -> AbstractAsyncContextManager[HttpStream]:
        """POST `body` as JSON and hand over the answer as it arrives:

            async with client.post_stream(url, headers, body) as answer:   # status and headers are in
                async for chunk in answer.chunks: ...

        Entering sends the request and waits for the status line and headers (raising
        `ProviderUnreachable` if they do not come in time or the connection fails). Each wait for
        the next chunk is bounded by the client's idle timeout (`ProviderUnreachable(timed_out=True)`:
        a stalled stream). Leaving the block, however it is left (the body read to its end, an
        exception, the consumer's task cancelled), closes the response; a response left before its
        end closes its connection, which is how the provider learns that the caller stopped. Never
        retried: the provider may have started working on the request."""
        ...


async def list_models(
    client: ProviderHttp, settings: ProviderSettings, provider: Provider | str, api_key: str
) -> HttpAnswer:
    """GET the provider's model list with `api_key`: the cheapest authenticated call that proves a key."""
    api = of(provider)
    return await client.get(settings.models_url(api.provider), headers=api.auth_headers(api_key, settings))


async def chat_completion(
    client: ProviderHttp,
    settings: ProviderSettings,
    provider: Provider | str,
    api_key: str,
    model: str,
    messages: Messages,
    *,
    max_tokens: int = 1024,
) -> ChatReply:
    """One non-streaming chat call. Raises `ProviderError` on any failure (timeouts, network errors and
    the provider's 5xx become `provider_unavailable`, worded as a call that failed: `call_failed`)."""
    api = of(provider)
    try:
        response = await client.post_json(
            settings.chat_url(api.provider, model),
            headers=api.auth_headers(api_key, settings),
            body=api.chat_body(model, messages, max_tokens),
        )
    except ProviderUnreachable as exc:
        raise _unreachable(api, exc) from None
    if response.status_code >= 400:
        raise ProviderError(
            api.provider,
            api.classify_error(response.status_code, response.content, response.headers, call=True),
            response.status_code,
        )
    try:
        return api.parse_chat_reply(model, response.json())
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise ProviderError(
            api.provider, api.call_failed("sent an answer we could not read"), response.status_code
        ) from None


def _unreachable(api: ProviderApi, exc: ProviderUnreachable) -> ProviderError:
    """No answer at all: the call's request failed before any status came."""
    reason = "did not answer in time" if exc.timed_out else f"could not be reached ({exc.kind})"
    return ProviderError(api.provider, api.call_failed(reason), timed_out=exc.timed_out)


async def chat_stream(
    client: ProviderHttp,
    settings: ProviderSettings,
    provider: Provider | str,
    api_key: str,
    model: str,
    messages: Messages,
    *,
    max_tokens: int = 1024,
) -> AsyncIterator[str | ChatReply]:
    """One streamed chat call: yields each text delta (`str`) as the provider sends it and, as the
    last item, a `ChatReply` with the whole text and the tokens of the provider's own usage.

    Raises `ProviderError` on any failure: a refusal before the stream starts (non-2xx, classified
    like any refusal), an error the provider sends midway (its own verdict), a stream that ends or
    breaks off before the provider's end of the answer or without its usage ("the answer was cut
    off", `provider_unavailable`), and no answer or a stall beyond the client's idle timeout
    (`timed_out=True`). Deltas already yielded stay yielded: a failure after some text says the
    answer is incomplete, and nothing here decides what that costs.

    Stopping early (breaking out and closing the generator, e.g. with `contextlib.aclosing`, or
    cancelling the task that iterates it) closes the provider's response, so the provider stops
    generating.
    """
    api = of(provider)
    url = settings.stream_url(api.provider, model)
    headers = api.auth_headers(api_key, settings)
    body = api.stream_body(model, messages, max_tokens)
    started = False
    try:
        async with client.post_stream(url, headers, body) as answer:
            started = True
            if answer.status_code >= 400:
                try:
                    content = await answer.read()
                except ProviderUnreachable:
                    content = b""  # the status alone says enough
                raise ProviderError(
                    api.provider,
                    api.classify_error(answer.status_code, content, answer.headers, call=True),
                    answer.status_code,
                )
            status = answer.status_code
            decoder = SseDecoder()
            parts: list[str] = []
            input_tokens: int | None = None
            output_tokens: int | None = None
            answered_by = model
            done = False
            async for chunk in answer.chunks:
                try:
                    pieces = [api.parse_stream_event(event) for event in decoder.feed(chunk)]
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    raise ProviderError(
                        api.provider, api.call_failed("sent an answer we could not read"), status
                    ) from None
                for piece in pieces:
                    if piece.error is not None:
                        raise ProviderError(api.provider, api.classify_stream_error(piece.error), status)
                    if piece.text:
                        parts.append(piece.text)
                        yield piece.text
                    input_tokens = piece.input_tokens if piece.input_tokens is not None else input_tokens
                    output_tokens = piece.output_tokens if piece.output_tokens is not None else output_tokens
                    answered_by = piece.model or answered_by
                    done = done or piece.done
                if done:
                    break
            if not done:
                raise ProviderError(
                    api.provider, api.cut_off("closed the connection before the answer was complete"), status
                )
            if input_tokens is None or output_tokens is None:
                raise ProviderError(api.provider, api.call_failed("ended the answer without its token usage"), status)
            await _drain(answer)
    except ProviderUnreachable as exc:
        if not started:
            raise _unreachable(api, exc) from None
        if exc.timed_out:
            raise ProviderError(
                api.provider, api.cut_off("stopped sending in the middle of the answer"), timed_out=True
            ) from None
        raise ProviderError(
            api.provider, api.cut_off(f"closed the connection before the answer was complete ({exc.kind})")
        ) from None
    yield ChatReply("".join(parts), input_tokens, output_tokens, answered_by)


async def _drain(answer: HttpStream) -> None:
    """Read what follows the provider's end of the answer (the body's own end, at once), so the
    response ends as the provider ends it and its connection can serve another call. Whatever goes
    wrong now changes nothing: the answer is complete."""
    try:
        async for _ in answer.chunks:
            pass
    except ProviderUnreachable:
        pass
