"""The settings/chat page in a real browser: Playwright for Python driving Debian's Chromium.

Screenshots of each step are kept in test-artifacts/ (gitignored)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import ROOT, Stack
from tests.e2e.test_chat_flow import ChatSystem, start_system

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / "test-artifacts" / "page"
USER_KEY = "sk-proj-valid-browser" + "k" * 16


@pytest.fixture
def system(stack: Stack, tmp_path: Path) -> Iterator[ChatSystem]:
    # Cookies keep their Secure flag: Chromium treats http://127.0.0.1 as a secure context.
    yield from start_system(stack.kafka_bootstrap, stack.database_url, stack.database_schema, stack.topic_prefix,
                            tmp_path / "logs", COOKIE_SECURE="true")


@pytest.fixture
def page() -> Iterator[Page]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.set_default_timeout(20_000)
            yield page
        finally:
            browser.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def send(page: Page, feature: str, message: str):
    page.get_by_label("Feature").select_option(feature)
    page.get_by_label("Message").fill(message)
    page.get_by_role("button", name="Send").click()
    entry = page.locator("#transcript li").last
    expect(entry.locator(".billing")).not_to_be_empty()
    return entry


def test_sign_in_check_a_key_and_see_billing_on_every_answer(system: ChatSystem, page: Page):
    page.goto(system.chat.url + "/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(page, "01-sign-in")
    page.get_by_label("User id").fill("pat")
    page.get_by_role("button", name="Sign in (dev)").click()

    badge = page.locator("#badge")
    expect(badge).to_have_text("Platform: 50 credits available")  # the dev sign-in's free plan
    expect(page.get_by_text("Signed in as")).to_contain_text("pat")
    # The session and the key live in HttpOnly cookies the page's script cannot read.
    assert "byok_session" not in page.evaluate("document.cookie")

    page.get_by_label("Provider", exact=True).select_option("openai")
    page.get_by_label("Model", exact=True).select_option("gpt-4o-mini")
    expect(page.locator("#model-price")).to_contain_text("3 credits")
    entry = send(page, "chat", "Summarise my sales data")
    expect(entry.locator(".billing")).to_have_text(re.compile(r"Platform: 3 credits charged"))
    expect(entry.locator(".answer")).not_to_have_text("…")
    expect(badge).to_have_text("Platform: 47 credits available")
    shot(page, "02-platform-answer")

    # The tooltip says what BYOK means for credits.
    page.get_by_role("button", name="What does using my own key mean?").focus()
    expect(page.get_by_role("tooltip")).to_be_visible()
    expect(page.get_by_role("tooltip")).to_contain_text("no platform credits")
    shot(page, "03-tooltip")

    switch = page.get_by_role("switch", name="Use my own API key")
    switch.click()
    expect(switch).to_have_attribute("aria-checked", "true")
    key_field = page.get_by_label("Your OpenAI API key")
    expect(key_field).to_have_attribute("type", "password")
    status = page.locator("#key-status")

    key_field.fill("sk-proj-revoked" + "r" * 20)
    page.get_by_role("button", name="Check").click()
    expect(status).to_contain_text("revoked")
    expect(badge).to_have_text("Platform: 47 credits available")  # a refused key changes nothing
    shot(page, "04-key-refused")

    key_field.fill(USER_KEY)
    page.get_by_role("button", name="Check").click()
    expect(status).to_contain_text("Valid")
    expect(badge).to_have_text("Your key: no credits")
    expect(key_field).to_have_value("")  # the page does not keep the key
    assert USER_KEY not in page.content()
    shot(page, "05-key-valid")

    entry = send(page, "chat", "Plot revenue by month")
    expect(entry.locator(".billing")).to_have_text("Your key: no credits")
    assert system.sim.state.calls(USER_KEY) >= 2  # the check and the chat ran on the user's key
    entry = send(page, "code_fix", "Fix my pandas groupby")
    expect(entry.locator(".billing")).to_have_text(re.compile(r"Platform: 1 credit charged"))
    entry = send(page, "deep_analysis", "Analyse everything")  # costs 50, 46 left
    expect(entry.locator(".answer")).to_contain_text("needs credits")
    expect(entry.locator(".billing")).to_have_text("Not sent: no credits")
    shot(page, "06-byok-answers")

    # The key is revoked at the provider: the next answer says so and the key status follows.
    system.sim.state.register(USER_KEY, "revoked")
    entry = send(page, "chat", "One more")
    expect(entry.locator(".answer")).to_contain_text("revoked")
    expect(status).to_contain_text("revoked")
    shot(page, "07-key-revoked")

    switch.click()
    expect(switch).to_have_attribute("aria-checked", "false")
    expect(badge).to_have_text(re.compile(r"Platform: 46 credits available"))
    shot(page, "08-byok-off")

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.context.cookies() == [] or all(c["name"] not in ("byok_key", "byok_session") or not c["value"]
                                              for c in page.context.cookies())
