"""A bounded schemathesis run over the chat and credit APIs, as real processes on the real broker and
database (the provider simulator as the only fake): zero 5xx and zero schema violations. First, the
live servers refuse an oversized body (declared or chunked) with 413 before reading it.

Also `make fuzz`. Each run writes a HAR file of every request it sent; the test counts them and the
5xx answers among them, and prints both (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from infra.harness import ServiceProcess
from services.provider_simulator import SimulatorServer
from services.shared.auth import mint_token
from tests.conftest import Stack

pytestmark = pytest.mark.e2e
SECRET = "fuzz-test-secret-0123456789abcdef"
# Test cases per API operation and phase: enough to reach every field's bounds, bounded in time.
MAX_EXAMPLES = int(os.environ.get("BYOK_FUZZ_EXAMPLES", "25"))
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@dataclass
class Apis:
    chat: ServiceProcess
    credits: ServiceProcess


@pytest.fixture
def apis(stack: Stack, tmp_path: Path) -> Iterator[Apis]:
    env = {**stack.env(), "AUTH_JWT_SECRET": SECRET, "LOG_LEVEL": "WARNING"}
    with SimulatorServer() as sim:
        with ServiceProcess("credits", "services.credits", {**env, "DEDUCT_WAIT_S": "2"}, tmp_path) as credits:
            chat_env = {
                **env,
                **sim.env(),
                "CREDITS_URL": credits.url,
                "CHAT_DEV_LOGIN": "true",
                "COOKIE_SECURE": "false",
                "KEY_CHECK_TIMEOUT_S": "1",
            }
            with ServiceProcess("chat", "services.chat", chat_env, tmp_path) as chat:
                yield Apis(chat, credits)


def raw_post(port: int, path: str, headers: str, body: bytes) -> bytes:
    """Send a request's head and `body` over a plain socket, then read what the server answers and
    closes (the body may be incomplete: a server that waited for the rest would time out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}\r\n".encode())
        s.sendall(body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


def fuzz(name: str, base_url: str, token: str, report_dir: Path) -> tuple[subprocess.CompletedProcess, Counter]:
    """One schemathesis run over `base_url`'s OpenAPI document; the statuses of every request sent."""
    har = report_dir / f"{name}.har"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{base_url}/openapi.json",
            "--checks",
            CHECKS,
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "20261202",
            "--header",
            f"Authorization: Bearer {token}",
            "--request-timeout",
            "20",
            # One worker: with two threads, hypothesis's lambda descriptions call ast.parse at once, which
            # CPython 3.11 does not survive (SystemError: AST constructor recursion depth mismatch).
            "--workers",
            "1",
            "--suppress-health-check",
            "all",
            "--report",
            "har",
            "--report-har-path",
            str(har),
        ],
        # In the test's folder: schemathesis keeps a cache where it runs.
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "NO_COLOR": "1"},
        cwd=report_dir,
    )
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    return done, Counter(e["response"]["status"] for e in entries)


def test_live_apis_refuse_big_bodies_and_schemathesis_finds_no_5xx_or_schema_violation(apis: Apis, tmp_path: Path):
    # 100 MB announced and none of it sent: answered 413 at once, unauthenticated, without waiting.
    for service, path in [(apis.chat, "/chat"), (apis.credits, "/api/admin/grants")]:
        answer = raw_post(service.port, path, "Content-Length: 104857600\r\n", b"")
        assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
        assert b"64 KiB" in answer
        # Chunked, no length announced and no end sent: counted as it arrives, refused past 64 KiB.
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        answer = raw_post(service.port, path, "Transfer-Encoding: chunked\r\n", chunk * 5)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:300]

    admin = mint_token(SECRET, "fuzz-admin", role="admin", ttl_s=3600)
    user = mint_token(SECRET, "fuzz-user", ttl_s=3600)
    r = httpx.post(
        f"{apis.credits.url}/api/admin/grants",
        headers={"Authorization": f"Bearer {admin}"},
        json={"grant_key": "fuzz", "user_id": "fuzz-user", "plan": "standard"},
    )
    assert r.status_code == 201, r.text

    summary = {}
    for name, url, token in [("chat", apis.chat.url, user), ("credits", apis.credits.url, admin)]:
        done, statuses = fuzz(name, url, token, tmp_path)
        server_errors = sum(n for status, n in statuses.items() if status >= 500 and status != 503)
        summary[name] = {
            "requests": sum(statuses.values()),
            "5xx": sum(n for s, n in statuses.items() if s >= 500),
            "statuses": dict(sorted(statuses.items())),
        }
        print(f"\n[fuzz] {name}: {summary[name]}")
        assert done.returncode == 0, f"{name}:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
        assert sum(statuses.values()) > 50, f"{name}: too few requests generated\n{done.stdout[-3000:]}"
        assert server_errors == 0, summary[name]
        # Both dependencies are up, so not even a 503 is expected.
        assert summary[name]["5xx"] == 0, (summary[name], done.stdout[-3000:])
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert "Traceback" not in apis.chat.log_tail(100_000) + apis.credits.log_tail(100_000)
