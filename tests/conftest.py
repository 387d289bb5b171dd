"""Fixtures shared by every test tier.

Unit tests need nothing. Integration and e2e tests get a real Kafka broker and a real PostgreSQL:
from testcontainers when a Docker engine answers, otherwise from the project's own scripts
(`infra/kafka.sh up`, `infra/postgres.sh up`, both idempotent), or from KAFKA_BOOTSTRAP_SERVERS /
DATABASE_URL when `BYOK_EXTERNAL_KAFKA=1` / DATABASE_URL is set. Each test gets its own topic prefix
and its own database schema, so tests never see each other's data.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from infra.topics import ensure_topics, wait_for_broker
from schemas.topics import topic_specs
from services.shared.db import migrate
from services.shared.settings import CommonSettings
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
# Tests run every service locally: on the development defaults the services refuse elsewhere.
os.environ.setdefault("BYOK_ENV", "development")


def docker_answers() -> bool:
    """True only when a Docker engine responds (the client alone is not enough)."""
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


def _script(name: str, *args: str) -> None:
    subprocess.run(["bash", str(ROOT / "infra" / name), *args], check=True, cwd=ROOT)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    if os.environ.get("BYOK_EXTERNAL_KAFKA") == "1":
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    elif docker_answers():
        yield from _kafka_container()
    else:
        _script("kafka.sh", "up")
        yield "127.0.0.1:" + os.environ.get("BYOK_KAFKA_PORT", "9092")


def _kafka_container() -> Iterator[str]:
    # KafkaContainer() raises without Docker, so it is only built here; the apache/kafka image
    # needs the generic container with its KRaft settings.
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    container = (
        DockerContainer("apache/kafka:4.1.1")
        .with_bind_ports(9092, 19092)
        .with_env("KAFKA_NODE_ID", "1")
        .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093")
        .with_env("KAFKA_ADVERTISED_LISTENERS", "PLAINTEXT://127.0.0.1:19092")
        .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        .with_env("KAFKA_MESSAGE_MAX_BYTES", "4194304")
    )
    with container:
        wait_for_logs(container, "Kafka Server started", timeout=120)
        yield "127.0.0.1:19092"


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
    elif docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as pg:
            yield pg.get_connection_url()
    else:
        _script("postgres.sh", "up")
        yield subprocess.run(
            ["bash", str(ROOT / "infra" / "postgres.sh"), "url"], check=True, capture_output=True, text=True
        ).stdout.strip()


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@dataclass
class Stack:
    """Where one test's data lives: its own topics and its own schema."""

    kafka_bootstrap: str
    database_url: str
    database_schema: str
    topic_prefix: str

    def settings(self, cls: type[CommonSettings] = CommonSettings, **overrides) -> CommonSettings:
        return cls(
            kafka_bootstrap_servers=self.kafka_bootstrap,
            database_url=self.database_url,
            database_schema=self.database_schema,
            topic_prefix=self.topic_prefix,
            **overrides,
        )

    def env(self) -> dict[str, str]:
        """The same settings as environment variables, for services run as processes."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            "DATABASE_URL": self.database_url,
            "DATABASE_SCHEMA": self.database_schema,
            "TOPIC_PREFIX": self.topic_prefix,
        }

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.database_url, server_settings={"search_path": self.database_schema})


@pytest.fixture
async def kafka_topics(kafka_bootstrap: str) -> AsyncIterator[str]:
    """A fresh topic prefix with every topic of the system created under it."""
    prefix = unique_name() + "."
    admin = await wait_for_broker(kafka_bootstrap, 60)
    try:
        await ensure_topics(admin, topic_specs(partitions=3, prefix=prefix))
        yield prefix
        await admin.delete_topics([s.name for s in topic_specs(prefix=prefix)])
    finally:
        await admin.close()


@pytest.fixture
async def db_schema(database_url: str) -> AsyncIterator[str]:
    """A fresh schema with every migration applied."""
    schema = unique_name("test_")
    await migrate(database_url, schema)
    yield schema
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def stack(kafka_bootstrap: str, database_url: str, kafka_topics: str, db_schema: str) -> Stack:
    return Stack(kafka_bootstrap, database_url, db_schema, kafka_topics)


class PrivateServer:
    """A Kafka broker or PostgreSQL cluster of one test's own, which the test may stop and start
    (restart and outage tests) without disturbing the shared one other tests use."""

    def __init__(self, script: str, state_dir: Path, env: dict[str, str]):
        self.script, self.state_dir = script, state_dir
        self.env = {**os.environ, "BYOK_STATE_DIR": str(state_dir), **env}
        self.env.pop("DATABASE_URL", None)
        self.env.pop("BYOK_EXTERNAL_KAFKA", None)

    def run(self, *args: str) -> str:
        done = subprocess.run(
            ["bash", str(ROOT / "infra" / self.script), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(f"{self.script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done.stdout.strip()

    def start(self) -> None:
        self.run("up")

    def stop(self) -> None:
        self.run("down")


@pytest.fixture
def private_state() -> Iterator[Path]:
    """A state folder under .run/ (not /tmp: PostgreSQL runs as another user and must reach it)."""
    import shutil

    path = ROOT / ".run" / "private" / unique_name()
    path.mkdir(parents=True)
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def private_kafka(private_state) -> Iterator[PrivateServer]:
    """A broker of this test's own (`.bootstrap`), started; stopped at the end whatever happened."""
    port, controller = free_port(), free_port()
    server = PrivateServer(
        "kafka.sh",
        private_state,
        {"BYOK_KAFKA_PORT": str(port), "BYOK_KAFKA_CONTROLLER_PORT": str(controller), "BYOK_KAFKA_HEAP": "512M"},
    )
    server.bootstrap = f"127.0.0.1:{port}"
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_postgres(private_state) -> Iterator[PrivateServer]:
    """A PostgreSQL cluster of this test's own (`.url`), started; stopped at the end."""
    port = free_port()
    server = PrivateServer("postgres.sh", private_state, {"BYOK_PG_PORT": str(port)})
    server.url = f"postgresql://byok:byok@127.0.0.1:{port}/byok"
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def credit_service(stack, tmp_path):
    """The credit service as its own process (`python -m services.credits`) on this test's stack;
    `.port` is its HTTP port."""
    from infra.harness import ServiceProcess

    proc = ServiceProcess("credits", "services.credits", stack.env(), tmp_path).launch()
    try:
        await proc.wait_healthy()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def private_kafka_cluster(private_state) -> Iterator[PrivateServer]:
    """Three Kafka nodes of this test's own (`BYOK_KAFKA_BROKERS=3`: replication factor 3,
    min.insync.replicas=2), started; `.bootstrap` names all three, `.kill(n)` SIGKILLs node n,
    `.start()` brings back whatever is down. Stopped at the end whatever happened."""
    from tests.support import free_ports

    port, controller = free_ports(3), free_ports(3)
    server = PrivateServer(
        "kafka.sh",
        private_state,
        {
            "BYOK_KAFKA_BROKERS": "3",
            "BYOK_KAFKA_PORT": str(port),
            "BYOK_KAFKA_CONTROLLER_PORT": str(controller),
            "BYOK_KAFKA_HEAP": "512M",
        },
    )
    server.bootstrap = ",".join(f"127.0.0.1:{port + i}" for i in range(3))
    server.kill = lambda node: server.run("kill", str(node))
    server.start()
    try:
        yield server
    finally:
        server.stop()
