"""The provider simulator speaks each provider's API and refuses keys by the rules tests set."""

from __future__ import annotations

import httpx
import pytest

import providers as p
from schemas.events import KeyCheckStatus, Provider
from services.provider_simulator import SimulatorServer, SimulatorState, base_urls, build_app
from services.shared.provider_http import ProviderClient
from tests.fakes import InProcessHttp
from tests.support import SIM_KEY_SHAPES as KEYS

pytestmark = pytest.mark.unit

EXPECTED = {
    "valid": None,
    "invalid": KeyCheckStatus.INVALID,
    "revoked": KeyCheckStatus.REVOKED_OR_EXPIRED,
    "no_quota": KeyCheckStatus.QUOTA_EXHAUSTED,
    "denied": KeyCheckStatus.PERMISSION_DENIED,
    "rate_limited": KeyCheckStatus.RATE_LIMITED,
    "down": KeyCheckStatus.PROVIDER_UNAVAILABLE,
}


def key(provider: Provider, marker: str) -> str:
    return KEYS[provider].format(marker.replace("_", ""))


@pytest.fixture
def sim():
    state = SimulatorState()
    settings = p.ProviderSettings(**{k.lower(): v for k, v in base_urls("http://sim").items()})
    client = InProcessHttp(transport=httpx.ASGITransport(app=build_app(state)), base_url="http://sim", timeout=5)
    return state, settings, client


@pytest.mark.parametrize("provider", list(Provider))
@pytest.mark.parametrize("behaviour", list(EXPECTED))
async def test_model_list_answers_each_behaviour_as_the_provider_would(sim, provider, behaviour):
    state, settings, client = sim
    api_key = key(provider, behaviour)
    assert p.key_shape_problem(provider, api_key) is None
    async with client:
        response = await p.list_models(client, settings, provider, api_key)
    assert state.calls(api_key, provider.value) == 1
    if EXPECTED[behaviour] is None:
        assert response.status_code == 200
        return
    assert response.status_code >= 400
    verdict = p.classify_error(provider, response.status_code, response.content, response.headers)
    assert verdict.status is EXPECTED[behaviour]
    assert api_key not in verdict.message


@pytest.mark.parametrize("provider", list(Provider))
async def test_chat_answers_carry_usage(sim, provider):
    _, settings, client = sim
    async with client:
        reply = await p.chat_completion(
            client,
            settings,
            provider,
            key(provider, "valid"),
            "some-model",
            [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there, how many tokens is this?"},
            ],
        )
    assert reply.input_tokens > 0 and reply.output_tokens > 0
    assert "hello there" in reply.text


@pytest.mark.parametrize("provider", list(Provider))
@pytest.mark.parametrize("behaviour", [b for b in EXPECTED if b != "valid"])
async def test_chat_refusals_raise_provider_error_with_the_key_status(sim, provider, behaviour):
    _, settings, client = sim
    async with client:
        with pytest.raises(p.ProviderError) as caught:
            await p.chat_completion(
                client, settings, provider, key(provider, behaviour), "m", [{"role": "user", "content": "hi"}]
            )
    assert caught.value.verdict.status is EXPECTED[behaviour]


async def test_wire_formats_are_the_providers_own(sim):
    _, settings, client = sim
    async with client:
        openai = await p.list_models(client, settings, "openai", key(Provider.OPENAI, "invalid"))
        assert openai.json()["error"]["code"] == "invalid_api_key"
        assert set(openai.json()["error"]) == {"message", "type", "param", "code"}
        quota = await p.list_models(client, settings, "openai", key(Provider.OPENAI, "noquota"))
        assert quota.status_code == 429 and quota.json()["error"]["code"] == "insufficient_quota"
        limited = await p.list_models(client, settings, "openai", key(Provider.OPENAI, "ratelimited"))
        assert limited.status_code == 429 and limited.headers["retry-after"] == "20"
        anthropic = await p.list_models(client, settings, "anthropic", key(Provider.ANTHROPIC, "invalid"))
        assert anthropic.json()["type"] == "error"
        assert anthropic.json()["error"]["type"] == "authentication_error"
        down = await p.list_models(client, settings, "anthropic", key(Provider.ANTHROPIC, "down"))
        assert down.status_code == 529 and down.json()["error"]["type"] == "overloaded_error"
        gemini = await p.list_models(client, settings, "gemini", key(Provider.GEMINI, "invalid"))
        assert gemini.status_code == 400
        assert gemini.json()["error"]["status"] == "INVALID_ARGUMENT"
        assert gemini.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        no_version = await client.get(
            settings.models_url("anthropic"), headers={"x-api-key": key(Provider.ANTHROPIC, "valid")}
        )
        assert no_version.status_code == 400
        no_key = await client.get(settings.models_url("openai"))
        assert no_key.status_code == 401
        by_query = await client.get(settings.models_url("gemini"), params={"key": key(Provider.GEMINI, "valid")})
        assert by_query.status_code == 200


async def test_registered_keys_override_conventions_and_can_be_limited_to_providers(sim):
    state, settings, client = sim
    platform_key = "sk-platform-key-without-marker-01"
    async with client:
        assert (await p.list_models(client, settings, "openai", platform_key)).status_code == 401  # default: invalid
        r = await client.post("/_sim/keys", json={"key": platform_key, "behaviour": "valid", "providers": ["openai"]})
        assert r.status_code == 200
        assert (await p.list_models(client, settings, "openai", platform_key)).status_code == 200
        assert (await p.list_models(client, settings, "groq", platform_key)).status_code == 401
        await client.post("/_sim/keys", json={"keys": [key(Provider.OPENAI, "valid")], "behaviour": "revoked"})
        revoked = await p.list_models(client, settings, "openai", key(Provider.OPENAI, "valid"))
        assert revoked.json()["error"]["code"] == "account_deactivated"
        counted = await client.post("/_sim/calls", json={"key": platform_key})
        assert counted.json() == {"calls": 3, "by_provider": {"openai": 2, "groq": 1}}
        await client.post("/_sim/default", json={"behaviour": "valid"})
        assert (await p.list_models(client, settings, "groq", "gsk_plainkey00000000000000")).status_code == 200


async def test_outage_answers_5xx_whatever_the_key_until_cleared(sim):
    _, settings, client = sim
    async with client:
        await client.post("/_sim/outage", json={"provider": "gemini", "status": 500})
        r = await p.list_models(client, settings, "gemini", key(Provider.GEMINI, "valid"))
        assert r.status_code == 500 and r.json()["error"]["status"] == "INTERNAL"
        assert (await p.list_models(client, settings, "openai", key(Provider.OPENAI, "valid"))).status_code == 200
        await client.delete("/_sim/outage")
        assert (await p.list_models(client, settings, "gemini", key(Provider.GEMINI, "valid"))).status_code == 200


async def test_reset_forgets_rules_and_counts(sim):
    state, settings, client = sim
    async with client:
        await client.post("/_sim/keys", json={"key": "sk-some-key-0000000000000", "behaviour": "valid"})
        await p.list_models(client, settings, "openai", "sk-some-key-0000000000000")
        assert (await client.get("/_sim/calls")).json()["total"] == 1
        await client.post("/_sim/reset")
        assert (await client.get("/_sim/calls")).json()["total"] == 0
        assert (await p.list_models(client, settings, "openai", "sk-some-key-0000000000000")).status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"key": "k", "behaviour": "sometimes"},
        {"behaviour": "valid"},
        {"key": "k", "behaviour": "valid", "providers": ["mistral"]},
        {"key": "k", "behaviour": "down", "status": 200},
    ],
)
async def test_control_api_refuses_bad_rules_clearly(sim, body):
    _, _, client = sim
    async with client:
        r = await client.post("http://sim/_sim/keys", json=body)
    assert r.status_code in (400, 422)


async def test_slow_key_makes_a_short_timeout_fire():
    # ASGITransport enforces no timeouts, so this one goes over a real socket, with the services' client.
    with SimulatorServer() as server:
        server.state.register(key(Provider.OPENAI, "slow"), "slow", delay_ms=3000)
        settings = p.ProviderSettings(**{k.lower(): v for k, v in server.env().items()})
        async with ProviderClient(timeout_s=0.05) as client:
            with pytest.raises(p.ProviderError) as caught:
                await p.chat_completion(
                    client, settings, "openai", key(Provider.OPENAI, "slow"), "m", [{"role": "user", "content": "hi"}]
                )
    assert caught.value.verdict.status is KeyCheckStatus.PROVIDER_UNAVAILABLE


def test_server_runs_in_process_on_a_free_port():
    with SimulatorServer() as sim:
        assert httpx.get(sim.base_url + "/healthz").json() == {"status": "ok"}
        settings = p.ProviderSettings(**{k.lower(): v for k, v in sim.env().items()})
        r = httpx.get(settings.models_url("groq"), headers=p.auth_headers("groq", key(Provider.GROQ, "valid")))
        assert r.status_code == 200
        assert sim.state.calls(key(Provider.GROQ, "valid")) == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(sim.base_url + "/healthz")
