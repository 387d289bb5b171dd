"""Never a 500 for an outage (issue 21 item 4): PostgreSQL is stopped under running chat and credit
processes, mid-request, again and again, while clients keep calling every kind of route. Every answer
is a status the route documents; an outage is a 503 with a JSON sentence; never a 500."""

from __future__ import annotations

import asyncio
import collections
import time

import httpx
import pytest

from tests.conftest import unique_name
from tests.e2e.test_chat_flow import start_system

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CYCLES = 6


async def hammer(client: httpx.AsyncClient, calls, stop: asyncio.Event, seen: collections.Counter, bad: list):
    i = 0
    while not stop.is_set():
        method, url, body, headers = calls[i % len(calls)]
        i += 1
        try:
            r = await client.request(
                method,
                url,
                json=body(i) if callable(body) else body,
                headers=headers(i) if callable(headers) else headers,
            )
        except httpx.HTTPError as exc:  # a connection the server dropped: not an answer at all
            bad.append(f"{method} {url}: {type(exc).__name__}: {exc}")
            continue
        seen[(f"{method} {httpx.URL(url).path}", r.status_code)] += 1
        if r.status_code >= 500:
            try:
                payload = r.json()
                sentence = payload.get("message") or payload.get("detail")
            except ValueError:
                sentence = None
            health = url.endswith("/healthz")  # answers its own body: what is up, what is not
            if r.status_code != 503 or not (health or (isinstance(sentence, str) and len(sentence) >= 20)):
                bad.append(f"{method} {url}: {r.status_code} {r.text[:300]}")
        await asyncio.sleep(0.01)


async def test_stopping_postgresql_mid_request_again_and_again_never_answers_500(
    private_postgres, kafka_bootstrap, kafka_topics, tmp_path
):
    systems = start_system(
        kafka_bootstrap,
        private_postgres.url,
        unique_name("outage_"),
        kafka_topics,
        tmp_path / "logs",
        with_validation=False,
    )
    system = next(systems)
    try:
        system.grant("olga", "standard")
        user = {"Authorization": f"Bearer {system.token('olga')}"}
        admin = {"Authorization": f"Bearer {system.token('ops', 'admin')}"}
        c, h = system.credits.url, system.chat.url
        credit_calls = [
            ("GET", f"{c}/api/credits/olga", None, user),
            ("GET", f"{c}/api/usage/olga", None, user),
            ("GET", f"{c}/healthz", None, None),
            ("POST", f"{c}/api/admin/grants", lambda i: {"grant_key": f"g{i}", "user_id": "u", "plan": "free"}, admin),
            (
                "POST",
                f"{c}/api/user/deduct-credits",
                lambda i: {"feature": "chat", "model": "gpt-4o", "key_source": "byok", "idempotency_key": f"k{i}"},
                user,
            ),
            (
                "POST",
                f"{c}/api/holds",
                lambda i: {
                    "event_id": f"00000000-0000-4000-8000-{i:012d}",
                    "feature": "chat",
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                },
                user,
            ),
            ("GET", f"{c}/api/admin/holds", None, admin),
        ]
        chat_calls = [
            ("GET", f"{h}/api/model-settings", None, user),
            ("POST", f"{h}/settings/model", {"provider": "openai", "model": "gpt-4o-mini"}, user),
            ("POST", f"{h}/chat", lambda i: {"message": f"hello {i}"}, lambda i: user | {"Idempotency-Key": f"i{i}"}),
            ("GET", f"{h}/api/me", None, user),
        ]
        seen: collections.Counter = collections.Counter()
        bad: list[str] = []
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=60) as client:
            workers = [
                asyncio.create_task(hammer(client, calls, stop, seen, bad))
                for calls in (credit_calls, credit_calls, credit_calls, chat_calls, chat_calls)
            ]
            try:
                for _ in range(CYCLES):
                    await asyncio.sleep(1.5)
                    await asyncio.to_thread(private_postgres.stop)
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(private_postgres.start)
                await asyncio.sleep(3)
            finally:
                stop.set()
                await asyncio.gather(*workers)
            # Both recover once the database is back.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                a = await client.get(f"{c}/api/credits/olga", headers=user)
                b = await client.get(f"{h}/api/model-settings", headers=user)
                if a.status_code == b.status_code == 200:
                    break
                await asyncio.sleep(0.5)
            assert (a.status_code, b.status_code) == (200, 200), (a.text, b.text)
        print("answers by route and status:", dict(sorted(seen.items())))
        assert not bad, "\n".join(bad[:20])
        assert sum(n for (_, status), n in seen.items() if status == 500) == 0
        assert sum(n for (_, status), n in seen.items() if status == 503) > 0, "the outages were never seen"
    finally:
        systems.close()
