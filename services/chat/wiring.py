"""What the chat's HTTP edge needs, built by the composition root (`bootstrap.py`) or by a test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.chat.calls import ChatCalls
from services.chat.credit_account import CreditAccount
from services.chat.key_session import KeyCookie
from services.chat.service import ChatService
from services.chat.usage import UsageReader
from services.shared.sessions import SessionRevocations


@dataclass
class Wiring:
    service: ChatService
    calls: ChatCalls
    key_cookie: KeyCookie
    balances: CreditAccount
    # Dev sign-in's welcome grant; None = no grant.
    grant_plan: Callable[[str], object] | None = None
    healthy: Callable[[], object] | None = None
    usage: UsageReader | None = None
    # Sign-outs recorded on the server (None: tokens are honoured until they expire).
    sessions: SessionRevocations | None = None
