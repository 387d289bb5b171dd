"""Kafka helpers: a producer tuned for this system, the dead-letter publisher, static membership."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    BrokerNotAvailableError,
    CorruptRecordException,
    InvalidMessageError,
    InvalidTopicError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
)
from prometheus_client import Counter
from pydantic import ValidationError

from schemas.events import ModelCallCompleted
from schemas.topics import dlq
from services.shared.db import database_away

log = logging.getLogger(__name__)

# The largest value a consumer here accepts; anything bigger is dead-lettered unread.
MAX_EVENT_BYTES = 64 * 1024

# Kafka refused the message itself (too large, invalid): sending it again cannot succeed.
_REFUSED_FOR_CONTENT = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    InvalidMessageError,
    CorruptRecordException,
    InvalidTopicError,
)

PARKED = Counter(
    "relay_parked_total", "Messages a relay parked in PostgreSQL because Kafka refused them as they are", ["source"]
)


def refused_for_content(exc: BaseException) -> bool:
    """True when Kafka (or the client) refused a message for what it is, not because the broker is away."""
    return isinstance(exc, _REFUSED_FOR_CONTENT)


def kafka_away(exc: BaseException) -> bool:
    """True when `exc` says the brokers cannot be reached or cannot serve now (connection refused,
    no leader, request timed out, ...): aiokafka marks those `retriable`; a send or start that timed
    out and a broker not available are outages too. False for a request Kafka refused as it is, and
    for misuse of the client (bugs)."""
    if not isinstance(exc, KafkaError) or refused_for_content(exc):
        return False
    return bool(getattr(exc, "retriable", False)) or isinstance(exc, (KafkaTimeoutError, BrokerNotAvailableError))


async def park(
    conn: asyncpg.Connection,
    source: str,
    topic: str,
    key: bytes | None,
    payload: bytes,
    headers: str,
    error: BaseException,
) -> None:
    """Keep a message Kafka will never take in `parked_messages`, so the relay moves on and nothing is lost."""
    await conn.execute(
        "INSERT INTO parked_messages (source, topic, key, payload, headers, error) VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
        source,
        topic,
        key,
        payload,
        headers,
        f"{type(error).__name__}: {error}"[:2000],
    )
    PARKED.labels(source).inc()
    log.error(
        "%s: a message for %s was refused by Kafka as it is (%s); parked in parked_messages",
        source,
        topic,
        type(error).__name__,
    )


class OutageLog:
    """One log line when a part (Kafka, PostgreSQL) becomes unreachable, one when it answers again, and
    none in between, however often the caller retries. `who` names the caller in each line."""

    def __init__(self, logger: logging.Logger, who: str):
        self.log, self.who = logger, who
        self.away: dict[str, float] = {}  # part -> when it went away (monotonic)

    def down(self, part: str, exc: BaseException) -> None:
        if part in self.away:
            return
        self.away[part] = time.monotonic()
        self.log.warning(
            "%s cannot reach %s (%s: %s); retrying quietly until it answers again",
            self.who,
            part,
            type(exc).__name__,
            exc,
        )

    def up(self, *parts: str) -> None:
        """`parts` answered (none given: every part)."""
        for part in parts or tuple(self.away):
            since = self.away.pop(part, None)
            if since is not None:
                self.log.warning("%s reaches %s again (after %.0f s)", self.who, part, time.monotonic() - since)


async def part_away(exc: BaseException, pool: asyncpg.Pool) -> str | None:
    """'PostgreSQL' or 'Kafka' when `exc`, raised by a round that uses both (a relay's), says that part is
    away; None for anything else (a bug, to be logged with its traceback).

    asyncpg's and aiokafka's own errors say which. A refused or reset connection and a timeout (OSError,
    TimeoutError) could come from either: the database is asked, and answers if it is not the one away.
    """
    if isinstance(exc, KafkaError):
        return "Kafka"
    if not database_away(exc):
        return None
    if not isinstance(exc, OSError):  # asyncpg's: PostgresConnectionError, InterfaceError, ...
        return "PostgreSQL"
    try:
        await asyncio.wait_for(pool.fetchval("SELECT 1"), 2.0)
    except Exception:
        return "PostgreSQL"
    return "Kafka"


class KafkaClientChatter(logging.Filter):
    """aiokafka logs every failed connection, metadata request and coordinator lookup, at ERROR, on each
    retry: about 8,000 lines per service in a 2-minute broker outage. The services say once that Kafka is
    away and once that it is back (OutageLog); of aiokafka's own lines, each distinct one passes at most
    once per `every_s` (its message template, so a line repeated for each node or retry counts once)."""

    def __init__(self, every_s: float = 600.0):
        super().__init__()
        self.every_s = every_s
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            return False
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = now
        return True


# aiokafka's modules that log per retry (logging.getLogger(__name__) in each): a logger's filters apply
# to what is logged on it, not to its children, so each gets the filter. Installed when this module is
# imported, which every service that talks to Kafka does.
_CHATTY = (
    "aiokafka",
    "aiokafka.conn",
    "aiokafka.client",
    "aiokafka.cluster",
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.consumer.subscription_state",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
    "aiokafka.producer.message_accumulator",
    "aiokafka.admin.client",
)


def quiet_kafka_client_logs(every_s: float = 600.0) -> None:
    for name in _CHATTY:
        logger = logging.getLogger(name)
        if not any(isinstance(f, KafkaClientChatter) for f in logger.filters):
            logger.addFilter(KafkaClientChatter(every_s))


quiet_kafka_client_logs()


@dataclass(frozen=True, slots=True)
class NotAnEvent:
    """Why a record's value is not a `ModelCallCompleted`: `kind` is the dead letter's error type."""

    kind: str  # "empty" | "too_large" | "malformed_json" | "schema"
    message: str


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def read_model_call(value: bytes | None) -> ModelCallCompleted | NotAnEvent:
    """One record's value as an event, or why it is not one. Never raises: the credit service
    dead-letters what it cannot read, finance reports it; both read with this one function."""
    if not value:
        return NotAnEvent("empty", "empty value")
    if len(value) > MAX_EVENT_BYTES:
        return NotAnEvent("too_large", f"value of {len(value)} bytes exceeds {MAX_EVENT_BYTES}")
    try:
        # The schema also refuses control characters (a NUL cannot be stored in PostgreSQL).
        return ModelCallCompleted.from_json(value)
    except ValidationError as exc:
        kind = "malformed_json" if any(e["type"] == "json_invalid" for e in exc.errors()) else "schema"
        return NotAnEvent(kind, _validation_summary(exc))


def make_producer(bootstrap: str, **overrides: Any) -> AIOKafkaProducer:
    """Idempotent producer: acks=all, so an acknowledged event is on disk, never duplicated by retries."""
    options: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=2,
        max_request_size=4 * 1024 * 1024,
        request_timeout_ms=10_000,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


class Consumed(Protocol):
    """What a dead letter keeps of a consumed record (aiokafka's `ConsumerRecord[bytes, bytes]` has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True)
class DeadLetter:
    """One message refused by a consumer, with why."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    error: str
    error_type: str

    @classmethod
    def of(cls, record: Consumed, error: str, error_type: str) -> DeadLetter:
        """The dead letter of a consumed record."""
        return cls(record.topic, record.partition, record.offset, record.key, record.value, error, error_type)

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("dlq.error", self.error[:2000].encode(errors="replace")),
            ("dlq.error_type", self.error_type.encode()),
            ("dlq.source_topic", self.topic.encode()),
            ("dlq.source_partition", str(self.partition).encode()),
            ("dlq.source_offset", str(self.offset).encode()),
        ]


async def send_dead_letters(producer: AIOKafkaProducer, letters: list[DeadLetter]) -> None:
    """Publish the original bytes to `<topic>.dlq` with the error in headers; wait for the acks."""
    futures = [await producer.send(dlq(d.topic), value=d.value or b"", key=d.key, headers=d.headers()) for d in letters]
    for f in futures:
        await f
    for d in letters:
        log.warning("dead-lettered %s[%d]@%d: %s", d.topic, d.partition, d.offset, d.error_type)


def leave_group_on_stop(consumer: AIOKafkaConsumer | None) -> None:
    """Make `consumer.stop()` leave its group at once, also as a static member.

    A static member (`group_instance_id`, KIP-345) keeps its partitions through a crash: restarted
    under the same id, it takes them back without a rebalance. But aiokafka (like the Java client
    before KIP-1092's `CloseOptions`) then sends no LeaveGroup on close either, so on a deliberate
    shutdown the partitions would wait out the session timeout. The broker accepts a LeaveGroup by
    member id for a static member and removes it (and its instance id) from the group; aiokafka sends
    exactly that on close when it does not know the instance id. So forget the id just before closing,
    after the last join: the coordinator commits, stops heartbeating, then leaves.
    tests/integration/test_static_membership.py proves the group is empty right after a stop.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None:  # never started, or not in a group
        return
    if not hasattr(coordinator, "_group_instance_id"):
        log.warning("this aiokafka has no _group_instance_id; a static member will not leave on close")
        return
    coordinator._group_instance_id = None
