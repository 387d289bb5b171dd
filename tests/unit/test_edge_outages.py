"""The shared HTTP edge (issue 21 items 4 and 6): every client error of an outage is a 503 with a
sentence, by class, while a real bug stays a 500; a body that cannot be read is told by its cause."""

from __future__ import annotations

import asyncpg
import pytest
from aiokafka.errors import IllegalStateError, KafkaConnectionError, NodeNotReadyError, RecordTooLargeError
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from services.shared.db import database_away, database_unreachable
from services.shared.edge import install_http_error_handler, install_outage_handlers
from services.shared.kafka import kafka_away

pytestmark = pytest.mark.unit

OUTAGES = [
    asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    asyncpg.exceptions.ProtocolError("unexpected message"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.InterfaceError("pool is closing"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.exceptions.ConnectionFailureError("server closed the connection unexpectedly"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
    ConnectionRefusedError(111, "Connect call failed"),
    ConnectionResetError(104, "Connection reset by peer"),
    OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 5432)"),
    TimeoutError(),
]
BUGS = [
    asyncpg.exceptions.DataError("invalid input for query argument $1"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    asyncpg.exceptions.UndefinedTableError('relation "nope" does not exist'),
    FileNotFoundError(2, "No such file or directory"),
    PermissionError(13, "Permission denied"),
    ValueError("a bug"),
]


class Body(BaseModel):
    n: int


def app_raising(error: BaseException) -> TestClient:
    app = FastAPI()
    body = lambda code, sentence: {"error": code, "message": sentence}  # noqa: E731
    install_outage_handlers(app, body)
    install_http_error_handler(app, body)

    @app.get("/boom")
    async def boom() -> dict:
        raise error

    @app.post("/n")
    async def n(b: Body) -> dict:
        return {"n": b.n}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("error", OUTAGES, ids=lambda e: f"{type(e).__name__}:{e}"[:60])
def test_a_database_outage_is_a_503_with_a_sentence(error):
    assert database_away(error) and database_unreachable(error)
    r = app_raising(error).get("/boom")
    assert r.status_code == 503 and r.json()["error"] == "database_unavailable", r.text
    assert "database is not reachable" in r.json()["message"] and r.headers["retry-after"]


@pytest.mark.parametrize("error", BUGS, ids=lambda e: f"{type(e).__name__}:{e}"[:60])
def test_a_bug_is_not_passed_off_as_an_outage(error):
    assert not database_away(error)
    assert app_raising(error).get("/boom").status_code == 500


@pytest.mark.parametrize("error", [KafkaConnectionError("refused"), NodeNotReadyError("node 1")])
def test_a_kafka_outage_is_a_503_and_a_misuse_of_the_client_is_not(error):
    assert kafka_away(error)
    r = app_raising(error).get("/boom")
    assert r.status_code == 503 and r.json()["error"] == "event_log_unavailable"
    for bug in (IllegalStateError("producer closed"), RecordTooLargeError("too big")):
        assert not kafka_away(bug)
        assert app_raising(bug).get("/boom").status_code == 500


def test_a_too_large_json_number_is_told_as_such_and_bad_utf8_as_bad_utf8():
    client = app_raising(ValueError())
    r = client.post("/n", content=b'{"n": ' + b"9" * 5000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "number too large" in r.json()["message"], r.text
    assert "UTF-8" not in r.json()["message"]
    r = client.post("/n", content=b'{"n": "\xff"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "UTF-8" in r.json()["message"], r.text
    assert client.post("/n", json={"n": 7}).json() == {"n": 7}
