"""The topics of the contract as a FastStream application, for `faststream docs gen`.

Nothing here runs: the handlers only declare who consumes and who publishes what, so the generated
AsyncAPI document (docs/asyncapi.json, checked by tests/unit/test_asyncapi.py) follows the code.
Regenerate with `make asyncapi`.
"""

from __future__ import annotations

from typing import Any

from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI

from schemas.events import CreditOutcome, KeyCheckRequest, KeyCheckResult, ModelCallCompleted
from schemas.topics import CREDIT_LEDGER, KEY_CHECK_REPLIES, KEY_CHECK_REQUESTS, MODEL_CALL_COMPLETED, dlq

broker = KafkaBroker("127.0.0.1:9092", description="Apache Kafka 4.x (KRaft). Messages are JSON, keyed by user_id.")


@broker.subscriber(
    MODEL_CALL_COMPLETED,
    group_id="credits",
    title="credits: model_call_completed",
    description="The credit service applies the credit policy to every completed model call. "
    "Retention: forever (finance replays it).",
)
@broker.publisher(
    CREDIT_LEDGER,
    title="credits: credit_ledger",
    schema=CreditOutcome,
    description="What the credit service decided for each event. Retention: forever.",
)
async def credits(event: ModelCallCompleted) -> CreditOutcome:
    raise NotImplementedError("a declaration: services/credits consumes this topic")


@broker.publisher(
    MODEL_CALL_COMPLETED,
    title="chat: model_call_completed",
    schema=ModelCallCompleted,
    description="Published by the chat service (through its outbox) for every completed or "
    "failed model call, tagged with the key source actually used.",
)
async def chat_emits() -> None: ...


@broker.subscriber(
    KEY_CHECK_REQUESTS,
    group_id="validation",
    title="validation: key_check_requests",
    description="Key checks; the key is sealed to the worker's public key `key_id`. "
    "The reply goes to the `reply_to` header's topic with the `correlation_id` copied. "
    "Retention: 1 hour.",
)
@broker.publisher(
    KEY_CHECK_REPLIES,
    title="validation: key_check_replies",
    schema=KeyCheckResult,
    description="Key-check answers, correlated by the `correlation_id` header. Retention: 1 hour.",
)
async def validation(request: KeyCheckRequest) -> KeyCheckResult:
    raise NotImplementedError("a declaration: services/validation answers on this topic")


@broker.publisher(
    dlq(MODEL_CALL_COMPLETED),
    title="credits: model_call_completed.dlq",
    schema=bytes,
    description="Records the credit service refused: the original bytes, the error in the "
    "`dlq.error`, `dlq.error_type` and `dlq.source_*` headers. Retention: forever.",
)
@broker.publisher(
    dlq(KEY_CHECK_REQUESTS),
    title="validation: key_check_requests.dlq",
    schema=bytes,
    description="Key-check requests the worker could not read, with the error in headers.",
)
async def dead_letters() -> None: ...


specification = AsyncAPI(
    broker,
    title="byok-credits",
    version="1",
    description="Events and replies between the chat, credit, validation and finance parts.",
)
app = FastStream(broker, specification=specification)


def document() -> dict[str, Any]:
    """The AsyncAPI document, as `faststream docs gen schemas.asyncapi:app` writes it."""
    doc: dict[str, Any] = specification.to_specification().to_jsonable()
    return doc
