"""CPU time a process (or a process and its children) spends over a measured phase, from /proc (Linux),
as milliseconds per call.

Usage:

    with ProcessCpu(chat_pid, Tree(credits_pid)) as used:
        run = await steady(...)
    chat_ms, credits_ms = used.per_call(run.planned)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name: field 3 of stat(5) is [0]."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of `pid` so far (its threads included)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime and stime, fields 14 and 15 of stat(5)


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root`, of each of its live descendants, and of the children it has reaped
    (PostgreSQL's postmaster and its backends, say)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = _stat(name)
        except OSError:  # gone in between
            continue
        parent[int(name)], ticks[int(name)] = int(fields[1]), int(fields[11]) + int(fields[12])
    root_fields = _stat(root)
    total = ticks.get(root, 0) + int(root_fields[13]) + int(root_fields[14])  # + cutime, cstime
    tree = {root}
    changed = True
    while changed:  # a few rounds: the tree is shallow
        changed = False
        for pid, ppid in parent.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                total += ticks[pid]
                changed = True
    return total * _TICK_S


@dataclass(frozen=True)
class Tree:
    """A process with its children: the credit service and its relay child, PostgreSQL's backends."""

    root: int


@dataclass(frozen=True)
class Group:
    """Several processes counted as one: the nodes of a Kafka cluster."""

    members: tuple[int | Tree, ...]


Source = int | Tree | Group


def read(source: Source) -> float:
    """CPU seconds so far of a process (an int), a process tree or a group."""
    if isinstance(source, Group):
        return sum(read(m) for m in source.members)
    if isinstance(source, Tree):
        return tree_cpu_seconds(source.root)
    return cpu_seconds(source)


def infra(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """infra/<script>.sh with the shell's own settings (BYOK_KAFKA_PORT, BYOK_PG_PORT, ...)."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["bash", str(root / f"infra/{script}.sh"), *args], capture_output=True, text=True)


def billing_sources(credits_pid: int) -> dict[str, Source]:
    """The billing pipeline's processes behind a chat: the credit service (with its relay child), and the
    Kafka and PostgreSQL that infra/ runs; one not run by infra/ (an external server) is left out."""
    return {"credit service": Tree(credits_pid), **infra_sources()}


def infra_sources() -> dict[str, Source]:
    """The Kafka (its nodes) and the PostgreSQL (postmaster and backends) that infra/ runs, if it does."""
    sources: dict[str, Source] = {}
    nodes = {
        int(p.stdout) for n in (1, 2, 3) if (p := infra("kafka", "pid", str(n))).returncode == 0 and p.stdout.strip()
    }
    if nodes and all(os.path.exists(f"/proc/{pid}") for pid in nodes):
        sources["Kafka"] = Group(tuple(sorted(nodes)))
    pg = infra("postgres", "pid")
    if pg.returncode == 0 and pg.stdout.strip():
        sources["PostgreSQL"] = Tree(int(pg.stdout))
    return sources


class ProcessCpu:
    def __init__(self, *sources: Source):
        self.sources = sources
        self.start: list[float] = []
        self.used: list[float] = []

    def __enter__(self) -> ProcessCpu:
        self.start = [read(p) for p in self.sources]
        return self

    def __exit__(self, *exc) -> None:
        self.used = [read(p) - s for p, s in zip(self.sources, self.start, strict=True)]

    def per_call(self, calls: int) -> tuple[float, ...]:
        return tuple(u * 1000 / max(calls, 1) for u in self.used)


async def idle_rates(sources: dict[str, Source], seconds: float) -> dict[str, float]:
    """CPU seconds per second each source spends over `seconds` of the caller doing nothing."""
    with ProcessCpu(*sources.values()) as idle:
        await asyncio.sleep(seconds)
    return dict(zip(sources, (u / seconds for u in idle.used), strict=True))
