"""A fifth provider is picked up from its modules alone (issue 23): registered for the length of a test
(`fifth_provider()`: an enum member, a provider module's `API` in `providers.REGISTRY`, a simulator
module in the simulator's registry), it is in the catalog and the page's names, the logs mask its keys,
model names route to it, and the simulator serves, controls and points at it; unregistered, it is gone
from all of them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import httpx
import pytest

import providers as p
from billing.pricing import default_price_book
from providers.openai import OpenAI
from schemas.events import KeyCheckStatus, Provider
from services.chat.catalog import MODELS, catalog, provider_names
from services.chat.routing import provider_for_model
from services.provider_simulator import SimulatorState, base_urls, build_app, openai as simulated_openai
from services.provider_simulator.registry import SIMULATED
from services.shared.logging import redact
from tests.fakes import InProcessHttp
from tests.unit.test_provider_registry import ownership_clashes

pytestmark = pytest.mark.unit

MESSAGES = [{"role": "user", "content": "hello acme"}]


def add_member(enum: Any, name: str, value: str) -> Any:
    """A member added to a closed enum, for a test only: what a real provider's line in
    `schemas.events.Provider` does."""
    member = str.__new__(enum, value)
    member._name_, member._value_ = name, value
    enum._member_map_[name] = member
    enum._value2member_map_[value] = member
    enum._member_names_.append(name)
    return member


def remove_member(enum: Any, name: str, value: str) -> None:
    enum._member_names_.remove(name)
    del enum._member_map_[name], enum._value2member_map_[value]


class AcmeSettings(p.ProviderSettings):
    """What a real provider's settings class among `ProviderSettings`' bases gives."""

    acme_base_url: str = "https://api.acme.example/v1"


def acme_api(member: Provider) -> p.ProviderApi:
    """The provider module: a provider that speaks OpenAI's API, as many do."""

    class Acme(OpenAI):
        provider = member
        name = "Acme"
        key_prefixes = ("acmk_",)
        key_charset = r"[A-Za-z0-9]"
        key_min_length = 32
        model_prefixes = ("acme-",)
        models = ("acme-large", "acme-small")
        keys_url = "https://console.acme.example/keys"
        billing_url = "https://console.acme.example/billing"
        base_url_setting = "acme_base_url"
        api_key_setting = "acme_api_key"

    return Acme()


class SimulatedAcme(simulated_openai.OpenAI):
    """The simulator module: OpenAI's routes under its own mount, with its own words."""

    name = "acme"
    display_name = "Acme"
    mount = "/acme"
    base_url_env = "ACME_BASE_URL"
    base_url_path = "/acme/v1"
    models = ["acme-large", "acme-small"]
    invalid_key_message = "Invalid Acme API key"


@contextmanager
def fifth_provider() -> Iterator[Provider]:
    """Registers Acme (enum member, provider module, simulator module) and unregisters it on exit."""
    member = cast(Provider, add_member(Provider, "ACME", "acme"))
    registry = cast(dict[Provider, p.ProviderApi], p.REGISTRY)
    simulated = cast(dict[str, Any], SIMULATED)
    try:
        registry[member] = acme_api(member)
        simulated["acme"] = SimulatedAcme()
        yield member
    finally:
        registry.pop(member, None)
        simulated.pop("acme", None)
        remove_member(Provider, "ACME", "acme")


@pytest.fixture
def acme() -> Iterator[Provider]:
    with fifth_provider() as member:
        yield member


def test_the_fifth_provider_is_in_the_catalog_and_the_page_names(acme):
    assert list(Provider)[-1] is acme and p.of("acme").name == "Acme"
    assert MODELS[acme] == ("acme-large", "acme-small")
    offered = catalog(default_price_book().lists[-1])
    assert offered["acme"] == [{"id": "acme-large", "credits": None}, {"id": "acme-small", "credits": None}]
    assert provider_names()["acme"] == "Acme"
    assert ownership_clashes() == []  # it claims nothing another provider claims


def test_the_logs_mask_the_fifth_providers_keys():
    key = "acmk_" + "Z9" * 20
    line = f"calling Acme with Authorization: Bearer {key}"
    assert key in redact(line)  # unknown before it is registered: nothing makes up its shape
    with fifth_provider() as acme:
        assert p.of(acme).sample_key("valid") not in redact(f"key {p.of(acme).sample_key('valid')}")
        assert redact(line) == "calling Acme with Authorization: Bearer [REDACTED]"
    assert key in redact(line)


def test_model_names_route_to_the_fifth_provider(acme):
    assert p.provider_of_model("acme-large") is acme  # its catalog
    assert p.provider_of_model("acme-next-preview") is acme  # its prefix
    assert provider_for_model("acme-small") is acme  # the chat's rule: the catalog, then the name
    assert provider_for_model("acme-next-preview") is acme
    assert provider_for_model("gpt-4o") is Provider.OPENAI


def test_its_keys_are_recognised_and_hinted(acme):
    key = p.of(acme).sample_key("valid")
    assert p.key_shape_problem(acme, key) is None
    assert p.owner_of(key) is p.of(acme)
    assert p.key_hint(key) == "acmk_…a1b2"
    assert "looks like an Acme key" in (p.key_shape_problem(Provider.OPENAI, key) or "")


async def test_the_simulator_serves_controls_and_points_at_the_fifth_provider(acme):
    assert base_urls("http://sim")["ACME_BASE_URL"] == "http://sim/acme/v1"
    state = SimulatorState()
    app = build_app(state)
    settings = AcmeSettings(**{k.lower(): v for k, v in base_urls("http://sim").items()})
    api = p.of(acme)
    async with InProcessHttp(transport=httpx.ASGITransport(app=app), base_url="http://sim", timeout=5) as client:
        valid, revoked = api.sample_key("valid"), api.sample_key("revoked")
        listed = await p.list_models(client, settings, acme, valid)
        assert listed.status_code == 200 and {m["id"] for m in listed.json()["data"]} == {"acme-large", "acme-small"}
        refused = await p.list_models(client, settings, acme, revoked)
        verdict = p.classify_error(acme, refused.status_code, refused.content, refused.headers)
        assert verdict.status is KeyCheckStatus.REVOKED_OR_EXPIRED and "This Acme key" in verdict.message

        reply = await p.chat_completion(client, settings, acme, valid, "acme-large", MESSAGES)
        assert reply.text and reply.input_tokens > 0 and reply.output_tokens > 0
        pieces = [piece async for piece in p.chat_stream(client, settings, acme, valid, "acme-small", MESSAGES)]
        assert isinstance(pieces[-1], p.ChatReply) and pieces[-1].text == "".join(pieces[:-1])

        assert (await client.post("/_sim/outage", json={"provider": "acme", "status": 503})).status_code == 200
        with pytest.raises(p.ProviderError) as down:
            await p.chat_completion(client, settings, acme, valid, "acme-large", MESSAGES)
        assert down.value.verdict.message.startswith("Acme is having problems right now (HTTP 503)")
    assert state.calls(valid, "acme") == 4


def test_unregistered_it_is_gone():
    with fifth_provider():
        pass
    assert "acme" not in {x.value for x in Provider} and "acme" not in catalog(default_price_book().lists[-1])
    assert p.provider_of_model("acme-large") is None and "ACME_BASE_URL" not in base_urls("http://sim")
    with pytest.raises(ValueError):
        Provider("acme")
