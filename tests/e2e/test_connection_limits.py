"""Limits per connection (services/shared/serving.py) against the real chat process: one client's
20,000 half-open connections, a 100 MB header and slow bodies leave another client's calls answered.

The normal client and the attacker each run in a process of their own (not threads of the test, whose
interpreter also serves the provider simulator), the normal client from another address (127.0.0.2:
another host, as far as the chat can tell). It sends one request after the other on a fresh connection
each time (so an exhausted server would show as refused connections), mostly `GET /api/model-settings`
(a signed-in read through the database) and every eighth a platform chat call (a hold, the provider, an
outbox row). Its p50, p99 and errors under each attack are printed and asserted (p99 < 1 s, no error).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack
from tests.e2e.test_chat_flow import ChatSystem, start_system, use_settings

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HALF_OPEN = 20_000
NORMAL_ADDRESS = "127.0.0.2"


def normal_client(url: str, token: str, stop, out) -> None:
    """Requests one after the other until `stop` is set; sends back (start, seconds, ok, what) each."""
    samples = []
    transport = httpx.HTTPTransport(local_address=NORMAL_ADDRESS)
    headers = {"Authorization": f"Bearer {token}", "Connection": "close"}
    with httpx.Client(base_url=url, transport=transport, headers=headers, timeout=15) as client:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                if i % 8 == 7:
                    r = client.post("/chat", json={"feature": "chat", "message": f"hello {i}"})
                else:
                    r = client.get("/api/model-settings")
                ok, what = r.status_code == 200, str(r.status_code)
            except httpx.HTTPError as exc:
                ok, what = False, type(exc).__name__
            samples.append((started, time.monotonic() - started, ok, what))
            i += 1
            time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
    out.send(samples)


def raise_open_files(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((max(wanted, hard), max(wanted, hard)), (min(wanted, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def half_open(port: int, n: int, hold_s: float, out) -> None:
    """Open `n` connections, each sending part of a request's headers, and keep them; `hold_s` after
    the last one, count how many the server has closed."""
    allowed = raise_open_files(n + 512)
    socks, failed = [], 0
    started = time.monotonic()
    for _ in range(min(n, allowed - 256)):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            s.send(b"POST /chat HTTP/1.1\r\nHost: chat\r\nContent-Type: application/json\r\n")
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    opened_in = time.monotonic() - started
    time.sleep(hold_s)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            s.recv(1024)  # an answer (408) or EOF: the server let go
            closed += 1
        except BlockingIOError:
            pass  # still open
        except OSError:
            closed += 1  # reset
        s.close()
    out.send({"tried": len(socks) + failed, "connect_failed": failed, "opened_in_s": opened_in, "closed": closed})


def big_header(port: int, seconds: float, out) -> None:
    """For `seconds`, again and again: one request whose header would be 100 MB, sent as fast as the
    server reads it."""
    chunk = b"a" * 65536
    attempts, sent_most, answers = 0, 0, set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        attempts += 1
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(b"GET /api/model-settings HTTP/1.1\r\nHost: chat\r\nX-Big: ")
                while sent < 100 * 1024 * 1024:
                    s.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            try:
                answers.add(s.recv(64).split(b"\r\n")[0].decode(errors="replace"))
            except OSError as exc:
                answers.add(type(exc).__name__)
        sent_most = max(sent_most, sent)
    out.send({"attempts": attempts, "most_bytes_sent": sent_most, "answers": sorted(answers)})


def slow_body(port: int, n: int, seconds: float, out) -> None:
    """`n` requests announcing a 60,000-byte body and sending one byte a second for `seconds`."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(
            b"POST /chat HTTP/1.1\r\nHost: chat\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n{"
        )
        socks.append(s)
    started, answers, cut_at = time.monotonic(), {}, []
    while socks and time.monotonic() - started < seconds:
        time.sleep(1)
        for s in list(socks):
            try:
                s.send(b" ")
            except OSError:
                pass
            s.setblocking(False)
            try:
                answer = s.recv(256).split(b"\r\n")[0].decode(errors="replace") or "closed"
            except BlockingIOError:
                continue  # still open
            except OSError:
                answer = "reset"
            answers[answer] = answers.get(answer, 0) + 1
            cut_at.append(time.monotonic() - started)
            socks.remove(s)
            s.close()
    for s in socks:
        s.close()
    out.send({"connections": n, "answers": answers, "still_open": len(socks), "cut_after_s": max(cut_at, default=None)})


def run_attack(target, *args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, theirs))
    proc.start()
    try:
        if not mine.poll(300):
            raise TimeoutError(f"{target.__name__} gave no result in 300 s")
        return mine.recv()
    finally:
        proc.join(30)


def chat_vitals(pid: int) -> tuple[int, int]:
    """Open files and resident memory (KiB) of the chat process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, rss


def figures(samples: list) -> dict:
    times = sorted(s[1] for s in samples)
    errors = [s[3] for s in samples if not s[2]]
    return {
        "requests": len(samples),
        "p50_ms": round(statistics.median(times) * 1000, 1) if times else None,
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 1) if times else None,
        "max_ms": round(times[-1] * 1000, 1) if times else None,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
    }


@pytest.fixture
def system(stack: Stack, tmp_path: Path) -> Iterator[ChatSystem]:
    yield from start_system(
        stack.kafka_bootstrap, stack.database_url, stack.database_schema, stack.topic_prefix, tmp_path / "logs"
    )


def test_one_clients_attacks_leave_another_clients_calls_answered(system: ChatSystem, tmp_path: Path):
    for plan_key in ("a", "b"):
        r = httpx.post(
            f"{system.credits.url}/api/admin/grants",
            json={"grant_key": f"limits:{plan_key}", "user_id": "norma", "plan": "standard"},
            headers={"Authorization": f"Bearer {system.token('ops', 'admin')}"},
        )
        assert r.status_code in (200, 201), r.text
    assert use_settings(system.client("norma"), "openai", "gpt-4o").status_code == 200
    port, pid = system.chat.port, system.chat.proc.pid

    ctx = multiprocessing.get_context("spawn")
    stop, (mine, theirs) = ctx.Event(), ctx.Pipe()
    client = ctx.Process(target=normal_client, args=(system.chat.url, system.token("norma"), stop, theirs))
    client.start()
    phases: list[tuple[str, float, float]] = []
    results: dict[str, dict] = {}
    vitals: dict[str, tuple[int, int]] = {}

    most: dict[str, tuple[int, int]] = {}  # the chat's most open files and memory during each phase
    current = ["start"]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            fds, rss = chat_vitals(pid)
            old = most.get(current[0], (0, 0))
            most[current[0]] = (max(old[0], fds), max(old[1], rss))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def phase(name: str, target=None, *args) -> None:
        current[0] = name
        started = time.monotonic()
        if target is None:
            time.sleep(args[0])
        else:
            results[name] = run_attack(target, *args)
        phases.append((name, started, time.monotonic()))
        vitals[name] = chat_vitals(pid)

    try:
        time.sleep(1)
        vitals["start"] = chat_vitals(pid)
        phase("baseline", None, 5)
        phase("half_open", half_open, port, HALF_OPEN, 13.0)  # held past the 10 s header timeout
        phase("big_header", big_header, port, 10.0)
        phase("slow_body", slow_body, port, 200, 40.0)  # past the 30 s body timeout
    finally:
        sampling.set()
        stop.set()
        samples = mine.recv() if mine.poll(60) else []
        client.join(30)

    report = {}
    for name, start, end in phases:
        report[name] = {
            "normal_client": figures([s for s in samples if start <= s[0] < end]),
            "attack": results.get(name),
            "chat_most_open_files": most.get(name, (0, 0))[0],
            "chat_most_rss_mib": round(most.get(name, (0, 0))[1] / 1024),
            "chat_open_files_after": vitals[name][0],
            "chat_rss_mib_after": round(vitals[name][1] / 1024),
        }
    report["chat_rss_mib_at_start"] = round(vitals["start"][1] / 1024)
    text = json.dumps(report, indent=2)
    print(text)
    (tmp_path / "connection_limits.json").write_text(text)

    for name, *_ in phases:
        seen = report[name]["normal_client"]
        assert seen["requests"] > 10, (name, seen)
        assert seen["errors"] == 0, (name, seen)
        assert seen["p99_ms"] < 1000, (name, seen)
    # One client never holds more than HTTP_MAX_CONNECTIONS_PER_CLIENT (1000) of the chat's files.
    assert report["half_open"]["chat_most_open_files"] < 1000 + 100, report["half_open"]
    half = report["half_open"]["attack"]
    assert half["tried"] >= min(HALF_OPEN, 15_000), half
    assert half["closed"] == half["tried"] - half["connect_failed"], "every half-sent request was closed"
    big = report["big_header"]["attack"]
    assert big["most_bytes_sent"] < 8 * 1024 * 1024, "the server stopped reading long before 100 MB"
    assert "HTTP/1.1 431 Request Header Fields Too Large" in big["answers"], big
    # Tens of thousands of refused headers cost no memory that stays: each refused connection is freed
    # at once (it used to live until its header timer fired, 10 s later: +150 MiB in CI). One 100 MB
    # header used to cost 140 MB by itself.
    assert report["big_header"]["chat_rss_mib_after"] < report["half_open"]["chat_rss_mib_after"] + 40, report
    slow = report["slow_body"]["attack"]
    assert slow["still_open"] == 0 and slow["answers"].get("HTTP/1.1 408 Request Timeout", 0) >= 1, slow
    assert report["slow_body"]["chat_open_files_after"] < 1000, "the slow bodies' connections were closed"
