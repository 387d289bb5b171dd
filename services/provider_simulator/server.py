"""Run the simulator with uvicorn in a background thread, on a free port (tests, benchmarks, demo)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from services.provider_simulator.app import SimulatorState, base_urls, build_app


class SimulatorServer:
    """`with SimulatorServer() as sim:` serves the simulator at `sim.base_url` until the block ends.

    Binds port 0 by default, so parallel tests never collide. `sim.state` is the live
    `SimulatorState`; `sim.env()` the base-URL settings pointing at it.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, state: SimulatorState | None = None):
        self.state = state or SimulatorState()
        self._host, self._port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("simulator not started")
        return f"http://{self._host}:{self.port}"

    def env(self) -> dict[str, str]:
        """`OPENAI_BASE_URL`, ... pointing at this simulator."""
        return base_urls(self.base_url)

    def start(self, timeout_s: float = 10) -> SimulatorServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(self.state),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="provider-simulator", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("provider simulator did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
