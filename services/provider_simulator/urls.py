"""Where each provider lives on a simulator: the one source of the base URLs for the services.

`python -m services.provider_simulator --print-urls` prints them as `NAME=URL` lines (infra/stack.sh
reads them); docker-compose.yml spells out the same URLs for its `simulator` service, and a unit test
(tests/unit/test_compose.py) holds the two together.
"""

from __future__ import annotations


def base_urls(root: str) -> dict[str, str]:
    """The four base-URL settings (env names) that point the services at a simulator at `root`."""
    root = root.rstrip("/")
    return {
        "OPENAI_BASE_URL": f"{root}/openai/v1",
        "GROQ_BASE_URL": f"{root}/groq",
        "ANTHROPIC_BASE_URL": f"{root}/anthropic",
        "GEMINI_BASE_URL": f"{root}/gemini",
    }
