"""Running one call to its end: ask the provider (plainly or streamed, within `call_max_s`), then write
how it ended (its event and the outcome every retry gets), whatever it was: completed, failed, timed
out, stopped by its last reader, or interrupted at shutdown. Started by `services/chat/calls.py`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

import providers
from billing.pricing import PriceBook
from providers import ChatReply, ProviderError
from schemas.events import CallStatus, Ending, KeyCheckStatus, ModelCallCompleted
from services.chat.call_answers import CallPlan, ended_event, outcome_of, unrecorded_outcome
from services.chat.call_store import INTERRUPTED_STATUS, CallStore, Outcome, interrupted_body
from services.chat.running import RunningCall
from services.chat.store import SettingsStore
from services.shared.db import database_unreachable

log = logging.getLogger(__name__)

StreamCaller = Callable[..., AsyncGenerator["str | ChatReply", None]]
"""Port: one streamed model call `(provider, api_key, model, messages, *, max_tokens)`: text deltas, then
a `ChatReply` with the provider's own usage; raises `ProviderError`."""
ModelCaller = Callable[..., Awaitable[ChatReply]]
"""Port: one plain model call `(provider, api_key, model, messages, *, max_tokens) -> ChatReply`; raises
`ProviderError`."""


class CallRunner:
    def __init__(
        self,
        *,
        store: CallStore,
        keys: SettingsStore,
        call_model: ModelCaller,
        stream_model: StreamCaller | None,
        price_book: PriceBook,
        clock: Callable[[], datetime],
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        call_max_s: float = 600.0,
        record_wait_s: float = 10.0,
    ):
        self.store, self.keys, self.book, self.clock, self.spawn = store, keys, price_book, clock, spawn
        self.call_model, self.stream_model = call_model, stream_model
        self.call_max_s, self.record_wait_s = call_max_s, record_wait_s

    async def run(self, running: RunningCall, call: CallPlan) -> Outcome:
        """Ask the provider, then record how the call ended; the call's outcome."""
        route, started = call.route, time.monotonic()
        reply: ChatReply | None = None
        error: ProviderError | None = None
        try:
            async with asyncio.timeout(self.call_max_s):
                if running.stream and self.stream_model is not None:
                    # Closed however the loop ends, so a Stop closes the provider's response at once.
                    stream = self.stream_model(
                        route.provider, call.api_key, route.model, call.messages, max_tokens=call.max_tokens
                    )
                    async with contextlib.aclosing(stream):
                        async for item in stream:
                            if isinstance(item, ChatReply):
                                reply = item
                            elif item:
                                running.push(item)
                else:
                    reply = await self.call_model(
                        route.provider, call.api_key, route.model, call.messages, max_tokens=call.max_tokens
                    )
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
        event = ended_event(call, running.deltas, started, ending, reply, self.clock())
        outcome = outcome_of(call, running.deltas, event, error, reply, self.book)
        outcome = await self._record(call, event, outcome)
        if outcome.ok or error is not None:
            await self._mark_key(call, error)
        return outcome

    async def _record(self, call: CallPlan, event: ModelCallCompleted, outcome: Outcome) -> Outcome:
        """Write the call's event and outcome. A pending event already published (this instance's lease
        lapsed) wins: the call ends as interrupted and is not shown as charged. While the database is
        away the write is retried; past `record_wait_s` the call is answered as not charged and what is
        written, once the database is back, is that: a failed event (never billed), never the charge
        the user was not shown."""
        write = asyncio.ensure_future(self.write(call.handle, event, outcome))
        try:
            return await asyncio.wait_for(asyncio.shield(write), self.record_wait_s)
        except TimeoutError:
            pass
        except Exception:  # a bug in the write: the same as a write that does not come back
            log.exception("call %s: its end could not be recorded", event.event_id)
        write.cancel()
        await asyncio.gather(write, return_exceptions=True)
        failed = event.model_copy(update={"status": CallStatus.FAILED, "ending": Ending.INTERRUPTED})
        unrecorded = unrecorded_outcome(call, failed, outcome, self.book)
        self.spawn(self.write(call.handle, failed, unrecorded))
        return unrecorded

    async def write(self, handle: int, event: ModelCallCompleted, outcome: Outcome) -> Outcome:
        """Write a call's end, retrying while the database is away."""
        backoff = 0.2
        while True:
            try:
                if await asyncio.shield(self.store.finish(handle, event, outcome)):
                    return outcome
                lost = Outcome(INTERRUPTED_STATUS, {**interrupted_body(), "event_id": str(event.event_id)})
                ended = await asyncio.shield(self.store.end(event.event_id, lost))
                if ended == lost:
                    log.warning("call %s ended after its pending event was published as interrupted", event.event_id)
                return ended
            except Exception as exc:
                # Away or busy (refused, restarting, a protocol state a dropped connection broke):
                # retried; anything else is about the write itself and would fail again.
                if not database_unreachable(exc):
                    raise
                if backoff == 0.2:
                    log.warning("cannot record the end of call %s yet (%s)", event.event_id, type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _mark_key(self, call: CallPlan, error: ProviderError | None) -> None:
        """What a call on the user's key taught about that key."""
        held = call.route.key
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
