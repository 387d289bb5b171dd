"""Waits for the broker to answer, then creates the system's topics (idempotent).

`python -m infra.topics [--wait SECONDS] [--prefix P] [--partitions N] [--in-sync]`

`--in-sync` then also waits until every partition of every topic has all its replicas in sync (a
rolling restart takes the next node down only then, so min.insync.replicas=2 always holds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from schemas.topics import DEFAULT_PARTITIONS, TopicSpec, topic_specs


async def wait_for_broker(bootstrap: str, timeout_s: float) -> AIOKafkaAdminClient:
    deadline = time.monotonic() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            await admin.list_topics()
            return admin
        except (KafkaError, OSError) as exc:
            await admin.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"Kafka at {bootstrap} did not answer in {timeout_s:.0f} s: {exc}") from exc
            await asyncio.sleep(0.3)


async def replication_factor(admin: AIOKafkaAdminClient) -> int:
    """Three replicas on a cluster of three or more brokers (their min.insync.replicas is 2, see
    infra/kafka.sh), else one per broker: the same code creates the topics on one broker and on three."""
    cluster = await admin.describe_cluster()
    return max(1, min(3, len(cluster["brokers"])))


async def ensure_topics(admin: AIOKafkaAdminClient, specs: list[TopicSpec]) -> list[str]:
    """Create the topics of `specs` that do not exist yet; return the names created."""
    existing = set(await admin.list_topics())
    missing = [s for s in specs if s.name not in existing]
    if missing:
        rf = await replication_factor(admin)
        await admin.create_topics([NewTopic(s.name, s.partitions, rf, topic_configs=s.config()) for s in missing])
    return [s.name for s in missing]


async def out_of_sync(admin: AIOKafkaAdminClient) -> list[str]:
    """The partitions (as `topic/partition`) whose in-sync replicas are fewer than their replicas."""
    lagging = []
    for topic in await admin.describe_topics(await admin.list_topics()):
        for p in topic["partitions"]:
            if len(p["isr"]) < len(p["replicas"]) or p["leader"] < 0:
                lagging.append(f"{topic['topic']}/{p['partition']}")
    return lagging


async def wait_in_sync(admin: AIOKafkaAdminClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while lagging := await out_of_sync(admin):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(lagging)} partitions not fully in sync after {timeout_s:.0f} s: {lagging[:5]}")
        await asyncio.sleep(0.5)


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--wait", type=float, default=60)
    ap.add_argument("--prefix", default="")
    ap.add_argument("--partitions", type=int, default=int(os.environ.get("KAFKA_PARTITIONS", DEFAULT_PARTITIONS)))
    ap.add_argument("--in-sync", action="store_true", help="also wait until every replica is in sync")
    args = ap.parse_args(argv)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    try:
        admin = await wait_for_broker(bootstrap, args.wait)
        try:
            created = await ensure_topics(admin, topic_specs(args.partitions, args.prefix))
            if args.in_sync:
                await wait_in_sync(admin, args.wait)
        finally:
            await admin.close()
    except TimeoutError as exc:
        print(exc, file=sys.stderr)  # a sentence, not a traceback
        return 1
    if created:
        print(f"created topics: {', '.join(created)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
