"""No raw key at rest, anywhere: after a full run with a known key, its bytes are in none of Kafka's
log directory, PostgreSQL's data (tables and files), the services' logs or any HTTP response."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import ROOT
from tests.e2e.test_chat_flow import start_system

pytestmark = pytest.mark.e2e

# Unique to this run's test, so a hit can only come from it.
KNOWN_KEY = "sk-proj-valid-SECRETcanary" + "Q7w9X2" * 4
# A key sent per request to the OpenAI-compatible gateway (X-Provider-Key), used for that call only.
GATEWAY_KEY = "sk-ant-api03-valid-GATEWAYcanary" + "R8t4Y6" * 4
NEEDLES = [KNOWN_KEY.encode(), KNOWN_KEY[13:].encode(), GATEWAY_KEY.encode(), GATEWAY_KEY[19:].encode()]


def grep_tree(folder: Path, needle: bytes) -> list[str]:
    done = subprocess.run(["grep", "-rlaF", "--", needle.decode(), str(folder)], capture_output=True, text=True)
    # 1 = no match. 2 = an error, which is fine only for files deleted while grep walked the tree
    # (PostgreSQL drops other tests' temporary and dropped-schema files meanwhile).
    vanished = all(line.endswith("No such file or directory") for line in done.stderr.splitlines())
    assert done.returncode in (0, 1) or (done.returncode == 2 and vanished), done.stderr
    return done.stdout.split()


async def rows_mentioning(url: str, schema: str, needle: str) -> list[str]:
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        tables = [
            r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        ]
        hits = []
        for table in tables:
            n = await conn.fetchval(
                f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE $1 OR '
                f"encode(convert_to(t::text, 'UTF8'), 'escape') LIKE $1",
                f"%{needle}%",
            )
            # bytea columns print as hex in t::text: look for the hex of the key too.
            n += await conn.fetchval(
                f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE $1', f"%{needle.encode().hex()}%"
            )
            if n:
                hits.append(f"{table}: {n}")
        await conn.execute("CHECKPOINT")  # table and WAL pages reach the data folder's files
        return hits
    finally:
        await conn.close()


def test_a_known_key_is_nowhere_at_rest(private_kafka, database_url, db_schema, tmp_path: Path):
    bodies: list[bytes] = []

    def keep(response: httpx.Response) -> httpx.Response:
        bodies.append(response.content)
        bodies.append(str(response.headers).encode())
        return response

    log_dir = tmp_path / "logs"
    for system in start_system(private_kafka.bootstrap, database_url, db_schema, "", log_dir):
        system.grant("secret-user", "free")
        with httpx.Client(base_url=system.chat.url, timeout=30, event_hooks={"response": [lambda r: r.read()]}) as web:
            keep(web.post("/auth/dev-login", json={"user_id": "secret-user"}))
            r = keep(
                web.post(
                    "/settings/model",
                    json={"provider": "openai", "model": "gpt-4o", "use_own_key": True, "api_key": KNOWN_KEY},
                )
            )
            assert r.status_code == 200 and r.json()["status"] == "valid", r.text
            keep(web.get("/api/model-settings"))
            for feature in ("chat", "chat", "code_fix"):
                assert keep(web.post("/chat", json={"feature": feature, "message": "hello"})).status_code == 200
            # A failing call on the key, a refused re-check, and a validation error carrying the key.
            system.sim.state.register(KNOWN_KEY, "no_quota")
            assert keep(web.post("/chat", json={"feature": "chat", "message": "again"})).status_code == 502
            keep(
                web.post(
                    "/settings/model",
                    json={"provider": "openai", "model": "gpt-4o", "use_own_key": True, "api_key": KNOWN_KEY},
                )
            )
            keep(web.post("/settings/model", json={"provider": "nope", "model": "x", "api_key": KNOWN_KEY}))
            keep(web.post("/chat", json={"feature": "chat", "message": KNOWN_KEY[:3], "api_key": KNOWN_KEY}))
            keep(web.get("/api/model-settings"))
            keep(web.get("/api/balance"))
            keep(web.get("/metrics"))
            keep(web.post("/settings/model", json={"provider": "openai", "model": "gpt-4o", "use_own_key": False}))
            # The gateway with a key per request: plain, streamed, failing, refused, and a wrong model.
            own = {"Authorization": f"Bearer {system.token('secret-user')}", "X-Provider-Key": GATEWAY_KEY}
            claude = {"model": "claude-3-5-haiku", "messages": [{"role": "user", "content": "hi"}]}
            assert keep(web.post("/v1/chat/completions", json=claude, headers=own)).status_code == 200
            assert (
                keep(web.post("/v1/chat/completions", json={**claude, "stream": True}, headers=own)).status_code == 200
            )
            keep(web.post("/v1/chat/completions", json={**claude, "model": "gpt-4o"}, headers=own))  # wrong provider
            keep(web.post("/v1/chat/completions", json={**claude, "messages": []}, headers=own))
            system.sim.state.register(GATEWAY_KEY, "revoked")
            # The provider refused the user's own key: the gateway's 403 (PermissionDeniedError), whose
            # sentence names the provider and never the key.
            assert keep(web.post("/v1/chat/completions", json=claude, headers=own)).status_code == 403
            keep(web.post("/auth/logout"))
        assert system.sim.state.calls(KNOWN_KEY) >= 3  # the key really was used
        assert system.sim.state.calls(GATEWAY_KEY) >= 3
        # free plan twice (test grant + dev sign-in welcome grant), one code_fix
        assert system.wait_balance("secret-user", 99) == 99  # the run really went through the ledger

    hits = {}
    for needle in NEEDLES:
        hits["http"] = hits.get("http", 0) + sum(needle in b for b in bodies)
        hits["kafka"] = grep_tree(private_kafka.state_dir / "kafka", needle)
        hits["logs"] = grep_tree(log_dir, needle)
        hits["tables"] = asyncio.run(rows_mentioning(database_url, db_schema, needle.decode()))
        hits["postgres files"] = grep_tree(ROOT / ".run" / "postgres" / "data", needle)
        assert hits == {"http": 0, "kafka": [], "logs": [], "tables": [], "postgres files": []}, needle
    # Positive controls: the same searches do find what is meant to be there (the user id and the hint).
    assert grep_tree(private_kafka.state_dir / "kafka", b"secret-user")
    assert grep_tree(ROOT / ".run" / "postgres" / "data", b"secret-user")
    assert asyncio.run(rows_mentioning(database_url, db_schema, "secret-user"))
    assert any("sk-proj-…".encode() + KNOWN_KEY[-4:].encode() in b for b in bodies)
    assert all((log_dir / f"{name}.log").exists() for name in ("chat", "credits", "validation"))
