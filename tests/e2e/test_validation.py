"""The worker as a real process (`python -m services.validation`): secrecy on disk and restarts."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from infra.harness import ServiceProcess
from schemas.events import KeyCheckStatus
from services.chat.key_check_client import KeyCheckRequester
from services.provider_simulator import SimulatorServer
from services.shared.settings import CommonSettings

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def start_worker(bootstrap: str, prefix: str, sim: SimulatorServer, log_path: Path, **env) -> ServiceProcess:
    worker_env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TOPIC_PREFIX": prefix,
        "SESSION_TIMEOUT_MS": "6000",
        "LOG_LEVEL": "DEBUG",
        **sim.env(),
        **env,
    }
    return ServiceProcess(log_path.stem, "services.validation", worker_env, log_path.parent).launch()


def files_containing(root: Path, needle: bytes) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            try:
                if needle in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


@pytest.fixture
def sim():
    with SimulatorServer() as server:
        yield server


async def test_keys_appear_nowhere_on_the_brokers_disk_or_in_the_worker_log(private_kafka, sim, tmp_path):
    mark = uuid.uuid4().hex[:12]
    keys = {
        "openai": f"sk-proj-valid{mark}SECRET0000c0de",
        "anthropic": f"sk-ant-api03-revoked{mark}SECRETc0de",
        "groq": f"gsk_invalid{mark}SECRET0000c0de",
        "gemini": f"AIzaSyValid{mark}SECRET00000000c0de",
    }
    worker = start_worker(private_kafka.bootstrap, "", sim, tmp_path / "worker.log")
    try:
        await worker.wait_healthy()
        common = CommonSettings(kafka_bootstrap_servers=private_kafka.bootstrap)
        async with KeyCheckRequester(common, timeout_s=60) as requester:
            results = {p: await requester.check(f"user-{p}", p, k) for p, k in keys.items()}
    finally:
        assert worker.stop() == 0
    assert {p: r.status for p, r in results.items()} == {
        "openai": KeyCheckStatus.VALID,
        "anthropic": KeyCheckStatus.REVOKED_OR_EXPIRED,
        "groq": KeyCheckStatus.INVALID,
        "gemini": KeyCheckStatus.VALID,
    }

    data_dir = private_kafka.state_dir / "kafka" / "data"
    log_text = worker.logs()
    # The run did reach the disk and the log: the search below looks in the right places.
    for result in results.values():
        assert files_containing(data_dir, str(result.request_id).encode()), "request not found on the broker's disk"
        assert str(result.request_id) in log_text and result.key_hint in log_text
    for api_key in keys.values():
        secret_part = api_key[-len(mark) - 10 :].encode()
        for needle in (api_key.encode(), secret_part, mark.encode()):
            assert files_containing(private_kafka.state_dir, needle) == [], (
                f"key bytes on the broker's disk: {needle!r}"
            )
            assert needle.decode() not in log_text
    assert "[REDACTED]" not in log_text  # nothing even tried to log a key: the filter had nothing to mask


async def test_no_request_is_left_unanswered_across_a_worker_crash(kafka_bootstrap, kafka_topics, sim, tmp_path):
    slow_key, quick_key = "sk-proj-slow-0000000000000001", "sk-proj-revoked-00000000000002"
    sim.state.register(slow_key, "slow", delay_ms=1500)
    log_path = tmp_path / "worker.log"
    first = start_worker(kafka_bootstrap, kafka_topics, sim, log_path)
    second = None
    common = CommonSettings(kafka_bootstrap_servers=kafka_bootstrap, topic_prefix=kafka_topics)
    try:
        await first.wait_healthy()
        async with KeyCheckRequester(common, timeout_s=120) as requester:
            assert (
                await requester.check("warm", "openai", "sk-proj-valid-000000000000003")
            ).status is KeyCheckStatus.VALID
            # Checks in flight inside the worker when it dies ...
            in_flight = [asyncio.create_task(requester.check(f"a{i}", "openai", slow_key)) for i in range(5)]
            await asyncio.sleep(0.5)
            first.kill()
            assert not any(t.done() for t in in_flight)
            # ... and checks sent while no worker runs.
            while_down = [asyncio.create_task(requester.check(f"b{i}", "openai", quick_key)) for i in range(5)]
            await asyncio.sleep(0.5)
            second = start_worker(kafka_bootstrap, kafka_topics, sim, log_path)
            await second.wait_healthy()
            answered = await asyncio.gather(*in_flight, *while_down)
    finally:
        first.kill()
        if second is not None:
            second.stop()
    assert [r.status for r in answered] == [KeyCheckStatus.VALID] * 5 + [KeyCheckStatus.REVOKED_OR_EXPIRED] * 5
    assert sim.state.calls(quick_key) >= 1


@pytest.mark.slow
async def test_worker_and_requester_come_back_with_the_broker(private_kafka, sim, tmp_path):
    worker = start_worker(private_kafka.bootstrap, "", sim, tmp_path / "worker.log")
    common = CommonSettings(kafka_bootstrap_servers=private_kafka.bootstrap)
    try:
        await worker.wait_healthy()
        async with KeyCheckRequester(common, timeout_s=60) as requester:
            assert (await requester.check("u", "groq", "gsk_valid000000000000000000001")).status is KeyCheckStatus.VALID
            private_kafka.stop()
            away = await requester.check("u", "groq", "gsk_valid000000000000000000002", timeout_s=2)
            assert away.status is KeyCheckStatus.PROVIDER_UNAVAILABLE and "try again" in away.message
            private_kafka.start()
            back = await requester.check("u", "groq", "gsk_revoked0000000000000000003")
            assert back.status is KeyCheckStatus.REVOKED_OR_EXPIRED
        assert worker.proc.poll() is None, worker.logs()[-2000:]
    finally:
        worker.stop()
