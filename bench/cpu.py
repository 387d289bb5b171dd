"""CPU time a process spends over a measured phase, from /proc (Linux), as milliseconds per call.

Usage:

    with ProcessCpu(chat_pid, credits_pid) as used:
        run = await steady(...)
    chat_ms, credits_ms = used.per_call(run.planned)
"""

from __future__ import annotations

import os

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of `pid` so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime and stime, fields 14 and 15 of stat(5)


class ProcessCpu:
    def __init__(self, *pids: int):
        self.pids = pids
        self.start: list[float] = []
        self.used: list[float] = []

    def __enter__(self) -> ProcessCpu:
        self.start = [cpu_seconds(p) for p in self.pids]
        return self

    def __exit__(self, *exc) -> None:
        self.used = [cpu_seconds(p) - s for p, s in zip(self.pids, self.start, strict=True)]

    def per_call(self, calls: int) -> tuple[float, ...]:
        return tuple(u * 1000 / max(calls, 1) for u in self.used)
