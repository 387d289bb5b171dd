"""A 413 every client reads (issue 21 item 5): a 2 MB body to real uvicorn processes of the chat and the
credit service, from httpx.AsyncClient (which sends its whole body before it reads), requests and
curl, is answered 413 with the sentence; the server reads and discards it rather than resetting the
connection under the upload."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
import requests

from tests.e2e.test_chat_flow import start_system

pytestmark = pytest.mark.e2e

BODY = b'{"message": "' + b"x" * (2 * 1024 * 1024) + b'"}'


@pytest.fixture(scope="module")
def system(tmp_path_factory, kafka_bootstrap, database_url):
    import asyncio

    from services.shared.db import migrate
    from tests.conftest import unique_name

    schema = unique_name("body_")
    asyncio.run(migrate(database_url, schema))
    systems = start_system(
        kafka_bootstrap,
        database_url,
        schema,
        unique_name() + ".",
        tmp_path_factory.mktemp("logs"),
        with_validation=False,
    )
    yield next(systems)
    systems.close()


async def pieces():
    for i in range(0, len(BODY), 65536):
        yield BODY[i : i + 65536]


def targets(system) -> list[tuple[str, dict]]:
    user = {"Authorization": f"Bearer {system.token('zed')}", "Content-Type": "application/json"}
    return [(f"{system.chat.url}/chat", user), (f"{system.credits.url}/api/user/deduct-credits", user)]


def refused(status: int, text: str) -> None:
    assert status == 413, text[:300]
    body = json.loads(text)
    assert "larger than 64 KiB" in (body.get("message") or body.get("detail")), body


async def test_httpx_async_client_reads_the_413(system):
    async with httpx.AsyncClient(timeout=30) as client:
        for url, headers in targets(system):
            for _ in range(3):  # and the connection stays usable for the next request
                r = await client.post(url, content=BODY, headers=headers)
                refused(r.status_code, r.text)
            # A body sent in chunks without a Content-Length is counted and drained too.
            r = await client.post(url, content=pieces(), headers=headers)
            refused(r.status_code, r.text)


def test_requests_reads_the_413(system):
    with requests.Session() as session:
        for url, headers in targets(system):
            r = session.post(url, data=BODY, headers=headers, timeout=30)
            refused(r.status_code, r.text)


def test_curl_reads_the_413(system, tmp_path):
    body = tmp_path / "body.json"
    body.write_bytes(BODY)
    for url, headers in targets(system):
        for expect in ([], ["-H", "Expect:"]):  # with curl's own 100-continue, and without it
            args = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-X", "POST", "--data-binary", f"@{body}"]
            args += [a for k, v in headers.items() for a in ("-H", f"{k}: {v}")] + expect + [url]
            done = subprocess.run(args, capture_output=True, text=True, timeout=60)
            text, _, status = done.stdout.rpartition("\n")
            refused(int(status), text)


async def test_a_body_beyond_the_drain_bound_is_refused_and_the_service_stays_up(system):
    huge = b"x" * (20 * 1024 * 1024)
    async with httpx.AsyncClient(timeout=30) as client:
        for url, headers in targets(system):
            try:
                r = await client.post(url, content=huge, headers=headers)
                refused(r.status_code, r.text)
            except httpx.TransportError:
                pass  # closed under the upload: allowed beyond the bound
            assert (await client.get(str(httpx.URL(url).copy_with(path="/healthz")))).status_code == 200
