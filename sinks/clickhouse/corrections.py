"""ClickHouse side of fixing history (migration 0011): the corrections log, the events each
correction changed, reads of the effective record by key, and the ``too_late`` events
kept in ``rejected_events`` (what a backfill re-imports). Plain reads and appends; what
a correction means is pipeline/corrections/.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meterstream.events import canonical_json, loads_exact
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.queries import (
    EVENT_COLUMNS_SQL,
    effective_sql,
    equal_to,
    event_fields,
    in_range,
    sql_string,
    sql_string_list,
)
from meterstream.sinks.clickhouse.writer import utc_datetime

CORRECTIONS = "corrections"
CORRECTIONS_COLUMNS = (
    "correction_id",
    "kind",
    "author",
    "reason",
    "created_at",
    "selector",
    "events_affected",
    "windows_affected",
    "status",
)
EVENT_CORRECTIONS = "event_corrections"
EVENT_CORRECTIONS_COLUMNS = (
    "customer_id",
    "idempotency_key",
    "correction_id",
    "action",
    "properties",
    "corrected_at",
)


def append_event_corrections(ch: ClickHouse, rows: Sequence[Sequence[Any]]) -> None:
    """``event_corrections`` rows (columns in order, ``corrected_at`` in epoch ms); a repeat
    of the same (customer, key, correction) collapses."""
    if rows:
        ch.insert(
            EVENT_CORRECTIONS,
            [(*r[:5], utc_datetime(int(r[5]))) for r in rows],
            column_names=list(EVENT_CORRECTIONS_COLUMNS),
        )


def append_correction(ch: ClickHouse, row: dict[str, Any]) -> None:
    """One log row (``created_at`` in epoch ms, ``selector`` a JSON-able object)."""
    ch.insert(
        CORRECTIONS,
        [
            (
                row["correction_id"],
                row["kind"],
                row["author"],
                row["reason"],
                utc_datetime(int(row["created_at_ms"])),
                canonical_json(row["selector"]),
                int(row["events_affected"]),
                int(row["windows_affected"]),
                row["status"],
            )
        ],
        column_names=list(CORRECTIONS_COLUMNS),
    )


_LOG_SELECT = (
    "SELECT correction_id, kind, author, reason,"
    " toUnixTimestamp64Milli(created_at) AS created_at_ms, selector, events_affected,"
    " windows_affected, status\nFROM corrections FINAL\n"
)


def _log_doc(row: Sequence[Any]) -> dict[str, Any]:
    cid, kind, author, reason, created, selector, events, windows, status = row
    return {
        "correction_id": cid,
        "kind": kind,
        "author": author,
        "reason": reason,
        "created_at_ms": int(created),
        "selector": loads_exact(selector) if selector else {},
        "events_affected": int(events),
        "windows_affected": int(windows),
        "status": status,
    }


def correction(
    ch: ClickHouse, correction_id: str, *, with_events: bool = False
) -> dict[str, Any] | None:
    """The log row of one correction (``with_events``: and the events it changed), or None."""
    rows = ch.query_plain_rows(
        _LOG_SELECT + f"WHERE correction_id = {sql_string(correction_id)}\nLIMIT 1"
    )
    if not rows:
        return None
    doc = _log_doc(rows[0])
    if with_events:
        doc["events"] = event_corrections_of(ch, correction_id)
    return doc


def corrections(ch: ClickHouse, limit: int = 100) -> list[dict[str, Any]]:
    """The latest ``limit`` log rows, newest first."""
    rows = ch.query_plain_rows(
        _LOG_SELECT + f"ORDER BY created_at DESC, correction_id DESC\nLIMIT {int(limit)}"
    )
    return [_log_doc(r) for r in rows]


def event_corrections_of(ch: ClickHouse, correction_id: str) -> list[dict[str, Any]]:
    """The events one correction changed."""
    rows = ch.query_plain_rows(
        "SELECT customer_id, idempotency_key, action, properties,"
        " toUnixTimestamp64Milli(corrected_at)\n"
        f"FROM event_corrections FINAL\nWHERE correction_id = {sql_string(correction_id)}\n"
        "ORDER BY customer_id, idempotency_key"
    )
    return [
        {
            "customer_id": c,
            "idempotency_key": k,
            "action": a,
            "properties": loads_exact(p) if p else None,
            "corrected_at_ms": int(t),
        }
        for c, k, a, p, t in rows
    ]


def key_corrections(ch: ClickHouse, customer_id: str, idempotency_key: str) -> list[dict[str, Any]]:
    """Every correction of one event, oldest first (the last one wins), with its log row's
    kind, author and reason."""
    rows = ch.query_plain_rows(
        "SELECT e.correction_id, e.action, e.properties,"
        " toUnixTimestamp64Milli(e.corrected_at) AS at, c.author, c.reason\n"
        "FROM (SELECT * FROM event_corrections FINAL"
        f" WHERE customer_id = {sql_string(customer_id)}"
        f" AND idempotency_key = {sql_string(idempotency_key)}) AS e\n"
        "LEFT JOIN (SELECT correction_id, author, reason FROM corrections FINAL) AS c"
        " ON e.correction_id = c.correction_id\n"
        "ORDER BY at, e.correction_id"
    )
    return [
        {
            "correction_id": cid,
            "action": action,
            "properties": loads_exact(props) if props else None,
            "properties_json": props,
            "corrected_at_ms": int(at),
            "author": author,
            "reason": reason,
        }
        for cid, action, props, at, author, reason in rows
    ]


def effective_events_by_key(
    ch: ClickHouse,
    pairs: Sequence[tuple[str, str]],
    *,
    without_correction: str | None = None,
) -> list[dict[str, Any]]:
    """The effective record's events of these (customer_id, idempotency_key) pairs (voided
    ones absent), as ``UsageEvent`` fields; see queries.events_in_range_sql."""
    unique = sorted(set(pairs))
    if not unique:
        return []
    customers = f"customer_id IN {sql_string_list(c for c, _ in unique)}"
    tuples = ", ".join(f"({sql_string(c)}, {sql_string(k)})" for c, k in unique)
    record = (
        f"SELECT {EVENT_COLUMNS_SQL}\nFROM usage_events\n"
        f"WHERE {customers} AND (customer_id, idempotency_key) IN ({tuples})\n"
        "ORDER BY customer_id, idempotency_key, ingested_at\n"
        "LIMIT 1 BY customer_id, idempotency_key"
    )
    sql = effective_sql(record, customers, without_correction)
    return [event_fields(row) for row in ch.query_plain_rows(sql)]


def rejected_raw(
    ch: ClickHouse,
    reason: str,
    customer_id: str | None = None,
    from_ms: int | None = None,
    to_ms: int | None = None,
) -> list[tuple[str, str, int]]:
    """The raw events kept in ``rejected_events`` for ``reason`` (customer_id, raw text,
    received_at ms), optionally of one customer and received in [from_ms, to_ms); one
    per (customer_id, idempotency_key, raw), first received first."""
    where = equal_to(reason=reason, customer_id=customer_id)
    where += in_range("received_at", from_ms, to_ms)
    rows = ch.query_plain_rows(
        "SELECT customer_id, raw, toUnixTimestamp64Milli(received_at)\n"
        f"FROM rejected_events\nWHERE {' AND '.join(where)}\n"
        "ORDER BY received_at\nLIMIT 1 BY customer_id, idempotency_key, raw"
    )
    return [(c, r, int(t)) for c, r, t in rows]
