"""Connections that close without an answer: a key check (GET of the model list) is sent once more
on a fresh connection; a chat completion (POST) is never sent twice, since the provider may have
received it and worked on it, and would be paid twice. The credit service's idempotent requests are
sent once more.

The provider here is a plain local HTTP/1.1 server that closes connections exactly as an idle
timeout racing a request does; no provider behaviour is faked beyond that.
"""

from __future__ import annotations

import asyncio
import json

import pytest

import providers
from schemas.events import KeyCheckStatus, Provider
from services.shared.provider_http import ProviderClient
from services.validation.checks import KeyChecker, make_http_client

pytestmark = pytest.mark.unit
KEY = "sk-proj-retryTESTkey000000000000000000042"
CHAT_ANSWER = {
    "model": "gpt-4o",
    "choices": [{"message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
}


class ClosingServer:
    """Answers the first request on each connection and keeps it alive; the next request on that
    connection finds it closed without a response (`always_close`: every request does)."""

    def __init__(self, always_close: bool = False):
        self.always_close = always_close
        self.connections = 0
        self.requests: list[str] = []
        self.answered = 0

    async def __aenter__(self) -> ClosingServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *headers = head.decode().split("\r\n")
                length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0)
                await reader.readexactly(length)
                self.requests.append(line)
                if served >= 1 or self.always_close:
                    return  # closed without a byte of response: the request was never seen
                served += 1
                body = json.dumps(CHAT_ANSWER if line.startswith("POST") else {"data": []}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await writer.drain()
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def settings_for(url: str) -> providers.ProviderSettings:
    return providers.ProviderSettings(openai_base_url=url + "/v1")


async def test_a_key_check_on_a_connection_the_provider_closed_is_retried_on_a_fresh_one():
    async with ClosingServer() as server, make_http_client(5, 2) as http:
        checker = KeyChecker(settings_for(server.url), http)
        first = await checker.check(Provider.OPENAI, KEY)
        second = await checker.check(Provider.OPENAI, KEY)  # goes out on the kept-alive connection
    assert first.status is KeyCheckStatus.VALID
    assert second.status is KeyCheckStatus.VALID, second.message
    # aiohttp sends a GET once more itself when its kept-alive connection turns out closed.
    assert server.requests == ["GET /v1/models HTTP/1.1"] * 3 and server.connections == 2


async def test_a_chat_call_is_never_sent_twice_even_when_its_connection_drops_without_an_answer():
    client = ProviderClient(timeout_s=5, max_connections=4)
    messages = [{"role": "user", "content": "hello"}]
    async with ClosingServer() as server, client:
        settings = settings_for(server.url)
        reply = await providers.chat_completion(client, settings, Provider.OPENAI, KEY, "gpt-4o", messages)
        assert reply.text == "hi"
        # The next call goes out on the kept-alive connection, which the server drops after reading it:
        # the provider may have worked on it, so it is reported, not sent again.
        with pytest.raises(providers.ProviderError) as failed:
            await providers.chat_completion(client, settings, Provider.OPENAI, KEY, "gpt-4o", messages)
        assert failed.value.verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
        assert "ServerDisconnectedError" in failed.value.verdict.message
        reply = await providers.chat_completion(client, settings, Provider.OPENAI, KEY, "gpt-4o", messages)
        assert reply.text == "hi"
    assert server.requests == ["POST /v1/chat/completions HTTP/1.1"] * 3  # each call once
    assert (server.answered, server.connections) == (2, 2)


async def test_a_chat_call_the_provider_read_and_then_dropped_is_not_sent_again():
    """A fresh connection that the provider drops after reading the whole request (and working on it):
    the case a retry would pay twice for."""
    async with ClosingServer(always_close=True) as server, ProviderClient(timeout_s=5) as client:
        with pytest.raises(providers.ProviderError):
            await providers.chat_completion(
                client, settings_for(server.url), Provider.OPENAI, KEY, "gpt-4o", [{"role": "user", "content": "hi"}]
            )
    assert server.requests == ["POST /v1/chat/completions HTTP/1.1"]


async def test_the_retry_is_one_only_and_the_failure_is_reported_as_could_not_verify():
    async with ClosingServer(always_close=True) as server, make_http_client(5, 2) as http:
        verdict = await KeyChecker(settings_for(server.url), http).check(Provider.OPENAI, KEY)
    assert verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    assert "ServerDisconnectedError" in verdict.message
    assert len(server.requests) == 2  # the first attempt and one more, no loop


async def test_a_credit_service_request_on_a_connection_it_closed_is_sent_once_more():
    """The chat's client for the credit service (admission holds on every platform call): a kept-alive
    connection the server closed costs no refusal, and a server that never answers is reported."""
    from services.chat.credits_client import CreditsClient, CreditsUnreachable

    async with ClosingServer() as server:
        client = CreditsClient(server.url, timeout_s=5)
        try:
            first = await client.request("GET", "/api/credits/alice", "token")
            second = await client.request("POST", "/api/holds", "token", json_body={"event_id": "e1"})
        finally:
            await client.aclose()
    assert (first.status, first.body) == (200, {"data": []})
    assert (second.status, second.body) == (200, CHAT_ANSWER)
    # The second request found its kept-alive connection closed, and went out again on a new one.
    assert server.requests == [
        "GET /api/credits/alice HTTP/1.1",
        "POST /api/holds HTTP/1.1",
        "POST /api/holds HTTP/1.1",
    ]
    assert (server.connections, server.answered) == (2, 2)

    for method in ("POST", "DELETE"):  # ours retries the POST, aiohttp the DELETE: each once only
        async with ClosingServer(always_close=True) as server:
            client = CreditsClient(server.url, timeout_s=5)
            try:
                with pytest.raises(CreditsUnreachable, match="did not answer"):
                    await client.request(method, "/api/holds/e1", "token")
            finally:
                await client.aclose()
        assert server.requests == [f"{method} /api/holds/e1 HTTP/1.1"] * 2


async def test_a_closed_client_opens_no_new_connection_for_a_call_still_running_at_shutdown():
    """A call that reaches the client after shutdown closed it must not open a session nobody closes."""
    from providers.client import ProviderUnreachable
    from services.chat.credits_client import CreditsClient, CreditsUnreachable

    async with ClosingServer() as server:
        provider = ProviderClient(timeout_s=5)
        await provider.aclose()
        with pytest.raises(ProviderUnreachable):
            await provider.get(server.url + "/v1/models", headers={})
        credits = CreditsClient(server.url, timeout_s=5)
        await credits.aclose()
        with pytest.raises(CreditsUnreachable, match="shutting down"):
            await credits.request("GET", "/api/credits/alice", "token")
    assert server.requests == [] and not provider._session.opened and not credits._session.opened


async def test_holds_queued_for_a_connection_wait_their_turn_and_a_silent_service_still_times_out():
    """A burst of holds larger than the client's connections queues for one: the timeout bounds the
    credit service's answer, not the wait for a connection (1,500 calls at once got 503s for that).
    A service that does not answer at all is still reported after the timeout."""
    from aiohttp import web

    from services.chat.credits_client import CreditsClient, CreditsUnreachable

    async def slow_hold(request: web.Request) -> web.Response:
        await asyncio.sleep(0.1 if request.path == "/api/holds" else 1)
        return web.json_response({"credits": 1})

    app = web.Application()
    app.router.add_post("/api/holds", slow_hold)
    app.router.add_post("/api/silent", slow_hold)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = CreditsClient(f"http://127.0.0.1:{port}", timeout_s=0.3, max_connections=2, queue_s=10)
    try:
        answers = await asyncio.gather(*(client.request("POST", "/api/holds", "t", json_body={}) for _ in range(12)))
        assert [a.status for a in answers] == [200] * 12  # 6 rounds of 0.1 s: 0.6 s, twice the timeout
        with pytest.raises(CreditsUnreachable, match="did not answer"):
            await client.request("POST", "/api/silent", "t", json_body={})
    finally:
        await client.aclose()
        await runner.cleanup()
