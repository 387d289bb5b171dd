"""Key checks over Kafka request/reply: the wire headers both sides use, and the requester (chat side).

The worker (services/validation) answers; the chat service asks. Both import this module rather
than each other.

    requester = KeyCheckRequester(settings)          # any CommonSettings: broker + topic prefix
    await requester.start()                          # at app start-up
    result = await requester.check(user_id, "openai", api_key, timeout_s=8)
    await requester.stop()                           # at shutdown

`check` seals the key to the worker's current public key (`KEY_SEAL_*` settings, see
services/shared/sealing.py), publishes a `KeyCheckRequest` keyed by user id with the headers
`reply_to` and `correlation_id`, and waits for the `KeyCheckResult` with that correlation id on the
replies topic. It never raises for the check's outcome: a malformed key is answered locally (no
round trip), and a timeout or a broker it cannot reach is a `provider_unavailable` result ("could
not verify, try again"), never `invalid`.

Each requester reads every partition of the replies topic from its end, without a consumer group,
and ignores replies it did not ask for, so any number of chat instances can share the topic.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

import providers
from schemas.events import KeyCheckRequest, KeyCheckResult, KeyCheckStatus, Provider
from schemas.topics import CORRELATION_ID, REPLY_TO
from services.shared.kafka import make_producer
from services.shared.sealing import KeySealer
from services.shared.settings import CommonSettings

log = logging.getLogger(__name__)


class KeyCheckRequester:
    """Asks the validation worker to check keys and waits for its answers."""

    def __init__(
        self,
        settings: CommonSettings,
        sealer: KeySealer | None = None,
        *,
        timeout_s: float = 8.0,
        fetch_max_wait_ms: int = 100,  # how often a quiet reader asks; see services/credits/settings.py
    ):
        self.settings = settings
        self.sealer = sealer or KeySealer.from_settings()
        self.timeout_s = timeout_s
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.requests_topic = settings.key_check_requests_topic
        self.replies_topic = settings.key_check_replies_topic
        self._pending: dict[str, asyncio.Future[KeyCheckResult]] = {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect, and pin the replies topic's end, so no reply to a later request can be missed."""
        bootstrap = self.settings.kafka_bootstrap_servers
        self._producer = make_producer(bootstrap, linger_ms=0, client_id="key-check-requester")
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            client_id="key-check-requester",
        )
        await self._producer.start()
        try:
            await self._consumer.start()
            partitions = await self._producer.partitions_for(self.replies_topic)
            if not partitions:
                raise RuntimeError(f"the replies topic {self.replies_topic!r} has no partitions (does it exist?)")
            tps = [TopicPartition(self.replies_topic, p) for p in sorted(partitions)]
            self._consumer.assign(tps)
            await self._consumer.seek_to_end(*tps)
            for tp in tps:
                await self._consumer.position(tp)
        except BaseException:
            await self._consumer.stop()
            await self._producer.stop()
            raise
        self._reader = asyncio.create_task(self._read_replies(), name="key-check-replies")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        self._reader = self._consumer = self._producer = None

    async def __aenter__(self) -> KeyCheckRequester:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def check(
        self, user_id: str, provider: Provider | str, api_key: str, timeout_s: float | None = None
    ) -> KeyCheckResult:
        """Check `api_key` for `user_id` with `provider`; the answer within `timeout_s`, or
        `provider_unavailable`. Raises only for bad arguments (unknown provider) or if not started."""
        if self._producer is None:
            raise RuntimeError("KeyCheckRequester.start() was not called")
        provider = Provider(provider)
        api_key = providers.normalize_key(api_key)
        hint = providers.key_hint(api_key)
        request_id = uuid.uuid4()
        if problem := providers.key_shape_problem(provider, api_key):
            return KeyCheckResult(
                request_id=request_id,
                provider=provider,
                status=KeyCheckStatus.MALFORMED,
                message=problem,
                key_hint=hint,
            )
        sealed = self.sealer.seal(api_key)
        del api_key
        request = KeyCheckRequest(
            request_id=request_id,
            user_id=user_id,
            provider=provider,
            sealed_key=sealed.sealed_key,
            key_id=sealed.key_id,
        )
        correlation_id = str(request_id)
        future: asyncio.Future[KeyCheckResult] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
                await self._producer.send_and_wait(
                    self.requests_topic,
                    request.to_json(),
                    key=user_id.encode(),
                    headers=[(REPLY_TO, self.replies_topic.encode()), (CORRELATION_ID, correlation_id.encode())],
                )
                return await future
        except TimeoutError:
            log.warning("key check %s for user %s (%s) timed out", request_id, user_id, provider.value)
            return self._unavailable(request_id, provider, hint, "did not get an answer in time")
        except Exception as exc:
            log.warning("key check %s could not be sent: %s", request_id, type(exc).__name__)
            return self._unavailable(request_id, provider, hint, "could not reach the key-check service")
        finally:
            self._pending.pop(correlation_id, None)

    @staticmethod
    def _unavailable(request_id: uuid.UUID, provider: Provider, hint: str | None, why: str) -> KeyCheckResult:
        return KeyCheckResult(
            request_id=request_id,
            provider=provider,
            status=KeyCheckStatus.PROVIDER_UNAVAILABLE,
            key_hint=hint,
            message=f"We could not verify your key: we {why}. The key may well be fine: try again in a minute.",
        )

    async def _read_replies(self) -> None:
        consumer = self._consumer
        assert consumer is not None, "started before reading"
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("reading key-check replies failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            for records in batch.values():
                for record in records:
                    self._resolve(record)

    def _resolve(self, record: ConsumerRecord[bytes, bytes]) -> None:
        headers = dict(record.headers or ())
        correlation_id = (headers.get(CORRELATION_ID) or b"").decode(errors="replace")
        future = self._pending.get(correlation_id)
        if future is None or future.done():
            return  # another instance's request, or one we stopped waiting for
        try:
            result = KeyCheckResult.from_json(record.value or b"")
        except ValidationError:
            log.warning("unreadable key-check reply at %s[%d]@%d", record.topic, record.partition, record.offset)
            return
        if str(result.request_id) != correlation_id:
            log.warning("key-check reply %s carries request id %s; ignored", correlation_id, result.request_id)
            return
        future.set_result(result)
