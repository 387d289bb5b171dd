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
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from billing.policy import is_billable
from billing.pricing import PriceBook
from schemas.events import CallStatus, Ending, ModelCallCompleted
from services.chat.call_answers import CallPlan, short_of_credits
from services.chat.call_request import CallRequest
from services.chat.call_runner import CallRunner, ModelCaller, StreamCaller
from services.chat.call_store import INTERRUPTED_STATUS, CallRecord, CallStore, Outcome, interrupted_body
from services.chat.credit_account import CreditAccount, CreditsUnavailable, HoldConflict, HoldRefused, Reservation
from services.chat.idempotency import IdempotencyKeyReused, call_event_id, checked_key
from services.chat.identity import Identity
from services.chat.key_session import KeyRing
from services.chat.refusals import BalanceUnknown, ChatRefused, InvalidRequest
from services.chat.routing import session_of
from services.chat.running import RunningCall
from services.chat.service import ChatService
from services.chat.store import SettingsStore
from services.shared.db import database_unreachable

log = logging.getLogger(__name__)


def not_started(exc: BaseException, event_id: uuid.UUID) -> Outcome:
    """What a retry that joined a call gets when the call was refused before it started: the refusal
    the first request got, or, for an outage, a sentence saying nothing was charged."""
    if isinstance(exc, ChatRefused):
        body = {"error": exc.code, "message": exc.message, **exc.details}
        return Outcome(exc.status, {**body, "charged": False, "event_id": str(event_id)})
    sentence = "This call could not be started just now; nothing was charged. Send it again in a moment."
    return Outcome(503, {"error": "not_started", "message": sentence, "charged": False, "event_id": str(event_id)})


class ChatCalls:
    """The call use case: starts, attaches to and ends calls (see the module's docstring)."""

    def __init__(
        self,
        *,
        service: ChatService,
        store: CallStore,
        keys: SettingsStore,
        balances: CreditAccount,
        call_model: ModelCaller,
        stream_model: StreamCaller | None,
        price_book: PriceBook,
        instance_id: uuid.UUID | None = None,
        call_max_s: float = 600.0,
        lease_s: float = 30.0,
        poll_s: float = 0.5,
        release_again_s: float = 10.0,
        record_wait_s: float = 10.0,
    ):
        self.service, self.store, self.balances, self.book = service, store, balances, price_book
        self.instance_id = instance_id or uuid.uuid4()
        self.call_max_s, self.lease_s, self.poll_s, self.release_again_s = call_max_s, lease_s, poll_s, release_again_s
        self.running: dict[tuple[str, str], RunningCall] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.runner = CallRunner(
            store=store,
            keys=keys,
            call_model=call_model,
            stream_model=stream_model,
            price_book=price_book,
            clock=service.clock,
            spawn=self._spawn,
            call_max_s=call_max_s,
            record_wait_s=record_wait_s,
        )

    # --- starting or finding a call ---------------------------------------------------------------

    async def start(
        self,
        who: Identity,
        ring: KeyRing | None,
        request: CallRequest,
        *,
        idempotency_key: str | None = None,
        stream: bool = False,
    ) -> RunningCall | Outcome:
        """The call of this user action: a running call to follow, or the outcome of one that ended.
        Raises `ChatRefused` for a call refused before anything was spent (nothing is kept then)."""
        key = checked_key(idempotency_key)
        digest, feature = request.digest(), request.feature
        if idempotency_key is not None:
            found = await self._existing(who, key, digest)
            if found is not None:
                return found
        route, api_key = await self.service.plan(who, ring, request)
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
        running = RunningCall(stream, str(pending.event_id), route.model)
        self.running[(who.user_id, key)] = running
        # A retry arriving from here on follows `running`: however the start ends, it gets an answer.
        try:
            reservation = await self._reserve(who, key, pending, handle)
        except BaseException as exc:
            self.running.pop((who.user_id, key), None)
            answer = not_started(exc, pending.event_id)
            running.finish(answer)
            if not isinstance(exc, (ChatRefused, asyncio.CancelledError)):  # refusals and cancels are settled
                log.exception("call %s could not be started", pending.event_id)
                self._settle_unstarted(handle, pending, answer)
            raise
        if isinstance(reservation, Outcome):
            self.running.pop((who.user_id, key), None)
            running.finish(reservation)
            return reservation
        messages = [dict(m) for m in request.messages]
        call = CallPlan(who, key, route, api_key, messages, pending, handle, reservation, request.max_tokens)
        running.task = asyncio.create_task(self._run(running, call), name=f"call-{pending.event_id}")
        running.task.add_done_callback(lambda _: self._never_ran(running, call))
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
        watcher = RunningCall(stream=False, event_id=str(record.event_id))

        async def poll() -> None:
            # Whatever happens (the database away a while, a bug), the watcher gets an outcome.
            outcome = Outcome(INTERRUPTED_STATUS, {**interrupted_body(), "event_id": str(record.event_id)})
            deadline = time.monotonic() + self.call_max_s + self.lease_s * 2
            try:
                while time.monotonic() < deadline:
                    try:
                        found = await self.store.find(record.user_id, record.idempotency_key)
                    except Exception as exc:
                        if not database_unreachable(exc):
                            raise
                        await asyncio.sleep(self.poll_s)
                        continue
                    if found is not None and found.outcome is not None:
                        outcome = found.outcome
                        break
                    if found is None or not found.instance_alive:
                        break
                    await asyncio.sleep(self.poll_s)
            finally:
                watcher.finish(outcome)

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
            short = short_of_credits(pending, exc, self.book.in_force(self.service.clock()).version)
            raise await self._refuse(who, key, pending, handle, short) from None
        except HoldConflict:
            reused = IdempotencyKeyReused(
                "This Idempotency-Key belongs to an earlier call that is already settled. Use a new key for a "
                "new message.",
                reason="idempotency_key_reused",
            )
            raise await self._refuse(who, key, pending, handle, reused) from None
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
            settle = self._settle_unstarted(handle, pending, outcome)
            if isinstance(exc, asyncio.CancelledError):
                raise
            await asyncio.wait({settle}, timeout=self.runner.record_wait_s)
            return outcome

    async def _refuse(
        self, who: Identity, key: str, pending: ModelCallCompleted, handle: int, refusal: ChatRefused
    ) -> ChatRefused:
        """Forget a call refused before anything was held, so that its key may be used again. With the
        database away, the refusal is recorded instead, whenever it can be (a `not_started` event, never
        billed): a claimed call nobody runs would keep its retries waiting."""
        try:
            await self.store.forget(handle, who.user_id, key)
        except Exception as exc:
            if not database_unreachable(exc):
                raise
            self._settle_unstarted(handle, pending, not_started(refusal, pending.event_id))
        return refusal

    def _settle_unstarted(self, handle: int, pending: ModelCallCompleted, outcome: Outcome) -> asyncio.Task[Any]:
        """Write a call that never reached the provider as `not_started` (failed: never billed), with the
        answer its retries get, whenever the database takes it."""
        event = pending.model_copy(update={"ending": Ending.NOT_STARTED, "occurred_at": self.service.clock()})
        return self._spawn(self.runner.write(handle, event, outcome))

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

    async def _run(self, running: RunningCall, call: CallPlan) -> None:
        """Run the call; whatever happens, its readers get an outcome and the call leaves `running`
        (a reader waiting on a call whose task died would wait for ever)."""
        try:
            outcome = await self.runner.run(running, call)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("call %s ended without an outcome", call.pending.event_id)
            event_id = str(call.pending.event_id)
            outcome = Outcome(INTERRUPTED_STATUS, {**interrupted_body(), "event_id": event_id})
            raise
        finally:
            self.running.pop((call.who.user_id, call.key), None)
            running.finish(outcome)

    def _never_ran(self, running: RunningCall, call: CallPlan) -> None:
        """A call cancelled before its task took a first step (a Stop in the same instant) never ran
        `_run`: it is answered and recorded here, not charged (the provider was never asked)."""
        if running.outcome.done():
            return
        self.running.pop((call.who.user_id, call.key), None)
        outcome = Outcome(INTERRUPTED_STATUS, {**interrupted_body(), "event_id": str(call.pending.event_id)})
        running.finish(outcome)
        self._settle_unstarted(call.handle, call.pending, outcome)

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
