"""The benchmarks' load generator: its lean HTTP client and its open-loop schedule (no services needed)."""

from __future__ import annotations

import asyncio

import pytest

from bench.loadgen import HttpFailed, LeanClient, steady
from services.provider_simulator.server import SimulatorServer

pytestmark = pytest.mark.unit


async def test_the_lean_client_answers_and_reuses_its_connection():
    with SimulatorServer() as sim:
        async with LeanClient(sim.base_url) as client:
            raw = client.prepare(
                "POST",
                "/groq/openai/v1/chat/completions",
                json_body={"model": "llama3-8b-8192", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": "Bearer gsk_valid0000000000000000000001"},
            )
            for _ in range(3):
                answer = await client.send(raw)
                assert answer.status == 200 and answer.json()["choices"][0]["message"]["content"]
            assert client.connections == 1
            refused = await client.send(
                client.prepare(
                    "GET", "/groq/openai/v1/models", headers={"Authorization": "Bearer gsk_invalid000000000000000001"}
                )
            )
            assert refused.status == 401


async def test_a_connection_the_server_closed_while_idle_is_not_reused():
    served = 0

    async def one_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # as a server does at its keep-alive timeout, without saying so first

    server = await asyncio.start_server(one_answer_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with LeanClient(f"http://127.0.0.1:{port}") as client:
            raw = client.prepare("GET", "/")
            assert (await client.send(raw)).body == b"ok"
            await asyncio.sleep(0.05)
            assert (await asyncio.wait_for(client.send(raw), 2)).body == b"ok"
            assert served == 2
    finally:
        server.close()
        await server.wait_closed()


async def test_a_refused_connection_fails_at_once():
    async with LeanClient("http://127.0.0.1:9") as client:
        with pytest.raises(HttpFailed):
            await client.send(client.prepare("GET", "/"))


async def test_steady_runs_open_loop_and_counts_every_failure():
    async def send(i: int) -> bool:
        if i % 10 == 3:
            return False
        if i % 10 == 5:
            raise HttpFailed("broken")
        if i == 7:
            await asyncio.sleep(60)  # never answers within the drain time
        await asyncio.sleep(0.02)
        return True

    run = await steady(100, 0.5, send, drain_s=0.5)
    assert run.planned == 50
    assert run.failures == 5 + 5 + 1
    assert len(run.latencies) == 50 - 11
    # Open loop: slow answers did not slow the schedule (50 starts in ~0.5 s, each ~20 ms long).
    assert all(19 <= ms < 400 for ms in run.latencies)


async def test_steady_measures_from_the_scheduled_time_so_a_late_generator_shows_as_latency():
    async def send(i: int) -> bool:
        if i == 0:
            import time

            time.sleep(0.1)  # the generator's own loop is blocked: later requests start late
        return True

    run = await steady(100, 0.2, send)
    assert run.failures == 0 and run.late_starts > 0
    assert max(run.latencies) >= 50  # the requests due during the block waited for it
