"""Identity tokens and the session-sealed key cookie (no services needed)."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest

from schemas.events import Provider
from services.chat.identity import AuthError, TokenReader, mint_token, read_token, token_from
from services.chat.key_session import KeyCookie, SessionKey, derive_secret

pytestmark = pytest.mark.unit
SECRET = "unit-test-secret-0123456789abcdef"
KEY = "sk-proj-unitTESTkey0123456789abcdefXYZ"


def sealer(ttl: int = 60) -> KeyCookie:
    return KeyCookie(derive_secret(SECRET, b"test"), ttl)


def test_token_round_trip_carries_user_role_and_session():
    who = read_token(SECRET, mint_token(SECRET, "alice", role="admin", session_id="s1"))
    assert (who.user_id, who.role, who.session_id, who.is_admin) == ("alice", "admin", "s1", True)


@pytest.mark.parametrize(
    "token",
    [
        mint_token("another-secret-0123456789abcdef", "alice"),  # forged
        mint_token(SECRET, "alice", ttl_s=-10),  # expired
        jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, algorithm="HS512"),  # other algorithm
        jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),  # no expiry
        "not-a-token",
    ],
)
def test_bad_tokens_are_refused(token):
    with pytest.raises(AuthError):
        read_token(SECRET, token)


@pytest.mark.parametrize(
    "token",
    [
        mint_token("another-secret-0123456789abcdef", "alice"),
        mint_token(SECRET, "alice", ttl_s=-10),
        "not-a-token",
    ],
)
def test_the_token_reader_refuses_what_read_token_refuses_every_time(token):
    reader = TokenReader(SECRET)
    for _ in range(2):
        with pytest.raises(AuthError):
            reader.read(token)
    assert reader._verified == {}


def test_the_token_reader_remembers_a_verified_token_only_until_it_expires():
    now = [time.time()]
    reader = TokenReader(SECRET, clock=lambda: now[0])
    token = mint_token(SECRET, "alice", ttl_s=60, session_id="s1")
    first = reader.read(token)
    assert (first.user_id, first.session_id) == ("alice", "s1")
    assert reader.read(token) is first  # not verified again
    now[0] += 61
    with pytest.raises(AuthError):  # expired: refused, though remembered
        reader.read(token)
    assert token not in reader._verified


def test_bearer_header_wins_over_cookie_and_other_schemes_are_refused():
    assert token_from("Bearer abc", "cookie") == "abc"
    assert token_from(None, "cookie") == "cookie"
    with pytest.raises(AuthError):
        token_from("Basic abc", None)
    with pytest.raises(AuthError):
        token_from(None, None)


def ring(*providers: Provider, ttl: int = 60) -> dict:
    return {p: SessionKey(uuid.uuid4(), p, KEY + p.value, "h", int(time.time()) + ttl) for p in providers}


def test_sealed_keys_open_only_for_their_user_and_session():
    box = sealer()
    keys = ring(Provider.OPENAI, Provider.GROQ)
    value = box.seal("alice", "s1", keys)
    assert KEY not in value and "unitTESTkey" not in value
    opened = box.open("alice", "s1", value)
    assert opened == keys and opened[Provider.GROQ].api_key == KEY + "groq"
    assert box.open("bob", "s1", value) == {}
    assert box.open("alice", "s2", value) == {}
    assert KEY not in repr(opened)
    assert 0 < box.max_age_s(keys) <= 60


def test_sealed_keys_expire_one_by_one_and_resist_tampering():
    box = sealer()
    mixed = {**ring(Provider.OPENAI, ttl=-1), **ring(Provider.GROQ)}
    assert box.open("alice", "s1", box.seal("alice", "s1", mixed)).keys() == {Provider.GROQ}
    value = box.seal("alice", "s1", ring(Provider.GROQ))
    flipped = value[:-3] + ("A" if value[-3] != "A" else "B") + value[-2:]
    assert box.open("alice", "s1", flipped) == {}
    assert box.open("alice", "s1", "garbage!") == {}
    # Another server secret cannot open it.
    assert KeyCookie(derive_secret("other-secret-0123456789", b"test"), 60).open("alice", "s1", value) == {}


def test_each_seal_is_fresh_ciphertext():
    box = sealer()
    keys = ring(Provider.OPENAI)
    assert box.seal("a", "s", keys) != box.seal("a", "s", keys)
