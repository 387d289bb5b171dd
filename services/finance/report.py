"""What a person sees: rich tables on the terminal, and the full lists as CSV or JSON files."""

from __future__ import annotations

import csv
import json
from dataclasses import fields
from pathlib import Path

import asyncpg
from rich.table import Table

from services.finance.conflicts import Conflict
from services.finance.differences import Correction, Difference, Kind
from services.finance.reconciliation import ReconcileReport, RepairResult
from services.finance.replay import ReplayResult

DIFFERENCE_COLUMNS = [f.name for f in fields(Difference) if f.name != "extra"] + ["correction_credits"]


def summary_table(report: ReconcileReport) -> Table:
    t = Table(title=f"reconciliation of {report.topic} over {report.window} (occurred_at, half-open)")
    t.add_column("difference")
    t.add_column("count", justify="right")
    t.add_column("credits to correct", justify="right")
    for kind, (n, credits) in report.counts().items():
        t.add_row(
            kind.value,
            f"{n:,}",
            "" if kind is Kind.UNREADABLE_EVENT else f"{credits:+,}",
            style="bold red" if n else "dim",
        )
    t.add_section()
    t.add_row("total", f"{len(report.differences):,}", "", style="bold")
    if report.pending:
        t.add_row(
            "not_yet_decided (not a difference: the credit service has not reached them)",
            f"{len(report.pending):,}",
            "",
            style="yellow",
        )
    t.add_section()
    t.add_row(
        "holds of events already decided (leaks; repair releases them)",
        f"{len(report.decided_holds):,}",
        f"{sum(h['credits'] for h in report.decided_holds):,} held",
        style="bold red" if report.decided_holds else "dim",
    )
    t.add_row(
        "holds open for long (not a difference: they never expire; see `holds`)",
        f"{len(report.old_holds):,}",
        f"{sum(h['credits'] for h in report.old_holds):,} held",
        style="yellow" if report.old_holds else "dim",
    )
    t.add_row(
        "conflicting duplicates, dead-lettered (not a difference; see `conflicts`)",
        f"{len(report.conflicts):,}",
        "",
        style="yellow" if report.conflicts else "dim",
    )
    return t


def endings_table(report: ReconcileReport) -> Table:
    """Events of the window by how their call ended (`unknown`: the event does not say)."""
    t = Table(title="events of the window by ending")
    t.add_column("ending")
    t.add_column("events", justify="right")
    for ending, n in report.tally.ending_counts().items():
        t.add_row(ending, f"{n:,}", style=None if n else "dim")
    return t


CONFLICT_COLUMNS = [f.name for f in fields(Conflict)]


def conflicts_table(conflicts: list[Conflict], limit: int = 50) -> Table:
    t = Table(
        title=f"{len(conflicts):,} conflicting duplicates (same event id, another call; the first decision stands)"
    )
    for col in ("event_id", "user", "occurred_at", "feature/model", "key/status", "dead-lettered", "why"):
        t.add_column(col, max_width=70 if col == "why" else None)
    for c in conflicts[:limit]:
        t.add_row(
            str(c.event_id or ""),
            c.user_id or "",
            c.occurred_at.isoformat() if c.occurred_at else "",
            f"{c.feature or ''}/{c.model or ''}",
            f"{c.key_source or ''}/{c.status or ''}",
            c.dead_lettered_at.isoformat(),
            c.error,
        )
    return t


HOLD_COLUMNS = ["event_id", "user_id", "credits", "feature", "provider", "model", "placed_at", "age_s", "decided"]


def holds_table(holds: list[asyncpg.Record], older_than_s: float, limit: int = 100) -> Table:
    t = Table(title=f"{len(holds):,} admission holds placed over {older_than_s:,.0f} s ago (holds never expire)")
    for col in ("event_id", "user", "credits", "feature/model", "placed_at", "age", "event decided"):
        t.add_column(col, justify="right" if col in ("credits", "age") else "left")
    for h in holds[:limit]:
        t.add_row(
            str(h["event_id"]),
            h["user_id"],
            f"{h['credits']:,}",
            f"{h['feature']}/{h['model']}",
            h["placed_at"].isoformat(),
            f"{h['age_s']:,.0f} s",
            "yes (a leak: repair --apply releases it)" if h["decided"] else "no",
            style="bold red" if h["decided"] else None,
        )
    return t


def stats_table(report: ReconcileReport) -> Table:
    t = Table(show_header=False, box=None)
    t.add_column()
    t.add_column(justify="right")
    s = report.tally
    rate = s.records / report.elapsed_s if report.elapsed_s else 0
    for label, value in [
        ("log records read", f"{s.records:,}"),
        ("events in the window", f"{s.in_window:,}"),
        ("  of which redeliveries of an event", f"{report.duplicate_deliveries:,}"),
        ("records outside the window", f"{s.outside_window:,}"),
        ("unreadable records", f"{s.unreadable:,}"),
        ("ledger entries in the window", f"{report.ledger_entries:,}"),
        ("elapsed", f"{report.elapsed_s:,.1f} s ({rate:,.0f} records/s)"),
    ]:
        t.add_row(label, value)
    return t


def differences_table(differences: list[Difference], limit: int = 20) -> Table:
    t = Table(title=f"first {min(limit, len(differences))} of {len(differences):,} differences")
    for col in ("kind", "event_id", "user", "occurred_at", "feature/model", "key/status", "owed", "ledger", "fix"):
        t.add_column(col, justify="right" if col in ("owed", "ledger", "fix") else "left")
    t.add_column("note", max_width=60)

    def pair(a: str | None, b: str | None) -> str:
        return f"{a or ''}/{b or ''}" if a or b else ""

    for d in differences[:limit]:
        t.add_row(
            d.kind.value,
            str(d.event_id or ""),
            d.user_id or "",
            d.occurred_at.isoformat() if d.occurred_at else "",
            pair(d.feature, d.model),
            pair(d.key_source, d.status),
            "?" if d.kind is Kind.UNREADABLE_EVENT else str(d.expected_credits or 0),
            str(d.ledger_credits),
            f"{d.correction_credits:+}" if d.repairable else "-",
            d.detail,
        )
    return t


def corrections_table(result: RepairResult, limit: int = 50) -> Table:
    verb = "written" if result.applied else "would write (dry run; --apply writes)"
    t = Table(title=f"corrections: {len(result.corrections):,} {verb}")
    for col in ("entry_id", "event_id", "user", "credits", "reason"):
        t.add_column(col, justify="right" if col == "credits" else "left")
    for c in result.corrections[:limit]:
        t.add_row(str(c.entry_id), str(c.event_id), c.user_id, f"{c.credits:+}", c.reason)
    return t


def replay_table(result: ReplayResult, limit: int = 50) -> Table:
    t = Table(
        title=(
            f"replay of {result.topic} into {result.scratch_schema}: {result.accounts:,} accounts, "
            f"{len(result.differences):,} differ from {result.live_schema}"
        )
    )
    for col in ("user", "live granted", "live debited", "live balance", "replay debited", "replay balance", "delta"):
        t.add_column(col, justify="left" if col == "user" else "right")
    for d in result.differences[:limit]:
        t.add_row(
            d.user_id,
            f"{d.live_granted:,}",
            f"{d.live_debited:,}",
            f"{d.live_balance:,}",
            f"{d.replay_debited:,}",
            f"{d.replay_balance:,}",
            f"{d.delta:+,}",
        )
    return t


def _format(path: Path, fmt: str | None) -> str:
    fmt = (fmt or path.suffix.lstrip(".") or "csv").lower()
    if fmt not in ("csv", "json"):
        raise ValueError(f"unknown output format {fmt!r}: use .csv or .json")
    return fmt


def write_rows(
    path: Path,
    rows: list[dict[str, object]],
    columns: list[str],
    fmt: str | None = None,
    header: dict[str, object] | None = None,
) -> None:
    """The full list: CSV (one row per item) or JSON ({...header, "items": [...]})."""
    if _format(path, fmt) == "csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text(json.dumps({**(header or {}), "items": rows}, default=str, indent=1))


def write_report(path: Path, report: ReconcileReport, fmt: str | None = None) -> None:
    header = {
        "topic": report.topic,
        "window": {"from": report.window.start, "to": report.window.end, "rule": "[from, to) on occurred_at"},
        "summary": {k.value: n for k, (n, _) in report.counts().items()},
        "not_yet_decided": len(report.pending),
        "events_in_window": report.tally.in_window,
        "endings": report.tally.ending_counts(),
        "holds_of_decided_events": len(report.decided_holds),
        "holds_open_for_long": len(report.old_holds),
        "conflicts": [c.as_row() for c in report.conflicts],
    }
    rows = [d.as_row() for d in report.differences + report.pending]
    write_rows(path, rows, DIFFERENCE_COLUMNS, fmt, header)


def write_corrections(path: Path, corrections: list[Correction], fmt: str | None = None) -> None:
    rows = [c.__dict__ for c in corrections]
    write_rows(path, rows, [f.name for f in fields(Correction)], fmt)


def write_replay(path: Path, result: ReplayResult, fmt: str | None = None) -> None:
    rows = [d.as_row() for d in result.differences]
    cols = (
        list(rows[0])
        if rows
        else [
            "user_id",
            "live_granted",
            "live_debited",
            "live_balance",
            "replay_granted",
            "replay_debited",
            "replay_balance",
            "delta",
        ]
    )
    write_rows(path, rows, cols, fmt, {"scratch_schema": result.scratch_schema, "accounts": result.accounts})


def write_conflicts(path: Path, conflicts: list[Conflict], fmt: str | None = None) -> None:
    write_rows(path, [c.as_row() for c in conflicts], CONFLICT_COLUMNS, fmt)


def write_holds(path: Path, holds: list[asyncpg.Record], fmt: str | None = None) -> None:
    write_rows(path, [{k: h[k] for k in HOLD_COLUMNS} for h in holds], HOLD_COLUMNS, fmt)
