"""Read side of ClickHouse: pure SQL builders plus small functions taking a :class:`ClickHouse`.

All builders return plain SQL text with values inlined as escaped literals
(no server-side parameters): the same text runs on chdb and on a server, it
is golden-tested, and large key lists travel in the POST body rather than in
URL parameters. Timestamps cross the boundary as epoch milliseconds
(``toUnixTimestamp64Milli`` / ``fromUnixTimestamp64Milli(..., 'UTC')``), so no
timezone conversion happens in the driver on either engine.

Window reads use the latest version of each window: ``argMax(tuple(...), version)``
grouped by the table's ORDER BY key, in a subquery. We do not use ``FINAL``:
``FINAL`` gives the same answer on chdb and on servers (measured on chdb), but
it depends on engine settings (``do_not_merge_across_partitions_select_final``)
and on how the engine treats equal versions, whereas a GROUP BY with ``argMax``
of one tuple is plain aggregation that every ClickHouse version evaluates the
same way, takes every column from the same row, and is correct before and
after background merges. Filters are applied inside the subquery only on key
columns (meter, customer_id, window_start), which cannot change which version
of a kept window wins.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

from meterstream.events import loads_exact

if TYPE_CHECKING:
    from meterstream.sinks.clickhouse.client import ClickHouse

Period = Literal["hour", "day", "month"]
PERIODS: dict[str, str] = {
    "hour": "toStartOfHour",
    "day": "toStartOfDay",
    "month": "toStartOfMonth",
}
VIEW_NAMES: dict[str, str] = {
    "hour": "meter_usage_hourly",
    "day": "meter_usage_daily",
    "month": "meter_usage_monthly",
}
AGGREGATIONS = ("sum", "count", "max", "min", "unique_count", "latest")
# Keep each IN-list query well under ClickHouse's default max_query_size (256 KiB).
MAX_SQL_BYTES = 200_000


# ---------------------------------------------------------------- literals


def sql_string(value: str) -> str:
    """A ClickHouse string literal: backslash and quote escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_string_list(values: Iterable[str]) -> str:
    """``('a', 'b')``: distinct values, sorted for deterministic text."""
    return "(" + ", ".join(sql_string(v) for v in sorted(set(values))) + ")"


def sql_ms(epoch_ms: int) -> str:
    """A DateTime64(3, 'UTC') literal from epoch milliseconds."""
    return f"fromUnixTimestamp64Milli(toInt64({int(epoch_ms)}), 'UTC')"


# ---------------------------------------------------------------- windows and views


def latest_windows_sql(where: str = "") -> str:
    """The latest version of each window (key: meter, customer_id, group_key, window_start).

    Columns: meter, customer_id, group_key, window_start, aggregation,
    window_end, w_value, w_event_count, w_distinct_values, latest_ts,
    latest_key, version, updated_at. ``w_`` names keep the outer aggregates
    (``sum(w_value) AS value``) free of alias cycles.
    """
    where_clause = f"\n    WHERE {where}" if where else ""
    return (
        "SELECT\n"
        "    meter,\n"
        "    customer_id,\n"
        "    group_key,\n"
        "    window_start,\n"
        "    toLowCardinality(w.1) AS aggregation,\n"
        "    w.2 AS window_end,\n"
        "    w.3 AS w_value,\n"
        "    w.4 AS w_event_count,\n"
        "    w.5 AS w_distinct_values,\n"
        "    w.6 AS latest_ts,\n"
        "    w.7 AS latest_key,\n"
        "    w.8 AS version,\n"
        "    w.9 AS updated_at\n"
        "FROM\n"
        "(\n"
        "    SELECT\n"
        "        meter,\n"
        "        customer_id,\n"
        "        group_key,\n"
        "        window_start,\n"
        "        argMax(\n"
        "            (aggregation, window_end, value, event_count, distinct_values,"
        " latest_ts, latest_key, version, updated_at),\n"
        "            version\n"
        "        ) AS w\n"
        f"    FROM meter_windows{where_clause}\n"
        "    GROUP BY meter, customer_id, group_key, window_start\n"
        ")"
    )


MERGED_VALUE_SQL = (
    "CAST(multiIf(\n"
    "        aggregation IN ('sum', 'count'), sum(w_value),\n"
    "        aggregation = 'max', max(w_value),\n"
    "        aggregation = 'min', min(w_value),\n"
    "        aggregation = 'unique_count',"
    " toDecimal128(length(groupUniqArrayArray(w_distinct_values)), 9),\n"
    "        aggregation = 'latest', argMax(w_value, (latest_ts, latest_key)),\n"
    "        toDecimal128(0, 9)\n"
    "    ), 'Decimal(38, 9)')"
)
"""Per-aggregation merge of windows into one total (DESIGN.md: mergeable aggregations).

sum/count add window values; max/min take the max/min; unique_count is the
exact size of the union of the windows' distinct values (never a sum of
per-window counts); latest is the value of the window whose (latest_ts,
latest_key) is greatest (key compared bytewise, as the aggregator does).
"""


def merge_windows_sql(period: Period | None, where: str = "") -> str:
    """Totals per (period_start,) meter, aggregation, customer_id, group_key.

    With ``period`` the result starts with ``period`` and ``period_start``
    columns (the view shape); with ``None`` it is one total per key over all
    windows that pass ``where`` (applied to meter_windows key columns).
    A window coarser than the period (a day window in the hourly view)
    counts at its own window start.
    """
    inner = textwrap.indent(latest_windows_sql(where), "    ")
    if period is None:
        head, group = "", "meter, aggregation, customer_id, group_key"
    else:
        start_fn = PERIODS[period]
        head = (
            f"    CAST('{period}' AS LowCardinality(String)) AS period,\n"
            f"    toDateTime64({start_fn}(window_start), 3, 'UTC') AS period_start,\n"
        )
        group = "period_start, meter, aggregation, customer_id, group_key"
    return (
        "SELECT\n"
        f"{head}"
        "    meter,\n"
        "    aggregation,\n"
        "    customer_id,\n"
        "    group_key,\n"
        f"    {MERGED_VALUE_SQL} AS value,\n"
        "    toUInt64(sum(w_event_count)) AS event_count,\n"
        "    toUInt64(count()) AS windows\n"
        "FROM\n"
        "(\n"
        f"{inner}\n"
        ")\n"
        f"GROUP BY {group}"
    )


def meter_usage_view_sql(period: Period) -> str:
    """``CREATE OR REPLACE VIEW meter_usage_{hourly,daily,monthly}``."""
    return f"CREATE OR REPLACE VIEW {VIEW_NAMES[period]} AS\n{merge_windows_sql(period)}"


def meter_usage_union_view_sql() -> str:
    """``meter_usage``: the three period views, with their ``period`` column."""
    parts = [f"SELECT * FROM {VIEW_NAMES[p]}" for p in ("hour", "day", "month")]
    return "CREATE OR REPLACE VIEW meter_usage AS\n" + "\nUNION ALL\n".join(parts)


def views_migration_sql() -> str:
    """The exact text of migrations/0005_meter_usage_views.sql (golden-tested).

    Its header names this function by its module's import name when 0005 was written
    (``sinks.clickhouse.queries``): an applied migration's text never changes."""
    header = (
        "-- Analyst views over meter_windows, generated by\n"
        "-- sinks.clickhouse.queries.views_migration_sql(); a unit test keeps this file\n"
        "-- and the generator identical. To change a view, add a new migration.\n"
        "--\n"
        "-- Each view reads the latest version of every window with argMax over the\n"
        "-- ORDER BY key (not FINAL: same result before and after merges on every\n"
        "-- ClickHouse, independent of FINAL's settings), then merges windows per\n"
        "-- aggregation: sum/count add, max/min, unique_count = size of the union of\n"
        "-- distinct values, latest = value of the greatest (latest_ts, latest_key).\n"
        "-- A window coarser than the period (a day window in the hourly view)\n"
        "-- appears at its own window start.\n"
    )
    statements = [meter_usage_view_sql(p) for p in ("hour", "day", "month")]
    statements.append(meter_usage_union_view_sql())
    return header + "\n" + ";\n\n".join(statements) + ";\n"


# ---------------------------------------------------------------- builders for the helpers


def _key_filters(
    meter: str | None,
    customer_id: str | None,
    start_ms: int | None,
    end_ms: int | None,
    customer_ids: Sequence[str] | None = None,
) -> str:
    parts = equal_to(meter=meter, customer_id=customer_id)
    if customer_ids is not None:
        parts.append(f"customer_id IN {sql_string_list(customer_ids)}")
    return " AND ".join(parts + in_range("window_start", start_ms, end_ms))


def equal_to(**values: str | None) -> list[str]:
    """A condition ``column = 'value'`` for each value given (None: no condition)."""
    return [f"{column} = {sql_string(v)}" for column, v in values.items() if v is not None]


def in_range(column: str, start_ms: int | None, end_ms: int | None) -> list[str]:
    """The conditions that ``column`` is in [start_ms, end_ms) (None: that end open)."""
    parts = []
    if start_ms is not None:
        parts.append(f"{column} >= {sql_ms(start_ms)}")
    if end_ms is not None:
        parts.append(f"{column} < {sql_ms(end_ms)}")
    return parts


def existing_keys_sql(pairs: Sequence[tuple[str, str]]) -> str:
    """Fingerprint of each (customer_id, idempotency_key) present in usage_events, and
    whether the key was set aside as unprocessable (``refused_meters = ['*']``).

    ``customer_id IN`` prunes by the primary key prefix; the tuple IN matches
    exact pairs (also served by the primary key (customer_id, idempotency_key)).
    """
    tuples = ", ".join(f"({sql_string(c)}, {sql_string(k)})" for c, k in sorted(set(pairs)))
    return (
        "SELECT customer_id, idempotency_key, any(fingerprint) AS fingerprint,"
        " max(has(refused_meters, '*')) AS excluded\n"
        "FROM usage_events\n"
        f"WHERE customer_id IN {sql_string_list(c for c, _ in pairs)}\n"
        f"  AND (customer_id, idempotency_key) IN ({tuples})\n"
        "GROUP BY customer_id, idempotency_key"
    )


def _distinct_per_customer_sql(
    table: str, distinct: str, time_column: str, customer_ids: Sequence[str], since_ms: int
) -> str:
    return (
        f"SELECT customer_id, uniqExact({distinct}) AS n\n"
        f"FROM {table}\n"
        f"WHERE customer_id IN {sql_string_list(customer_ids)}\n"
        f"  AND {time_column} >= {sql_ms(since_ms)}\n"
        "GROUP BY customer_id"
    )


def record_key_counts_sql(customer_ids: Sequence[str], since_ms: int) -> str:
    """Distinct idempotency keys per customer with ``timestamp >= since_ms`` (the record)."""
    return _distinct_per_customer_sql(
        "usage_events", "idempotency_key", "timestamp", customer_ids, since_ms
    )


def window_key_counts_sql(customer_ids: Sequence[str], since_ms: int) -> str:
    """Distinct windows per customer with ``window_start >= since_ms`` (meter_windows)."""
    return _distinct_per_customer_sql(
        "meter_windows", "meter, group_key, window_start", "window_start", customer_ids, since_ms
    )


def events_in_range_sql(
    customer_ids: Sequence[str] | None,
    event_names: Sequence[str] | None,
    start_ms: int,
    end_ms: int,
    *,
    without_correction: str | None = None,
) -> str:
    """Events of the effective record with ``start_ms <= timestamp < end_ms``, one row per
    (customer_id, key): voided events left out, amended ones with their new properties
    (the latest row of ``event_corrections`` per key wins, by (corrected_at,
    correction_id); ``without_correction``: as if that correction had not been made).

    ``LIMIT 1 BY`` (first ingested wins) rather than FINAL: it does not depend
    on merges or on duplicates sharing a partition, and keeps the result
    deterministic. A row marking the key unprocessable (``refused_meters = ['*']``) is
    written with the epoch as ``ingested_at`` (writer.UNPROCESSABLE_INGESTED_AT_MS), so
    it wins over the event's own row.
    """
    names = "" if event_names is None else f"  AND event_name IN {sql_string_list(event_names)}\n"
    customers = "1" if customer_ids is None else f"customer_id IN {sql_string_list(customer_ids)}"
    record = (
        f"SELECT {EVENT_COLUMNS_SQL}\n"
        "FROM usage_events\n"
        f"WHERE {customers}\n"
        f"{names}"
        f"  AND timestamp >= {sql_ms(start_ms)}\n"
        f"  AND timestamp < {sql_ms(end_ms)}\n"
        "ORDER BY customer_id, idempotency_key, ingested_at\n"
        "LIMIT 1 BY customer_id, idempotency_key"
    )
    return effective_sql(record, customers, without_correction)


def effective_sql(record: str, customers: str, without_correction: str | None = None) -> str:
    """``record`` (a query of :data:`EVENT_COLUMNS_SQL`, one row per key, of customers
    ``customers``) as the effective record: voided events out, amended properties in."""
    fixes = latest_corrections_sql(customers, without_correction)
    return (
        f"SELECT {EFFECTIVE_COLUMNS_SQL}\n"
        f"FROM (\n{textwrap.indent(record, '  ')}\n) AS e\n"
        f"LEFT JOIN (\n{textwrap.indent(fixes, '  ')}\n)"
        " AS c ON e.customer_id = c.customer_id AND e.idempotency_key = c.idempotency_key\n"
        "WHERE c.action != 'void'\n"
        "ORDER BY customer_id, idempotency_key"
    )


def latest_corrections_sql(where: str = "1", without_correction: str | None = None) -> str:
    """The correction that wins for each corrected event (``event_corrections``): its
    action and, for an amend, the new properties."""
    if without_correction is not None:
        where += f" AND correction_id != {sql_string(without_correction)}"
    return (
        "SELECT customer_id, idempotency_key,\n"
        "    argMax(action, (corrected_at, correction_id)) AS action,\n"
        "    argMax(properties, (corrected_at, correction_id)) AS properties\n"
        "FROM event_corrections\n"
        f"WHERE {where}\n"
        "GROUP BY customer_id, idempotency_key"
    )


def record_day_keys_sql(
    event_name: str, customer_ids: Sequence[str], start_ms: int, end_ms: int
) -> str:
    """Events of ``event_name`` per (customer, UTC day) in [start_ms, end_ms), counted
    over :func:`events_in_range_sql` itself (one per key, the first ingested): what a
    re-read of those days would hold."""
    inner = events_in_range_sql(customer_ids, [event_name], start_ms, end_ms)
    return (
        "SELECT customer_id, intDiv(timestamp_ms, 86400000) * 86400000 AS day_ms,"
        " count() AS n\n"
        "FROM (\n"
        f"{textwrap.indent(inner, '  ')}\n"
        ")\n"
        "GROUP BY customer_id, day_ms"
    )


def stored_day_totals_sql(
    meter: str, customer_ids: Sequence[str], start_ms: int, end_ms: int
) -> str:
    """One meter's stored windows (latest versions) starting in [start_ms, end_ms), merged
    per (customer, UTC day) like the views merge them (all groups together)."""
    inner = latest_windows_sql(_key_filters(meter, None, start_ms, end_ms, customer_ids))
    return (
        "SELECT customer_id, intDiv(toUnixTimestamp64Milli(window_start), 86400000)"
        " * 86400000 AS day_ms,\n"
        f"    {MERGED_VALUE_SQL} AS value,\n"
        "    toUInt64(sum(w_event_count)) AS event_count\n"
        "FROM\n(\n"
        f"{textwrap.indent(inner, '    ')}\n"
        ")\n"
        "GROUP BY customer_id, day_ms, aggregation"
    )


def meter_customers_sql(meter: str, event_name: str, start_ms: int, end_ms: int) -> str:
    """Customers with an event of ``event_name`` in [start_ms, end_ms) in the record, or a
    window of ``meter`` starting in it in meter_windows: everyone a reconciliation of
    that range can find a difference for."""
    return (
        "SELECT customer_id FROM (\n"
        "  SELECT customer_id FROM usage_events\n"
        f"  WHERE event_name = {sql_string(event_name)}\n"
        f"    AND timestamp >= {sql_ms(start_ms)} AND timestamp < {sql_ms(end_ms)}\n"
        "  UNION DISTINCT\n"
        "  SELECT customer_id FROM meter_windows\n"
        f"  WHERE {_key_filters(meter, None, start_ms, end_ms)}\n"
        ")\n"
        "ORDER BY customer_id"
    )


WINDOW_COLUMNS_SQL = (
    "meter, aggregation, customer_id, group_key,"
    " toUnixTimestamp64Milli(window_start) AS window_start_ms,"
    " toUnixTimestamp64Milli(window_end) AS window_end_ms,"
    " w_value AS value, w_event_count AS event_count,"
    " w_distinct_values AS distinct_values,"
    " toUnixTimestamp64Milli(latest_ts) AS latest_ts_ms, latest_key, version,"
    " toUnixTimestamp64Milli(updated_at) AS updated_at_ms"
)


def latest_windows_query_sql(
    meter: str | None = None,
    customer_id: str | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    customer_ids: Sequence[str] | None = None,
) -> str:
    """Latest version of each window whose start is in [start_ms, end_ms)."""
    where = _key_filters(meter, customer_id, start_ms, end_ms, customer_ids)
    inner = textwrap.indent(latest_windows_sql(where), "    ")
    return (
        f"SELECT {WINDOW_COLUMNS_SQL}\n"
        "FROM\n(\n"
        f"{inner}\n"
        ")\n"
        "ORDER BY meter, customer_id, group_key, window_start_ms"
    )


@dataclass(frozen=True)
class UsageQuery:
    """One customer's usage (:func:`usage`): windows starting in [from_ms, to_ms) (open
    where None), of one meter or all; with a ``period``, one row per period start."""

    customer_id: str
    meter: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    period: Period | None = None


def usage_sql(query: UsageQuery) -> str:
    """Totals per meter and group for windows starting in [from_ms, to_ms).

    Same SQL as the views (``merge_windows_sql``) with the filter pushed into
    the latest-version subquery; ``period_start`` comes back as epoch ms.
    """
    q = query
    merged = merge_windows_sql(q.period, _key_filters(q.meter, q.customer_id, q.from_ms, q.to_ms))
    head = "period, toUnixTimestamp64Milli(period_start) AS period_start_ms, " if q.period else ""
    order = "period_start_ms, " if q.period else ""
    return (
        f"SELECT {head}meter, aggregation, customer_id, group_key, value, event_count, windows\n"
        "FROM\n(\n"
        f"{textwrap.indent(merged, '    ')}\n"
        ")\n"
        f"ORDER BY {order}meter, group_key"
    )


REJECTED_COUNTS_SQL = (
    "SELECT reason, count() AS n FROM rejected_events GROUP BY reason ORDER BY reason"
)


# ---------------------------------------------------------------- functions


def _chunks_by_size(items: Sequence[tuple[str, str]], limit: int) -> list[list[tuple[str, str]]]:
    chunks: list[list[tuple[str, str]]] = [[]]
    size = 0
    for pair in items:
        # "(c, k), " in the tuple list, plus c again in the customer IN list (upper bound)
        customer = len(sql_string(pair[0]).encode())
        cost = 2 * customer + len(sql_string(pair[1]).encode()) + 8
        if chunks[-1] and size + cost > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(pair)
        size += cost
    return chunks


def customer_chunks(customers: Iterable[str], limit: int = MAX_SQL_BYTES) -> list[list[str]]:
    """``customers`` (distinct, sorted) in lists whose ``IN (...)`` text stays under
    ``limit`` bytes: a read of many customers' rows is one query per list."""
    chunks: list[list[str]] = [[]]
    size = 0
    for customer in sorted(set(customers)):
        cost = len(sql_string(customer).encode()) + 2
        if chunks[-1] and size + cost > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(customer)
        size += cost
    return chunks if chunks[-1] else []


class RecordedKey(NamedTuple):
    fingerprint: str
    excluded: bool  # set aside as unprocessable: counted by no meter


def recorded_keys(
    ch: ClickHouse, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], RecordedKey]:
    """Each (customer_id, idempotency_key) already in usage_events: its fingerprint and
    whether it was set aside as unprocessable.

    One query per call for ordinary batches (2000 pairs of ~40-byte ids is
    ~200 KB of SQL); only batches whose literals would pass ``MAX_SQL_BYTES``
    are split, to stay under the server's default ``max_query_size``.
    """
    unique = sorted(set(pairs))
    found: dict[tuple[str, str], RecordedKey] = {}
    if not unique:
        return found
    for chunk in _chunks_by_size(unique, MAX_SQL_BYTES):
        for customer_id, key, fingerprint, excluded in ch.query_rows(existing_keys_sql(chunk)):
            found[(customer_id, key)] = RecordedKey(fingerprint, bool(excluded))
    return found


def existing_keys(ch: ClickHouse, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Map each (customer_id, idempotency_key) already in usage_events to its fingerprint
    (:func:`recorded_keys` without the exclusion)."""
    return {pair: rec.fingerprint for pair, rec in recorded_keys(ch, pairs).items()}


def record_key_counts(ch: ClickHouse, customer_ids: Sequence[str], since_ms: int) -> dict[str, int]:
    """Per customer, the number of distinct record keys with ``timestamp >= since_ms``
    (customers with none are absent)."""
    return _counts_by_customer(ch, record_key_counts_sql, customer_ids, since_ms)


def _counts_by_customer(
    ch: ClickHouse,
    sql_of: Callable[[Sequence[str], int], str],
    customer_ids: Sequence[str],
    since_ms: int,
) -> dict[str, int]:
    counts: dict[str, int] = {}
    pairs = [(c, "") for c in sorted(set(customer_ids))]
    for chunk in _chunks_by_size(pairs, MAX_SQL_BYTES) if pairs else []:
        for customer_id, n in ch.query_rows(sql_of([c for c, _ in chunk], since_ms)):
            counts[str(customer_id)] = int(n)
    return counts


def window_key_counts(ch: ClickHouse, customer_ids: Sequence[str], since_ms: int) -> dict[str, int]:
    """Per customer, the number of distinct windows in ``meter_windows`` starting at or
    after ``since_ms`` (customers with none are absent)."""
    return _counts_by_customer(ch, window_key_counts_sql, customer_ids, since_ms)


def events_in_range(
    ch: ClickHouse,
    customer_ids: Sequence[str] | None,
    event_names: Sequence[str] | None,
    start_ms: int,
    end_ms: int,
    *,
    without_correction: str | None = None,
) -> list[dict[str, Any]]:
    """Events of the effective record (accepted, not voided, amendments applied) in
    [start_ms, end_ms), one per (customer_id, idempotency_key); see
    :func:`events_in_range_sql`.

    Each dict has exactly the :class:`meterstream.events.UsageEvent` fields
    (event_name, customer_id, idempotency_key, timestamp_ms, properties parsed
    with exact decimals, key_derived, fingerprint, refused_meters), so
    ``UsageEvent(**row)`` works. ``None`` means every customer / every event name;
    empty lists match nothing.
    """
    if customer_ids is not None and not customer_ids:
        return []
    if event_names is not None and not event_names:
        return []
    sql = events_in_range_sql(
        customer_ids, event_names, start_ms, end_ms, without_correction=without_correction
    )
    return [event_fields(row) for row in ch.query_plain_rows(sql)]


EVENT_COLUMNS_SQL: Final = (
    "event_name, customer_id, idempotency_key, toUnixTimestamp64Milli(timestamp) AS timestamp_ms,"
    "\n       properties, key_derived, fingerprint, refused_meters"
)
"""The record's columns that make a UsageEvent, in the order :func:`event_fields` reads."""
EFFECTIVE_COLUMNS_SQL: Final = (
    "e.event_name AS event_name, e.customer_id AS customer_id,"
    " e.idempotency_key AS idempotency_key, e.timestamp_ms AS timestamp_ms,"
    "\n       if(c.action = 'amend', c.properties, e.properties) AS properties,"
    " e.key_derived AS key_derived, e.fingerprint AS fingerprint,"
    " e.refused_meters AS refused_meters"
)
""":data:`EVENT_COLUMNS_SQL` of the effective record (``e``: the record, ``c``: the
latest correction per key, :func:`latest_corrections_sql`)."""


def event_fields(row: Sequence[Any]) -> dict[str, Any]:
    """A row of :data:`EVENT_COLUMNS_SQL` as the UsageEvent fields (``UsageEvent(**d)``)."""
    name, customer, key, ts, properties, derived, fingerprint, refused = row[:8]
    return {
        "event_name": name,
        "customer_id": customer,
        "idempotency_key": key,
        "timestamp_ms": int(ts),
        "properties": loads_exact(properties) if properties else {},
        "key_derived": bool(derived),
        "fingerprint": fingerprint,
        "refused_meters": tuple(refused) if refused else (),
    }


DAY_CHECK_CUSTOMERS = 500  # customers per query of day_check (SQL text stays small)


def day_check(
    ch: ClickHouse,
    meter: str,
    event_name: str,
    customer_ids: Sequence[str],
    start_ms: int,
    end_ms: int,
) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], tuple[Decimal, int]]]:
    """For each (customer, UTC day) in [start_ms, end_ms): the record's events of
    ``event_name`` (:func:`record_day_keys_sql`) and the meter's stored windows merged
    (value, event count; :func:`stored_day_totals_sql`). Days without any are absent."""
    record: dict[tuple[str, int], int] = {}
    stored: dict[tuple[str, int], tuple[Decimal, int]] = {}
    ordered = sorted(set(customer_ids))
    for i in range(0, len(ordered), DAY_CHECK_CUSTOMERS):
        chunk = ordered[i : i + DAY_CHECK_CUSTOMERS]
        for customer, day, n in ch.query_rows(
            record_day_keys_sql(event_name, chunk, start_ms, end_ms)
        ):
            record[(str(customer), int(day))] = int(n)
        for customer, day, value, count in ch.query_rows(
            stored_day_totals_sql(meter, chunk, start_ms, end_ms)
        ):
            key = (str(customer), int(day))
            # two rows for one day only if the meter's aggregation changed: never equal
            stored[key] = (Decimal(-1), -1) if key in stored else (Decimal(value), int(count))
    return record, stored


def meter_customers(
    ch: ClickHouse, meter: str, event_name: str, start_ms: int, end_ms: int
) -> list[str]:
    """Sorted customer ids of :func:`meter_customers_sql`."""
    rows = ch.query_rows(meter_customers_sql(meter, event_name, start_ms, end_ms))
    return [str(row[0]) for row in rows]


def latest_windows(
    ch: ClickHouse,
    meter: str | None = None,
    customer_id: str | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    customer_ids: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Latest version of each window (window_start in [start_ms, end_ms)); times in epoch ms.

    ``customer_ids``: only these customers (an empty list matches nothing)."""
    if customer_ids is not None and not customer_ids:
        return []
    rows = ch.query_dicts(
        latest_windows_query_sql(meter, customer_id, start_ms, end_ms, customer_ids)
    )
    for row in rows:
        for name in ("window_start_ms", "window_end_ms", "latest_ts_ms", "updated_at_ms"):
            row[name] = int(row[name])
        row["value"] = Decimal(row["value"])
        row["distinct_values"] = list(row["distinct_values"])
    return rows


def usage(ch: ClickHouse, query: UsageQuery) -> list[dict[str, Any]]:
    """Usage of one customer per meter and group (Subscribd's ``usageThisPeriod``).

    ``query.period`` None: one total per (meter, group) over windows starting in
    [from_ms, to_ms), merged per aggregation exactly like the views. With a
    period: one row per period start (``period_start_ms``), like the views.
    ``value`` is a Decimal; ``group_key`` is canonical JSON ('{}' when none).
    """
    period = query.period
    if period is not None and period not in PERIODS:
        raise ValueError(f"period must be one of {sorted(PERIODS)} or None, got {period!r}")
    rows = ch.query_dicts(usage_sql(query))
    for row in rows:
        row["value"] = Decimal(row["value"])
        row["event_count"] = int(row["event_count"])
        row["windows"] = int(row["windows"])
        if period is not None:
            row["period_start_ms"] = int(row["period_start_ms"])
    return rows


def rejected_counts(ch: ClickHouse) -> dict[str, int]:
    """Rejected events per reason."""
    return {str(reason): int(n) for reason, n in ch.query_rows(REJECTED_COUNTS_SQL)}
