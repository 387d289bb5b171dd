"""The project's own infrastructure scripts: idempotent up, clean down, the topics of the design."""

import os
import subprocess

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from schemas.topics import FOREVER, ONE_HOUR, topic_specs
from tests.support import ROOT

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


@pytest.mark.parametrize(
    ("brokers", "args", "said"),
    [
        ("1", ["stop", "3"], "one Kafka node runs here"),  # a forgotten BYOK_KAFKA_BROKERS=3
        ("1", ["kill", "1"], "one Kafka node runs here"),
        ("3", ["stop", "4"], "name a node from 1 to 3, not '4'"),
        ("3", ["kill", "x"], "name a node from 1 to 3, not 'x'"),
        ("3", ["stop"], "name a node from 1 to 3, not ''"),
        ("3", ["stop", "2"], "kafka node 2 is not running"),
        ("3", ["roll"], "kafka node 1 is not running: start it with 'bash infra/kafka.sh up' first"),
    ],
)
def test_node_commands_refuse_what_names_no_running_node_of_the_cluster(tmp_path, brokers, args, said):
    """Nothing runs in this state folder: each command must refuse with a sentence, and stop nothing."""
    env = {**os.environ, "BYOK_STATE_DIR": str(tmp_path), "BYOK_KAFKA_BROKERS": brokers, "BYOK_KAFKA_PORT": "29392"}
    done = subprocess.run(["bash", "infra/kafka.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and said in done.stderr, done.stderr
