"""`python -m bench [--quick] [--only NAME ...]`: run the benchmarks and print one table."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from pathlib import Path

import uvloop
from rich.console import Console
from rich.table import Table

from bench import BenchEnv, Figure
from bench.cpu import infra

# Each module here defines `async def run(env) -> list[Figure]`.
MODULES = ["credits", "validation", "chat", "stream", "gateway", "finance", "resume", "scale", "failover"]


def table(figures: list[Figure]) -> Table:
    t = Table(title="byok-credits benchmarks (baselines measured in the same run)")
    for col in ("benchmark", "metric", "value", "baseline", "baseline value", "ratio", "target"):
        t.add_column(col, justify="right" if "value" in col or col == "ratio" else "left")
    for f in figures:
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else ""
        base = f"{f.baseline_value:,.2f} {f.unit}" if f.baseline_value is not None else ""
        t.add_row(f.benchmark, f.metric, f"{f.value:,.2f} {f.unit}", f.baseline_name, base, ratio, f.target)
    return t


def start_missing() -> list[str]:
    """Start the broker and the database unless they run already (a stack beside which the benchmark
    runs, say); the ones started here, which the benchmark stops when it ends."""
    started = []
    for script in ("kafka", "postgres"):
        if infra(script, "status").returncode != 0:
            up = infra(script, "up")
            if up.returncode != 0:
                raise SystemExit(f"could not start {script}: {up.stderr or up.stdout}")
            started.append(script)
    return started


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small loads, for a smoke run")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()
    started = start_missing()
    try:
        return await run_all(args)
    finally:
        for script in reversed(started):  # what the benchmark started, it stops
            print(f"stopping the {script} this benchmark started", file=sys.stderr)
            infra(script, "down")


async def run_all(args: argparse.Namespace) -> int:
    db = os.environ.get("DATABASE_URL") or infra("postgres", "url").stdout.strip()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or infra("kafka", "bootstrap").stdout.strip()
    env = BenchEnv(bootstrap, db, args.quick)
    figures: list[Figure] = []
    for name in args.only or MODULES:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                print(f"(no benchmark module bench/{name}.py yet)", file=sys.stderr)
                continue
            raise
        print(f"running bench/{name}.py ...", file=sys.stderr)
        figures += await module.run(env)
    Console(width=200).print(table(figures))
    if args.json:
        args.json.write_text(json.dumps([f.__dict__ | {"ratio": f.ratio} for f in figures], indent=2))
    return 0


if __name__ == "__main__":
    # The load generators time each answer with the loop's clock, which uvloop keeps in whole
    # milliseconds: the benchmark runs on the standard loop, as the credit service does.
    # BENCH_LOOP=uvloop runs the in-process parts (the credit pipeline's bulk run) on uvloop, to compare.
    if os.environ.get("BENCH_LOOP", "asyncio") == "uvloop":
        sys.exit(uvloop.run(main()))
    sys.exit(asyncio.run(main()))
