"""The simulator's ASGI app: the control API, and each provider's routes under its mount (see the
package docstring). Each provider's answers are in its own module (`openai.py`, `groq.py`,
`anthropic.py`, `gemini.py`), listed in `registry.py`."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.provider_simulator.base import Answer, Json
from services.provider_simulator.registry import SIMULATED
from services.provider_simulator.state import BEHAVIOURS, Rule, SimulatorState, default_delay_ms
from services.provider_simulator.urls import base_urls

__all__ = ["BEHAVIOURS", "SimulatorState", "base_urls", "build_app"]


class KeyRule(BaseModel):
    key: str | None = Field(default=None, min_length=1)
    keys: list[str] = Field(default_factory=list)
    behaviour: str
    delay_ms: int = Field(default=0, ge=0, le=600_000)
    status: int | None = Field(default=None, ge=400, le=599)
    providers: list[str] | None = None
    chunks: int | None = Field(default=None, ge=1, le=10_000)


class Outage(BaseModel):
    provider: str
    status: int = Field(default=503, ge=500, le=599)


class DefaultBehaviour(BaseModel):
    behaviour: str


class CallsQuery(BaseModel):
    key: str


def build_app(state: SimulatorState | None = None) -> FastAPI:
    """The simulator as an ASGI app; `app.state.sim` is its `SimulatorState`."""
    state = state or SimulatorState()
    app = FastAPI(title="LLM provider simulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sim = state

    def bad_control(message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=400)

    # --- control ---

    @app.get("/healthz")
    async def healthz() -> Json:
        return {"status": "ok"}

    @app.post("/_sim/keys", response_model=None)
    async def register(rule: KeyRule) -> Answer:
        keys = ([rule.key] if rule.key else []) + rule.keys
        if not keys:
            return bad_control("give 'key' or 'keys'")
        if rule.behaviour not in BEHAVIOURS:
            return bad_control(f"unknown behaviour {rule.behaviour!r}; one of {list(BEHAVIOURS)}")
        if rule.providers and set(rule.providers) - set(SIMULATED):
            return bad_control(f"unknown provider in {rule.providers}; one of {list(SIMULATED)}")
        delay = rule.delay_ms or default_delay_ms(rule.behaviour)
        for key in keys:
            state.register(
                key, rule.behaviour, delay_ms=delay, status=rule.status, providers=rule.providers, chunks=rule.chunks
            )
        return {"registered": len(keys)}

    @app.delete("/_sim/keys")
    async def forget() -> Json:
        with state._lock:
            state._rules.clear()
        return {"ok": True}

    @app.post("/_sim/default", response_model=None)
    async def set_default(body: DefaultBehaviour) -> Answer:
        if body.behaviour not in BEHAVIOURS:
            return bad_control(f"unknown behaviour {body.behaviour!r}; one of {list(BEHAVIOURS)}")
        state.default_behaviour = body.behaviour
        return {"ok": True}

    @app.post("/_sim/outage", response_model=None)
    async def outage(body: Outage) -> Answer:
        if body.provider not in SIMULATED:
            return bad_control(f"unknown provider {body.provider!r}; one of {list(SIMULATED)}")
        state.set_outage(body.provider, body.status)
        return {"ok": True}

    @app.delete("/_sim/outage")
    async def end_outage() -> Json:
        state.clear_outages()
        return {"ok": True}

    @app.post("/_sim/calls")
    async def calls_of_key(body: CallsQuery) -> Json:
        return {"calls": state.calls(body.key), "by_provider": state.calls_by_provider(body.key)}

    @app.get("/_sim/calls")
    async def all_calls() -> Json:
        return {
            "total": state.total_calls(),
            "by_provider": state.calls_by_provider(),
            "by_endpoint": state.endpoints(),
            "streams": state.streams(),
        }

    @app.post("/_sim/reset")
    async def reset() -> Json:
        state.reset()
        return {"ok": True}

    # --- the gate every provider route passes: count the call, then refuse it or let it through ---

    async def gate(provider: str, key: str | None, endpoint: str) -> JSONResponse | Rule:
        state._count(key, provider, endpoint)
        if not key:
            return Rule("invalid")  # callers answer their provider's "no key" error
        rule, outage_status = state.decide(key, provider)
        simulated = SIMULATED[provider]
        if outage_status:
            return simulated.refusal(Rule("down", status=outage_status)) or rule
        if rule.streams_only:
            return rule  # its delay is the stream's, and everything else answers as valid
        if rule.delay_ms:
            await asyncio.sleep(rule.delay_ms / 1000)
        return simulated.refusal(rule) or rule

    for simulated in SIMULATED.values():
        app.include_router(simulated.router(gate), prefix=simulated.mount)

    return app
