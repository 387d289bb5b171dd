"""Provider simulator: one local HTTP server that speaks OpenAI, Anthropic, Groq and Gemini.

A test and demo tool (LLM providers are unreachable here). Each provider lives under its own path
prefix, and below it the provider's real paths, auth headers, status codes and error bodies:

| provider  | base URL to configure               | model list             | chat                                       | streamed chat |
|-----------|-------------------------------------|------------------------|--------------------------------------------|---------------|
| OpenAI    | `OPENAI_BASE_URL=<sim>/openai/v1`   | `GET  /models`         | `POST /chat/completions`                   | same, `stream: true` |
| Groq      | `GROQ_BASE_URL=<sim>/groq`          | `GET  /openai/v1/models` | `POST /openai/v1/chat/completions`       | same, `stream: true` |
| Anthropic | `ANTHROPIC_BASE_URL=<sim>/anthropic`| `GET  /v1/models`      | `POST /v1/messages`                        | same, `stream: true` |
| Gemini    | `GEMINI_BASE_URL=<sim>/gemini`      | `GET  /v1beta/models`  | `POST /v1beta/models/{model}:generateContent` | `POST /v1beta/models/{model}:streamGenerateContent?alt=sse` |

Gemini answers the same under `/v1` (where google-genai 3.x calls by default).
(`SimulatorServer.env()` / `base_urls(root)` give these.) Auth: OpenAI and Groq `Authorization: Bearer`,
Anthropic `x-api-key` or `Authorization: Bearer` (the current SDK sends its key that way) plus a
required `anthropic-version` (any date), Gemini `x-goog-api-key` (or `?key=`). Chat answers carry the
real usage fields. The official SDKs are its clients in `tests/unit/test_simulator_sdks.py`.

## Streams

In each provider's own wire format (`text/event-stream`), one text piece per word:

- OpenAI: `data: {chat.completion.chunk}` events (the first with the role, one per piece, one with
  `finish_reason`), with `stream_options.include_usage` a last chunk with empty `choices` and `usage`
  (`prompt_tokens`, `completion_tokens`, `total_tokens`), then `data: [DONE]`.
- Groq: the same, plus `x_groq` (`id` in the first and last chunk, `usage` in the last chunk's
  `x_groq.usage`, as Groq sends it whether or not `include_usage` is asked).
- Anthropic: `event:` + `data:` pairs: `message_start` (`usage.input_tokens`), `content_block_start`,
  `ping`, `content_block_delta` (`text_delta`) per piece, `content_block_stop`, `message_delta`
  (`stop_reason`, `usage.output_tokens`), `message_stop`.
- Gemini: `data: {GenerateContentResponse}` per piece; the last has `finishReason` and the whole
  `usageMetadata` (`promptTokenCount`, `candidatesTokenCount`). Without `alt=sse`, one JSON array.

## Which keys are accepted

A key's *behaviour* decides the answer: `valid`, `invalid`, `revoked`, `no_quota`, `denied`
(permission), `rate_limited`, `slow` (waits `delay_ms`, default 5000, then answers as valid),
`down` (a 5xx: OpenAI/Groq 503, Anthropic 529 overloaded_error, Gemini 503 UNAVAILABLE; `status`
overrides the code). The stream behaviours are keys that work (model list and plain chat answer as
`valid`, at once) whose *streams* go wrong, halfway through the pieces:

| behaviour | marker | what a stream does |
|---|---|---|
| `stream_fail` | `streamfail` | sends the provider's error event and ends the body: OpenAI/Groq `data: {"error": {"type": "server_error", ...}}`, Anthropic `event: error` with `overloaded_error`, Gemini `data: {"error": {"code": 503, "status": "UNAVAILABLE"}}` |
| `stream_stall` | `streamstall` | stops sending without closing for `delay_ms` (default 300000, 5 minutes), then goes on |
| `stream_cut` | `streamcut` | closes the connection without ending the body (no usage, no end event) |
| `stream_slow` | `streamslow` | sends `chunks` pieces (default 40) `delay_ms` apart (default 200): time to press Stop |

The behaviour of a key is, in order:

1. the one registered for it with `POST /_sim/keys`;
2. else a marker word in the key, case-insensitive, first match in this order: `streamfail`,
   `streamstall`, `streamcut`, `streamslow`, `revoked`, `noquota`, `denied`, `ratelimited`, `slow`,
   `down`, `invalid`, `valid` (e.g. `sk-valid-000000000000000001`, `sk-ant-api03-revoked-0000000001`,
   `gsk_noquota000000000000001`, `AIzaSyDenied00000000000000000001`, `sk-proj-streamcut-00000000000000001`);
3. else the default behaviour (`invalid`, like a real provider facing an unknown key).

An outage (`POST /_sim/outage`) makes every call to a provider answer 5xx whatever the key.
How streams ended is counted (`completed`, `failed`, `cut`, `abandoned`: the client went away first,
as a Stop does): `GET /_sim/calls` `streams`, `state.streams()`.

## Control API (JSON)

- `POST /_sim/keys` `{"key": "...", "behaviour": "revoked", "delay_ms": 0, "status": null,
  "providers": null, "chunks": null}`: register a key (e.g. the platform keys); `providers` limits it
  to some providers (elsewhere it is `invalid`); `delay_ms` and `chunks` as in the table above. Also
  `{"keys": [...], "behaviour": ...}` for several.
- `DELETE /_sim/keys`: forget registered keys.
- `POST /_sim/default` `{"behaviour": "invalid"}`: the behaviour of keys with no rule.
- `POST /_sim/outage` `{"provider": "openai", "status": 503}` / `DELETE /_sim/outage`.
- `POST /_sim/calls` `{"key": "..."}` -> `{"calls": n, "by_provider": {...}}`: provider calls made
  with that key (keys travel in bodies, never in URLs, so no access log can hold them).
- `GET /_sim/calls` -> `{"total": n, "by_provider": {...}, "by_endpoint": {...}, "streams": {...}}`
  (endpoints `models`, `chat`, `stream`).
- `POST /_sim/reset`: forget keys, counts, outages and the default.
- `GET /healthz`.

## Layout

`app.py` builds the app (control API, and each provider's routes under its mount); each provider's
paths, auth, answers and stream events are in its own module (`openai.py`, `groq.py`, `anthropic.py`, `gemini.py`,
each a `base.SimulatedProvider`), listed in `registry.py`; `base.py` the stream plumbing they share (`stream_script`: pieces, pauses, the failure midway;
`EventStream`: plays it, listening for the client going away); `state.py` holds key rules and counts;
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
