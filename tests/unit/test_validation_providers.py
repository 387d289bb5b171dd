"""Key shapes, hints, auth headers and error mapping of the `providers` package."""

from __future__ import annotations

import asyncio

import pytest

import providers as p
from schemas.events import KeyCheckStatus, Provider
from services.shared.provider_http import ProviderClient

pytestmark = pytest.mark.unit

GOOD = {
    Provider.OPENAI: ["sk-proj-abcDEF123_-abcdefghijklmnop", "sk-" + "a" * 48],
    Provider.ANTHROPIC: ["sk-ant-api03-" + "x" * 40],
    Provider.GROQ: ["gsk_" + "A1" * 26],
    Provider.GEMINI: ["AIzaSy" + "B" * 33],
}


@pytest.mark.parametrize("provider,api_key", [(pr, k) for pr, ks in GOOD.items() for k in ks])
def test_well_formed_keys_pass(provider, api_key):
    assert p.key_shape_problem(provider, api_key) is None


@pytest.mark.parametrize(
    "provider,api_key,words",
    [
        (Provider.OPENAI, "", "empty"),
        (Provider.OPENAI, "hello", "start with"),
        (Provider.OPENAI, "sk-short", "cut short"),
        (Provider.OPENAI, "sk-abc def ghijklmnopqrstuvwxyz", "spaces"),
        (Provider.OPENAI, "sk-ant-api03-" + "x" * 40, "Anthropic key"),
        (Provider.ANTHROPIC, "sk-proj-" + "x" * 40, "an OpenAI key"),
        (Provider.ANTHROPIC, "xx-" + "x" * 40, "start with"),
        (Provider.GROQ, "gsk_" + "x" * 10 + "!" * 10, "characters"),
        (Provider.GEMINI, "gsk_" + "x" * 40, "Groq key"),
        (Provider.GEMINI, "AIza" + "x" * 10, "cut short"),
        (Provider.GEMINI, "AIza" + "x" * 600, "too long"),
        (Provider.ANTHROPIC, "sk-ant-" + "é" * 30, "characters"),
    ],
)
def test_malformed_keys_are_named_with_what_to_do(provider, api_key, words):
    problem = p.key_shape_problem(provider, api_key)
    assert problem is not None and words in problem
    if len(api_key) > 8:
        assert api_key not in problem


def test_normalize_strips_a_pasted_newline():
    assert p.normalize_key("  sk-" + "a" * 30 + "\n") == "sk-" + "a" * 30


@pytest.mark.parametrize(
    "api_key,hint",
    [
        ("sk-proj-abcdefghijklmnopqrstuvwxyza1b2", "sk-proj-…a1b2"),
        ("sk-" + "z" * 40 + "a1b2", "sk-…a1b2"),
        ("sk-ant-api03-" + "x" * 30 + "9f9f", "sk-ant-…9f9f"),
        ("gsk_" + "x" * 40 + "QQQQ", "gsk_…QQQQ"),
        ("AIzaSy" + "x" * 30 + "wxyz", "AIza…wxyz"),
        ("unknownkind-0123456789", "…6789"),
        ("short", None),
    ],
)
def test_key_hint_shows_only_prefix_and_last_four(api_key, hint):
    assert p.key_hint(api_key) == hint


def test_auth_headers_are_each_providers_scheme():
    assert p.auth_headers("openai", "K") == {"Authorization": "Bearer K"}
    assert p.auth_headers("groq", "K") == {"Authorization": "Bearer K"}
    assert p.auth_headers("anthropic", "K") == {"x-api-key": "K", "anthropic-version": "2023-06-01"}
    assert p.auth_headers("gemini", "K") == {"x-goog-api-key": "K"}


def test_default_base_urls_are_the_real_providers(monkeypatch):
    for name in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "GROQ_BASE_URL", "GEMINI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    s = p.ProviderSettings()
    assert s.models_url("openai") == "https://api.openai.com/v1/models"
    assert s.models_url("groq") == "https://api.groq.com/openai/v1/models"
    assert s.models_url("anthropic") == "https://api.anthropic.com/v1/models"
    assert s.models_url("gemini") == "https://generativelanguage.googleapis.com/v1beta/models"
    assert s.chat_url("gemini", "gemini-2.5-pro").endswith("/v1beta/models/gemini-2.5-pro:generateContent")
    monkeypatch.setenv("GROQ_BASE_URL", "http://127.0.0.1:8090/groq/")
    assert p.ProviderSettings().models_url("groq") == "http://127.0.0.1:8090/groq/openai/v1/models"


@pytest.mark.parametrize(
    "provider,status,body,expected",
    [
        ("openai", 502, b"<html>bad gateway</html>", KeyCheckStatus.PROVIDER_UNAVAILABLE),
        (
            "openai",
            404,
            b'{"error":{"message":"nope","type":"invalid_request_error","code":"unknown_url"}}',
            KeyCheckStatus.PROVIDER_UNAVAILABLE,
        ),
        (
            "openai",
            401,
            b'{"error":{"message":"You have insufficient permissions for this operation. Missing scopes: '
            b'api.model.read.","type":"invalid_request_error","code":null}}',
            KeyCheckStatus.PERMISSION_DENIED,
        ),
        (
            "groq",
            429,
            b'{"error":{"message":"Rate limit reached","type":"tokens","code":"rate_limit_exceeded"}}',
            KeyCheckStatus.RATE_LIMITED,
        ),
        (
            "anthropic",
            500,
            b'{"type":"error","error":{"type":"api_error","message":"Internal"}}',
            KeyCheckStatus.PROVIDER_UNAVAILABLE,
        ),
        (
            "anthropic",
            400,
            b'{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens required"}}',
            KeyCheckStatus.PROVIDER_UNAVAILABLE,
        ),
        (
            "gemini",
            429,
            b'{"error":{"code":429,"message":"Resource has been exhausted","status":"RESOURCE_EXHAUSTED"}}',
            KeyCheckStatus.RATE_LIMITED,
        ),
        (
            "gemini",
            403,
            b'{"error":{"code":403,"message":"Billing","status":"PERMISSION_DENIED",'
            b'"details":[{"reason":"BILLING_DISABLED"}]}}',
            KeyCheckStatus.QUOTA_EXHAUSTED,
        ),
        ("gemini", 400, None, KeyCheckStatus.PROVIDER_UNAVAILABLE),
    ],
)
def test_error_mapping_never_condemns_a_key_without_an_auth_refusal(provider, status, body, expected):
    assert p.classify_error(provider, status, body).status is expected


def test_rate_limit_message_says_how_long_to_wait():
    verdict = p.classify_error(
        "openai", 429, b'{"error":{"code":"rate_limit_exceeded","message":"x"}}', {"Retry-After": "20"}
    )
    assert verdict.retry_after_s == 20 and "20 seconds" in verdict.message


def test_unavailable_says_the_key_may_be_fine():
    verdict = p.unavailable("anthropic")
    assert verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
    assert "try again" in verdict.message and "invalid" not in verdict.message.lower()


@pytest.mark.parametrize("provider", list(Provider))
def test_chat_body_round_trips_through_each_format(provider):
    body = p.chat_body(provider, "m", [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], 10)
    if provider in (Provider.OPENAI, Provider.GROQ):
        assert body["messages"][0]["role"] == "system" and body["max_tokens"] == 10
    elif provider is Provider.ANTHROPIC:
        assert body["system"] == "s" and body["messages"] == [{"role": "user", "content": "u"}]
    else:
        assert body["systemInstruction"]["parts"][0]["text"] == "s"
        assert body["contents"][0]["parts"][0]["text"] == "u"


async def test_the_shared_provider_client_never_carries_one_users_cookie_to_another_call():
    """One client serves every user's calls: a cookie a provider sets on one user's call (a session or
    load-balancer cookie) must not ride along on the next user's call. A real socket, by host name
    (a cookie jar may refuse cookies of bare IP addresses, which would hide the fault)."""
    seen: list[str | None] = []

    async def provider(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
                seen.append({k.lower(): v for k, v in fields.items()}.get("cookie"))
                body = b'{"data": []}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Set-Cookie: lb_session=user-a-affinity; Path=/; Max-Age=3600\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(provider, "localhost", 0)
    url = f"http://localhost:{server.sockets[0].getsockname()[1]}/v1/models"
    try:
        async with ProviderClient(timeout_s=5) as client:
            first = await client.get(url, headers={"authorization": "Bearer sk-user-a"})
            await client.get(url, headers={"authorization": "Bearer sk-user-b"})
    finally:
        server.close()
        await server.wait_closed()
    assert "lb_session" in first.headers.get("set-cookie", "")
    assert seen == [None, None]
