"""Groq as the simulator speaks it: OpenAI's API under `/openai/v1`, with Groq's own wording."""

from __future__ import annotations

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
