"""The call lifecycle's rules with fakes for every port: idempotency, endings, Stop, leases, shutdown."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from providers import ChatReply, KeyVerdict, ProviderError
from schemas.events import CallStatus, Ending, Feature, KeyCheckStatus, Provider
from services.chat.call_store import Outcome
from services.chat.idempotency import IdempotencyKeyReused, call_event_id
from services.chat.identity import Identity
from services.chat.refusals import InvalidRequest, PaymentRequired
from services.chat.routing import page_request
from services.chat.running import RunningCall
from tests.fakes import FakeChecker, FakeProvider, MemoryCredits, MemorySettingsStore, memory_chat

pytestmark = pytest.mark.unit

ALICE = Identity("alice", "user", "sess-1", "token-a")


class FakeStream:
    """A provider stream: `pieces` text deltas, `gap_s` apart, then the usage; or a failure after
    `fail_after` pieces."""

    def __init__(self, pieces: int = 5, gap_s: float = 0.0, first_s: float = 0.0, fail_after: int | None = None):
        self.pieces, self.gap_s, self.first_s, self.fail_after = pieces, gap_s, first_s, fail_after
        self.closed = 0

    async def __call__(self, provider, api_key, model, messages, *, max_tokens=1024):
        try:
            await asyncio.sleep(self.first_s)
            text = ""
            for i in range(self.pieces):
                if self.fail_after is not None and i == self.fail_after:
                    raise ProviderError(Provider.OPENAI, KeyVerdict(KeyCheckStatus.PROVIDER_UNAVAILABLE, "broke"), 200)
                piece = f"word{i} "
                text += piece
                yield piece
                await asyncio.sleep(self.gap_s)
            yield ChatReply(text, 12, self.pieces, model)
        finally:
            self.closed += 1


def make(balance: int = 100, stream: FakeStream | None = None, **calls_kw):
    balances = MemoryCredits({"alice": balance})
    provider = FakeProvider()
    _, calls, store = memory_chat(MemorySettingsStore(), balances, provider, FakeChecker())
    calls.runner.stream_model = stream
    for name, value in calls_kw.items():
        setattr(calls.runner, name, value)
    return calls, store, balances, provider


async def outcome_of(started) -> Outcome:
    return started if isinstance(started, Outcome) else await started.result()


async def test_one_key_is_one_call_one_event_and_its_outcome_again():
    calls, store, _, provider = make()
    first = await outcome_of(await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="k-1"))
    again = await outcome_of(await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="k-1"))
    assert first == again and first.body["event_id"] == str(call_event_id("alice", "k-1"))
    assert len(provider.calls) == 1 and len(store.events) == 1
    with pytest.raises(IdempotencyKeyReused):
        await calls.start(ALICE, None, page_request(Feature.CHAT, "something else"), idempotency_key="k-1")
    with pytest.raises(InvalidRequest):
        await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="has spaces")
    # Another user's same key is another call.
    bob = Identity("bob", "user", "s", "t")
    calls.balances.balances["bob"] = 100
    other = await outcome_of(await calls.start(bob, None, page_request(Feature.CHAT, "hi"), idempotency_key="k-1"))
    assert other.body["event_id"] != first.body["event_id"]


async def test_a_retry_while_the_call_runs_attaches_to_it():
    calls, store, _, _ = make(stream=FakeStream(pieces=4, gap_s=0.02))
    running = await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="k", stream=True)
    attached = await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="k")
    assert attached is running
    seen = [item async for item in running.follow() if item is not None]
    assert seen[:-1] == ["word0 ", "word1 ", "word2 ", "word3 "] and seen[-1] == await attached.result()
    assert len(store.events) == 1 and store.events[0].ending is Ending.COMPLETED


async def test_stop_before_the_first_token_is_free_and_after_it_is_billed_once():
    stream = FakeStream(pieces=50, gap_s=0.01, first_s=0.2)
    calls, store, balances, _ = make(stream=stream)
    running = await calls.start(
        ALICE, None, page_request(Feature.CHAT, "stop early"), idempotency_key="early", stream=True
    )
    reader = running.follow()
    read = asyncio.ensure_future(reader.__anext__())
    await asyncio.sleep(0.05)
    read.cancel()  # the page's Stop: the last reader goes away (as Starlette cancels a left stream)
    await asyncio.gather(read, return_exceptions=True)
    early = await running.result()
    event = store.events[-1]
    assert event.ending is Ending.STOPPED and event.status is CallStatus.FAILED and not early.body["charged"]
    assert stream.closed == 1  # the provider's stream was closed

    running = await calls.start(
        ALICE, None, page_request(Feature.CHAT, "stop late"), idempotency_key="late", stream=True
    )
    reader = running.follow()
    shown = [await reader.__anext__(), await reader.__anext__()]
    await reader.aclose()
    late = await running.result()
    event = store.events[-1]
    assert event.ending is Ending.STOPPED and event.status is CallStatus.SUCCEEDED and late.body["charged"]
    assert late.body["reply"].startswith("".join(shown)) and event.output_tokens >= 1
    assert late.body["billing"]["credits"] == 3 and "charged as a whole call" in late.body["notice"]
    # The kept answer is what a retry gets.
    again = await calls.start(ALICE, None, page_request(Feature.CHAT, "stop late"), idempotency_key="late")
    assert again == late


async def test_a_plain_call_is_not_stopped_when_its_waiter_goes_away():
    calls, store, _, provider = make()
    gate = asyncio.Event()
    real = provider.__call__

    async def slow(*args, **kw):
        await gate.wait()
        return await real(*args, **kw)

    calls.runner.call_model = slow
    running = await calls.start(ALICE, None, page_request(Feature.CHAT, "keep going"), idempotency_key="k")
    waiter = asyncio.ensure_future(running.result())
    await asyncio.sleep(0.01)
    waiter.cancel()  # the client went away
    gate.set()
    done = await running.outcome
    assert done.ok and done.body["charged"] and store.events[0].ending is Ending.COMPLETED


@pytest.mark.parametrize(
    "stream, ending",
    [(FakeStream(pieces=6, fail_after=3), Ending.PROVIDER_ERROR), (FakeStream(pieces=6, gap_s=1.0), Ending.TIMEOUT)],
)
async def test_failures_and_timeouts_after_the_first_token_are_never_billed(stream, ending):
    calls, store, _, _ = make(stream=stream, call_max_s=0.3)
    running = await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="k", stream=True)
    items = [item async for item in running.follow() if item is not None]
    final = items[-1]
    assert isinstance(final, Outcome) and final.status == 502 and not final.body["charged"]
    assert final.body["ending"] == ending.value and len(items) > 1  # text came first
    assert store.events[0].status is CallStatus.FAILED and store.events[0].ending is ending


async def test_a_call_whose_pending_event_was_published_is_never_shown_as_charged():
    """This instance lost its lease (the database was away longer than it), so the relay published the
    call's pending event as interrupted: the call, finishing after all, must not say it was charged."""
    calls, store, _, provider = make()
    gate = asyncio.Event()
    real = provider.__call__

    async def slow(*args, **kw):
        await gate.wait()
        return await real(*args, **kw)

    calls.runner.call_model = slow
    running = await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="k")
    store.published.add(1)  # the relay took the pending row
    gate.set()
    done = await running.result()
    assert done.status == 503 and done.body["error"] == "interrupted" and done.body["charged"] is False
    assert store.rows[1][0].ending is Ending.INTERRUPTED  # the event that went out


async def test_shutdown_interrupts_what_still_runs_after_the_grace_period():
    calls, store, _, _ = make(stream=FakeStream(pieces=100, gap_s=0.05))
    running = await calls.start(ALICE, None, page_request(Feature.CHAT, "long"), idempotency_key="k", stream=True)
    await asyncio.sleep(0.1)
    await calls.close(grace_s=0.05)
    done = await running.outcome
    assert done.status == 503 and done.body["ending"] == "interrupted" and not store.alive
    assert store.events[0].ending is Ending.INTERRUPTED and store.events[0].status is CallStatus.FAILED


async def test_readers_see_the_text_from_the_start_then_the_outcome():
    call = RunningCall(stream=False)
    call.push("a")
    late = call.follow(idle_s=0.01)
    assert await late.__anext__() == "a"
    assert await late.__anext__() is None  # nothing new for a while: a keep-alive
    call.push("b")
    call.finish(Outcome(200, {"reply": "ab"}))
    assert [x async for x in late] == ["b", Outcome(200, {"reply": "ab"})]


async def test_a_call_whose_end_cannot_be_recorded_is_answered_free_and_recorded_failed():
    """The database is away when the answer comes: past `record_wait_s` the user is told the answer is not
    charged, and what is written once the database is back is a failed event, never the charge."""
    calls, store, _, _ = make(record_wait_s=0.1)
    real_finish, attempts = store.finish, []

    async def away_then_back(handle, event, outcome):
        attempts.append(event)
        if len(attempts) < 4:
            raise ConnectionRefusedError("database away")
        return await real_finish(handle, event, outcome)

    store.finish = away_then_back
    done = await (await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="k")).result()
    assert done.ok and done.body["charged"] is False and "not charged" in done.body["notice"]
    assert done.body["reply"]  # the answer itself is given
    for _ in range(100):
        if store.rows[1][1]:
            break
        await asyncio.sleep(0.05)
    written, ready = store.rows[1]
    assert ready and written.status is CallStatus.FAILED and written.ending is Ending.INTERRUPTED
    assert attempts[0].status is CallStatus.SUCCEEDED  # it was tried as it was, first
    assert (await store.find("alice", "k")).outcome == done


async def test_a_retry_that_joins_a_call_refused_at_its_hold_gets_the_same_refusal():
    """Two requests with one key: the second joins the first while its hold is asked for; the hold is
    refused (402). The second must get that answer, not wait for ever on a call that never ran (the
    outage test saw a request hang 60 s on exactly this)."""
    calls, store, balances, provider = make(balance=1)
    gate = asyncio.Event()
    real_reserve = balances.reserve

    async def slow_reserve(*args):
        await gate.wait()
        return await real_reserve(*args)

    balances.reserve = slow_reserve
    request = page_request(Feature.DEEP_ANALYSIS, "analyse")
    first = asyncio.ensure_future(calls.start(ALICE, None, request, idempotency_key="k"))
    await asyncio.sleep(0.01)  # the first has claimed the key and waits for its hold
    joined = await calls.start(ALICE, None, request, idempotency_key="k")
    gate.set()
    with pytest.raises(PaymentRequired) as refused:
        await first
    answer = await asyncio.wait_for(outcome_of(joined), 1.0)
    assert answer.status == 402 and answer.body["error"] == refused.value.code and answer.body["charged"] is False
    assert not provider.calls and not store.events and not calls.running


async def test_a_write_broken_by_a_dropped_connection_is_retried_and_a_bug_still_answers():
    """asyncpg's "cannot switch to state" (a connection PostgreSQL dropped mid-statement) is the database
    being away: the end is written once it answers. Any other failure of the write still answers the
    call (not charged), instead of leaving its readers waiting."""
    calls, store, _, _ = make(record_wait_s=0.5)
    real_finish, attempts = store.finish, []

    async def protocol_broken_once(handle, event, outcome):
        attempts.append(event)
        if len(attempts) == 1:
            raise asyncpg.exceptions.InternalClientError(
                "cannot switch to state 15; another operation (2) is in progress"
            )
        return await real_finish(handle, event, outcome)

    store.finish = protocol_broken_once
    done = await asyncio.wait_for(outcome_of(await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"))), 5)
    assert done.ok and done.body["charged"] is True and len(attempts) == 2

    async def buggy(handle, event, outcome):
        raise KeyError("a bug")

    store.finish = buggy
    done = await asyncio.wait_for(outcome_of(await calls.start(ALICE, None, page_request(Feature.CHAT, "ho"))), 5)
    assert done.ok and done.body["charged"] is False and "not charged" in done.body["notice"]
    assert not calls.running


async def test_a_retry_watching_a_call_in_the_database_survives_the_database_going_away():
    """A retry for a call this process no longer runs (its end is being written) watches the database
    for the outcome; the database away while it watches must not leave the retry waiting for ever."""
    calls, store, _, _ = make()
    calls.poll_s = 0.01
    done = await outcome_of(await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="k"))
    kept = store.calls[("alice", "k")]["outcome"]
    store.calls[("alice", "k")]["outcome"] = None  # as if the end were still being written
    real_find, away = store.find, [3]

    async def away_for_a_while(user_id, key):
        if away[0]:
            away[0] -= 1
            raise ConnectionRefusedError("database away")
        return await real_find(user_id, key)

    watcher = await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="k")
    assert isinstance(watcher, RunningCall)
    store.find = away_for_a_while
    await asyncio.sleep(0.05)
    store.calls[("alice", "k")]["outcome"] = kept  # written now
    assert await asyncio.wait_for(watcher.result(), 2) == done and away == [0]


async def test_a_refusal_that_cannot_be_forgotten_is_recorded_for_its_retries():
    """Refused at its hold while the database is away (the claim cannot be removed): the refusal is
    written as the call's outcome once it can be, so a retry gets it instead of watching for ever."""
    calls, store, _, provider = make(balance=1)
    calls.poll_s = 0.01

    async def away(*args):
        raise ConnectionRefusedError("database away")

    store.forget = away
    request = page_request(Feature.DEEP_ANALYSIS, "analyse")
    with pytest.raises(PaymentRequired):
        await calls.start(ALICE, None, request, idempotency_key="k")
    retry = await asyncio.wait_for(outcome_of(await calls.start(ALICE, None, request, idempotency_key="k")), 2)
    assert retry.status == 402 and retry.body["charged"] is False and not provider.calls
    assert store.events[-1].ending is Ending.NOT_STARTED and store.events[-1].status is CallStatus.FAILED


async def test_a_call_stopped_before_its_task_starts_is_answered_and_recorded_free():
    """A Stop in the very instant the call is started cancels a task that never ran a line: its readers
    still get an answer (not charged), the call leaves this instance, and its end is written (failed)."""
    calls, store, _, provider = make(stream=FakeStream(pieces=3))
    running = await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="k", stream=True)
    running.stop()  # before the loop ever runs the task
    done = await asyncio.wait_for(running.result(), 2)
    assert done.body["charged"] is False and not calls.running and not provider.calls
    for _ in range(50):
        if store.events:
            break
        await asyncio.sleep(0.01)
    assert store.events[-1].status is CallStatus.FAILED and store.events[-1].ending is Ending.NOT_STARTED
    again = await asyncio.wait_for(
        outcome_of(await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"), idempotency_key="k")), 2
    )
    assert again == done


async def test_a_write_that_landed_but_lost_its_answer_keeps_the_charge_it_recorded():
    """The first write of a call's end commits, its answer is lost (PostgreSQL dropped the connection),
    and the relay takes the event before the retry: the user is told the outcome that is billed."""
    calls, store, _, _ = make()
    real_finish = store.finish
    tries = []

    async def committed_then_dropped(handle, event, outcome):
        tries.append(event)
        if len(tries) == 1:
            await real_finish(handle, event, outcome)
            store.published.add(handle)  # the relay took the ready event meanwhile
            raise ConnectionResetError("the answer to COMMIT was lost")
        return await real_finish(handle, event, outcome)

    store.finish = committed_then_dropped
    done = await asyncio.wait_for(outcome_of(await calls.start(ALICE, None, page_request(Feature.CHAT, "hi"))), 5)
    assert done.ok and done.body["charged"] is True and len(tries) == 2
    assert store.events[-1].status is CallStatus.SUCCEEDED
