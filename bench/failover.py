"""Leader failover under load on a three-node cluster (BYOK_KAFKA_BROKERS=3, its own state and ports).

A producer configured as the system's relays are (idempotent, acks=all) sends a steady stream of
events to every partition of `model_call_completed`. Then, several times: SIGKILL the node leading the
busiest partition, wait for a new leader, bring the node back and wait until every replica is in sync.

Figures:
- failover: the longest any send waited past the kill (in flight at the kill, or started after it);
  target at most 5 s. Baseline, same run: the longest send in the steady seconds before that kill.
- new leader: from the kill to the metadata naming another leader for the partition.
- sends that failed after the producer's own retries (each is sent again, as the relays do): target 0.

User calls never wait on Kafka (the chat's outbox takes them); `tests/e2e/test_kafka_cluster.py`
shows every user call answered through a leader kill and a rolling restart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time

from aiokafka.admin import AIOKafkaAdminClient

from bench import BenchEnv, Figure, percentile
from infra.harness import ROOT, free_ports
from infra.topics import wait_in_sync
from schemas.topics import MODEL_CALL_COMPLETED
from services.shared.kafka import make_producer

NAME = "failover"


class Cluster:
    def __init__(self) -> None:
        self.state = ROOT / ".run" / "bench-failover"
        shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True)
        port, controller = free_ports(3), free_ports(3)
        self.env = {
            **os.environ,
            "BYOK_STATE_DIR": str(self.state),
            "BYOK_KAFKA_BROKERS": "3",
            "BYOK_KAFKA_PORT": str(port),
            "BYOK_KAFKA_CONTROLLER_PORT": str(controller),
            "BYOK_KAFKA_HEAP": "512M",
        }
        self.env.pop("BYOK_EXTERNAL_KAFKA", None)
        self.bootstrap = ",".join(f"127.0.0.1:{port + i}" for i in range(3))

    def run(self, *args: str) -> None:
        done = subprocess.run(
            ["bash", str(ROOT / "infra/kafka.sh"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"kafka.sh {' '.join(args)} failed:\n{done.stderr[-2000:]}")

    async def wait_in_sync(self, timeout_s: float) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            await wait_in_sync(admin, timeout_s)
        finally:
            await admin.close()

    async def describe(self) -> list[dict]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            [topic] = await admin.describe_topics([MODEL_CALL_COMPLETED])
            return topic["partitions"]
        finally:
            await admin.close()


class Sender:
    """Steady sends to every partition; keeps (started, acknowledged) per send and every failure."""

    def __init__(self, bootstrap: str, per_tick: int = 12, tick_s: float = 0.02):
        self.producer = make_producer(bootstrap, request_timeout_ms=5000)
        self.per_tick, self.tick_s = per_tick, tick_s
        self.sends: list[tuple[float, float]] = []
        self.in_flight: dict[int, float] = {}
        self.failures = 0
        self.partition_counts: dict[int, int] = {}
        self._stop = asyncio.Event()

    async def _send(self, n: int) -> None:
        started = time.monotonic()
        self.in_flight[n] = started
        value = b'{"bench": "failover", "n": %d}' % n
        try:
            while True:
                try:
                    meta = await (await self.producer.send(MODEL_CALL_COMPLETED, value, key=b"user-%d" % (n % 64)))
                    self.partition_counts[meta.partition] = self.partition_counts.get(meta.partition, 0) + 1
                    break
                except Exception:  # noqa: BLE001 - counted: a send that failed after the producer's retries
                    self.failures += 1
                    await asyncio.sleep(0.2)
            self.sends.append((started, time.monotonic()))
        finally:
            del self.in_flight[n]

    async def run(self) -> None:
        await self.producer.start()
        tasks: set[asyncio.Task] = set()
        n = 0
        try:
            while not self._stop.is_set():
                for _ in range(self.per_tick):
                    task = asyncio.create_task(self._send(n))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    n += 1
                await asyncio.sleep(self.tick_s)
            await asyncio.gather(*tasks)
        finally:
            await self.producer.stop()

    def stop(self) -> None:
        self._stop.set()

    def longest_wait_past(self, at: float, until: float) -> float:
        """The longest any send waited past `at`, among sends in flight at `at` or started before `until`."""
        waits = [done - max(started, at) for started, done in self.sends if done >= at and started < until]
        waits += [time.monotonic() - max(started, at) for started in self.in_flight.values()]
        return max(waits, default=0.0)

    def longest_between(self, begin: float, end: float) -> float:
        return max((done - started for started, done in self.sends if begin <= started < end), default=0.0)


async def run(env: BenchEnv) -> list[Figure]:
    kills = 1 if env.quick else 3
    cluster = Cluster()
    await asyncio.to_thread(cluster.run, "up")
    sender = Sender(cluster.bootstrap)
    sending = asyncio.create_task(sender.run())
    failovers, baselines, new_leaders = [], [], []
    try:
        for _ in range(kills):
            await asyncio.sleep(3)  # settle (start-up, or the last node's catching up)
            steady_from = time.monotonic()
            await asyncio.sleep(4)
            partitions = await cluster.describe()
            busiest = max(sender.partition_counts, key=sender.partition_counts.get)
            victim = next(p["leader"] for p in partitions if p["partition"] == busiest)
            killed = time.monotonic()
            baselines.append(sender.longest_between(steady_from, killed))
            await asyncio.to_thread(cluster.run, "kill", str(victim))
            while True:  # a new leader named in the metadata
                try:
                    leader = next(p["leader"] for p in await cluster.describe() if p["partition"] == busiest)
                except Exception:  # noqa: BLE001 - metadata may be unavailable for a moment
                    leader = -1
                if leader not in (-1, victim):
                    break
                if time.monotonic() - killed > 60:
                    raise TimeoutError(f"no new leader for partition {busiest} in 60 s")
                await asyncio.sleep(0.1)
            new_leaders.append(time.monotonic() - killed)
            await asyncio.sleep(8)  # sends go on to the nodes left
            failovers.append(sender.longest_wait_past(killed, killed + 8))
            await asyncio.to_thread(cluster.run, "up")  # back, then every replica in sync before the next kill
            await cluster.wait_in_sync(120)
        sender.stop()
        await sending
    finally:
        sender.stop()
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await asyncio.to_thread(cluster.run, "down")
        shutil.rmtree(cluster.state, ignore_errors=True)
    label = f"leader of the busiest partition SIGKILLed ({kills}x, acks=all)"
    return [
        Figure(
            NAME,
            f"{label}: longest send wait past the kill, p50",
            percentile(failovers, 50),
            "s",
            "longest send before the kill, p50",
            percentile(baselines, 50),
            "lower",
            "<= 5 s",
        ),
        Figure(
            NAME, f"{label}: longest send wait past the kill, max", max(failovers), "s", "", None, "lower", "<= 5 s"
        ),
        Figure(NAME, f"{label}: kill to a new leader in the metadata, p50", percentile(new_leaders, 50), "s"),
        Figure(
            NAME, f"{label}: sends failed after the producer's retries", sender.failures, "", "", None, "lower", "0"
        ),
        Figure(NAME, f"{label}: sends acknowledged", len(sender.sends), "", "", None, "higher"),
    ]
