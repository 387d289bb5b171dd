"""The OpenAI-compatible gateway (DESIGN "An OpenAI-compatible gateway"): `POST /v1/chat/completions`
and `GET /v1/models`, so the product's backend and any OpenAI client (the `openai` SDK, LiteLLM, ...)
reach every model of the catalog with BYOK and billing applied.

The route only translates: OpenAI's request into a `CallRequest` for the same call use case as the
page's `POST /chat` (idempotency, holds, endings, streaming), and its `Outcome` back into OpenAI's
shapes (`api/openai_shapes.py`). Anthropic and Gemini models are translated by `providers/` as for any
call. `X-Provider-Key` is the user's own key for this call only: never stored, logged or echoed.
"""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from billing.pricing import default_price_book
from schemas.events import Feature, utc_now
from services.chat.api.deps import Key, Who, Wired
from services.chat.api.openai_shapes import GATEWAY_ERRORS, OpenAIErrorOut, chunks, completion, failure
from services.chat.call_request import CallRequest
from services.chat.call_store import Outcome
from services.chat.catalog import MODELS
from services.chat.identity import Identity
from services.chat.key_session import KeyRing
from services.chat.refusals import InvalidRequest
from services.chat.wiring import Wiring
from services.shared.edge import error_responses

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
MAX_PROVIDER_KEY_CHARS = 1024


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionIn(BaseModel):
    """OpenAI's chat completion request; parameters this gateway does not apply are accepted and
    ignored (temperature, top_p, user, ...), except those that would change the answer's shape."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")
    messages: list[MessageIn] = Field(min_length=1, max_length=1000)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=200_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=200_000)
    n: int | None = Field(default=None, ge=1, le=1)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError("tools are not supported by this gateway")
        return tools


@router.get("/models", responses=error_responses(401, model=OpenAIErrorOut))
async def models(who: Who) -> dict[str, Any]:
    """Every model of the catalog, whatever its provider; `credits` is its platform price (null: it runs
    only on the user's own key)."""
    prices = default_price_book().in_force(utc_now())
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": p.value, "credits": prices.model_price(m)}
            for p, ms in MODELS.items()
            for m in ms
        ],
    }


@router.post(
    "/chat/completions",
    responses={
        200: {
            "description": "A chat.completion; with `stream: true`, chat.completion.chunk events, then [DONE]",
            "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
        },
        **GATEWAY_ERRORS,
    },
)
async def chat_completions(
    body: CompletionIn,
    who: Who,
    w: Wired,
    ring: Key,
    x_feature: Annotated[str | None, Header()] = None,
    x_provider_key: Annotated[str | None, Header(max_length=MAX_PROVIDER_KEY_CHARS)] = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    call = gateway_call(body, x_feature, x_provider_key)
    return await completion_response(w, who, ring, body, call, idempotency_key)


def gateway_call(body: CompletionIn, x_feature: str | None, x_provider_key: str | None) -> CallRequest:
    """The call an OpenAI request asks for; raises `InvalidRequest` for one that cannot be a call."""
    try:
        feature = Feature(x_feature or Feature.CHAT.value)
    except ValueError:
        raise InvalidRequest(
            f"X-Feature is one of {', '.join(f.value for f in Feature)}.", reason="invalid_feature"
        ) from None
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise InvalidRequest("messages: send at least one user message with text.", reason="empty_messages")
    return CallRequest(
        feature,
        messages,
        model=body.model,
        own_key=x_provider_key or None,
        max_tokens=body.max_completion_tokens or body.max_tokens or 1024,
        route="v1",
    )


async def completion_response(
    w: Wiring, who: Identity, ring: KeyRing, body: CompletionIn, call: CallRequest, idempotency_key: str | None
) -> Response:
    """Start (or find) the call and answer it in OpenAI's shape: a `chat.completion`, a stream of chunks,
    or an error. Raises what `ChatCalls.start` raises for a call refused before it started."""
    started = await w.calls.start(who, ring, call, idempotency_key=idempotency_key, stream=body.stream)
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            chunks(started, body.model, include),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
    outcome = started if isinstance(started, Outcome) else await started.result()
    if not outcome.ok:
        return failure(outcome)
    return JSONResponse(completion(outcome.body, body.model))
