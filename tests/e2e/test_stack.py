"""`make up` / `make down` (infra/stack.sh) on ports and a state folder of the test's own: up twice is
harmless, up brings back a part that died, down leaves no process of ours."""

import os
import signal
import subprocess
import time

import httpx
import pytest

from tests.support import ROOT, free_port, processes_with_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def processes_of(state_dir) -> set[int]:
    return processes_with_env("BYOK_STATE_DIR", str(state_dir))


def test_up_twice_restart_a_dead_part_and_down(private_state):
    ports = {
        name: str(free_port())
        for name in (
            "BYOK_KAFKA_PORT",
            "BYOK_KAFKA_CONTROLLER_PORT",
            "BYOK_PG_PORT",
            "SIM_PORT",
            "CHAT_PORT",
            "CREDITS_PORT",
            "VALIDATION_PORT",
        )
    }
    env = {**os.environ, **ports, "BYOK_STATE_DIR": str(private_state), "BYOK_KAFKA_HEAP": "512M"}
    for var in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "BYOK_EXTERNAL_KAFKA", "HTTP_PORT", "CREDITS_URL"):
        env.pop(var, None)

    def stack(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "infra/stack.sh", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )

    try:
        first = stack("up")
        assert first.returncode == 0, first.stderr[-3000:]
        started = processes_of(private_state)
        assert len(started) >= 6, "kafka, postgres and four services"
        for port in ("CHAT_PORT", "CREDITS_PORT", "VALIDATION_PORT", "SIM_PORT"):
            assert httpx.get(f"http://127.0.0.1:{ports[port]}/healthz", timeout=5).status_code == 200
        page = httpx.get(f"http://127.0.0.1:{ports['CHAT_PORT']}/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()

        second = stack("up")
        assert second.returncode == 0 and "already running" in second.stderr
        assert processes_of(private_state) == started, "a second up starts nothing new"

        credits_pid = int((private_state / "services" / "credits.pid").read_text())
        os.kill(credits_pid, signal.SIGKILL)
        time.sleep(0.5)
        third = stack("up")
        assert third.returncode == 0 and "credits starting" in third.stderr
        assert httpx.get(f"http://127.0.0.1:{ports['CREDITS_PORT']}/healthz", timeout=5).status_code == 200
    finally:
        down = stack("down")
    assert down.returncode == 0, down.stderr[-2000:]
    time.sleep(0.5)
    assert processes_of(private_state) == set(), "down leaves no process of ours"
