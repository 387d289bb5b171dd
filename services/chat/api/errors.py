"""How the chat answers what it refuses: sign-in first (401), a `ChatRefused` with its status and
sentence, a malformed request (422, saying where, never echoing the input, which may hold a key); under
/v1/ in OpenAI's error shape. Outages and the framework's own errors come from `services.shared.edge`."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter

from services.chat.api import openai_shapes
from services.chat.identity import AuthError
from services.chat.refusals import ChatRefused
from services.shared.edge import describe, install_http_error_handler, install_outage_handlers

REFUSALS = Counter("chat_refusals_total", "Calls refused before reaching a provider", ["reason"])


def error_body(code: str, sentence: str) -> dict[str, str]:
    return {"error": code, "message": sentence}


def gateway_path(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def gateway_unauthenticated(exc: Exception) -> JSONResponse:
    """Sign-in first, in OpenAI's error shape (its SDKs raise AuthenticationError)."""
    answer = openai_shapes.openai_error(
        401, "invalid_api_key", f"Sign in first: the API key is your identity token ({exc})."
    )
    answer.headers["WWW-Authenticate"] = "Bearer"
    return answer


async def not_authenticated(request: Request, exc: Exception) -> JSONResponse:
    if gateway_path(request):
        return gateway_unauthenticated(exc)
    return JSONResponse(
        {"error": "not_authenticated", "message": "Sign in first.", "detail": str(exc)},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def gateway_refusal(exc: ChatRefused) -> JSONResponse:
    """A refusal before the call started, counted, in OpenAI's error shape."""
    REFUSALS.labels(exc.code).inc()
    return openai_shapes.refusal(exc)


async def refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ChatRefused)
    if gateway_path(request):
        return gateway_refusal(exc)
    REFUSALS.labels(exc.code).inc()
    return JSONResponse({"error": exc.code, "message": exc.message, **exc.details}, status_code=exc.status)


async def invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if gateway_path(request):
        return openai_shapes.openai_error(422, "invalid_request", describe(exc.errors()))
    return JSONResponse(error_body("invalid_request", describe(exc.errors())), status_code=422)


def install(app: FastAPI) -> None:
    install_outage_handlers(app, error_body)
    install_http_error_handler(app, error_body)
    app.add_exception_handler(AuthError, not_authenticated)
    app.add_exception_handler(ChatRefused, refused)
    app.add_exception_handler(RequestValidationError, invalid)
