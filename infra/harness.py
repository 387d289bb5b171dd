"""Run the system's services as real processes on free ports: the one harness of the tests and the
benchmarks.

    with ServiceProcess("chat", "services.chat", env, log_dir) as chat:   # started and healthy
        httpx.get(chat.url + "/healthz")

    proc = ServiceProcess("credits", "services.credits", env, log_dir).launch()   # in async code
    await proc.wait_healthy()

Each process gets `HTTP_PORT` (a free one unless given) and writes its output to
`log_dir/<name>.log`, so a test can search the logs afterwards. Every wait has a timeout and fails
with the log's tail, never hangs.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]  # an AF_INET socket's name is (host, port)
        return port


def free_ports(n: int) -> int:
    """A port p with p .. p + n - 1 all free, below the ephemeral range (so that no outgoing
    connection takes one of them before the process meant for it binds it)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000 - n)
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


# The running stack's own ports (infra/stack.sh): never inherited by a process the harness starts.
STACK_PORT_VARIABLES = frozenset({"CHAT_PORT", "CREDITS_PORT", "VALIDATION_PORT", "SIM_PORT", "HTTP_PORT"})


class ServiceProcess:
    """One service run as `python -m <module>`, with its output kept in a log file."""

    def __init__(self, name: str, module: str, env: dict[str, str], log_dir: Path, port: int | None = None):
        self.name, self.module = name, module
        self.port = port or free_port()
        # Local runs: the services accept their development defaults (see refuse_default_secrets).
        # The port is the harness's own: a stack's CHAT_PORT exported in the shell would win over
        # HTTP_PORT in the chat's settings and point the process (and a benchmark) at the wrong port.
        inherited = {k: v for k, v in os.environ.items() if k not in STACK_PORT_VARIABLES}
        self.env = {
            "BYOK_ENV": "development",
            **inherited,
            **env,
            "HTTP_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
        }
        self.log_path = Path(log_dir) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> ServiceProcess:
        """Start the process and return at once (see `wait_healthy`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def start(self, timeout_s: float = 60) -> ServiceProcess:
        """Start the process and wait (blocking) until its `/healthz` answers 200."""
        self.launch()
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_alive()
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not become healthy in {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    async def wait_healthy(self, timeout_s: float = 60) -> None:
        """Wait, without blocking the event loop, until `/healthz` answers 200."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                self._check_alive()
                try:
                    if (await client.get(self.url + "/healthz", timeout=1)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} not healthy in {timeout_s} s:\n{self.log_tail()}")

    def _check_alive(self) -> None:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 20) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; the exit code (None if it never ran)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None

    def kill(self) -> None:
        """SIGKILL: the process dies at once, mid-whatever it was doing."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 3000) -> str:
        return self.logs()[-n:]

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
