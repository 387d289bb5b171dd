"""The chat service's HTTP app (port 8000): the routers of `services/chat/api/routes/`, their error
answers, and the body limit, around the wiring the composition root builds (`bootstrap.py`).

Routes: `GET /` (the page), `GET /api/config`, `POST /settings/model`, `GET /api/model-settings`,
`DELETE /api/keys/{provider}`, `POST /chat`, `GET /api/calls/{idempotency_key}`, `GET /api/balance`,
`GET /api/usage`, `GET /api/me`, `POST /auth/dev-login` (only with DEV_LOGIN on), `POST /auth/logout`,
`POST /auth/logout-everywhere`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /healthz`, `GET /metrics`.
"""

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp

from services.chat.api import errors
from services.chat.api.gateway_path import GatewayPath
from services.chat.api.openai_shapes import OpenAIErrors
from services.chat.api.routes import account, auth, calls, gateway, keys, pages
from services.chat.identity import TokenReader
from services.chat.settings import ChatSettings
from services.chat.wiring import Wiring
from services.shared.edge import BodyLimit

__all__ = ["Wiring", "create_app", "serving_app"]


def create_app(settings: ChatSettings, wire: Callable[[ChatSettings], AbstractAsyncContextManager[Wiring]]) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with wire(settings) as wiring:
            app.state.wiring = wiring
            app.state.tokens.revoked = wiring.sessions.is_revoked if wiring.sessions is not None else None
            yield

    app = FastAPI(title="byok-credits: chat service", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.tokens = TokenReader(settings.auth_jwt_secret)
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")
    # Outermost: an oversized body is refused before authentication and parsing.
    app.add_middleware(BodyLimit, max_bytes=settings.http_max_body_bytes, body=errors.error_body)
    # Outside it: the gateway's errors in OpenAI's shape, the body limit's 413 included.
    app.add_middleware(OpenAIErrors)
    errors.install(app)
    for topic in (pages, auth, keys, account, calls, gateway):
        app.include_router(topic.router)

    def openapi() -> dict[str, Any]:
        # /chat reads its body itself, so FastAPI does not know ChatIn: its schema (and the enums it
        # refers to) go into the components, where the route's $ref points.
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            chat_in = calls.ChatIn.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(chat_in.pop("$defs", {}))
            schemas["ChatIn"] = chat_in
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def serving_app(settings: ChatSettings, wire: Callable[[ChatSettings], AbstractAsyncContextManager[Wiring]]) -> ASGIApp:
    """The app the chat serves: `create_app`'s behind the gateway's short path (`api/gateway_path.py`),
    which answers the calls of `POST /v1/chat/completions` that pass the route's checks."""
    return GatewayPath(create_app(settings, wire), settings.http_max_body_bytes)
