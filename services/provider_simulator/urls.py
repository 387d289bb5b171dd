"""Where each provider lives on a simulator: the one source of the base URLs for the services.

`python -m services.provider_simulator --print-urls` prints them as `NAME=URL` lines (infra/stack.sh
reads them); docker-compose.yml spells out the same URLs for its `simulator` service, and a unit test
(tests/unit/test_compose.py) holds the two together.
"""

from __future__ import annotations

from services.provider_simulator.registry import SIMULATED


def base_urls(root: str) -> dict[str, str]:
    """The base-URL settings (env names) that point the services at a simulator at `root`."""
    root = root.rstrip("/")
    return {p.base_url_env: root + p.base_url_path for p in SIMULATED.values()}
