"""The composition root: builds the chat service's adapters from one `ChatSettings` at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from billing.pricing import default_price_book
from providers import ChatReply, ProviderSettings, chat_completion, chat_stream
from providers.base import Messages
from schemas.events import KeyCheckResult, Provider
from services.chat.call_store import PgCallStore
from services.chat.calls import ChatCalls
from services.chat.credit_account import CreditAccount, HttpCreditAccount
from services.chat.credits_client import CreditsClient, CreditsUnreachable
from services.chat.identity import mint_token
from services.chat.key_check_client import KeyCheckRequester
from services.chat.key_session import KeyCookie, derive_secret
from services.chat.outbox import OutboxRelay
from services.chat.service import ChatService, KeyCheckClient
from services.chat.settings import ChatSettings
from services.chat.store import PgSettingsStore
from services.chat.usage import HttpUsageReader
from services.chat.wiring import Wiring
from services.shared.db import create_pool, migrate
from services.shared.kafka import make_producer
from services.shared.provider_http import ProviderClient
from services.shared.sessions import SessionRevocations

log = logging.getLogger(__name__)


def key_cookie(settings: ChatSettings) -> KeyCookie:
    secret = settings.key_cookie_secret or settings.auth_jwt_secret
    return KeyCookie(derive_secret(secret, b"byok-credits chat key cookie v1"), settings.key_ttl_s)


class StartingKeyChecker:
    """The key-check requester (services/chat/key_check_client.py), started on first use, so the chat service comes up (and
    platform calls work) while Kafka is still down; a check then answers 'provider_unavailable'."""

    def __init__(self, settings: ChatSettings):
        self.settings = settings
        self._requester: KeyCheckRequester | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> KeyCheckRequester:
        async with self._lock:
            if self._requester is None:
                requester = KeyCheckRequester(self.settings)
                await requester.start()
                self._requester = requester
        return self._requester

    async def warm(self) -> None:
        """Start now if Kafka answers (so the first check is quick); otherwise on first use."""
        try:
            await self._ready()
        except Exception as exc:
            log.warning("key checker not started yet (%s); will retry on first check", type(exc).__name__)

    async def check(self, user_id: str, provider: Provider, api_key: str, timeout_s: float) -> KeyCheckResult:
        try:
            requester = await self._ready()
        except Exception as exc:
            raise ConnectionError(f"the key checker could not start ({type(exc).__name__})") from None
        return await requester.check(user_id, provider, api_key, timeout_s)

    async def stop(self) -> None:
        if self._requester is not None:
            await self._requester.stop()


async def every(every_s: float, what: str, purge: Callable[[], Awaitable[object]]) -> None:
    """Run `purge` every `every_s` (each instance does it; a delete is the same whoever runs it), saying
    what it removed; a failed round (the database away for a while) is logged and tried again next time."""
    while True:
        try:
            gone = await purge()
            if gone and gone != (0, 0):
                log.info("purged %s: %s", what, gone)
        except Exception as exc:
            log.warning("could not purge %s (%s)", what, type(exc).__name__)
        await asyncio.sleep(every_s)


@contextlib.asynccontextmanager
async def wire(settings: ChatSettings, *, checker: KeyCheckClient | None = None) -> AsyncIterator[Wiring]:
    await migrate(settings.database_url, settings.database_schema)
    # The chat service never changes a session's state, so connections go back to the pool unreset.
    pool = await create_pool(
        settings.database_url, settings.database_schema, max_size=settings.db_pool_size, reset_sessions=False
    )
    relay = OutboxRelay(
        pool,
        lambda: make_producer(settings.kafka_bootstrap_servers),
        settings.model_call_completed_topic,
        batch=settings.relay_batch,
        idle_poll_s=settings.relay_idle_poll_s,
        linger_s=settings.relay_linger_s,
        stale_after_s=settings.outbox_stale_after_s,
    )
    # A plain call may take minutes before its first byte (reasoning models, deep analysis): reads wait
    # up to the call's own bound, which the call lifecycle enforces anyway.
    provider_http = ProviderClient(
        timeout_s=settings.call_max_s,
        connect_timeout_s=settings.provider_connect_timeout_s,
        stream_idle_timeout_s=settings.stream_idle_timeout_s,
        max_connections=settings.provider_max_connections,
    )
    credits = CreditsClient(settings.credits_url, settings.credits_timeout_s)
    providers = ProviderSettings()

    async def call_model(
        provider: Provider, api_key: str, model: str, messages: Messages, *, max_tokens: int = 1024
    ) -> ChatReply:
        return await chat_completion(
            provider_http, providers, provider, api_key, model, messages, max_tokens=max_tokens
        )

    def stream_model(
        provider: Provider, api_key: str, model: str, messages: Messages, *, max_tokens: int = 1024
    ) -> AsyncGenerator[str | ChatReply, None]:
        # An async generator (so a Stop can close it at once), declared as an iterator by providers/.
        stream = chat_stream(provider_http, providers, provider, api_key, model, messages, max_tokens=max_tokens)
        return cast(AsyncGenerator[str | ChatReply, None], stream)

    store = PgSettingsStore(pool)
    starting = StartingKeyChecker(settings) if checker is None else None
    checker = checker or starting
    assert checker is not None
    balances: CreditAccount = HttpCreditAccount(credits)
    service = ChatService(
        store=store,
        checker=checker,
        platform_keys=settings.platform_keys(),
        price_book=default_price_book(),
        default_provider=settings.default_provider,
        default_model=settings.default_model,
        feature_models=settings.feature_models(),
        key_ttl_s=settings.key_ttl_s,
        key_check_timeout_s=settings.key_check_timeout_s,
    )
    call_store = PgCallStore(pool, relay.wake)
    calls = ChatCalls(
        service=service,
        store=call_store,
        keys=store,
        balances=balances,
        call_model=call_model,
        stream_model=stream_model,
        price_book=service.book,
        call_max_s=settings.call_max_s,
        lease_s=settings.lease_s,
    )
    # The lease first: a call may start only once this instance is known to be alive.
    await call_store.renew_lease(calls.instance_id, settings.lease_s)

    async def grant_plan(user_id: str) -> dict[str, Any]:
        admin = mint_token(settings.auth_jwt_secret, "chat-dev-login", role="admin", ttl_s=60)
        answer = await credits.request(
            "POST",
            "/api/admin/grants",
            admin,
            json_body={
                "grant_key": f"dev-welcome:{user_id}",
                "user_id": user_id,
                "plan": settings.dev_login_grant_plan,
            },
        )
        if answer.status not in (200, 201):
            raise CreditsUnreachable(f"the credit service refused the welcome grant (HTTP {answer.status})")
        return {"plan": settings.dev_login_grant_plan, "created": answer.body.get("created")}

    async def healthy() -> dict[str, bool]:
        try:
            await pool.fetchval("SELECT 1")
            return {"database": True}
        except Exception:
            return {"database": False}

    sessions = SessionRevocations(
        pool, refresh_s=settings.session_refresh_s, token_max_ttl_s=max(settings.session_ttl_s, 86_400)
    )
    await sessions.start()
    await relay.start()
    warming = asyncio.create_task(starting.warm()) if starting is not None else None
    background = [
        asyncio.create_task(
            every(
                settings.key_record_purge_every_s,
                "expired key records",
                lambda: store.purge_keys(
                    datetime.now(timezone.utc) - timedelta(seconds=settings.key_record_retention_s)
                ),
            )
        ),
        asyncio.create_task(every(settings.key_record_purge_every_s, "expired session revocations", sessions.purge)),
        asyncio.create_task(
            every(
                settings.call_purge_every_s,
                "kept answers and ended calls",
                lambda: call_store.purge(settings.answer_kept_s, settings.call_kept_s),
            )
        ),
        asyncio.create_task(calls.keep_lease(settings.lease_renew_s)),
    ]
    try:
        yield Wiring(
            service,
            calls,
            key_cookie(settings),
            balances,
            grant_plan if settings.dev_login and settings.dev_login_grant_plan else None,
            healthy,
            usage=HttpUsageReader(credits),
            sessions=sessions,
        )
    finally:
        await calls.close(settings.shutdown_grace_s)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await relay.stop()
        await sessions.stop()
        if warming is not None:
            warming.cancel()
            await asyncio.gather(warming, return_exceptions=True)
        if starting is not None:
            await starting.stop()
        await provider_http.aclose()
        await credits.aclose()
        await pool.close()
