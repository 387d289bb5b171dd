"""Fakes of the services' ports for unit tests (the provider simulator is the only fake of something
outside; these stand in for our own adapters: the credit service's HTTP API, PostgreSQL, the
key-check worker and the model call)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from uuid import UUID

import httpx

from billing.policy import price_of
from billing.pricing import default_price_book
from providers import ChatReply, HttpStream, ProviderError, ProviderUnreachable, key_hint
from schemas.events import KeyCheckResult, KeyCheckStatus, ModelCallCompleted, Provider, utc_now
from services.chat.call_store import CallRecord, CallStore, Outcome
from services.chat.calls import ChatCalls
from services.chat.credit_account import CreditAccount, Funds, HoldRefused, Reservation
from services.chat.identity import Identity
from services.chat.service import ChatService
from services.chat.store import REVOKED_REPLACED, KeyRecord, ModelSettings, SettingsStore
from services.chat.usage import UsageReader
from tests.support import PLATFORM_KEY


class MemoryCredits(CreditAccount):
    """Balances from a dict, holds kept in memory like the credit service keeps them."""

    def __init__(self, balances: dict[str, int] | None = None):
        self.balances = balances or {}
        self.holds: dict[UUID, tuple[str, int]] = {}

    async def funds(self, who: Identity) -> Funds:
        held = sum(c for user, c in self.holds.values() if user == who.user_id)
        return Funds(self.balances.get(who.user_id, 0), held)

    async def reserve(self, who, event_id, feature, provider, model) -> Reservation:
        credits = price_of(feature, model, default_price_book().in_force(utc_now()))
        funds = await self.funds(who)
        if event_id not in self.holds:
            if funds.available < credits:
                raise HoldRefused(credits, funds.available, funds.held)
            self.holds[event_id] = (who.user_id, credits)
        return Reservation(event_id, credits, (await self.funds(who)).available)

    async def release(self, who, event_id) -> None:
        self.holds.pop(event_id, None)

    def settle(self, event_id: UUID, debited: int) -> None:
        """What the ledger does when the call's event is decided."""
        user, _ = self.holds.pop(event_id)
        self.balances[user] = self.balances.get(user, 0) - debited


class FixedUsage(UsageReader):
    """Usage from a dict."""

    def __init__(self, usage: dict[str, dict] | None = None):
        self.by_user = usage or {}

    async def usage(self, who: Identity, limit: int = 50) -> dict:
        found = self.by_user.get(who.user_id, {"calls": [], "last_grant": None})
        return {"calls": found["calls"][:limit], "last_grant": found.get("last_grant")}


class MemoryCallStore(CallStore):
    """Calls and their outbox rows in dicts; `events` is what would be published, in order."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], dict] = {}
        self.rows: dict[int, tuple[ModelCallCompleted, bool]] = {}
        self.alive = True  # the instance's lease
        self.published: set[int] = set()  # rows the relay took (a lapsed lease)
        self._handles = 0

    async def claim(self, user_id, key, request_hash, instance_id, stream, pending) -> int | None:
        if (user_id, key) in self.calls:
            return None
        self._handles += 1
        handle = self._handles
        self.rows[handle] = (pending, False)
        self.calls[(user_id, key)] = {
            "hash": request_hash,
            "event_id": pending.event_id,
            "instance": instance_id,
            "stream": stream,
            "outcome": None,
        }
        return handle

    async def find(self, user_id, key) -> CallRecord | None:
        c = self.calls.get((user_id, key))
        if c is None:
            return None
        return CallRecord(user_id, key, c["hash"], c["event_id"], c["instance"], c["stream"], c["outcome"], self.alive)

    async def finish(self, handle, event, outcome) -> bool:
        if handle in self.published:
            return False
        self.rows[handle] = (event, True)
        await self.end(event.event_id, outcome)
        return True

    async def end(self, event_id, outcome) -> Outcome:
        for c in self.calls.values():
            if c["event_id"] == event_id:
                if c["outcome"] is None:
                    c["outcome"] = outcome
                return c["outcome"]
        return outcome

    async def forget(self, handle, user_id, key) -> None:
        self.rows.pop(handle, None)
        self.calls.pop((user_id, key), None)

    async def renew_lease(self, instance_id, lease_s) -> None:
        self.alive = True

    async def end_lease(self, instance_id) -> None:
        self.alive = False

    async def purge(self, answer_kept_s, call_kept_s) -> tuple[int, int]:
        return 0, 0

    @property
    def events(self) -> list[ModelCallCompleted]:
        return [e for e, _ in self.rows.values()]


@dataclass
class _Row:
    user_id: str
    session_id: str
    record: KeyRecord
    revoked: str | None = None


class MemorySettingsStore(SettingsStore):
    """Model settings and key records in memory, with the PostgreSQL store's rules (a replaced key is revoked)."""

    def __init__(self, clock=lambda: datetime.now(timezone.utc)):
        self.rows: dict[str, ModelSettings] = {}
        self.keys: dict[UUID, _Row] = {}
        self.clock = clock

    async def get(self, user_id: str) -> ModelSettings | None:
        return self.rows.get(user_id)

    async def put(self, settings: ModelSettings) -> None:
        self.rows[settings.user_id] = settings

    def _live(self, row: _Row) -> bool:
        return row.revoked is None and row.record.expires_at > self.clock()

    async def load(self, user_id, session_id, key_ids):
        keys = {}
        for key_id in key_ids:
            row = self.keys.get(key_id)
            if row and row.user_id == user_id and row.session_id == session_id and self._live(row):
                keys[row.record.provider] = row.record
        return self.rows.get(user_id), keys

    async def add_key(self, user_id, session_id, record):
        await self.revoke_keys(user_id, REVOKED_REPLACED, session_id=session_id, provider=record.provider)
        self.keys[record.key_id] = _Row(user_id, session_id, record)

    async def mark_key(self, key_id, status, message):
        row = self.keys.get(key_id)
        if row and row.revoked is None:
            row.record = replace(row.record, status=status, message=message)

    async def revoke_keys(self, user_id, reason, *, session_id=None, provider=None):
        count = 0
        for row in self.keys.values():
            if (
                row.user_id == user_id
                and row.revoked is None
                and session_id in (None, row.session_id)
                and provider in (None, row.record.provider)
            ):
                row.revoked = reason
                count += 1
        return count

    async def purge_keys(self, expired_before):
        gone = [k for k, row in self.keys.items() if row.record.expires_at < expired_before]
        for k in gone:
            del self.keys[k]
        return len(gone)


class FakeChecker:
    def __init__(self, status: KeyCheckStatus = KeyCheckStatus.VALID):
        self.status, self.calls = status, []

    async def check(self, user_id, provider, api_key, timeout_s):
        self.calls.append((user_id, provider, api_key))
        return KeyCheckResult(
            request_id=uuid.uuid4(),
            provider=provider,
            status=self.status,
            message=f"checked: {self.status.value}",
            key_hint=key_hint(api_key),
        )


class FakeProvider:
    """Answers with usage, or raises the given provider error; records which key each call used."""

    def __init__(self):
        self.calls: list[tuple[Provider, str, str]] = []
        self.error: ProviderError | None = None

    async def __call__(self, provider, api_key, model, messages, *, max_tokens=1024):
        self.calls.append((provider, api_key, model))
        if self.error:
            raise self.error
        return ChatReply("an answer", 11, 7, model)


class InProcessHttp(httpx.AsyncClient):
    """The providers' HTTP port (`providers.client.ProviderHttp`) over httpx, for tests that run the
    simulator's ASGI app in-process or capture requests with a MockTransport. The services use
    `services.shared.provider_http.ProviderClient` (aiohttp, real sockets).

    `post_stream` drives an ASGI app itself (httpx's ASGITransport collects a whole body before it
    answers, so a stalled stream would never start and a cut one would fail as an app error): the
    body arrives piece by piece as the app sends it, each wait bounded by the client's read timeout
    (`ProviderUnreachable(timed_out=True)`), an app that returns or fails before ending its body is a
    connection closed midway (`ProviderUnreachable`), and leaving the block tells the app the client
    went away (`http.disconnect`) and cancels it. Over any other transport it streams through httpx."""

    async def post_json(self, url: str, headers: Mapping[str, str], body: object) -> httpx.Response:
        return await self.post(url, headers=headers, json=body)

    @asynccontextmanager
    async def post_stream(self, url: str, headers: Mapping[str, str], body: object) -> AsyncIterator[HttpStream]:
        request = self.build_request("POST", url, headers=headers, json=body)
        idle_s = self.timeout.read
        transport = self._transport
        if isinstance(transport, httpx.ASGITransport):
            async with _asgi_stream(transport.app, request, idle_s) as answer:
                yield answer
            return
        try:
            response = await self.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise ProviderUnreachable(type(exc).__name__, timed_out=True) from None
        except httpx.TransportError as exc:
            raise ProviderUnreachable(type(exc).__name__) from None
        try:
            yield HttpStream(response.status_code, response.headers, _httpx_chunks(response))
        finally:
            await response.aclose()


async def _httpx_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.TimeoutException as exc:
        raise ProviderUnreachable(type(exc).__name__, timed_out=True) from None
    except httpx.TransportError as exc:
        raise ProviderUnreachable(type(exc).__name__) from None


@asynccontextmanager
async def _asgi_stream(app, request: httpx.Request, idle_s: float | None) -> AsyncIterator[HttpStream]:
    """One request to an ASGI app, its answer handed over as the app sends it."""
    body = await request.aread()
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    pieces: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent_request = False

    async def receive() -> dict:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            started.set_result(message)
        elif message["type"] == "http.response.body":
            pieces.put_nowait((message.get("body", b""), message.get("more_body", False)))

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception as exc:  # the app failed: before its answer a 500, after it a broken body
            if not started.done():
                started.set_exception(ProviderUnreachable(type(exc).__name__))
        finally:
            if not started.done():
                started.set_exception(ProviderUnreachable("NoResponse"))
            pieces.put_nowait(None)  # the app is done, whether or not it ended its body

    url = request.url
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "headers": [(k.lower(), v) for k, v in request.headers.raw],
        "scheme": url.scheme,
        "path": url.path,
        "raw_path": url.raw_path.split(b"?")[0],
        "query_string": url.query,
        "server": (url.host, url.port),
        "client": ("127.0.0.1", 123),
        "root_path": "",
    }
    task = asyncio.create_task(run())

    async def wait(awaitable):
        try:
            return await asyncio.wait_for(awaitable, idle_s)
        except TimeoutError:
            raise ProviderUnreachable("ReadTimeout", timed_out=True) from None

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            piece = await wait(pieces.get())
            if piece is None:
                raise ProviderUnreachable("RemoteProtocolError")  # the body never ended
            data, more = piece
            if data:
                yield data
            if not more:
                return

    try:
        start = await wait(asyncio.shield(started))
        headers = httpx.Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", [])])
        yield HttpStream(start["status"], headers, chunks())
    finally:
        gone.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def memory_chat(
    store: SettingsStore, balances: CreditAccount, provider: FakeProvider, checker: FakeChecker, **service_kw
) -> tuple[ChatService, ChatCalls, MemoryCallStore]:
    """The chat's rules and its call use case over in-memory ports (the calls' rows in `MemoryCallStore`)."""
    service = ChatService(
        store=store,
        checker=checker,
        platform_keys=service_kw.pop("platform_keys", {p: PLATFORM_KEY for p in Provider}),
        price_book=default_price_book(),
        **service_kw,
    )
    calls_store = MemoryCallStore()
    calls = ChatCalls(
        service=service,
        store=calls_store,
        keys=store,
        balances=balances,
        call_model=provider,
        stream_model=None,
        price_book=service.book,
    )
    return service, calls, calls_store
