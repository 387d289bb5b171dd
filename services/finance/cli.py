"""`byok-finance` / `python -m services.finance`: reconcile, repair and replay.

Exit codes: 0 clean, 1 differences found, 2 could not run (bad arguments, Kafka or PostgreSQL
unreachable, topic missing, refused scratch schema).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from services.finance import report as render
from services.finance.conflicts import read_conflicts
from services.finance.progress_bar import RichProgress, progress_bar
from services.finance.reconciliation import (
    ReconcileReport,
    RepairResult,
    open_holds,
    reconcile as run_reconcile,
    repair as run_repair,
)
from services.finance.replay import ReplayResult, replay as run_replay
from services.finance.settings import FinanceSettings
from services.finance.window import EPOCH, Window

T = TypeVar("T")

WINDOW_RULE = (
    "The window is half-open, [--from, --to), on each event's occurred_at: an event at exactly "
    "--from is in, one at exactly --to is out (it belongs to the next window). Times are ISO 8601; "
    "without an offset they are UTC."
)

app = typer.Typer(
    help="Replay model_call_completed from Kafka and reconcile it against the credit ledger. " + WINDOW_RULE,
    no_args_is_help=True,
    add_completion=False,
)
out_console = Console()
err_console = Console(stderr=True)


def parse_moment(value: str | None, default: datetime) -> datetime:
    if value is None:
        return default
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 time (e.g. 2026-11-01T00:00:00Z)") from None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _settings(
    bootstrap: str | None,
    database_url: str | None,
    schema: str | None,
    topic_prefix: str | None,
    credits_group: str | None = None,
) -> FinanceSettings:
    # Only what was given overrides the environment; FinanceSettings validates each value against its field.
    overrides: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "database_url": database_url,
        "database_schema": schema,
        "topic_prefix": topic_prefix,
        "finance_credits_group": credits_group,
    }
    return FinanceSettings(**{k: v for k, v in overrides.items() if v is not None})


def _window(start: str | None, end: str | None) -> Window:
    try:
        return Window(parse_moment(start, EPOCH), parse_moment(end, datetime.now(timezone.utc)))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except typer.Exit:
        raise
    except Exception as exc:  # an operational failure: say what, exit 2, no traceback for users
        err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}")
        raise typer.Exit(2) from exc


FromOpt = Annotated[str | None, typer.Option("--from", help="Start of the window, inclusive (default: the beginning).")]
ToOpt = Annotated[str | None, typer.Option("--to", help="End of the window, exclusive (default: now).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Write the full list here (.csv or .json).")]
FormatOpt = Annotated[str | None, typer.Option("--format", help="csv or json (default: from --out's suffix).")]
BootstrapOpt = Annotated[str | None, typer.Option(help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS).")]
DbOpt = Annotated[str | None, typer.Option(help="Ledger database (env DATABASE_URL).")]
SchemaOpt = Annotated[str | None, typer.Option(help="Ledger schema (env DATABASE_SCHEMA).")]
PrefixOpt = Annotated[str | None, typer.Option(help="Topic prefix (env TOPIC_PREFIX).")]
GroupOpt = Annotated[
    str | None,
    typer.Option(
        "--credits-group",
        help="The credit service's consumer group, read (never joined) to tell events it has not "
        "reached yet from missing debits; '' turns that off (env FINANCE_CREDITS_GROUP, default credits).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@app.command(help="Report every difference between what the window's events owe and the ledger. " + WINDOW_RULE)
def reconcile(
    start: FromOpt = None,
    end: ToOpt = None,
    out: OutOpt = None,
    fmt: FormatOpt = None,
    show: Annotated[int, typer.Option(help="Differences listed on the terminal.")] = 20,
    bootstrap: BootstrapOpt = None,
    database_url: DbOpt = None,
    schema: SchemaOpt = None,
    topic_prefix: PrefixOpt = None,
    credits_group: GroupOpt = None,
    quiet: QuietOpt = False,
) -> None:
    settings = _settings(bootstrap, database_url, schema, topic_prefix, credits_group)
    window = _window(start, end)

    async def go() -> ReconcileReport:
        with progress_bar(quiet, err_console) as bar:
            return await run_reconcile(settings, window, RichProgress(bar))

    report = _run(go())
    out_console.print(render.summary_table(report))
    out_console.print(render.stats_table(report))
    out_console.print(render.endings_table(report))
    if report.conflicts:
        out_console.print(render.conflicts_table(report.conflicts, show or 20))
    if report.differences and show:
        out_console.print(render.differences_table(report.differences, show))
    if report.pending:
        out_console.print(
            f"[yellow]{len(report.pending):,} events not yet decided by the credit service "
            f"(beyond group {settings.finance_credits_group!r}'s committed offsets): "
            f"not differences yet, never repaired; reconcile again later[/]"
        )
    if out:
        render.write_report(out, report, fmt)
        out_console.print(f"full list: {out}")
    raise typer.Exit(0 if report.clean else 1)


@app.command(
    help="Show the correction entries that would fix the window (dry run); --apply writes them. "
    "Idempotent: running it twice writes nothing new. " + WINDOW_RULE
)
def repair(
    start: FromOpt = None,
    end: ToOpt = None,
    apply: Annotated[bool, typer.Option("--apply", help="Write the corrections (default: dry run).")] = False,
    out: OutOpt = None,
    fmt: FormatOpt = None,
    bootstrap: BootstrapOpt = None,
    database_url: DbOpt = None,
    schema: SchemaOpt = None,
    topic_prefix: PrefixOpt = None,
    credits_group: GroupOpt = None,
    quiet: QuietOpt = False,
) -> None:
    settings = _settings(bootstrap, database_url, schema, topic_prefix, credits_group)
    window = _window(start, end)

    async def go() -> RepairResult:
        with progress_bar(quiet, err_console) as bar:
            return await run_repair(settings, window, apply=apply, progress=RichProgress(bar))

    result = _run(go())
    out_console.print(render.summary_table(result.report))
    out_console.print(render.corrections_table(result))
    if result.applied:
        out_console.print(
            f"{result.written:,} new correction entries written "
            f"({len(result.corrections) - result.written:,} were already there); "
            f"{result.holds_released:,} holds of decided events released"
        )
    if result.not_repaired:
        out_console.print(
            f"[yellow]{len(result.not_repaired):,} differences need a person "
            f"(unreadable events are never repaired automatically)[/]"
        )
    if out:
        render.write_corrections(out, result.corrections, fmt)
        out_console.print(f"corrections: {out}")
    # Differences remain unless every one was corrected by this run.
    fixed = result.applied and not result.not_repaired
    raise typer.Exit(0 if result.report.clean or fixed else 1)


@app.command(
    help="Rebuild every balance from the whole log (plus the live grants, which are not events) "
    "into a scratch schema and compare it with the live balances."
)
def replay(
    into: Annotated[str, typer.Option("--into", help="Scratch schema to build (never the live one).")],
    replace: Annotated[
        bool, typer.Option("--replace", help="Drop and rebuild the scratch schema if it holds data.")
    ] = False,
    out: OutOpt = None,
    fmt: FormatOpt = None,
    bootstrap: BootstrapOpt = None,
    database_url: DbOpt = None,
    schema: SchemaOpt = None,
    topic_prefix: PrefixOpt = None,
    quiet: QuietOpt = False,
) -> None:
    settings = _settings(bootstrap, database_url, schema, topic_prefix)

    async def go() -> ReplayResult:
        with progress_bar(quiet, err_console) as bar:
            return await run_replay(settings, into, replace=replace, progress=RichProgress(bar))

    result = _run(go())
    out_console.print(render.replay_table(result))
    out_console.print(
        f"{result.tally.records:,} records replayed ({result.tally.unreadable:,} unreadable), "
        f"{result.entries:,} ledger entries rebuilt in {result.elapsed_s:,.1f} s"
    )
    if out:
        render.write_replay(out, result, fmt)
    raise typer.Exit(0 if result.clean else 1)


@app.command(
    help="List the events dead-lettered as conflicts: an event id already decided, re-sent for another call "
    "(another user, feature, model, key source, provider or status). The first decision stands; a person "
    "looks at the rest. Read from model_call_completed.dlq. Exit 1 when there is any. " + WINDOW_RULE
)
def conflicts(
    start: FromOpt = None,
    end: ToOpt = None,
    out: OutOpt = None,
    fmt: FormatOpt = None,
    bootstrap: BootstrapOpt = None,
    topic_prefix: PrefixOpt = None,
) -> None:
    settings = _settings(bootstrap, None, None, topic_prefix)
    window = _window(start, end)
    found = _run(read_conflicts(settings, window))
    out_console.print(render.conflicts_table(found))
    if out:
        render.write_conflicts(out, found, fmt)
        out_console.print(f"full list: {out}")
    raise typer.Exit(1 if found else 0)


@app.command(
    help="List the admission holds placed more than --older-than seconds ago, with their event ids. Holds "
    "never expire: each waits for its event's decision. One whose call provably never reached the provider "
    "is released with DELETE /api/holds/{event_id} (admin token). Exit 1 when there is any."
)
def holds(
    older_than: Annotated[
        float | None, typer.Option("--older-than", min=0, help="Age in seconds (env FINANCE_HOLD_AGE_S, default 3600).")
    ] = None,
    out: OutOpt = None,
    fmt: FormatOpt = None,
    database_url: DbOpt = None,
    schema: SchemaOpt = None,
) -> None:
    settings = _settings(None, database_url, schema, None)
    age = settings.finance_hold_age_s if older_than is None else older_than
    found = _run(open_holds(settings, age))
    out_console.print(render.holds_table(found, age))
    if out:
        render.write_holds(out, found, fmt)
        out_console.print(f"full list: {out}")
    raise typer.Exit(1 if found else 0)


def main() -> None:
    app()
