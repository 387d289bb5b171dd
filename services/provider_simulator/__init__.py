"""Provider simulator: one local HTTP server that speaks OpenAI, Anthropic, Groq and Gemini.

A test and demo tool (LLM providers are unreachable here). Each provider lives under its own path
prefix, and below it the provider's real paths, auth headers, status codes and error bodies:

| provider  | base URL to configure               | model list             | chat                                       |
|-----------|-------------------------------------|------------------------|--------------------------------------------|
| OpenAI    | `OPENAI_BASE_URL=<sim>/openai/v1`   | `GET  /models`         | `POST /chat/completions`                   |
| Groq      | `GROQ_BASE_URL=<sim>/groq`          | `GET  /openai/v1/models` | `POST /openai/v1/chat/completions`       |
| Anthropic | `ANTHROPIC_BASE_URL=<sim>/anthropic`| `GET  /v1/models`      | `POST /v1/messages`                        |
| Gemini    | `GEMINI_BASE_URL=<sim>/gemini`      | `GET  /v1beta/models`  | `POST /v1beta/models/{model}:generateContent` |

(`SimulatorServer.env()` / `base_urls(root)` give these.) Auth: OpenAI and Groq `Authorization: Bearer`,
Anthropic `x-api-key` plus a required `anthropic-version`, Gemini `x-goog-api-key` (or `?key=`).
Chat answers carry the real usage fields. Streaming is not simulated.

## Which keys are accepted

A key's *behaviour* decides the answer: `valid`, `invalid`, `revoked`, `no_quota`, `denied`
(permission), `rate_limited`, `slow` (waits `delay_ms`, default 5000, then answers as valid),
`down` (a 5xx: OpenAI/Groq 503, Anthropic 529 overloaded_error, Gemini 503 UNAVAILABLE; `status`
overrides the code). The behaviour of a key is, in order:

1. the one registered for it with `POST /_sim/keys`;
2. else a marker word in the key, case-insensitive, first match in this order: `revoked`, `noquota`,
   `denied`, `ratelimited`, `slow`, `down`, `invalid`, `valid` (e.g. `sk-valid-000000000000000001`,
   `sk-ant-api03-revoked-0000000001`, `gsk_noquota000000000000001`, `AIzaSyDenied00000000000000000001`);
3. else the default behaviour (`invalid`, like a real provider facing an unknown key).

An outage (`POST /_sim/outage`) makes every call to a provider answer 5xx whatever the key.

## Control API (JSON)

- `POST /_sim/keys` `{"key": "...", "behaviour": "revoked", "delay_ms": 0, "status": null,
  "providers": null}`: register a key (e.g. the platform keys); `providers` limits it to some
  providers (elsewhere it is `invalid`). Also `{"keys": [...], "behaviour": ...}` for several.
- `DELETE /_sim/keys`: forget registered keys.
- `POST /_sim/default` `{"behaviour": "invalid"}`: the behaviour of keys with no rule.
- `POST /_sim/outage` `{"provider": "openai", "status": 503}` / `DELETE /_sim/outage`.
- `POST /_sim/calls` `{"key": "..."}` -> `{"calls": n, "by_provider": {...}}`: provider calls made
  with that key (keys travel in bodies, never in URLs, so no access log can hold them).
- `GET /_sim/calls` -> `{"total": n, "by_provider": {...}, "by_endpoint": {...}}`.
- `POST /_sim/reset`: forget keys, counts, outages and the default.
- `GET /healthz`.

## Layout

`app.py` builds the app (control API, and each provider's routes under its mount); each provider's
paths, auth and answers are in its own module (`openai.py`, `groq.py`, `anthropic.py`, `gemini.py`,
each a `base.SimulatedProvider`), listed in `registry.py`; `state.py` holds key rules and counts;
`urls.py` the base URLs.

In-process (tests): `build_app(state)` gives the ASGI app; `SimulatorServer` runs it with uvicorn
on a free port in a background thread (`with SimulatorServer() as sim: sim.base_url`), and its
`state` (`SimulatorState`) can be driven directly (`sim.state.register(key, "revoked")`,
`sim.state.calls(key)`). As a process: `python -m services.provider_simulator [--port 8090]` (env `SIM_VALID_KEYS`: comma-separated
keys to accept, e.g. the platform keys).
"""

from services.provider_simulator.app import BEHAVIOURS, SimulatorState, base_urls, build_app
from services.provider_simulator.server import SimulatorServer

__all__ = ["BEHAVIOURS", "SimulatorServer", "SimulatorState", "base_urls", "build_app"]
