"""`python -m scripts.demo` (`make demo`): the design's scripted scenario against the live stack.

A platform user and a BYOK user make calls of every feature through the chat service. The script
prints each answer's billing, then the credit service's own decisions (read from `credit_ledger`)
and the balances, and exits 0 only if every decision and every balance is what the policy says.
Users are new on each run (a run id in their names), so the demo can be run again and again.

Env: CHAT_URL (http://127.0.0.1:8000), CREDITS_URL (http://127.0.0.1:8001), AUTH_JWT_SECRET,
KAFKA_BOOTSTRAP_SERVERS, TOPIC_PREFIX (the same settings as the services).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, field

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic_settings import SettingsConfigDict
from rich.console import Console
from rich.table import Table

from billing.policy import platform_price
from billing.pricing import default_price_book
from schemas.events import CreditOutcome, Feature, utc_now
from services.chat.identity import mint_token
from services.chat.routing import DEFAULT_FEATURE_MODELS
from services.shared.settings import CommonSettings, HttpSettings

console = Console()

# Keys the provider simulator knows by their marker words ("valid", "revoked").
BYOK_KEY = "gsk_valid" + "demo" * 6
REVOKED_KEY = "gsk_revoked" + "demo" * 6


class DemoSettings(CommonSettings, HttpSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore")
    chat_url: str = "http://127.0.0.1:8000"
    credits_url: str = "http://127.0.0.1:8001"
    settle_timeout_s: float = 60.0


ALWAYS_BILLED = ("deep_analysis", "code_fix", "code_canvas")


def price(feature: str, model: str | None = None) -> int:
    """What a platform call of `feature` costs by the price list in force (the model of an
    always-billed feature is the platform's own for it, as the chat runs it)."""
    f = Feature(feature)
    model = model or DEFAULT_FEATURE_MODELS[f][1]
    credits = platform_price(f, model, default_price_book().in_force(utc_now()))
    if credits is None:
        raise SystemExit(f"{model} has no platform price in the price list in force")
    return credits


@dataclass
class Expect:
    user: str
    plan: str
    granted: int
    calls: list[tuple[str, dict]] = field(default_factory=list)  # (what, chat answer)
    event_credits: dict[str, tuple[str, int]] = field(default_factory=dict)  # event id -> (decision, credits)

    @property
    def balance(self) -> int:
        return self.granted - sum(c for _, c in self.event_credits.values())


class Demo:
    def __init__(self, settings: DemoSettings):
        self.s = settings
        self.run = uuid.uuid4().hex[:6]
        self.ok = True

    def token(self, user: str, role: str = "user") -> str:
        return mint_token(self.s.auth_jwt_secret, user, role=role, ttl_s=900)

    def client(self, user: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.s.chat_url, timeout=60, headers={"Authorization": f"Bearer {self.token(user)}"}
        )

    def fail(self, message: str) -> None:
        self.ok = False
        console.print(f"[bold red]✗ {message}[/]")

    def grant(self, user: str, plan: str) -> int:
        r = httpx.post(
            f"{self.s.credits_url}/api/admin/grants",
            timeout=30,
            json={"grant_key": f"demo:{user}", "user_id": user, "plan": plan},
            headers={"Authorization": f"Bearer {self.token('demo-admin', 'admin')}"},
        )
        r.raise_for_status()
        return r.json()["credits"]

    def settings(
        self, c: httpx.Client, provider: str, model: str, own: bool = False, key: str | None = None
    ) -> httpx.Response:
        body = {"provider": provider, "model": model, "use_own_key": own} | ({"api_key": key} if key else {})
        r = c.post("/settings/model", json=body)
        if "byok_key" in r.cookies:
            # Keep the sealed key like a browser would (httpx sends Secure cookies only over https).
            c.cookies.set("byok_key", r.cookies["byok_key"])
        return r

    def call(
        self,
        who: Expect,
        c: httpx.Client,
        feature: str,
        expect_status: int = 200,
        expect_decision: str | None = None,
        expect_credits: int | None = None,
    ) -> None:
        r = c.post("/chat", json={"feature": feature, "message": f"demo {feature} request"})
        body = r.json()
        what = f"{feature} ({c.get('/api/model-settings').json()['model']})"
        billing = body.get("billing") or {}
        shown = billing.get("summary") or body.get("message", "")
        console.print(f"  {who.user:<22} {what:<34} HTTP {r.status_code}  {shown}")
        if r.status_code != expect_status:
            return self.fail(f"{who.user} {feature}: HTTP {r.status_code}, expected {expect_status}: {body}")
        if r.status_code == 200:
            if (billing["decision"], billing["credits"]) != (expect_decision, expect_credits):
                self.fail(
                    f"{who.user} {feature}: billed {billing['decision']}/{billing['credits']}, "
                    f"expected {expect_decision}/{expect_credits}"
                )
            who.event_credits[body["event_id"]] = (expect_decision, expect_credits)
        elif billing:  # a failed provider call still has an event: never billed
            who.event_credits[body["event_id"]] = ("not_billed_failed", 0)

    def scenario(self) -> list[Expect]:
        plat = Expect(f"demo-platform-{self.run}", "standard", 0)
        byok = Expect(f"demo-byok-{self.run}", "standard", 0)
        plat.granted, byok.granted = self.grant(plat.user, plat.plan), self.grant(byok.user, byok.plan)
        console.rule(f"[bold]Platform user {plat.user}: {plat.granted} credits ({plat.plan})")
        with self.client(plat.user) as c:
            self.settings(c, "openai", "gpt-4o").raise_for_status()
            self.call(plat, c, "chat", 200, "debited", price("chat", "gpt-4o"))
            for feature in ALWAYS_BILLED:
                self.call(plat, c, feature, 200, "debited", price(feature))
            self.settings(c, "gemini", "gemini-2.5-flash").raise_for_status()
            console.print("  (gemini-2.5-flash has no platform price: the platform call must be refused)")
            self.call(plat, c, "chat", 402)

        console.rule(f"[bold]BYOK user {byok.user}: {byok.granted} credits ({byok.plan})")
        with self.client(byok.user) as c:
            refused = self.settings(c, "groq", "llama-3.3-70b-versatile", own=True, key=REVOKED_KEY)
            console.print(f"  check of a revoked key: {refused.json().get('status')}: {refused.json().get('message')}")
            if refused.status_code != 400 or refused.json().get("status") != "revoked_or_expired":
                self.fail(f"a revoked key was not refused: {refused.text}")
            r = self.settings(c, "groq", "llama-3.3-70b-versatile", own=True, key=BYOK_KEY)
            console.print(
                f"  check of the user's key: {r.json().get('status')} ({r.json().get('key_hint')}): {r.json().get('message')}"
            )
            if r.status_code != 200 or r.json().get("status") != "valid":
                self.fail(f"the user's key was not accepted: {r.text}")
                return [plat, byok]
            self.call(byok, c, "chat", 200, "not_billed_byok", 0)
            self.call(byok, c, "chat", 200, "not_billed_byok", 0)
            for feature in ALWAYS_BILLED:
                self.call(byok, c, feature, 200, "debited", price(feature))
            self.settings(c, "groq", "qwen-qwq-32b", own=True)
            self.call(byok, c, "chat", 200, "not_billed_byok", 0)
        return [plat, byok]

    async def outcomes(self, users: list[Expect], start: dict[TopicPartition, int]) -> dict[str, CreditOutcome]:
        """The credit service's decisions for this run's events, read from `credit_ledger`."""
        wanted = {e for u in users for e in u.event_credits}
        found: dict[str, CreditOutcome] = {}
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.s.kafka_bootstrap_servers, group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        try:
            consumer.assign(list(start))
            for tp, offset in start.items():
                consumer.seek(tp, offset)
            deadline = time.monotonic() + self.s.settle_timeout_s
            while wanted - found.keys() and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        try:
                            outcome = CreditOutcome.from_json(record.value)
                        except ValueError:
                            continue
                        if str(outcome.event_id) in wanted:
                            found[str(outcome.event_id)] = outcome
        finally:
            await consumer.stop()
        return found

    async def ledger_end(self) -> dict[TopicPartition, int]:
        topic = self.s.credit_ledger_topic
        producer = AIOKafkaProducer(bootstrap_servers=self.s.kafka_bootstrap_servers)
        await producer.start()
        try:
            partitions = [TopicPartition(topic, p) for p in sorted(await producer.partitions_for(topic))]
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=self.s.kafka_bootstrap_servers, group_id=None)
        await consumer.start()
        try:
            return await consumer.end_offsets(partitions)
        finally:
            await consumer.stop()

    def balance(self, user: str) -> int:
        r = httpx.get(
            f"{self.s.credits_url}/api/credits/{user}",
            timeout=30,
            headers={"Authorization": f"Bearer {self.token(user)}"},
        )
        r.raise_for_status()
        return r.json()["balance"]

    def report(self, users: list[Expect], outcomes: dict[str, CreditOutcome]) -> None:
        decisions = Table(title="Decisions of the credit service (credit_ledger)")
        for col in ("user", "event", "expected", "decided", "credits", "balance after"):
            decisions.add_column(col)
        for u in users:
            for event_id, (decision, credits) in u.event_credits.items():
                o = outcomes.get(event_id)
                got = f"{o.decision.value}" if o else "—"
                good = o is not None and (o.decision.value, o.credits) == (decision, credits)
                if not good:
                    self.fail(
                        f"{u.user} event {event_id[:8]}: expected {decision}/{credits}, "
                        f"decided {got}/{o.credits if o else '—'}"
                    )
                mark = "[green]✓[/]" if good else "[red]✗[/]"
                decisions.add_row(
                    u.user,
                    event_id[:8],
                    f"{decision} {credits}",
                    f"{mark} {got}",
                    str(o.credits if o else "—"),
                    str(o.balance_after if o else "—"),
                )
        console.print(decisions)
        balances = Table(title="Balances")
        for col in ("user", "granted", "expected", "credit service", ""):
            balances.add_column(col)
        for u in users:
            deadline = time.monotonic() + self.s.settle_timeout_s
            while (seen := self.balance(u.user)) != u.balance and time.monotonic() < deadline:
                time.sleep(0.25)
            if seen != u.balance:
                self.fail(f"{u.user}: balance {seen}, expected {u.balance}")
            balances.add_row(
                u.user,
                str(u.granted),
                str(u.balance),
                str(seen),
                "[green]✓ right[/]" if seen == u.balance else "[red]✗ wrong[/]",
            )
        console.print(balances)


def main() -> int:
    settings = DemoSettings()
    demo = Demo(settings)
    for name, url in (("chat", settings.chat_url), ("credits", settings.credits_url)):
        try:
            httpx.get(url + "/healthz", timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            console.print(
                f"[red]The {name} service at {url} does not answer ({exc}); start the stack with `make up`.[/]"
            )
            return 2
    start = asyncio.run(demo.ledger_end())
    users = demo.scenario()
    demo.report(users, asyncio.run(demo.outcomes(users, start)))
    console.rule("[bold green]every decision and balance is right" if demo.ok else "[bold red]something is wrong")
    return 0 if demo.ok else 1


if __name__ == "__main__":
    sys.exit(main())
