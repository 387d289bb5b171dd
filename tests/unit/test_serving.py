"""services/shared/serving.py: the limits per connection, on a real uvicorn server (a thread of the
test, short timeouts) and raw sockets."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from infra.harness import free_port
from services.shared.serving import ServingSettings, raise_open_files, server_config

pytestmark = pytest.mark.unit

LIMITS = ServingSettings(
    header_timeout_s=0.5, body_timeout_s=0.5, keepalive_s=1, max_connections_per_client=5, max_in_flight=2
)
release = threading.Event()


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/wait":
        while not release.is_set():
            await asyncio.sleep(0.01)
    answer = json.dumps({"got": len(body)}).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(answer)).encode())]}
    )
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, LIMITS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(10)


def connect(port: int, data: bytes = b"", source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    if data:
        s.sendall(data)
    return s


def read_all(s: socket.socket, timeout_s: float = 3) -> bytes:
    s.settimeout(timeout_s)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        out += b"<reset>"
    finally:
        s.close()
    return out


GET = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


def test_a_normal_request_is_answered(port):
    assert read_all(connect(port, GET)).startswith(b"HTTP/1.1 200 OK")


def test_headers_over_the_limit_get_431_and_the_server_stops_reading(port):
    s = connect(port, b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: ")
    sent = 0
    try:
        while sent < 50 * 1024 * 1024:
            s.sendall(b"a" * 65536)
            sent += 65536
    except OSError:
        pass
    assert sent < 10 * 1024 * 1024, "refused long before 50 MB"
    answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), answer[:80]


def test_headers_that_do_not_finish_in_time_get_408_and_a_silent_connection_is_closed(port):
    started = time.monotonic()
    assert read_all(connect(port, b"GET / HTTP/1.1\r\nHost: t\r\n")).startswith(b"HTTP/1.1 408 Request Timeout")
    assert read_all(connect(port)) == b"", "no answer to a connection that never sent a byte"
    assert time.monotonic() - started < 3


def test_a_body_that_does_not_finish_in_time_gets_408(port):
    s = connect(port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
    started = time.monotonic()
    answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout") and 0.4 < time.monotonic() - started < 3


def test_a_kept_alive_connection_serves_requests_then_closes_when_idle(port):
    s = connect(port)
    s.settimeout(3)
    for _ in range(3):  # each request gets the full time for its headers, then the keep-alive time
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
        time.sleep(0.3)
    assert read_all(s) == b"", "closed after the keep-alive time"


def test_connections_beyond_the_per_client_cap_are_closed_while_another_client_is_served(port):
    held = [connect(port) for _ in range(LIMITS.max_connections_per_client)]
    time.sleep(0.1)
    try:
        assert read_all(connect(port, GET)) in (b"", b"<reset>")
        assert read_all(connect(port, GET, source="127.0.0.2")).startswith(b"HTTP/1.1 200 OK")
    finally:
        for s in held:
            s.close()
    time.sleep(0.1)
    assert read_all(connect(port, GET)).startswith(b"HTTP/1.1 200 OK"), "the count went down as they closed"


def test_requests_beyond_the_in_flight_limit_get_503(port):
    release.clear()
    waiting = [connect(port, b"GET /wait HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n") for _ in range(2)]
    time.sleep(0.2)
    try:
        answer = read_all(connect(port, GET))
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 5" in answer.lower()
    finally:
        release.set()
    assert all(read_all(s).startswith(b"HTTP/1.1 200 OK") for s in waiting)


def test_the_open_files_limit_is_raised_towards_what_the_connections_need():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert raise_open_files(min(4096, hard)) == min(4096, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(4096, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
