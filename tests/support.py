"""Helpers for tests that run services as real processes and feed real topics."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from aiokafka import AIOKafkaProducer

import providers
from infra.harness import free_port, free_ports  # noqa: F401  (tests import them from here)
from schemas.events import CallStatus, Feature, KeyCheckStatus, KeySource, ModelCallCompleted, Provider

ROOT = Path(__file__).resolve().parents[1]


def processes_with_env(name: str, value: str) -> set[int]:
    """Live (not zombie) processes whose environment has `name=value`: what a test started, by
    whatever path (children, grandchildren, processes run as another user)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"{name}={value}".encode() in f.read().split(b"\0"):
                    with open(f"/proc/{pid}/stat") as st:
                        if st.read().split()[2] != "Z":
                            found.add(int(pid))
        except OSError:
            continue
    return found


def make_event(**overrides) -> ModelCallCompleted:
    fields = dict(
        event_id=uuid.uuid4(),
        occurred_at=datetime.now(timezone.utc),
        user_id="alice",
        session_id="s1",
        request_id=uuid.uuid4().hex,
        provider=Provider.OPENAI,
        model="gpt-4o",
        feature=Feature.CHAT,
        key_source=KeySource.PLATFORM,
        status=CallStatus.SUCCEEDED,
        input_tokens=10,
        output_tokens=20,
        latency_ms=5,
    )
    fields.update(overrides)
    return ModelCallCompleted(**fields)


async def publish(bootstrap: str, topic: str, values: list[bytes | ModelCallCompleted], keys=None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        futures = []
        for i, v in enumerate(values):
            if isinstance(v, ModelCallCompleted):
                key, v = v.user_id.encode(), v.to_json()
            else:
                key = keys[i] if keys else b"k"
            futures.append(await producer.send(topic, v, key=key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def wait_for(predicate, timeout_s: float = 30, every_s: float = 0.1, what: str = "condition"):
    """Poll an async predicate until it returns a truthy value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout_s} s (last: {value!r})")
        await asyncio.sleep(every_s)


# The platform's OpenAI key in unit tests that wire the chat service with fakes (tests/fakes.py).
PLATFORM_KEY = "sk-platform-key-0000000000000000000001"

# Keys of each provider's real shape (its module's `sample_key`), with a behaviour marker the provider
# simulator reacts to (see services/provider_simulator): sim_key(Provider.GROQ, "revoked").
SIM_KEY_SHAPES = {p: providers.of(p).sample_key("{}") for p in Provider}
# The key-check status each simulator behaviour must produce.
BEHAVIOUR_STATUS = {
    "valid": KeyCheckStatus.VALID,
    "invalid": KeyCheckStatus.INVALID,
    "revoked": KeyCheckStatus.REVOKED_OR_EXPIRED,
    "denied": KeyCheckStatus.PERMISSION_DENIED,
    "noquota": KeyCheckStatus.QUOTA_EXHAUSTED,
    "ratelimited": KeyCheckStatus.RATE_LIMITED,
    "down": KeyCheckStatus.PROVIDER_UNAVAILABLE,
}


def sim_key(provider: Provider, marker: str) -> str:
    return providers.of(provider).sample_key(marker)
