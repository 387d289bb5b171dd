# ruff: noqa: F811 (pytest fixtures imported from test_page_browser are parameters here)
"""The page as the public will use it (issue 21, item 8): sessions that end in every tab, no misleading
labels, bounded messages, one sentence once, a way to more credits, a usage table that says it scrolls,
no uncaught errors offline, and axe-core finding no violation signed out and signed in. Each at desktop
and phone size, on the real stack, in Debian's Chromium; screenshots in .run/screenshots/."""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ROOT
from tests.e2e.test_chat_flow import ChatSystem
from tests.e2e.test_page_browser import (  # noqa: F401 (fixtures)
    OPENAI_VALID,
    browser,
    byok_on,
    check_key,
    new_user,
    open_page,
    page,
    send,
    shot,
    sign_in,
    system,
    viewport,
)

pytestmark = [pytest.mark.e2e, pytest.mark.browser]
AXE = ROOT / ".run" / "axe"


@pytest.fixture(scope="module")
def axe_source() -> str:
    """axe-core from npm, installed once into .run/axe and injected into the page by the tests."""
    script = AXE / "node_modules" / "axe-core" / "axe.min.js"
    if not script.exists():
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(AXE), "axe-core@4"],
            check=True,
            timeout=300,
        )
    return script.read_text()


def violations(page: Page, axe_source: str) -> list[dict]:
    page.add_script_tag(content=axe_source)
    return page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ['violations']})).violations
             .map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))"""
    )


def test_axe_finds_no_violation_signed_out_or_signed_in(system: ChatSystem, page: Page, viewport: str, axe_source):
    page.goto(system.chat.url + "/")
    expect(page.get_by_role("button", name="Sign in (dev)")).to_be_visible()
    assert violations(page, axe_source) == []
    sign_in(page, system, new_user("axe"))
    send(page, "code_fix", "Fix https://example.com/a/very/long/path/that/should/be/a/link")
    page.get_by_role("button", name="Refresh").click()
    shot(page, f"axe-signed-in-{viewport}")
    assert violations(page, axe_source) == []
    you = page.locator("#transcript .you").last
    expect(you.locator("a")).to_have_attribute("href", "https://example.com/a/very/long/path/that/should/be/a/link")
    assert httpx.get(system.chat.url + "/static/favicon.svg").status_code == 200


def test_sign_out_in_one_tab_shows_sign_in_in_the_other(system: ChatSystem, page: Page, viewport: str):
    user = new_user("tabs")
    sign_in(page, system, user)
    other = page.context.new_page()
    other.goto(system.chat.url + "/")
    expect(other.locator("#who-name")).to_have_text(user)
    page.get_by_role("button", name="Sign out", exact=True).click()
    expect(page.get_by_role("button", name="Sign in (dev)")).to_be_visible()
    other.evaluate("checkSession()")  # what its half-minute timer or coming into view does
    expect(other.get_by_role("button", name="Sign in (dev)")).to_be_visible()
    expect(other.locator("#signin-note")).to_contain_text("You were signed out")
    expect(other.locator("#app")).to_be_hidden()
    shot(other, f"other-tab-signed-out-{viewport}")


def test_sign_out_everywhere_ends_other_browsers_too(system: ChatSystem, browser, viewport: str):
    user = new_user("every")
    first, second = open_page(browser, viewport), open_page(browser, viewport)
    try:
        sign_in(first, system, user)
        sign_in(second, system, user)
        first.get_by_role("button", name="Sign out everywhere").click()
        expect(first.locator("#signin-note")).to_contain_text("signed out everywhere")
        second.get_by_label("Message").fill("still here?")
        second.get_by_role("button", name="Send").click()  # any call answers 401: the form comes back
        expect(second.get_by_role("button", name="Sign in (dev)")).to_be_visible()
        shot(second, f"signed-out-everywhere-{viewport}")
    finally:
        first.context.close()
        second.context.close()


def test_an_unpriced_model_is_not_called_short_of_credits(system: ChatSystem, page: Page, viewport: str):
    sign_in(page, system, new_user("unpriced"))
    page.get_by_label("Provider").select_option("gemini")
    page.get_by_label("Model for chat").select_option("gemini-2.5-flash")
    entry = send(page, "chat", "hello")
    expect(entry.locator(".billing")).to_have_text("Not sent: no platform price")
    expect(entry.locator(".answer")).to_contain_text("has no platform price")
    shot(page, f"unpriced-model-{viewport}")


def test_a_provider_then_its_model_chosen_quickly_are_saved_in_that_order(
    system: ChatSystem, page: Page, viewport: str
):
    """CI once charged 5 credits for a call shown on an unpriced model: the two saves (provider, then
    model) raced, and the server kept the provider's first model. Here the first save is held back and
    whatever else was sent meanwhile is let through first: the page must not have sent the second yet."""
    user = new_user("order")
    sign_in(page, system, user)
    seen, held = [], []

    def hold_the_first(route):  # the first save waits; any other goes through at once
        seen.append(route.request.post_data_json)
        if held:
            route.continue_()
        else:
            held.append(route)

    page.route("**/settings/model", hold_the_first)
    page.get_by_label("Provider").select_option("gemini")
    page.get_by_label("Model for chat").select_option("gemini-2.5-flash")
    page.wait_for_timeout(300)
    assert [b["model"] for b in seen] == ["gemini-2.5-pro"], seen  # the model's save waits for the provider's
    with page.expect_response("**/settings/model"):
        held[0].continue_()
    expect(page.get_by_label("Model for chat")).to_have_value("gemini-2.5-flash")
    entry = send(page, "chat", "hello")
    expect(entry.locator(".billing")).to_have_text("Not sent: no platform price")
    r = httpx.get(system.chat.url + "/api/model-settings", headers={"Authorization": f"Bearer {system.token(user)}"})
    assert (r.json()["provider"], r.json()["model"]) == ("gemini", "gemini-2.5-flash"), r.text


def test_settings_changed_elsewhere_are_shown_before_anything_is_charged(system: ChatSystem, page: Page, viewport: str):
    """Another client (a second tab, the API) moves chat to a dearer model while this page still shows
    the first: the message is not sent, the page shows the new settings, and only the next message,
    sent on what is now shown, is charged."""
    user = new_user("elsewhere")
    sign_in(page, system, user)
    expect(page.locator("#feature-status")).to_contain_text("on platform credits")
    shown_model = page.get_by_label("Model for chat").input_value()
    assert shown_model == "gpt-4o-mini"  # 3 credits
    r = httpx.post(
        system.chat.url + "/settings/model",
        json={"provider": "openai", "model": "gpt-4.1", "use_own_key": False},
        headers={"Authorization": f"Bearer {system.token(user)}"},
    )
    assert r.status_code == 200, r.text
    entry = send(page, "chat", "hello")
    expect(entry.locator(".billing")).to_have_text("Not sent: your settings changed")
    expect(entry.locator(".answer")).to_contain_text("gpt-4.1 on platform credits, 5 credits")
    expect(page.get_by_label("Model for chat")).to_have_value("gpt-4.1")
    expect(page.locator("#feature-status")).to_contain_text("gpt-4.1 on platform credits: 5 credits per message")
    expect(page.locator("#badge")).to_contain_text("50 credits left")
    shot(page, f"settings-changed-elsewhere-{viewport}")
    again = send(page, "chat", "hello again")
    expect(again.locator(".billing")).to_have_text("Platform: 5 credits charged · 45 left")


def test_long_messages_are_counted_bounded_and_not_echoed_whole(system: ChatSystem, page: Page, viewport: str):
    sign_in(page, system, new_user("long"))
    box = page.get_by_label("Message")
    box.fill("x" * 25_000)
    assert len(box.input_value()) == 20_000  # the box takes no more
    expect(page.locator("#counter")).to_have_text("20,000 / 20,000 characters")
    entry = send(page, "code_fix", "y" * 20_000)
    assert len(entry.locator(".you").inner_text()) < 800  # the transcript shows the start only
    expect(entry.locator(".you")).to_contain_text("(20,000 characters)")
    expect(page.locator("#counter")).to_have_text("0 / 20,000 characters")  # the box was emptied
    shot(page, f"long-message-{viewport}")
    # Over the API, the sentence says the count rather than a validator's wording.
    token = system.token("long-api")
    r = httpx.post(
        system.chat.url + "/chat", json={"message": "z" * 20_001}, headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 422 and "limited to 20,000 characters and this one has 20,001" in r.json()["message"]


def test_a_refused_replacement_key_says_the_earlier_one_stays_and_paused_chat_says_it_once(
    system: ChatSystem, page: Page, viewport: str
):
    sign_in(page, system, new_user("keys"))
    byok_on(page)
    reason = page.locator("#key-status").inner_text()
    body = page.locator("main").inner_text()
    assert body.count(reason[:60]) == 1, body  # the reason once, beside the key
    expect(page.locator("#feature-status")).to_contain_text("Chat is paused until a working OpenAI key is added")
    check_key(page, OPENAI_VALID, "Valid")
    check_key(page, "sk-proj-invalid" + "i" * 20, "is still the one in use")
    shot(page, f"refused-replacement-key-{viewport}")


def test_at_zero_credits_the_page_says_how_to_get_more_and_usage_says_it_scrolls(
    system: ChatSystem, page: Page, viewport: str
):
    sign_in(page, system, new_user("broke"))
    entry = send(page, "deep_analysis", "spend it all")
    expect(entry.locator(".billing")).to_have_text(re.compile(r"50 credits charged · 0 left"))
    expect(page.locator("#low-balance")).to_contain_text("To get more, ask your workspace admin")
    for _ in range(40):
        page.get_by_role("button", name="Refresh").click()
        if page.locator("#usage tbody tr").count():
            break
        page.wait_for_timeout(500)
    cue = page.locator(".scroll-cue")
    if viewport == "phone":
        expect(cue).to_be_visible()
    else:
        expect(cue).to_be_hidden()
    shot(page, f"zero-credits-and-usage-{viewport}")


def test_background_refreshes_offline_throw_nothing(system: ChatSystem, page: Page, viewport: str):
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(page, system, new_user("offline"))
    page.context.set_offline(True)
    page.evaluate("Promise.all([refreshBalance(), loadUsage(), checkSession()])")
    page.get_by_role("button", name="Refresh").click()
    page.wait_for_timeout(300)
    expect(page.locator("#usage-note")).to_contain_text("cannot be reached")
    page.context.set_offline(False)
    assert errors == []
