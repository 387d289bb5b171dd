"""The project's own infrastructure scripts: idempotent up, clean down, the topics of the design."""

import subprocess

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from schemas.topics import FOREVER, ONE_HOUR, topic_specs

pytestmark = pytest.mark.integration


def pids_of(pattern: str) -> set[str]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return set(out.split())


async def test_private_broker_up_twice_is_harmless_and_down_leaves_no_process(private_kafka):
    before = pids_of(str(private_kafka.state_dir))
    assert len(before) == 1, "one broker process for this state folder"
    private_kafka.start()  # second up: finds it running, starts nothing
    assert pids_of(str(private_kafka.state_dir)) == before
    private_kafka.stop()
    assert pids_of(str(private_kafka.state_dir)) == set()
    private_kafka.stop()  # second down: harmless


async def test_topics_have_the_retention_of_the_design(private_kafka):
    admin = AIOKafkaAdminClient(bootstrap_servers=private_kafka.bootstrap)
    await admin.start()
    try:
        specs = topic_specs()
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, s.name) for s in specs])
        retention = {}
        for response in described:
            for resource in response.resources:
                name, configs = resource[3], resource[4]
                retention[name] = next(c[1] for c in configs if c[0] == "retention.ms")
        assert retention["model_call_completed"] == FOREVER
        assert retention["credit_ledger"] == FOREVER
        assert retention["model_call_completed.dlq"] == FOREVER
        assert retention["key_check_requests"] == ONE_HOUR
        assert retention["key_check_replies"] == ONE_HOUR
        meta = await admin.describe_topics(["model_call_completed"])
        assert len(meta[0]["partitions"]) == 6
    finally:
        await admin.close()


async def test_private_postgres_survives_a_restart_with_its_data(private_postgres):
    conn = await asyncpg.connect(private_postgres.url)
    await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
    await conn.close()
    private_postgres.stop()
    with pytest.raises(OSError):
        await asyncpg.connect(private_postgres.url, timeout=2)
    private_postgres.start()
    private_postgres.start()  # idempotent
    conn = await asyncpg.connect(private_postgres.url)
    assert await conn.fetchval("SELECT v FROM kept") == 42
    await conn.close()
