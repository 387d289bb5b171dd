"""One key-check request record in, one outcome out (a reply and/or a dead letter); no Kafka I/O.

Wire protocol (FastStream's, so a FastStream publisher can ask too): the request carries headers
`reply_to` (a replies topic; default the system's one) and `correlation_id` (default the request
id); the reply carries the same `correlation_id`. Only topics named like the replies topic are
answered, so a request cannot make the worker write anywhere else.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from uuid import UUID

from aiokafka import ConsumerRecord
from pydantic import ValidationError

import providers
from schemas.events import KeyCheckRequest, KeyCheckResult, KeyCheckStatus, Provider
from schemas.topics import CORRELATION_ID, REPLY_TO
from services.shared.kafka import MAX_EVENT_BYTES, DeadLetter
from services.shared.sealing import KeyOpener, SealingError
from services.validation import metrics
from services.validation.service import KeyCheckService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class Outcome:
    reply: Reply | None = None
    dead_letter: DeadLetter | None = None


def _headers(record: ConsumerRecord[bytes, bytes]) -> dict[str, str]:
    return {k: (v or b"").decode(errors="replace") for k, v in (record.headers or ())}


def _loose_id_and_provider(value: bytes | None) -> tuple[UUID, Provider] | None:
    """request_id and provider of a request that failed validation, if they can be read at all."""
    try:
        data = json.loads(value or b"")
        return UUID(str(data["request_id"])), Provider(data["provider"])
    except Exception:
        return None


class RequestHandler:
    def __init__(self, service: KeyCheckService, opener: KeyOpener, replies_topic: str, max_request_age_s: float = 120):
        self.service, self.opener, self.replies_topic = service, opener, replies_topic
        self.max_request_age_s = max_request_age_s

    def _allowed_reply_topic(self, topic: str) -> bool:
        return topic == self.replies_topic or topic.startswith(self.replies_topic + ".")

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> Outcome:
        """Never raises: whatever the record holds, the answer is a reply, a dead letter, or both."""
        started = time.monotonic()
        headers = _headers(record)
        reply_to = headers.get(REPLY_TO) or self.replies_topic

        def dead(reason: str, error: str) -> DeadLetter:
            metrics.DEAD_LETTERS.labels(reason).inc()
            return DeadLetter.of(record, error, reason)

        def reply(
            request_id: UUID,
            provider: Provider,
            status: KeyCheckStatus,
            message: str,
            hint: str | None = None,
            user_key: bytes | None = record.key,
        ) -> Reply:
            result = KeyCheckResult(
                request_id=request_id,
                provider=provider,
                status=status,
                message=message,
                key_hint=hint,
                latency_ms=int((time.monotonic() - started) * 1000),
            )
            correlation = headers.get(CORRELATION_ID) or str(request_id)
            return Reply(reply_to, user_key, result.to_json(), [(CORRELATION_ID, correlation.encode())])

        def internal_failure(loose: tuple[UUID, Provider] | None) -> Reply | None:
            if loose is None:
                return None
            request_id, provider = loose
            return reply(
                request_id,
                provider,
                KeyCheckStatus.PROVIDER_UNAVAILABLE,
                "We could not check your key because of a problem on our side. Your key may well be fine: "
                "try again in a minute.",
            )

        if not self._allowed_reply_topic(reply_to):
            return Outcome(
                dead_letter=dead("reply_to_not_allowed", f"reply_to {reply_to[:200]!r} is not a replies topic")
            )
        if record.value is None or len(record.value) > MAX_EVENT_BYTES:
            size = 0 if record.value is None else len(record.value)
            return Outcome(dead_letter=dead("bad_size", f"request of {size} bytes (limit {MAX_EVENT_BYTES})"))
        try:
            request = KeyCheckRequest.from_json(record.value)
        except ValidationError as exc:
            # The error text lists fields and types, not input values (include_input=False).
            error = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False))
            return Outcome(
                internal_failure(_loose_id_and_provider(record.value)),
                dead("invalid_request", f"not a KeyCheckRequest: {error}"),
            )

        age_s = (datetime.now(timezone.utc) - request.requested_at).total_seconds()
        if age_s > self.max_request_age_s:
            log.info("request %s is %.0f s old; answered without a provider call", request.request_id, age_s)
            return Outcome(
                reply(
                    request.request_id,
                    request.provider,
                    KeyCheckStatus.PROVIDER_UNAVAILABLE,
                    "This check waited too long to be answered. Please try again.",
                )
            )
        try:
            api_key = self.opener.open(request.key_id, request.sealed_key)
        except SealingError as exc:
            return Outcome(internal_failure((request.request_id, request.provider)), dead("cannot_open", str(exc)))
        try:
            verdict = await self.service.check(request.user_id, request.provider, api_key)
        except Exception as exc:  # a bug must not stop the worker; the message keeps no key
            log.exception("check of request %s failed", request.request_id)
            return Outcome(
                internal_failure((request.request_id, request.provider)),
                dead("internal_error", f"{type(exc).__name__}"),
            )
        hint = providers.key_hint(api_key)
        del api_key
        log.info(
            "request %s user %s %s: %s (key %s)",
            request.request_id,
            request.user_id,
            request.provider.value,
            verdict.status.value,
            hint,
        )
        return Outcome(
            reply(request.request_id, request.provider, verdict.status, verdict.message, hint, request.user_id.encode())
        )
