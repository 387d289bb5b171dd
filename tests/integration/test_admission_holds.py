"""Admission holds in the credit service's database (DESIGN.md "Admission holds").

The database refuses what Python might get wrong (tests that bypass Python), the routes answer as the
contract says, concurrent placements never overspend, and only deciding its event or releasing it ends a
hold: holds do not lapse by time (migrations/0014), and operators see the old ones.
"""

import asyncio
import json
import uuid

import asyncpg
import httpx
import pytest

from billing.policy import decide
from billing.pricing import default_price_book
from schemas.events import CallStatus, Feature
from services.credits.api import ApiContext, build_api
from services.credits.ledger import Decided, Ledger
from services.credits.settings import CreditSettings
from services.shared.auth import mint_token
from tests.support import make_event, publish, wait_for

pytestmark = pytest.mark.integration
SECRET = "holds-test-secret-0123456789abcdef"


@pytest.fixture
async def pool(stack):
    pool = await asyncpg.create_pool(
        stack.database_url, min_size=2, max_size=10, server_settings={"search_path": stack.database_schema}
    )
    yield pool
    await pool.close()


@pytest.fixture
async def api(stack, pool):
    settings = stack.settings(CreditSettings, auth_jwt_secret=SECRET)
    app = build_api(ApiContext(settings, Ledger(pool), default_price_book()))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://credits") as client:
        yield client


def auth(user: str, role: str = "user") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, user, role=role, ttl_s=600)}"}


async def grant(ledger: Ledger, user: str, plan: str = "free") -> None:
    await ledger.grant(f"test:{user}:{plan}", user, plan, {"free": 50, "standard": 500}[plan])


def hold_sql(event_id, user: str, credits: int) -> tuple:
    return (
        """INSERT INTO holds (event_id, user_id, credits, feature, provider, model, price_list_version)
               VALUES ($1, $2, $3, 'chat', 'openai', 'gpt-4o', '2026-01')""",
        event_id,
        user,
        credits,
    )


async def test_the_database_refuses_a_hold_beyond_what_is_available_bypassing_python(pool):
    await grant(Ledger(pool), "ann")  # 50
    async with pool.acquire() as conn:
        await conn.execute(*hold_sql(uuid.uuid4(), "ann", 30))
        with pytest.raises(asyncpg.CheckViolationError, match="exceeds the 20 available"):
            await conn.execute(*hold_sql(uuid.uuid4(), "ann", 21))
        await conn.execute(*hold_sql(uuid.uuid4(), "ann", 20))  # exactly what is left
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(*hold_sql(uuid.uuid4(), "ann", 1))
        with pytest.raises(asyncpg.CheckViolationError, match="no account"):
            await conn.execute(*hold_sql(uuid.uuid4(), "nobody", 1))
        # held follows the holds and cannot be set by hand; holds are never changed, only released
        assert await conn.fetchval("SELECT held FROM accounts WHERE user_id = 'ann'") == 50
        with pytest.raises(asyncpg.CheckViolationError, match="cannot be set directly"):
            await conn.execute("UPDATE accounts SET held = 0 WHERE user_id = 'ann'")
        with pytest.raises(asyncpg.RestrictViolationError, match="never changed"):
            await conn.execute("UPDATE holds SET credits = 1")
        await conn.execute("DELETE FROM holds WHERE user_id = 'ann' AND credits = 20")
        assert await conn.fetchval("SELECT held FROM accounts WHERE user_id = 'ann'") == 30


async def test_a_hold_for_an_event_already_decided_is_refused_and_deciding_releases_a_hold(pool):
    ledger, book = Ledger(pool), default_price_book()
    await grant(ledger, "ben")
    decided = make_event(user_id="ben", model="gpt-4o")  # 5 credits
    await ledger.record([Decided(decided, decide(decided, book))])
    with pytest.raises(asyncpg.CheckViolationError, match="already decided"):
        await pool.execute(*hold_sql(decided.event_id, "ben", 5))
    # A hold is settled by the transaction that decides its event, whatever the decision.
    for status, debit in ((CallStatus.SUCCEEDED, 5), (CallStatus.FAILED, 0)):
        event = make_event(user_id="ben", model="gpt-4o", status=status)
        await pool.execute(*hold_sql(event.event_id, "ben", 5))
        before = await ledger.balance("ben")
        assert before.held == 5
        await ledger.record([Decided(event, decide(event, book))])
        after = await ledger.balance("ben")
        assert (after.held, after.balance) == (0, before.balance - debit)
        assert after.available == before.available + 5 - debit


async def test_the_database_settles_a_hold_when_any_writer_decides_its_event_bypassing_python(pool):
    """Settlement is the database's rule (migrations/0011), not the ledger writer's: a decision
    inserted by plain SQL releases its hold, and a correction entry releases none."""
    await grant(Ledger(pool), "bea")  # 50
    decided, other = uuid.uuid4(), uuid.uuid4()
    async with pool.acquire() as conn:
        await conn.execute(*hold_sql(decided, "bea", 5))
        await conn.execute(*hold_sql(other, "bea", 7))
        assert await conn.fetchval("SELECT held FROM accounts WHERE user_id = 'bea'") == 12
        await conn.execute(
            """INSERT INTO ledger_entries (entry_id, event_id, kind, user_id, decision, credits, price_list_version)
               VALUES ($1, $1, 'decision', 'bea', 'debited', 5, '2026-01'),
                      ($2, NULL, 'correction', 'bea', 'correction', 0, NULL)""",
            decided,
            other,  # a correction that happens to share the other hold's id settles nothing
        )
        row = await conn.fetchrow("SELECT held, balance FROM accounts WHERE user_id = 'bea'")
        assert (row["held"], row["balance"]) == (7, 45)
        assert await conn.fetchval("SELECT array_agg(event_id) FROM holds WHERE user_id = 'bea'") == [other]


async def test_a_hold_outlives_the_old_ttl_setting_and_only_its_events_decision_releases_it(stack, pool):
    """The credit service used to release holds HOLD_TTL_S after placing them; with the settings of old
    set short, a hold now stays (its event may wait in an outbox for an hour) until its event is decided."""
    from services.credits.bootstrap import running

    settings = stack.settings(CreditSettings, auth_jwt_secret=SECRET, hold_ttl_s=0.05, hold_sweep_s=0.05)
    async with running(settings) as runtime:
        await grant(runtime.ledger, "cat")
        late = make_event(user_id="cat", model="gpt-4o")  # 5 credits
        async with httpx.AsyncClient(transport=httpx.ASGITransport(runtime.api()), base_url="http://c") as client:
            body = {"event_id": str(late.event_id), "feature": "chat", "provider": "openai", "model": "gpt-4o"}
            placed = await client.post("/api/holds", json=body, headers=auth("cat"))
            assert placed.status_code == 201 and "expires_in_s" not in placed.json(), placed.text
            await asyncio.sleep(1.0)  # twenty times the old TTL, twenty old sweeps
            b = await runtime.ledger.balance("cat")
            assert (b.balance, b.held, b.available) == (50, 5, 45)
            await publish(stack.kafka_bootstrap, settings.model_call_completed_topic, [late])

            async def settled():
                b = await runtime.ledger.balance("cat")
                return (b.balance, b.held) == (45, 0)

            await wait_for(settled, what="the event decided and its hold released")
            assert await pool.fetchval("SELECT count(*) FROM holds") == 0


async def test_admins_see_old_holds_and_metrics_say_how_old_the_oldest_is(stack, api, pool):
    from services.credits import metrics

    await grant(Ledger(pool), "ida")
    old, fresh = uuid.uuid4(), uuid.uuid4()
    await pool.execute(
        """INSERT INTO holds (event_id, user_id, credits, feature, provider, model, price_list_version, placed_at)
           VALUES ($1, 'ida', 5, 'chat', 'openai', 'gpt-4o', '2026-01', now() - interval '2 hours')""",
        old,
    )
    placed = await api.post(
        "/api/holds",
        json={"event_id": str(fresh), "feature": "chat", "provider": "openai", "model": "gpt-4o-mini"},
        headers=auth("ida"),
    )
    assert placed.status_code == 201
    assert (await api.get("/api/admin/holds", headers=auth("ida"))).status_code == 403
    listed = await api.get("/api/admin/holds?older_than_s=3600", headers=auth("ops", "admin"))
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert (body["older_than_s"], body["count"]) == (3600, 1)
    (hold,) = body["holds"]
    assert (hold["event_id"], hold["user_id"], hold["credits"], hold["decided"]) == (str(old), "ida", 5, False)
    assert hold["age_s"] >= 7200
    everything = (await api.get("/api/admin/holds?older_than_s=0", headers=auth("ops", "admin"))).json()
    assert [h["event_id"] for h in everything["holds"]] == [str(old), str(fresh)]  # oldest first
    assert (await api.get("/api/admin/holds?older_than_s=-1", headers=auth("ops", "admin"))).status_code == 422
    text = (await api.get("/metrics")).text
    assert "credits_holds_open 2.0" in text and "credits_holds_held_credits 8.0" in text
    assert metrics.OLDEST_HOLD_AGE._value.get() >= 7200
    # An operator who knows the call never reached the provider releases it; nothing is debited.
    released = await api.delete(f"/api/holds/{old}", headers=auth("ops", "admin"))
    assert released.status_code == 200 and released.json()["released"] == 5
    b = await Ledger(pool).balance("ida")
    assert (b.balance, b.held) == (50, 3)


async def test_hold_routes_answer_as_the_contract_says(api, pool):
    await grant(Ledger(pool), "dan")
    event_id = str(uuid.uuid4())
    body = {"event_id": event_id, "feature": "deep_analysis", "provider": "openai", "model": "gpt-4o"}
    placed = await api.post("/api/holds", json=body, headers=auth("dan"))
    assert placed.status_code == 201, placed.text
    assert (placed.json()["credits"], placed.json()["available"]) == (50, 0)  # deep analysis: 50 flat
    again = await api.post("/api/holds", json=body, headers=auth("dan"))
    assert again.status_code == 200 and again.json()["credits"] == 50  # the same hold, not a second one
    stolen = await api.post("/api/holds", json=body, headers=auth("eve"))
    assert stolen.status_code in (402, 409)  # another user's event id is not theirs to hold
    refused = await api.post(
        "/api/holds", json={**body, "event_id": str(uuid.uuid4()), "feature": "chat"}, headers=auth("dan")
    )
    assert refused.status_code == 402
    assert (refused.json()["needed"], refused.json()["available"]) == (5, 0) and "5 credits" in refused.json()[
        "message"
    ]
    credits = (await api.get("/api/credits/dan", headers=auth("dan"))).json()
    assert (credits["balance"], credits["held"], credits["available"]) == (50, 50, 0)
    unpriced = await api.post(
        "/api/holds", json={**body, "feature": "chat", "model": "gpt-9-ultra"}, headers=auth("dan")
    )
    assert unpriced.status_code == 422 and "no price" in unpriced.json()["detail"]
    assert (await api.delete(f"/api/holds/{event_id}", headers=auth("eve"))).status_code == 404  # not eve's
    released = await api.delete(f"/api/holds/{event_id}", headers=auth("dan"))
    assert released.status_code == 200 and released.json() == {"event_id": event_id, "released": 50, "available": 50}
    assert (await api.delete(f"/api/holds/{event_id}", headers=auth("dan"))).status_code == 404
    assert (await api.post("/api/holds", json=body)).status_code == 401


async def test_twenty_concurrent_deep_analysis_holds_on_fifty_credits_admit_exactly_one(api, pool):
    await grant(Ledger(pool), "fay")
    bodies = [
        {"event_id": str(uuid.uuid4()), "feature": Feature.DEEP_ANALYSIS.value, "provider": "openai", "model": "gpt-4o"}
        for _ in range(20)
    ]
    answers = await asyncio.gather(*[api.post("/api/holds", json=b, headers=auth("fay")) for b in bodies])
    assert sorted(a.status_code for a in answers) == [201] + [402] * 19
    credits = (await api.get("/api/credits/fay", headers=auth("fay"))).json()
    assert (credits["held"], credits["available"]) == (50, 0)


async def test_the_compatibility_route_refuses_a_reused_key_with_a_different_body(stack, pool):
    from services.credits.bootstrap import running

    settings = stack.settings(CreditSettings, auth_jwt_secret=SECRET)
    async with running(settings) as runtime:
        await grant(runtime.ledger, "gus")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(runtime.api()), base_url="http://c") as client:
            body = {"feature": "chat", "model": "gpt-4o", "key_source": "platform", "idempotency_key": "call-1"}
            first = await client.post("/api/user/deduct-credits", json=body, headers=auth("gus"))
            assert first.status_code == 200 and first.json()["decision"] == "debited"
            same = await client.post("/api/user/deduct-credits", json=body, headers=auth("gus"))
            assert same.status_code == 200 and same.json()["event_id"] == first.json()["event_id"]
            other = await client.post(
                "/api/user/deduct-credits", json={**body, "key_source": "byok"}, headers=auth("gus")
            )
            assert other.status_code == 409 and "already used for a different call" in other.json()["detail"]
            assert (await runtime.ledger.balance("gus")).balance == 45


async def test_a_hold_waits_for_a_locked_account_at_most_three_seconds_then_nothing_is_held(api, pool):
    """The chat gives up on the credit service after 5 s: a placement still waiting for the account's
    lock after that would hold credits for a call that never starts (migrations/0013)."""
    await grant(Ledger(pool), "gil")
    body = {"event_id": str(uuid.uuid4()), "feature": "chat", "provider": "openai", "model": "gpt-4o"}
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM accounts WHERE user_id = 'gil' FOR UPDATE")  # e.g. a stuck writer
        # Bounded here too: without the database's bound this would wait for the blocker, which waits for it.
        busy = await asyncio.wait_for(api.post("/api/holds", json=body, headers=auth("gil")), 15)
    assert busy.status_code == 503 and "nothing was held" in busy.json()["detail"], busy.text
    credits = (await api.get("/api/credits/gil", headers=auth("gil"))).json()
    assert (credits["held"], credits["available"]) == (0, 50)
    placed = await api.post("/api/holds", json=body, headers=auth("gil"))  # the lock gone: placed at once
    assert placed.status_code == 201


async def test_the_holds_short_path_answers_exactly_as_the_route_and_leaves_refusals_to_it(stack, pool):
    """POST /api/holds is answered in front of FastAPI (services.credits.api.hold_path) when its checks
    pass; the same requests through the FastAPI route (a chunked body, no Content-Length) get the same
    answers, and a request that fails a check reaches the route whole."""
    from services.credits.api.hold_path import HoldPath

    settings = stack.settings(CreditSettings, auth_jwt_secret=SECRET)
    ledger = Ledger(pool)
    await grant(ledger, "hal")  # 50
    await grant(ledger, "ivy")
    app = build_api(ApiContext(settings, ledger, default_price_book()))
    assert isinstance(app, HoldPath)
    reached: list[bytes] = []  # the bodies the FastAPI app was given

    async def route(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/api/holds":
            parts, more = [], True
            while more:
                message = await receive()
                parts.append(message.get("body", b""))
                more = message.get("more_body", False)
            reached.append(b"".join(parts))
            given = [{"type": "http.request", "body": reached[-1], "more_body": False}]

            async def again():
                return given.pop() if given else await receive()

            return await fastapi_app(scope, again, send)
        return await fastapi_app(scope, receive, send)

    fastapi_app, app.app = app.app, route

    def chunked(body: dict):
        async def parts():
            yield json.dumps(body).encode()

        return parts()

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://credits") as api:

        async def both(user: str, body: dict) -> tuple[httpx.Response, httpx.Response]:
            """The request through the short path, then the same one through the route."""
            short = await api.post("/api/holds", json=body, headers=auth(user))
            assert reached == [], "the short path handed a request it can answer to the route"
            routed = await api.post(
                "/api/holds", content=chunked(body), headers={**auth(user), "Content-Type": "application/json"}
            )
            assert len(reached) == 1
            reached.clear()
            return short, routed

        def body(**fields) -> dict:
            return {"event_id": str(uuid.uuid4()), "feature": "chat", "provider": "openai", "model": "gpt-4o", **fields}

        first = body()
        placed, again = await both("hal", first)  # placed, then the same hold placed before
        assert (placed.status_code, again.status_code) == (201, 200)
        assert {**placed.json(), "created": False} == again.json() and placed.json()["available"] == 45
        conflict = await both("ivy", first)  # hal's event id
        broke = [body(feature="deep_analysis") for _ in range(2)]
        for status, (short, routed) in (
            (409, conflict),
            (422, await both("hal", body(model="gpt-9-ultra"))),
        ):
            assert (short.status_code, short.json()) == (
                routed.status_code,
                routed.json(),
            ) and short.status_code == status
        poor_short = await api.post("/api/holds", json=broke[0], headers=auth("hal"))  # 50 needed, 45 left
        assert reached == []
        poor_routed = await api.post(
            "/api/holds", content=chunked(broke[1]), headers={**auth("hal"), "Content-Type": "application/json"}
        )
        assert (poor_short.status_code, poor_short.json()) == (poor_routed.status_code, poor_routed.json())
        assert poor_short.status_code == 402 and poor_short.json()["needed"] == 50
        reached.clear()
        # Refused before anything is held: the route gets the request, body and all, and refuses it.
        refusals = [
            (401, await api.post("/api/holds", json=body(), headers={"Authorization": "Bearer forged"})),
            (401, await api.post("/api/holds", json=body())),
            # Two Authorization headers: the route reads the first, and so does the short path.
            (
                401,
                await api.post(
                    "/api/holds", json=body(), headers=[("Authorization", "Bearer forged"), *auth("hal").items()]
                ),
            ),
            (422, await api.post("/api/holds", json={**body(), "credits": 1}, headers=auth("hal"))),
            (422, await api.post("/api/holds", json=body(feature="nope"), headers=auth("hal"))),
            (
                422,
                await api.post(
                    "/api/holds", content=b"{not json", headers={**auth("hal"), "Content-Type": "application/json"}
                ),
            ),
        ]
        assert [(s, r.status_code) for s, r in refusals] == [(s, s) for s, _ in refusals]
        assert all(r.json()["error"] for _, r in refusals)
        assert len(reached) == len(refusals) and reached[-1] == b"{not json"
    assert (await ledger.balance("hal")).held == 5  # the first hold only
