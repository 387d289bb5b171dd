"""`python -m bench.passthrough`: the bound the chat's own CPU per call is measured against (issue 22).

A bare Python pass-through of the same request: uvicorn (uvloop, httptools, no access log, as the chat
runs) and one pooled aiohttp session; no auth, no settings, no call row, no outbox, no hold. It sends
`POST /v1/chat/completions` on to `UPSTREAM` (the simulator's OpenAI base URL) with the caller's
Authorization header and answers what came back: a plain answer whole, a stream piece by piece.
`/healthz` answers 200 for the harness. HTTP_PORT: the port.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import uvicorn

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:8100/openai/v1")
Scope = dict[str, Any]


class PassThrough:
    def __init__(self, upstream: str):
        self.url = upstream.rstrip("/") + "/chat/completions"
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.session is not None:
                        await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        assert self.session is not None
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        async with self.session.post(self.url, data=body, headers=headers) as upstream:
            kind = upstream.headers.get("Content-Type", "application/json").encode()
            await send({"type": "http.response.start", "status": upstream.status, "headers": [(b"content-type", kind)]})
            if kind.startswith(b"text/event-stream"):
                async for piece in upstream.content.iter_any():
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                await send({"type": "http.response.body", "body": await upstream.read()})


if __name__ == "__main__":
    uvicorn.run(
        PassThrough(UPSTREAM),
        host="127.0.0.1",
        port=int(os.environ.get("HTTP_PORT", "8090")),
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        log_config=None,
    )
