"""docker-compose.yml points every service at the providers where the simulator serves them."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
import yaml

import providers as p
from schemas.events import Provider
from services.provider_simulator import SimulatorState, base_urls, build_app
from tests.support import SIM_KEY_SHAPES as KEYS

pytestmark = pytest.mark.unit

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
APPS = ("setup", "simulator", "credits", "validation", "chat")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def default_of(value: str) -> str:
    """What compose substitutes for `${NAME:-default}` when NAME is unset."""
    match = re.fullmatch(r"\$\{(\w+):-(.*)\}", str(value))
    return match.group(2) if match else str(value)


def simulator_root(services: dict) -> str:
    env = services["simulator"]["environment"]
    assert env["SIM_HOST"] == "0.0.0.0", "the simulator listens beyond its container's loopback"
    return f"http://simulator:{env['SIM_PORT']}"


def provider_urls(service: dict) -> dict[str, str]:
    env = service["environment"]
    return {name: default_of(env[name]) for name in base_urls("http://x")}


def test_every_service_points_at_the_simulators_own_base_urls():
    services = compose()["services"]
    expected = base_urls(simulator_root(services))
    for name in APPS:
        assert provider_urls(services[name]) == expected, name


@pytest.mark.parametrize("provider", list(Provider))
async def test_a_valid_key_is_accepted_at_the_compose_url(provider):
    """Not only equal strings: the compose URL, host aside, reaches the provider's model list."""
    urls = provider_urls(compose()["services"]["chat"])
    settings = p.ProviderSettings(**{k.lower(): v for k, v in urls.items()})
    app = build_app(SimulatorState())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), timeout=5) as client:
        response = await p.list_models(client, settings, provider, KEYS[provider].format("valid"))
    assert response.status_code == 200, response.text


def test_the_stack_script_reads_the_same_urls_from_the_simulator(capsys):
    """infra/stack.sh exports what `python -m services.provider_simulator --print-urls` prints."""
    from services.provider_simulator.__main__ import main

    assert main(["--host", "127.0.0.1", "--port", "18490", "--print-urls"]) == 0
    printed = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert printed == base_urls("http://127.0.0.1:18490")


def merged(*files: str) -> dict:
    """The services of compose files applied in order, as `docker compose -f a -f b` merges what
    these tests read: each service's environment mapping key by key, other keys replaced."""
    services: dict = {}
    for name in files:
        for svc, spec in yaml.safe_load((COMPOSE.parent / name).read_text())["services"].items():
            into = services.setdefault(svc, {})
            for key, value in spec.items():
                if key == "environment":
                    into[key] = {**into.get(key, {}), **value}
                else:
                    into[key] = value
    return services


def test_the_cluster_file_makes_three_nodes_of_one_quorum_that_every_service_knows():
    import base64

    services = merged("docker-compose.yml", "docker-compose.cluster.yml")
    nodes = {svc: spec["environment"] for svc, spec in services.items() if svc.startswith("kafka")}
    assert len(nodes) == 3
    voters = {f"{env['KAFKA_NODE_ID']}@{svc}:9093" for svc, env in nodes.items()}
    internal = {f"{svc}:19092" for svc in nodes}
    for svc, env in nodes.items():
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters, svc
        assert f"INTERNAL://{svc}:19092" in env["KAFKA_ADVERTISED_LISTENERS"], svc
        assert (env["KAFKA_DEFAULT_REPLICATION_FACTOR"], env["KAFKA_MIN_INSYNC_REPLICAS"]) == (3, 2), svc
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 3, svc
        assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16, "a UUID, as Kafka wants it"
    assert len({env["KAFKA_NODE_ID"] for env in nodes.values()}) == 3
    assert len({env["CLUSTER_ID"] for env in nodes.values()}) == 1
    for name in APPS:
        assert set(services[name]["environment"]["KAFKA_BOOTSTRAP_SERVERS"].split(",")) == internal, name


def test_credit_and_validation_instances_are_named_by_their_hostname_and_restarted():
    services = compose()["services"]
    assert "CREDITS_INSTANCE=$$(hostname)" in services["credits"]["command"]
    assert "VALIDATION_INSTANCE=$$(hostname)" in services["validation"]["command"]
    for name in ("simulator", "credits", "validation", "chat"):
        assert services[name]["restart"] == "unless-stopped", name
    assert services["chat"]["environment"]["CREDITS_URL"] == "http://credits:8001"
