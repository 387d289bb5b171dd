"""The settings/chat page in a real browser: Playwright for Python driving Debian's Chromium, on the
real stack (chat, credits, validation on the real broker and database; the provider simulator).

One test per numbered finding of issue 12 ("Never a surprise charge"), each at 1280x800 and at
390x844, plus one keyboard-only path and the usage, low-balance and fallback flows. Every test writes
its screenshots to .run/screenshots/ (gitignored), named after the finding and the viewport.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from infra.topics import ensure_topics, wait_for_broker
from schemas.topics import topic_specs
from services.shared.db import migrate
from tests.conftest import ROOT, unique_name
from tests.e2e.test_chat_flow import ChatSystem, start_system

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = ROOT / ".run" / "screenshots"
VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
CHECKS_PER_MINUTE = 3  # the validation worker's per-user, per-provider limit in this module

OPENAI_VALID = "sk-proj-valid-browser" + "k" * 16
OPENAI_REVOKED = "sk-proj-revoked" + "r" * 20
ANTHROPIC_VALID = "sk-ant-api03-valid-browser" + "a" * 16
GROQ_VALID = "gsk_validbrowser" + "g" * 20
GEMINI_NOQUOTA = "AIzaSynoquota" + "0" * 26


async def _prepare(bootstrap: str, database_url: str, schema: str, prefix: str) -> None:
    admin = await wait_for_broker(bootstrap, 60)
    try:
        await ensure_topics(admin, topic_specs(partitions=3, prefix=prefix))
    finally:
        await admin.close()
    await migrate(database_url, schema)


async def _cleanup(bootstrap: str, database_url: str, schema: str, prefix: str) -> None:
    admin = await wait_for_broker(bootstrap, 60)
    try:
        await admin.delete_topics([s.name for s in topic_specs(prefix=prefix)])
    finally:
        await admin.close()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def system(kafka_bootstrap: str, database_url: str, tmp_path_factory) -> Iterator[ChatSystem]:
    """One stack for the module (each test signs in as a user of its own), so the tests stay quick."""
    schema, prefix = unique_name("test_"), unique_name() + "."
    asyncio.run(_prepare(kafka_bootstrap, database_url, schema, prefix))
    try:
        # Cookies keep their Secure flag: Chromium treats http://127.0.0.1 as a secure context.
        yield from start_system(
            kafka_bootstrap,
            database_url,
            schema,
            prefix,
            tmp_path_factory.mktemp("logs"),
            validation_env={"USER_CHECKS_PER_MINUTE": str(CHECKS_PER_MINUTE)},
            COOKIE_SECURE="true",
        )
    finally:
        asyncio.run(_cleanup(kafka_bootstrap, database_url, schema, prefix))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Browser, viewport: str) -> Page:
    context = browser.new_context(viewport=VIEWPORTS[viewport])
    page = context.new_page()
    page.set_default_timeout(20_000)
    return page


@pytest.fixture(params=list(VIEWPORTS))
def viewport(request) -> str:
    return request.param


@pytest.fixture
def page(browser: Browser, viewport: str) -> Iterator[Page]:
    page = open_page(browser, viewport)
    try:
        yield page
    finally:
        page.context.close()


def shot(page: Page, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def new_user(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:6]}"


def sign_in(page: Page, system: ChatSystem, user: str) -> None:
    page.goto(system.chat.url + "/")
    page.get_by_label("User id").fill(user)
    page.get_by_role("button", name="Sign in (dev)").click()
    expect(page.locator("#who-name")).to_have_text(user)
    expect(page.locator("#badge")).to_contain_text("50 credits left")  # the dev sign-in's free plan


def byok_on(page: Page) -> None:
    switch = page.get_by_role("switch", name="Use my own API key")
    switch.click()
    expect(switch).to_have_attribute("aria-checked", "true")
    expect(page.locator("#feature-status")).to_contain_text("paused")


def check_key(page: Page, key: str, expect_text: str | re.Pattern) -> None:
    page.locator("#api-key").fill(key)
    page.get_by_role("button", name="Check").click()
    expect(page.locator("#key-status")).to_contain_text(expect_text)


def send(page: Page, feature: str, message: str):
    page.get_by_label("Feature").select_option(feature)
    page.get_by_label("Message").fill(message)
    page.get_by_role("button", name="Send").click()
    entry = page.locator("#transcript li").last
    expect(entry.locator(".billing")).not_to_be_empty()
    return entry


def no_sideways_scroll(page: Page) -> None:
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px"


# --- finding 1 -----------------------------------------------------------------------------------


def test_finding_1_byok_on_with_a_refused_key_never_runs_on_credits(system: ChatSystem, page: Page, viewport: str):
    user = new_user("f1")
    sign_in(page, system, user)
    byok_on(page)
    check_key(page, OPENAI_REVOKED, "revoked")
    expect(page.locator("#key-status")).to_have_class(re.compile("error"))
    expect(page.locator("#badge")).to_contain_text("Chat paused")
    entry = send(page, "chat", "Summarise my sales data")
    expect(entry.locator(".answer")).to_contain_text("no OpenAI key")
    expect(entry.locator(".billing")).to_have_text("Not sent: nothing charged")
    expect(page.get_by_role("switch", name="Use my own API key")).to_have_attribute("aria-checked", "true")
    shot(page, f"finding-1-refused-key-no-charge-{viewport}")
    assert system.wait_balance(user, 50, within_s=3) == 50  # nothing was charged, then or later


# --- finding 2 -----------------------------------------------------------------------------------


def test_finding_2_a_key_is_bound_to_its_provider(system: ChatSystem, page: Page, viewport: str):
    user = new_user("f2")
    key = f"sk-proj-valid-{viewport}-" + uuid.uuid4().hex
    sign_in(page, system, user)
    byok_on(page)
    check_key(page, key, "Valid")
    page.get_by_label("Provider", exact=True).select_option("anthropic")
    expect(page.locator("#api-key-label")).to_have_text("Your Anthropic API key")
    expect(page.locator("#api-key")).to_have_attribute("placeholder", "")  # not the OpenAI key's hint
    expect(page.locator("#keys li")).to_have_count(1)
    expect(page.locator("#keys li").first).to_contain_text("OpenAI sk-proj-…")
    expect(page.locator("#key-status")).to_contain_text("no Anthropic key")  # the reason, once, by the key
    expect(page.locator("#feature-status")).to_contain_text("paused until a working Anthropic key is added")
    entry = send(page, "chat", "Which model answers?")
    expect(entry.locator(".billing")).to_have_text("Not sent: nothing charged")
    assert system.sim.state.calls(key) == 1  # only the check: no chat ran on the OpenAI key
    shot(page, f"finding-2-key-bound-to-provider-{viewport}")

    anthropic_key = f"sk-ant-api03-valid-{viewport}-" + uuid.uuid4().hex
    check_key(page, anthropic_key, "Valid")
    expect(page.locator("#keys li")).to_have_count(2)
    entry = send(page, "chat", "Which model answers now?")
    expect(entry.locator(".billing")).to_have_text("Your key: no credits")
    assert system.sim.state.calls(anthropic_key, "anthropic") == 2 and system.sim.state.calls(key) == 1


# --- finding 3 -----------------------------------------------------------------------------------


def test_finding_3_signed_out_shows_only_sign_in(system: ChatSystem, page: Page, viewport: str):
    page.goto(system.chat.url + "/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    for hidden in ("#app", "#who", "#badge", "#skip"):
        expect(page.locator(hidden)).to_be_hidden()
    expect(page.get_by_text("Signed in as")).to_be_hidden()
    shot(page, f"finding-3-signed-out-{viewport}")
    sign_in(page, system, new_user("f3"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_hidden()
    page.get_by_role("button", name="Sign out", exact=True).click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    for hidden in ("#app", "#who", "#badge"):
        expect(page.locator(hidden)).to_be_hidden()
    shot(page, f"finding-3-signed-out-again-{viewport}")


# --- finding 4 -----------------------------------------------------------------------------------


def test_finding_4_the_status_line_is_true_per_feature_before_sending(system: ChatSystem, page: Page, viewport: str):
    user = new_user("f4")
    sign_in(page, system, user)
    byok_on(page)
    check_key(page, OPENAI_VALID, "Valid")
    status = page.locator("#feature-status")
    expect(status).to_have_text("Chat runs on your OpenAI key: no credits.")
    page.get_by_label("Feature").select_option("deep_analysis")
    expect(status).to_have_text(
        "Deep analysis runs on the platform's gpt-4.1, always on credits: 50 credits per call. You have 50 credits."
    )
    shot(page, f"finding-4-deep-analysis-price-{viewport}")
    page.get_by_label("Feature").select_option("code_canvas")
    expect(status).to_contain_text("1 credit per call")
    entry = send(page, "code_fix", "Fix my pandas groupby")
    expect(entry.locator(".billing")).to_have_text(re.compile(r"Platform: 1 credit charged · 49 left"))
    expect(page.locator("#badge")).to_have_text("Chat: your key · 49 credits left")
    page.get_by_label("Feature").select_option("deep_analysis")
    expect(status).to_contain_text("You have 49 credits. Not enough for this call.")
    entry = send(page, "deep_analysis", "Analyse everything")
    expect(entry.locator(".answer")).to_contain_text("needs credits")
    expect(entry.locator(".billing")).to_have_text("Not sent: not enough credits")
    no_sideways_scroll(page)
    shot(page, f"finding-4-status-per-feature-{viewport}")


# --- finding 5 -----------------------------------------------------------------------------------


def test_finding_5_long_urls_in_messages_wrap_and_are_links(system: ChatSystem, page: Page, viewport: str):
    sign_in(page, system, new_user("f5"))
    page.get_by_label("Provider", exact=True).select_option("gemini")
    byok_on(page)
    check_key(page, GEMINI_NOQUOTA, "aistudio.google.com")
    link = page.locator("#key-status a")
    expect(link).to_have_attribute("href", re.compile(r"^https://aistudio\.google\.com/"))
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    no_sideways_scroll(page)
    card = page.locator("#key-status").bounding_box()
    check = page.get_by_role("button", name="Check").bounding_box()
    width = VIEWPORTS[viewport]["width"]
    assert card["x"] + card["width"] <= width and check["x"] + check["width"] <= width, (card, check)
    shot(page, f"finding-5-url-wraps-as-link-{viewport}")


# --- finding 6 -----------------------------------------------------------------------------------


def test_finding_6_focus_stays_where_the_user_works_and_ctrl_enter_sends(system: ChatSystem, page: Page, viewport: str):
    page.goto(system.chat.url + "/")
    expect(page.locator("#user-id")).to_be_focused()
    page.locator("#user-id").fill(new_user("f6"))
    page.keyboard.press("Enter")
    expect(page.locator("#chat-input")).to_be_focused()  # after sign-in: the message box
    page.keyboard.type("Plot revenue by month")
    page.keyboard.press("Control+Enter")
    entry = page.locator("#transcript li").last
    expect(entry.locator(".billing")).to_have_text(re.compile(r"Platform: 3 credits charged"))
    expect(page.locator("#chat-input")).to_be_focused()  # after Send: still the message box
    expect(page.locator("#chat-input")).to_have_value("")
    page.get_by_role("button", name="Send").click()  # empty: nothing sent, focus back in the box
    expect(page.locator("#chat-input")).to_be_focused()
    page.get_by_label("Message").fill("And by region")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#transcript li")).to_have_count(2)
    expect(page.locator("#transcript li").last.locator(".billing")).not_to_be_empty()
    expect(page.locator("#chat-input")).to_be_focused()  # clicking Send keeps the focus in the page's work
    shot(page, f"finding-6-focus-kept-{viewport}")


# --- finding 7 -----------------------------------------------------------------------------------


def _chat_with(system: ChatSystem, cookies: dict[str, str]) -> httpx.Response:
    return httpx.post(
        system.chat.url + "/chat", json={"feature": "chat", "message": "replayed"}, cookies=cookies, timeout=30
    )


def test_finding_7_key_lifetime_is_said_and_old_key_cookies_are_revoked(system: ChatSystem, page: Page, viewport: str):
    user = new_user("f7")
    key = f"sk-proj-valid-f7-{viewport}-" + uuid.uuid4().hex
    sign_in(page, system, user)
    byok_on(page)
    expect(page.locator("#key-lifetime")).to_contain_text("up to 8 hours, even if you close the browser")
    check_key(page, key, "Valid")
    expect(page.locator("#keys li")).to_contain_text(re.compile(r"works · kept until \d\d:\d\d"))
    saved = {c["name"]: c["value"] for c in page.context.cookies()}
    assert {"byok_session", "byok_key"} <= saved.keys()
    assert _chat_with(system, saved).json()["key_source"] == "byok"
    shot(page, f"finding-7-key-lifetime-{viewport}")

    # Switching BYOK off says which key went, and the saved cookie opens nothing afterwards.
    page.get_by_role("switch", name="Use my own API key").click()
    expect(page.locator("#key-status")).to_contain_text(re.compile(r"Your keys \(OpenAI sk-proj-…\w+\) were removed"))
    shot(page, f"finding-7-byok-off-says-so-{viewport}")
    byok_on(page)
    r = _chat_with(system, saved)
    assert r.status_code == 409 and r.json()["error"] == "own_key_missing", r.text

    # Remove: the same for a key removed with its button.
    check_key(page, key, "Valid")
    saved = {c["name"]: c["value"] for c in page.context.cookies()}
    page.get_by_role("button", name=re.compile("Remove your OpenAI key")).click()
    expect(page.locator("#key-status")).to_contain_text("was removed from this session")
    expect(page.locator("#keys li")).to_have_count(0)
    assert _chat_with(system, saved).status_code == 409

    # Sign-out: a saved copy of both cookies opens nothing at all (the session ended on the server).
    check_key(page, key, "Valid")
    saved = {c["name"]: c["value"] for c in page.context.cookies()}
    calls = system.sim.state.calls(key)
    page.get_by_role("button", name="Sign out", exact=True).click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert not any(c["name"] == "byok_key" and c["value"] for c in page.context.cookies())
    r = _chat_with(system, saved)
    assert r.status_code == 401 and system.sim.state.calls(key) == calls, r.text
    shot(page, f"finding-7-signed-out-{viewport}")


# --- finding 8 -----------------------------------------------------------------------------------


def test_finding_8_the_check_limit_is_per_provider_and_says_which(system: ChatSystem, page: Page, viewport: str):
    sign_in(page, system, new_user("f8"))
    byok_on(page)
    # Keys never seen before: a key the worker has already judged is answered from its cache, uncounted.
    for _ in range(CHECKS_PER_MINUTE):
        check_key(page, "sk-proj-invalid-" + uuid.uuid4().hex, "does not recognise this key")
    check_key(
        page,
        "sk-proj-invalid-" + uuid.uuid4().hex,
        re.compile(rf"checked {CHECKS_PER_MINUTE} OpenAI keys in the last minute.*Wait about \d+ seconds"),
    )
    expect(page.locator("#key-status")).to_contain_text("keys of other providers can be checked now")
    shot(page, f"finding-8-openai-limit-{viewport}")
    page.get_by_label("Provider", exact=True).select_option("groq")
    expect(page.locator("#key-status")).not_to_contain_text("Wait about")
    check_key(page, f"gsk_valid{viewport}" + uuid.uuid4().hex, "Valid")  # Groq is not made to wait
    page.get_by_label("Provider", exact=True).select_option("openai")
    expect(page.locator("#key-status")).to_contain_text("OpenAI keys in the last minute")  # still said for OpenAI
    shot(page, f"finding-8-groq-not-blocked-{viewport}")


# --- keyboard only -------------------------------------------------------------------------------


def tab_to(page: Page, selector: str, limit: int = 40, back: bool = False) -> None:
    target = page.locator(selector)
    for _ in range(limit):
        if target.evaluate("el => el === document.activeElement"):
            return
        page.keyboard.press("Shift+Tab" if back else "Tab")
    raise AssertionError(f"Tab never reached {selector}")


def test_keyboard_only_sign_in_add_a_key_chat_and_remove_it(system: ChatSystem, browser: Browser):
    page = open_page(browser, "desktop")
    try:
        page.goto(system.chat.url + "/")
        expect(page.get_by_label("User id")).to_be_focused()  # the page gives it the focus once it is ready
        page.keyboard.type(new_user("kb"))
        page.keyboard.press("Enter")
        # Signing in grants the welcome credits first: allow a loaded machine its time.
        expect(page.locator("#chat-input")).to_be_focused(timeout=20_000)
        tab_to(page, "#byok", back=True)
        page.keyboard.press("Space")
        expect(page.locator("#byok")).to_have_attribute("aria-checked", "true")
        expect(page.locator("#byok")).to_be_focused()
        page.keyboard.press("Tab")  # the "?" button: its tooltip says what BYOK means for credits
        expect(page.get_by_role("tooltip")).to_be_visible()
        expect(page.get_by_role("tooltip")).to_contain_text("no platform credits are used")
        page.keyboard.press("Escape")  # closes the tooltip, keeps the focus where it was
        expect(page.get_by_role("tooltip")).to_be_hidden()
        expect(page.get_by_role("button", name="What does using my own key mean?")).to_be_focused()
        tab_to(page, "#api-key")
        page.keyboard.type(OPENAI_VALID)
        page.keyboard.press("Enter")
        expect(page.locator("#key-status")).to_contain_text("Valid")
        expect(page.locator("#api-key")).to_be_focused()
        tab_to(page, "#chat-input")
        page.keyboard.type("Chart my churn")
        page.keyboard.press("Control+Enter")
        expect(page.locator("#transcript li").last.locator(".billing")).to_have_text("Your key: no credits")
        expect(page.locator("#chat-input")).to_be_focused()
        tab_to(page, "#keys button", back=True)
        page.keyboard.press("Enter")
        expect(page.locator("#keys li")).to_have_count(0)
        expect(page.locator("#api-key")).to_be_focused()  # not dropped to the page body
        shot(page, "keyboard-only-desktop")
    finally:
        page.context.close()


# --- usage, low balance, fallback ----------------------------------------------------------------


def test_usage_panel_and_low_balance_warning(system: ChatSystem, page: Page, viewport: str):
    user = new_user("use")
    sign_in(page, system, user)
    expect(page.locator("#low-balance")).to_be_hidden()
    entry = send(page, "deep_analysis", "Everything, in depth")
    expect(entry.locator(".billing")).to_have_text(re.compile(r"Platform: 50 credits charged · 0 left"))
    expect(page.locator("#low-balance")).to_be_visible()
    expect(page.locator("#low-balance")).to_contain_text("Low balance: 0 credits left of the 50 in your last grant")
    row = page.locator("#usage tbody tr").first
    for _ in range(40):  # the ledger records the call a moment after the answer
        if row.count():
            break
        page.get_by_role("button", name="Refresh").click()
        page.wait_for_timeout(500)
    expect(row).to_contain_text("Deep analysis")
    expect(row).to_contain_text("OpenAI gpt-4.1")
    expect(row.locator("td.num")).to_have_text("50")
    shot(page, f"usage-and-low-balance-{viewport}")
    system.grant(user, "standard")
    page.wait_for_timeout(1200)  # the chat service reuses a balance read for up to a second
    page.reload()
    expect(page.locator("#badge")).to_contain_text("500 credits left")
    expect(page.locator("#low-balance")).to_be_hidden()


def test_fallback_to_platform_is_a_choice_and_each_answer_says_so(system: ChatSystem, page: Page, viewport: str):
    user = new_user("fb")
    sign_in(page, system, user)
    byok_on(page)
    fallback = page.get_by_label("If my key cannot be used, run chat on platform credits")
    expect(fallback).not_to_be_checked()
    fallback.check()
    status = page.locator("#feature-status")
    expect(status).to_contain_text("falls back to platform credits (no usable OpenAI key): 3 credits per message")
    expect(page.locator("#badge")).to_contain_text("fallback")
    entry = send(page, "chat", "Quick question")
    expect(entry.locator(".billing")).to_have_text("Platform credits (fallback): 3 credits charged · 47 left")
    expect(entry.locator(".notice")).to_contain_text("ran on platform credits, as you chose: 3 credits charged")
    shot(page, f"fallback-says-so-{viewport}")
    fallback.uncheck()
    expect(status).to_contain_text("paused")
    assert system.wait_balance(user, 47) == 47


# --- the call lifecycle (issue 19) ---------------------------------------------------------------

PLATFORM_OPENAI = "sk-local-simulator-valid-platform-0001"


def test_answers_stream_and_stop_says_what_it_costs_before_and_charges_once_after(
    system: ChatSystem, page: Page, viewport: str
):
    user = new_user("stream")
    sign_in(page, system, user)  # 50 credits; chat on gpt-4o-mini, 3 credits a message
    system.sim.state.register(PLATFORM_OPENAI, "stream_slow", delay_ms=250)
    try:
        page.get_by_label("Feature").select_option("chat")
        page.get_by_label("Message").fill("Stream me a long answer")
        page.get_by_role("button", name="Send").click()
        entry = page.locator("#transcript li").last
        expect(page.locator("#stop-note")).to_contain_text("Stop is free until the answer starts")
        expect(page.locator("#stop-note")).to_contain_text("charged in full (3 credits)")
        expect(entry.locator(".answer")).to_contain_text("[gpt-4o-mini simulated]")  # text arrives while it runs
        first = entry.locator(".answer").inner_text()
        page.wait_for_timeout(600)
        assert len(entry.locator(".answer").inner_text()) > len(first)  # and keeps arriving
        shot(page, f"streaming-with-stop-{viewport}")
        page.get_by_role("button", name="Stop").click()
        expect(entry.locator(".billing")).to_have_text("Stopped after the answer started: 3 credits charged")
        expect(entry.locator(".notice")).to_contain_text("charged as a whole call")
        expect(page.locator("#stop")).to_be_hidden()
        shot(page, f"stopped-after-first-token-{viewport}")
        assert system.wait_balance(user, 47) == 47
        # A stream that fails midway keeps the text it had, says why it ends there, and costs nothing.
        system.sim.state.register(PLATFORM_OPENAI, "stream_fail")
        failed = send(page, "chat", "This one breaks halfway")
        expect(failed.locator(".billing")).to_have_text("Failed call: no credits")
        expect(failed.locator(".answer")).to_contain_text("[gpt-4o-mini simulated]")
        expect(failed.locator(".notice")).to_contain_text("could not answer this call")
        shot(page, f"stream-failed-midway-{viewport}")
        page.wait_for_timeout(1500)
        assert system.balance(user) == 47
    finally:
        system.sim.state.register(PLATFORM_OPENAI, "valid")


def test_a_dropped_connection_says_the_call_may_have_gone_through_and_never_charges_twice(
    system: ChatSystem, page: Page, viewport: str
):
    user = new_user("drop")
    sign_in(page, system, user)

    # 1. The request never reaches the server: the page says so, and Send again sends it once.
    page.route("**/chat", lambda route: route.abort("connectionreset"))
    entry = send(page, "code_fix", "Fix my loop")
    expect(entry.locator(".answer")).to_contain_text("did not reach the server, so nothing was charged")
    expect(entry.locator(".billing")).to_have_text("Not sent: nothing charged")
    shot(page, f"dropped-before-the-server-{viewport}")
    page.unroute("**/chat")
    expect(page.get_by_label("Message")).to_have_value("Fix my loop")  # kept for the retry
    page.get_by_role("button", name="Send").click()
    retried = page.locator("#transcript li").last
    expect(retried.locator(".billing")).to_have_text(re.compile(r"Platform: 1 credit charged"))

    # 2. The server got the call and the answer is lost on the way back: the page fetches its outcome.
    def deliver_then_drop(route):
        route.fetch()  # the server runs the call to its end
        route.abort("connectionreset")

    page.route("**/chat", deliver_then_drop)
    entry = send(page, "code_fix", "Fix my other loop")
    expect(entry.locator(".billing")).to_have_text(re.compile(r"Platform: 1 credit charged"))
    expect(entry.locator(".answer")).to_contain_text("[gpt-4.1-mini simulated]")
    shot(page, f"dropped-after-the-server-{viewport}")
    page.unroute("**/chat")
    assert system.wait_balance(user, 48) == 48  # two messages, two charges: nothing twice
