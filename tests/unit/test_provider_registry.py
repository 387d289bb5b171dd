"""Everything about a provider comes from its module (issue 23): the registry's providers own their models
without clashes, have their settings, a simulator, keys the logs mask, and calls that fail say so as
calls (issue 21: never "we could not verify your key")."""

from __future__ import annotations

import httpx
import pytest

import providers as p
from billing.pricing import default_price_book
from schemas.events import KeyCheckStatus, Provider
from services.chat.catalog import MODELS, catalog, provider_names
from services.provider_simulator import SimulatorServer, SimulatorState, base_urls, build_app
from services.provider_simulator.registry import SIMULATED
from services.shared.logging import redact
from services.shared.provider_http import ProviderClient
from tests.fakes import InProcessHttp
from tests.support import sim_key

pytestmark = pytest.mark.unit

MESSAGES = [{"role": "user", "content": "hello"}]


def ownership_clashes() -> list[str]:
    """Each way two registered providers could claim one model: overlapping model prefixes (one a prefix
    of the other's), or one model id in two providers' catalog or hosted models. Empty when none."""
    clashes = []
    apis = list(p.REGISTRY.values())
    for i, a in enumerate(apis):
        for b in apis[i + 1 :]:
            clashes += [
                f"{a.name} {x!r} / {b.name} {y!r}"
                for x in a.model_prefixes
                for y in b.model_prefixes
                if x.startswith(y) or y.startswith(x)
            ]
            clashes += [
                f"{a.name} and {b.name} both claim {m!r}"
                for m in set(a.models + a.hosted_models) & set(b.models + b.hosted_models)
            ]
    return clashes


def test_no_two_providers_claim_overlapping_prefixes_or_the_same_model():
    assert ownership_clashes() == []


@pytest.mark.parametrize("provider", list(Provider))
def test_each_catalog_and_hosted_model_is_its_providers(provider):
    api = p.of(provider)
    assert api.models, "a provider offers at least one model"
    for model in api.models + api.hosted_models:
        assert p.provider_of_model(model) is provider, model


def test_every_priced_model_has_exactly_one_owner():
    """The compatibility route guesses a provider from the model; a priced model nobody owns could not
    be billed through it."""
    for prices in default_price_book().lists:
        for model in (m for tier in prices.tiers.values() for m in tier.models):
            owners = [
                api.provider
                for api in p.REGISTRY.values()
                if model in api.models + api.hosted_models or any(model.startswith(x) for x in api.model_prefixes)
            ]
            assert len(owners) == 1, (model, owners)


def test_mistral_is_no_longer_claimed_by_groq_but_the_model_groq_runs_is():
    assert p.provider_of_model("mistral-large-latest") is None  # Mistral's own naming: free for its module
    assert p.provider_of_model("mistral-saba-24b") is Provider.GROQ  # what Groq runs, by exact id
    assert p.provider_of_model("mixtral-8x7b-32768") is Provider.GROQ


def test_the_catalog_and_the_names_come_from_the_modules():
    assert dict(MODELS) == {provider: api.models for provider, api in p.REGISTRY.items()}
    assert list(catalog(default_price_book().lists[-1])) == [provider.value for provider in p.REGISTRY]
    assert provider_names() == {"openai": "OpenAI", "anthropic": "Anthropic", "groq": "Groq", "gemini": "Gemini"}


@pytest.mark.parametrize("provider", list(Provider))
def test_each_provider_has_its_settings_and_its_platform_key_is_a_secret(provider):
    api = p.of(provider)
    assert api.base_url_setting in p.ProviderSettings.model_fields
    assert api.api_key_setting in p.PlatformKeySettings.model_fields
    assert api.api_key_setting in p.PlatformKeySettings.SECRETS
    keys = p.PlatformKeySettings().platform_keys()
    assert set(keys) == set(Provider) and p.owner_of(keys[provider] or "") is api  # the dummy has its shape
    assert p.PlatformKeySettings(**{api.api_key_setting: ""}).platform_keys()[provider] == ""


@pytest.mark.parametrize("provider", list(Provider))
def test_the_simulator_speaks_each_provider_and_serves_its_catalog(provider):
    api = p.of(provider)
    simulated = SIMULATED[provider.value]
    assert set(api.models) <= set(simulated.models)
    assert simulated.base_url_env.lower() == api.base_url_setting
    assert set(SIMULATED) == {x.value for x in Provider}


@pytest.mark.parametrize("provider", list(Provider))
def test_sample_keys_have_the_providers_shape(provider):
    api = p.of(provider)
    for marker in ("valid", "revoked", "streamcut"):
        key = api.sample_key(marker)
        assert marker in key and key.endswith("a1b2")
        assert p.key_shape_problem(provider, key) is None
        assert p.owner_of(key) is api


@pytest.mark.parametrize("provider", list(Provider))
def test_the_logs_mask_every_providers_keys_even_cut_short(provider):
    api = p.of(provider)
    key = api.sample_key("valid")
    for prefix in api.key_prefixes:
        whole = prefix + key[len(api.key_prefixes[0]) :]
        cut = whole[: len(prefix) + max(12, (api.key_min_length - len(prefix)) // 2)]
        for shown in (whole, cut):
            line = f"calling with Authorization: Bearer {shown} now"
            assert shown not in redact(line) and "[REDACTED]" in redact(line), shown


def test_the_logs_keep_ordinary_words():
    line = "task-scheduler started: disk-usage high, gsk_ and AIza alone, sk-short"
    assert redact(line) == line


# --- issue 21: a call that fails is not a key check ------------------------------------------------


def in_process():
    state = SimulatorState()
    settings = p.ProviderSettings(**{k.lower(): v for k, v in base_urls("http://sim").items()})
    client = InProcessHttp(transport=httpx.ASGITransport(app=build_app(state)), base_url="http://sim", timeout=5)
    return state, settings, client


def says_call_failed(verdict: p.KeyVerdict, name: str) -> bool:
    return (
        verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
        and "verify" not in verdict.message
        and verdict.message.startswith(name)
        and "this call did not complete" in verdict.message
        and "says nothing about your key" in verdict.message
    )


async def collect_stream(stream) -> p.ProviderError:
    with pytest.raises(p.ProviderError) as failed:
        async for _ in stream:
            pass
    return failed.value


@pytest.mark.parametrize("provider", list(Provider))
async def test_a_call_answered_with_a_5xx_says_the_provider_had_a_problem(provider):
    state, settings, client = in_process()
    api_key, model = sim_key(provider, "down"), p.of(provider).models[0]
    name = p.of(provider).name
    async with client:
        with pytest.raises(p.ProviderError) as plain:
            await p.chat_completion(client, settings, provider, api_key, model, MESSAGES)
        streamed = await collect_stream(p.chat_stream(client, settings, provider, api_key, model, MESSAGES))
    for error in (plain.value, streamed):
        assert says_call_failed(error.verdict, name), error.verdict.message
        assert "is having problems right now (HTTP 5" in error.verdict.message
        assert not error.timed_out


@pytest.mark.parametrize("provider", list(Provider))
async def test_an_error_sent_midway_through_a_stream_is_worded_as_a_call(provider):
    _, settings, client = in_process()
    api_key, model = sim_key(provider, "streamfail"), p.of(provider).models[0]
    async with client:
        error = await collect_stream(p.chat_stream(client, settings, provider, api_key, model, MESSAGES))
    assert says_call_failed(error.verdict, p.of(provider).name), error.verdict.message


@pytest.fixture(scope="module")
def server():
    with SimulatorServer() as sim:
        yield sim


async def test_a_call_that_times_out_says_the_provider_did_not_answer_in_time(server):
    server.state.reset()
    settings = p.ProviderSettings(**{k.lower(): v for k, v in server.env().items()})
    api_key = sim_key(Provider.ANTHROPIC, "slow")
    server.state.register(api_key, "slow", delay_ms=3000)
    async with ProviderClient(timeout_s=0.2) as client:
        with pytest.raises(p.ProviderError) as plain:
            await p.chat_completion(client, settings, Provider.ANTHROPIC, api_key, "claude-sonnet-4", MESSAGES)
        streamed = await collect_stream(
            p.chat_stream(client, settings, Provider.ANTHROPIC, api_key, "claude-sonnet-4", MESSAGES)
        )
    for error in (plain.value, streamed):
        assert error.timed_out
        assert says_call_failed(error.verdict, "Anthropic"), error.verdict.message
        assert "did not answer in time" in error.verdict.message


async def test_a_key_check_keeps_the_check_wording(server):
    from services.validation.checks import KeyChecker

    server.state.reset()
    settings = p.ProviderSettings(**{k.lower(): v for k, v in server.env().items()})
    slow = sim_key(Provider.OPENAI, "slow")
    server.state.register(slow, "slow", delay_ms=3000)
    async with ProviderClient(timeout_s=0.2) as client:
        checker = KeyChecker(settings, client)
        timed_out = await checker.check(Provider.OPENAI, slow)
        down = await checker.check(Provider.OPENAI, sim_key(Provider.OPENAI, "down"))
    for verdict in (timed_out, down):
        assert verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE
        assert verdict.message.startswith("We could not verify your key because OpenAI "), verdict.message
