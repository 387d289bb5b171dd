"""The simulator's state: key rules (registered or read from marker words), outages and call counts."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from dataclasses import dataclass, field

# The key's own answer; then the streams of a key that works (every call but a stream answers as
# `valid`): one that fails midway with the provider's error event, one that stops sending without
# closing, one whose connection closes before the end, and one that sends many pieces slowly.
STREAM_BEHAVIOURS = ("stream_fail", "stream_stall", "stream_cut", "stream_slow")
BEHAVIOURS = ("valid", "invalid", "revoked", "no_quota", "denied", "rate_limited", "slow", "down", *STREAM_BEHAVIOURS)
# Marker words recognised in unregistered keys, first match wins ("invalid" before "valid",
# "streamslow" before "slow").
_MARKERS = (
    ("streamfail", "stream_fail"),
    ("streamstall", "stream_stall"),
    ("streamcut", "stream_cut"),
    ("streamslow", "stream_slow"),
    ("revoked", "revoked"),
    ("noquota", "no_quota"),
    ("denied", "denied"),
    ("ratelimited", "rate_limited"),
    ("slow", "slow"),
    ("down", "down"),
    ("invalid", "invalid"),
    ("valid", "valid"),
)
DEFAULT_SLOW_MS = 5000
# A `stream_slow` answer: this many pieces, this long apart (about 8 s in all, time to press Stop).
DEFAULT_STREAM_SLOW_MS = 200
DEFAULT_STREAM_SLOW_CHUNKS = 40
# A `stream_stall` answer stops sending this long (then goes on as if nothing happened).
DEFAULT_STALL_MS = 300_000


def default_delay_ms(behaviour: str) -> int:
    """The delay a behaviour has when none is given: `slow` before answering, `stream_slow` between
    pieces, `stream_stall` the stall; none for the others."""
    return {"slow": DEFAULT_SLOW_MS, "stream_slow": DEFAULT_STREAM_SLOW_MS, "stream_stall": DEFAULT_STALL_MS}.get(
        behaviour, 0
    )


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class Rule:
    """`delay_ms`: for `slow` (and any behaviour but the streams') the wait before answering; for
    `stream_slow` the wait between pieces; for `stream_stall` how long the stream stops. `chunks`:
    how many text pieces a streamed answer has (None: one per word, or 40 for `stream_slow`)."""

    behaviour: str
    delay_ms: int = 0
    status: int | None = None
    providers: frozenset[str] | None = None
    chunks: int | None = None

    @property
    def streams_only(self) -> bool:
        """A stream behaviour: everything but a stream answers as `valid`, without delay."""
        return self.behaviour in STREAM_BEHAVIOURS


@dataclass
class SimulatorState:
    """Key rules and call counts. Thread-safe: tests read it while the server thread serves."""

    default_behaviour: str = "invalid"
    _rules: dict[str, Rule] = field(default_factory=dict)  # by key fingerprint
    _outages: dict[str, int] = field(default_factory=dict)
    _calls: Counter[tuple[str, str]] = field(default_factory=Counter)  # (fingerprint, provider) -> n
    _endpoints: Counter[str] = field(default_factory=Counter)
    _streams: Counter[str] = field(default_factory=Counter)  # how streams ended
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(
        self,
        key: str,
        behaviour: str,
        *,
        delay_ms: int = 0,
        status: int | None = None,
        providers: list[str] | None = None,
        chunks: int | None = None,
    ) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; one of {BEHAVIOURS}")
        with self._lock:
            self._rules[_fingerprint(key)] = Rule(
                behaviour, delay_ms, status, frozenset(providers) if providers else None, chunks
            )

    def set_outage(self, provider: str, status: int = 503) -> None:
        with self._lock:
            self._outages[provider] = status

    def clear_outages(self) -> None:
        with self._lock:
            self._outages.clear()

    def reset(self) -> None:
        with self._lock:
            self._rules.clear()
            self._outages.clear()
            self._calls.clear()
            self._endpoints.clear()
            self._streams.clear()
            self.default_behaviour = "invalid"

    def calls(self, key: str, provider: str | None = None) -> int:
        """How many provider calls were made with `key` (on `provider`, or on any)."""
        fp = _fingerprint(key)
        with self._lock:
            return sum(n for (f, p), n in self._calls.items() if f == fp and provider in (None, p))

    def calls_by_provider(self, key: str | None = None) -> dict[str, int]:
        fp = _fingerprint(key) if key is not None else None
        out: Counter[str] = Counter()
        with self._lock:
            for (f, p), n in self._calls.items():
                if fp in (None, f):
                    out[p] += n
        return dict(out)

    def total_calls(self) -> int:
        with self._lock:
            return sum(self._calls.values())

    def endpoints(self) -> dict[str, int]:
        with self._lock:
            return dict(self._endpoints)

    def streams(self) -> dict[str, int]:
        """How the streams served so far ended: `completed`, `failed` (an error event sent), `cut`
        (closed midway), `abandoned` (the client went away first: a Stop reached the provider)."""
        with self._lock:
            return dict(self._streams)

    def _count_stream(self, outcome: str) -> None:
        with self._lock:
            self._streams[outcome] += 1

    def _count(self, key: str | None, provider: str, endpoint: str) -> None:
        with self._lock:
            self._calls[(_fingerprint(key or ""), provider)] += 1
            self._endpoints[f"{provider} {endpoint}"] += 1

    def decide(self, key: str, provider: str) -> tuple[Rule, int | None]:
        """The rule for `key` on `provider`, and the provider's outage status if any."""
        with self._lock:
            outage = self._outages.get(provider)
            rule = self._rules.get(_fingerprint(key))
            default = self.default_behaviour
        if rule is not None:
            if rule.providers is not None and provider not in rule.providers:
                return Rule("invalid"), outage
            return rule, outage
        lowered = key.lower()
        for marker, behaviour in _MARKERS:
            if marker in lowered:
                return Rule(behaviour, default_delay_ms(behaviour)), outage
        return Rule(default), outage
