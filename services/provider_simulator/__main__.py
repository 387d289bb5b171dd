"""`python -m services.provider_simulator [--host H] [--port 8090]`: serve the provider simulator.

Point the services at it with the base URLs it prints (`--print-urls` prints only those) (see the package docstring for the control
API). Env: `SIM_HOST`, `SIM_PORT`, `SIM_VALID_KEYS` (comma-separated keys to accept on every
provider, e.g. the platform keys of a demo stack, whatever their shape).
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

from services.provider_simulator.app import SimulatorState, base_urls, build_app
from services.shared.serving import server_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default=os.environ.get("SIM_HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("SIM_PORT", "8090")))
    ap.add_argument(
        "--print-urls",
        action="store_true",
        help="print the base-URL settings (NAME=URL lines) for this host and port, and exit",
    )
    args = ap.parse_args(argv)
    if args.print_urls:
        for name, url in base_urls(f"http://{args.host}:{args.port}").items():
            print(f"{name}={url}")
        return 0
    for name, url in base_urls(f"http://{args.host}:{args.port}").items():
        print(f"{name}={url}", file=sys.stderr)
    # No access log: a Gemini client may put a key in the query string (?key=).
    state = SimulatorState()
    for key in filter(None, (k.strip() for k in os.environ.get("SIM_VALID_KEYS", "").split(","))):
        state.register(key, "valid")
    # uvicorn with the limits per connection every service has (services/shared/serving.py).
    uvicorn.Server(server_config(build_app(state), args.host, args.port)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
