"""Groq as the simulator speaks it: OpenAI's API under `/openai/v1`, with Groq's own wording. Its
streams are OpenAI's chunks plus `x_groq`: the request id in the first and last chunk, and the usage
(with Groq's timings) in the last chunk's `x_groq.usage`; with `stream_options.include_usage` also
OpenAI's usage chunk."""

from __future__ import annotations

from services.provider_simulator.base import Json
from services.provider_simulator.openai import OpenAI


class Groq(OpenAI):
    name = "groq"
    display_name = "Groq"
    mount = "/groq"
    base_url_env = "GROQ_BASE_URL"
    base_url_path = "/groq"
    api_prefix = "/openai/v1"
    models = [
        "llama-3.3-70b-versatile",
        "llama3-8b-8192",
        "gemma2-9b-it",
        "qwen-qwq-32b",
        "deepseek-r1-distill-llama-70b",
    ]
    invalid_key_message = "Invalid API Key"
    denied_code = "permission_denied"

    def first_chunk_extra(self, request_id: str) -> Json:
        return {"x_groq": {"id": request_id}}

    def last_chunk_extra(self, request_id: str, usage: dict[str, int]) -> Json:
        timed = {**usage, "queue_time": 0.01, "prompt_time": 0.001, "completion_time": 0.02, "total_time": 0.021}
        return {"x_groq": {"id": request_id, "usage": timed}}

    def usage_chunk_extra(self, request_id: str, usage: dict[str, int]) -> Json:
        return {"x_groq": {"id": request_id, "usage": usage}}
