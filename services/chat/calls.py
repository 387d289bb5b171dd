"""The call lifecycle (DESIGN "The call lifecycle"): one user action is one call, one hold and at most
one charge, however it ends and however often it is retried.

- **One call per action.** A call is the user's `Idempotency-Key` (or a fresh key when the client sent
  none); its `event_id` is derived from the user and the key, so the ledger dedupes it too. A retry
  while the call runs attaches to it, a retry after it ended gets its `Outcome` again, another body
  with the same key is refused.
- **Written before anything is spent.** The call's row and its pending event (failed, ending
  `interrupted`) are committed before its price is held, so every hold has an event that will settle it.
- **Runs detached from the request.** The provider is asked in a task of its own: a client that goes
  away from a plain call does not cancel it (it completes, is billed once, and the key returns its
  answer). A streamed call stops when its last listener goes away (the page's Stop): before the first
  token it is failed and free, after it succeeded and billed, the text so far kept.
- **Leases, not timers.** This instance renews a lease while it lives; the relay publishes a pending
  event (as failed) only once that lease has lapsed, never because a call is slow. A call runs at most
  `call_max_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

import providers
from billing.policy import decide, is_billable
from billing.pricing import PriceBook
from providers import ChatReply, ProviderError
from schemas.events import CallStatus, Decision, Ending, Feature, KeyCheckStatus, KeySource, ModelCallCompleted
from services.chat.balances import BalanceReader, CreditsUnavailable, HoldConflict, HoldRefused, Reservation
from services.chat.call_store import INTERRUPTED_STATUS, CallRecord, CallStore, Outcome, interrupted_body
from services.chat.identity import Identity
from services.chat.key_session import KeyRing
from services.chat.refusals import BalanceUnknown, InvalidRequest, PaymentRequired
from services.chat.service import FEATURE_NAMES, FEATURE_PROMPTS, Billing, ChatService, Route, session_of
from services.chat.store import SettingsStore

log = logging.getLogger(__name__)

# Printable ASCII without spaces, as HTTP header values and Stripe's keys are.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")
_EVENT_IDS = uuid.UUID("5f0e8f4e-2b7c-4f43-9a51-0c4f6a7d1e21")  # the namespace of derived event ids

StreamCaller = Callable[[Any, str, str, Sequence[Mapping[str, str]]], AsyncGenerator["str | ChatReply", None]]
"""Port: one streamed model call `(provider, api_key, model, messages)`: text deltas, then a `ChatReply`
with the provider's own usage; raises `ProviderError`."""
ModelCaller = Callable[[Any, str, str, Sequence[Mapping[str, str]]], Awaitable[ChatReply]]
"""Port: one plain model call `(provider, api_key, model, messages) -> ChatReply`; raises `ProviderError`."""


class IdempotencyKeyReused(InvalidRequest):
    code = "idempotency_key_reused"


def call_event_id(user_id: str, key: str) -> uuid.UUID:
    """The event id of the user's call with `key`: the same on every instance and every retry."""
    return uuid.uuid5(_EVENT_IDS, f"{user_id}\n{key}")


def request_hash(feature: Feature, message: str) -> str:
    """What makes two requests with one key the same call (never anything secret)."""
    return hashlib.sha256(f"{feature.value}\n{message}".encode()).hexdigest()


def checked_key(key: str | None) -> str:
    """The client's `Idempotency-Key`, or a fresh one (a call nobody can retry) when it sent none."""
    if key is None:
        return f"auto-{uuid.uuid4().hex}"
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidRequest(
            "The Idempotency-Key header is 1 to 200 printable characters without spaces (for example a UUID).",
            reason="invalid_idempotency_key",
        )
    return key


class RunningCall:
    """A call this instance is running: the text so far, who follows it, and its outcome once it ends."""

    def __init__(self, stream: bool):
        loop = asyncio.get_running_loop()
        self.stream = stream
        self.deltas: list[str] = []
        self.outcome: asyncio.Future[Outcome] = loop.create_future()
        self._changed: asyncio.Future[None] = loop.create_future()
        self.listeners = 0
        self.stopping = False
        self.task: asyncio.Task[Any] | None = None

    def push(self, text: str) -> None:
        self.deltas.append(text)
        self._notify()

    def finish(self, outcome: Outcome) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    def stop(self) -> None:
        """Stop the call (the user pressed Stop, or went away from a stream)."""
        if self.task is not None and not self.outcome.done():
            self.stopping = True
            self.task.cancel()

    async def follow(self, idle_s: float = 15.0) -> AsyncIterator[str | Outcome | None]:
        """The text from the start, then the outcome; None after `idle_s` without news (a keep-alive).
        A streamed call whose last follower leaves is stopped."""
        self.listeners += 1
        try:
            seen = 0
            while True:
                while seen < len(self.deltas):
                    seen += 1
                    yield self.deltas[seen - 1]
                if self.outcome.done():
                    yield self.outcome.result()
                    return
                try:
                    await asyncio.wait_for(asyncio.shield(self._changed), idle_s)
                except TimeoutError:
                    yield None
        finally:
            self.listeners -= 1
            if self.listeners == 0 and self.stream:
                self.stop()

    async def result(self) -> Outcome:
        """The outcome, waited for without stopping the call if the waiter goes away."""
        self.listeners += 1
        try:
            return await asyncio.shield(self.outcome)
        finally:
            self.listeners -= 1


@dataclass(frozen=True)
class _Call:
    """What one running call needs, decided before it starts."""

    who: Identity
    key: str
    route: Route
    api_key: str
    messages: list[dict[str, str]]
    pending: ModelCallCompleted
    handle: int
    reservation: Reservation | None


class ChatCalls:
    """The call use case: starts, attaches to and ends calls (see the module's docstring)."""

    def __init__(
        self,
        *,
        service: ChatService,
        store: CallStore,
        keys: SettingsStore,
        balances: BalanceReader,
        call_model: ModelCaller,
        stream_model: StreamCaller | None,
        price_book: PriceBook,
        instance_id: uuid.UUID | None = None,
        call_max_s: float = 600.0,
        lease_s: float = 30.0,
        poll_s: float = 0.5,
        release_again_s: float = 10.0,
    ):
        self.service, self.store, self.keys, self.balances = service, store, keys, balances
        self.call_model, self.stream_model, self.book = call_model, stream_model, price_book
        self.instance_id = instance_id or uuid.uuid4()
        self.call_max_s, self.lease_s, self.poll_s, self.release_again_s = call_max_s, lease_s, poll_s, release_again_s
        self.running: dict[tuple[str, str], RunningCall] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # --- starting or finding a call ---------------------------------------------------------------

    async def start(
        self,
        who: Identity,
        ring: KeyRing | None,
        feature: Feature,
        message: str,
        *,
        idempotency_key: str | None = None,
        stream: bool = False,
    ) -> RunningCall | Outcome:
        """The call of this user action: a running call to follow, or the outcome of one that ended.
        Raises `ChatRefused` for a call refused before anything was spent (nothing is kept then)."""
        key = checked_key(idempotency_key)
        digest = request_hash(feature, message)
        if idempotency_key is not None:
            found = await self._existing(who, key, digest)
            if found is not None:
                return found
        route, api_key = await self.service.plan(who, ring, feature, message)
        pending = ModelCallCompleted(
            event_id=call_event_id(who.user_id, key),
            occurred_at=self.service.clock(),
            user_id=who.user_id,
            session_id=session_of(who),
            request_id=uuid.uuid4().hex,
            provider=route.provider,
            model=route.model,
            feature=feature,
            key_source=route.key_source,
            status=CallStatus.FAILED,
            input_tokens=0,
            output_tokens=0,
            latency_ms=0,
            ending=Ending.INTERRUPTED,  # what it is, should this instance go away before it ends
        )
        handle = await self.store.claim(who.user_id, key, digest, self.instance_id, stream, pending)
        if handle is None:  # the same key, claimed a moment ago (by a concurrent retry)
            found = await self._existing(who, key, digest)
            if found is not None:
                return found
            raise InvalidRequest("This call was refused a moment ago; send it again.", reason="retry")
        running = RunningCall(stream)
        self.running[(who.user_id, key)] = running
        try:
            reservation = await self._reserve(who, key, pending, handle)
        except BaseException:
            self.running.pop((who.user_id, key), None)
            raise
        if isinstance(reservation, Outcome):
            self.running.pop((who.user_id, key), None)
            return reservation
        messages = [{"role": "system", "content": FEATURE_PROMPTS[feature]}, {"role": "user", "content": message}]
        call = _Call(who, key, route, api_key, messages, pending, handle, reservation)
        running.task = asyncio.create_task(self._run(running, call), name=f"call-{pending.event_id}")
        return running

    async def _existing(self, who: Identity, key: str, digest: str) -> RunningCall | Outcome | None:
        running = self.running.get((who.user_id, key))
        record = await self.store.find(who.user_id, key)
        if record is None:
            return None
        if record.request_hash != digest:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used for another request (another message or feature). "
                "Use a new key for a new message.",
                reason="idempotency_key_reused",
            )
        if record.outcome is not None:
            return record.outcome
        if running is not None:
            return running
        if not record.instance_alive:
            return Outcome(INTERRUPTED_STATUS, {**interrupted_body(), "event_id": str(record.event_id)})
        return self._watch(record)

    def _watch(self, record: CallRecord) -> RunningCall:
        """A call another instance runs: its outcome, once the database has it."""
        watcher = RunningCall(stream=False)

        async def poll() -> None:
            deadline = time.monotonic() + self.call_max_s + self.lease_s * 2
            while time.monotonic() < deadline:
                found = await self.store.find(record.user_id, record.idempotency_key)
                if found is None or found.outcome is not None or not found.instance_alive:
                    break
                await asyncio.sleep(self.poll_s)
            if found is not None and found.outcome is not None:
                watcher.finish(found.outcome)
            else:
                watcher.finish(Outcome(INTERRUPTED_STATUS, {**interrupted_body(), "event_id": str(record.event_id)}))

        watcher.task = self._spawn(poll())
        return watcher

    async def find(self, who: Identity, key: str) -> tuple[str, Outcome | None]:
        """Where the user's call with `key` stands: `running`, `ended` (with its outcome) or `unknown`."""
        record = await self.store.find(who.user_id, checked_key(key))
        if record is None:
            return "unknown", None
        if record.outcome is not None:
            return "ended", record.outcome
        if (who.user_id, key) in self.running or record.instance_alive:
            return "running", None
        return "ended", Outcome(INTERRUPTED_STATUS, {**interrupted_body(), "event_id": str(record.event_id)})

    # --- holds ------------------------------------------------------------------------------------

    async def _reserve(
        self, who: Identity, key: str, pending: ModelCallCompleted, handle: int
    ) -> Reservation | Outcome | None:
        """Hold a billable call's price, now that its pending event is written. A refusal (nothing was
        held) forgets the call; a lost answer settles it as `not_started`, whose decision releases any
        hold that was placed after all."""
        if not is_billable(pending.feature, pending.key_source):
            return None
        try:
            return await self.balances.reserve(who, pending.event_id, pending.feature, pending.provider, pending.model)
        except HoldRefused as exc:
            await self.store.forget(handle, who.user_id, key)
            raise self._short(pending, exc) from None
        except HoldConflict:
            await self.store.forget(handle, who.user_id, key)
            raise IdempotencyKeyReused(
                "This Idempotency-Key belongs to an earlier call that is already settled. Use a new key for a "
                "new message.",
                reason="idempotency_key_reused",
            ) from None
        except (CreditsUnavailable, asyncio.CancelledError) as exc:
            self._release_soon(who, pending.event_id)
            body = {
                "error": BalanceUnknown.code,
                "message": "We cannot reserve credits for this call right now, so platform calls are paused and "
                "nothing was charged. Try again in a minute as a new message, or use your own key for chat.",
                "charged": False,
                "ending": Ending.NOT_STARTED.value,
                "event_id": str(pending.event_id),
            }
            outcome = Outcome(503, body)
            event = pending.model_copy(update={"ending": Ending.NOT_STARTED, "occurred_at": self.service.clock()})
            settle = self._spawn(self._record(handle, event, outcome))
            if isinstance(exc, asyncio.CancelledError):
                raise
            await asyncio.shield(settle)
            return outcome

    def _short(self, pending: ModelCallCompleted, exc: HoldRefused) -> PaymentRequired:
        feature, model = pending.feature, pending.model
        what = FEATURE_NAMES[feature]
        if feature is Feature.CHAT:
            advice = "Switch on “use my own API key” to chat on your own key without credits, or get more credits."
        else:
            advice = f"{what} always runs on the platform's models, so it needs credits: get more credits."
        return PaymentRequired(
            f"{what} with {model} costs {exc.needed} credit{'s' if exc.needed != 1 else ''} and you have "
            f"{max(exc.available, 0)} available"
            f"{f' ({exc.held} more are held by calls still running)' if exc.held else ''}. {advice}",
            reason="insufficient_credits",
            needed=exc.needed,
            available=exc.available,
            held=exc.held,
            balance=exc.available + exc.held,
            price_list_version=self.book.in_force(self.service.clock()).version,
            suggest_byok=feature is Feature.CHAT,
        )

    def _release_soon(self, who: Identity, event_id: uuid.UUID) -> None:
        """Release a hold whose placement's answer was lost, now and once more after `release_again_s`
        (a placement the credit service had queued may land after the first). The call's `not_started`
        event settles it in any case."""

        async def release() -> None:
            await self.balances.release(who, event_id)
            await asyncio.sleep(self.release_again_s)
            await self.balances.release(who, event_id)

        self._spawn(release())

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- running and ending a call ----------------------------------------------------------------

    async def _run(self, running: RunningCall, call: _Call) -> None:
        route, started = call.route, time.monotonic()
        reply: ChatReply | None = None
        error: ProviderError | None = None
        try:
            async with asyncio.timeout(self.call_max_s):
                if running.stream and self.stream_model is not None:
                    # Closed however the loop ends, so a Stop closes the provider's response at once.
                    stream = self.stream_model(route.provider, call.api_key, route.model, call.messages)
                    async with contextlib.aclosing(stream):
                        async for item in stream:
                            if isinstance(item, ChatReply):
                                reply = item
                            elif item:
                                running.push(item)
                else:
                    reply = await self.call_model(route.provider, call.api_key, route.model, call.messages)
                    if running.stream and reply.text:
                        running.push(reply.text)
            ending = Ending.COMPLETED if reply is not None else Ending.PROVIDER_ERROR
        except ProviderError as exc:
            error, ending = exc, Ending.TIMEOUT if getattr(exc, "timed_out", False) else Ending.PROVIDER_ERROR
        except TimeoutError:
            ending = Ending.TIMEOUT
        except asyncio.CancelledError:
            ending = Ending.STOPPED if running.stopping else Ending.INTERRUPTED
        except Exception:  # a bug: the call is recorded as failed, never left pending
            log.exception("call %s failed", call.pending.event_id)
            ending = Ending.PROVIDER_ERROR
        event = self._event(call, running, started, ending, reply)
        outcome = self._outcome(call, running, event, error, reply)
        outcome = await self._record(call.handle, event, outcome)
        if outcome.ok or error is not None:
            await self._mark_key(call, error)
        self.running.pop((call.who.user_id, call.key), None)
        running.finish(outcome)

    def _event(
        self, call: _Call, running: RunningCall, started: float, ending: Ending, reply: ChatReply | None
    ) -> ModelCallCompleted:
        text = "".join(running.deltas)
        succeeded = ending is Ending.COMPLETED or (ending is Ending.STOPPED and bool(text))
        changes: dict[str, Any] = {
            "occurred_at": self.service.clock(),
            "status": CallStatus.SUCCEEDED if succeeded else CallStatus.FAILED,
            "latency_ms": int((time.monotonic() - started) * 1000),
            "ending": ending,
        }
        if reply is not None:
            changes.update(input_tokens=max(0, int(reply.input_tokens)), output_tokens=max(0, int(reply.output_tokens)))
        elif succeeded:  # stopped mid-stream: the provider's usage never came; about 4 characters a token
            prompt = sum(len(m["content"]) for m in call.messages)
            changes.update(input_tokens=max(1, prompt // 4), output_tokens=max(1, len(text) // 4))
        return call.pending.model_copy(update=changes)

    def _billing(self, call: _Call, event: ModelCallCompleted) -> Billing:
        charge = decide(event, self.book)
        before = None if call.reservation is None else call.reservation.available + call.reservation.credits
        return Billing(event.key_source, charge.decision, charge.credits, charge.price_list_version, before)

    def _outcome(
        self,
        call: _Call,
        running: RunningCall,
        event: ModelCallCompleted,
        error: ProviderError | None,
        reply: ChatReply | None,
    ) -> Outcome:
        route, billing = call.route, self._billing(call, event)
        ending = event.ending or Ending.COMPLETED
        if event.status is CallStatus.SUCCEEDED or ending is Ending.STOPPED:
            notice = None
            if route.fallback:
                notice = (
                    f"{route.reason}, so this answer ran on platform credits, as you chose: "
                    f"{billing.credits} credit{'s' if billing.credits != 1 else ''} charged."
                )
            if ending is Ending.STOPPED:
                notice = (
                    "Stopped after the answer had started: the provider worked on it, so it is charged as a whole call."
                    if billing.charged
                    else "Stopped before the answer started: nothing is charged."
                    if event.status is CallStatus.FAILED
                    else "Stopped: your own key paid the provider; no credits."
                )
            text = reply.text if reply is not None else "".join(running.deltas)
            return Outcome(200, self._answer(call, event, billing, text, notice))
        if ending is Ending.INTERRUPTED:
            return Outcome(INTERRUPTED_STATUS, {**interrupted_body(), "event_id": str(event.event_id)})
        name = providers.of(route.provider).name
        if error is not None and route.key_source is KeySource.BYOK:
            message = error.verdict.message
        elif ending is Ending.TIMEOUT:
            message = f"{name} did not finish this call in time. No credits were used; try again in a minute."
        else:
            status = error.verdict.status.value if error is not None else "unreadable answer"
            message = f"{name} could not answer this call ({status}). No credits were used; try again in a minute."
        return Outcome(
            502,
            {
                "error": "provider_error",
                "message": message,
                "key_status": error.verdict.status.value if error is not None else KeyCheckStatus.PROVIDER_UNAVAILABLE,
                "key_source": route.key_source.value,
                "whose_key": "Your" if route.key_source is KeySource.BYOK else "The platform's",
                "event_id": str(event.event_id),
                "ending": ending.value,
                "charged": False,
                "billing": billing.as_dict(),
            },
        )

    def _answer(
        self, call: _Call, event: ModelCallCompleted, billing: Billing, text: str, notice: str | None
    ) -> dict[str, Any]:
        return {
            "reply": text,
            "provider": event.provider.value,
            "model": event.model,
            "feature": event.feature.value,
            "key_source": event.key_source.value,
            "event_id": str(event.event_id),
            "idempotency_key": None if call.key.startswith("auto-") else call.key,
            "usage": {"input_tokens": event.input_tokens, "output_tokens": event.output_tokens},
            "latency_ms": event.latency_ms,
            "ending": (event.ending or Ending.COMPLETED).value,
            "charged": billing.decision is Decision.DEBITED,
            "billing": billing.as_dict(),
            # BYOK chat that ran on platform credits because the user chose to fall back: said so.
            "fallback": call.route.fallback,
            "notice": notice,
        }

    async def _record(self, handle: int, event: ModelCallCompleted, outcome: Outcome) -> Outcome:
        """Write the call's event and outcome, retrying while the database is away (the pending event
        and its hold wait meanwhile). A pending event already published (this instance's lease lapsed)
        wins: the call ends as interrupted and is not shown as charged."""
        backoff = 0.2
        while True:
            try:
                if await asyncio.shield(self.store.finish(handle, event, outcome)):
                    return outcome
                lost = Outcome(INTERRUPTED_STATUS, {**interrupted_body(), "event_id": str(event.event_id)})
                log.warning("call %s ended after its pending event was published as interrupted", event.event_id)
                await asyncio.shield(self.store.end(event.event_id, lost))
                return lost
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("cannot record the end of call %s yet (%s)", event.event_id, type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _mark_key(self, call: _Call, error: ProviderError | None) -> None:
        """What a call on the user's key taught about that key."""
        held = call.route.held
        if held is None:
            return
        try:
            if error is not None:
                await self.keys.mark_key(held.key.key_id, error.verdict.status.value, error.verdict.message)
            elif held.record.status != KeyCheckStatus.VALID.value:
                name = providers.of(call.route.provider).name
                await self.keys.mark_key(held.key.key_id, KeyCheckStatus.VALID.value, f"Your {name} key works.")
        except Exception as exc:  # the answer stands; the key's status is refreshed by the next call
            log.warning("could not record the key's status (%s)", type(exc).__name__)

    # --- the instance's lease ---------------------------------------------------------------------

    async def keep_lease(self, every_s: float) -> None:
        """Renew this instance's lease every `every_s` until cancelled."""
        while True:
            try:
                await self.store.renew_lease(self.instance_id, self.lease_s)
            except Exception as exc:  # the database is away: calls still run; their rows wait
                log.warning("cannot renew this instance's lease (%s)", type(exc).__name__)
            await asyncio.sleep(every_s)

    async def close(self, grace_s: float) -> None:
        """Let running calls finish for up to `grace_s`, then interrupt the rest (failed, not charged)."""
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for chore in list(self._background):
            chore.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        try:
            await self.store.end_lease(self.instance_id)
        except Exception as exc:
            log.warning("could not end this instance's lease (%s); it lapses on its own", type(exc).__name__)
