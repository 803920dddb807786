"""Golden tests of the ClickHouse SQL text, migrations, row builders and the batch writer.

No ClickHouse here: the integration tests run the same SQL on chdb (and on a
server where Docker exists).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from meterstream.events import Reason, Rejection, UsageEvent, content_fingerprint
from meterstream.meters.aggregation import aggregator_for
from meterstream.sinks.clickhouse import queries as q
from meterstream.sinks.clickhouse.migrate import MIGRATIONS_DIR, checksum, load_migrations
from meterstream.sinks.clickhouse.sqltext import split_statements
from meterstream.sinks.clickhouse.writer import (
    METER_WINDOWS_COLUMNS,
    REJECTED_EVENTS_COLUMNS,
    USAGE_EVENTS_COLUMNS,
    decimal_38_9,
    meter_window_row,
    rejected_row,
    usage_event_row,
    utc_datetime,
)
from tests.support import MIGRATIONS

HOURLY_VIEW_SQL = """\
CREATE OR REPLACE VIEW meter_usage_hourly AS
SELECT
    CAST('hour' AS LowCardinality(String)) AS period,
    toDateTime64(toStartOfHour(window_start), 3, 'UTC') AS period_start,
    meter,
    aggregation,
    customer_id,
    group_key,
    CAST(multiIf(
        aggregation IN ('sum', 'count'), sum(w_value),
        aggregation = 'max', max(w_value),
        aggregation = 'min', min(w_value),
        aggregation = 'unique_count', toDecimal128(length(groupUniqArrayArray(w_distinct_values)), 9),
        aggregation = 'latest', argMax(w_value, (latest_ts, latest_key)),
        toDecimal128(0, 9)
    ), 'Decimal(38, 9)') AS value,
    toUInt64(sum(w_event_count)) AS event_count,
    toUInt64(count()) AS windows
FROM
(
    SELECT
        meter,
        customer_id,
        group_key,
        window_start,
        toLowCardinality(w.1) AS aggregation,
        w.2 AS window_end,
        w.3 AS w_value,
        w.4 AS w_event_count,
        w.5 AS w_distinct_values,
        w.6 AS latest_ts,
        w.7 AS latest_key,
        w.8 AS version,
        w.9 AS updated_at
    FROM
    (
        SELECT
            meter,
            customer_id,
            group_key,
            window_start,
            argMax(
                (aggregation, window_end, value, event_count, distinct_values, latest_ts, latest_key, version, updated_at),
                version
            ) AS w
        FROM meter_windows
        GROUP BY meter, customer_id, group_key, window_start
    )
)
GROUP BY period_start, meter, aggregation, customer_id, group_key"""  # noqa: E501


# ---------------------------------------------------------------- views and migrations


def test_hourly_view_sql_is_golden() -> None:
    assert q.meter_usage_view_sql("hour") == HOURLY_VIEW_SQL


@pytest.mark.parametrize(
    ("period", "view", "start_fn"),
    [
        ("day", "meter_usage_daily", "toStartOfDay"),
        ("month", "meter_usage_monthly", "toStartOfMonth"),
    ],
)
def test_daily_and_monthly_views_differ_from_hourly_only_in_period(
    period: q.Period, view: str, start_fn: str
) -> None:
    expected = (
        HOURLY_VIEW_SQL.replace("meter_usage_hourly", view)
        .replace("'hour'", f"'{period}'")
        .replace("toStartOfHour", start_fn)
    )
    assert q.meter_usage_view_sql(period) == expected


def test_meter_usage_is_the_union_of_the_period_views() -> None:
    assert q.meter_usage_union_view_sql() == (
        "CREATE OR REPLACE VIEW meter_usage AS\n"
        "SELECT * FROM meter_usage_hourly\n"
        "UNION ALL\n"
        "SELECT * FROM meter_usage_daily\n"
        "UNION ALL\n"
        "SELECT * FROM meter_usage_monthly"
    )


def test_views_migration_file_is_generated_by_the_python_function() -> None:
    text = (MIGRATIONS_DIR / "0005_meter_usage_views.sql").read_text(encoding="utf-8")
    assert text == q.views_migration_sql(), (
        "migrations/0005 differs from queries.views_migration_sql(); applied migrations must not "
        "change: add a new migration for a new view definition"
    )
    statements = split_statements(text)
    assert [s.splitlines()[-1] if s.startswith("--") else s.split("\n")[0] for s in statements][
        1:
    ] == [
        "CREATE OR REPLACE VIEW meter_usage_daily AS",
        "CREATE OR REPLACE VIEW meter_usage_monthly AS",
        "CREATE OR REPLACE VIEW meter_usage AS",
    ]
    assert statements[0].endswith(HOURLY_VIEW_SQL)


def test_migration_files_are_versioned_in_order() -> None:
    migrations = load_migrations()
    assert [m.name for m in migrations] == MIGRATIONS
    assert [m.version for m in migrations] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert all(m.checksum == checksum(m.sql) for m in migrations)
    assert [len(m.statements) for m in migrations] == [1, 1, 1, 1, 4, 1, 3, 1, 3, 5, 3, 2, 2]


def _squash(sql: str) -> str:
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return re.sub(r"\s+", " ", body).strip()


def test_usage_events_ddl() -> None:
    sql = _squash((MIGRATIONS_DIR / "0001_usage_events.sql").read_text())
    assert sql == (
        "CREATE TABLE IF NOT EXISTS usage_events ( idempotency_key String, customer_id String,"
        " event_name LowCardinality(String), timestamp DateTime64(3, 'UTC'),"
        " properties String COMMENT 'canonical JSON text of the properties object, exact decimals',"
        " fingerprint String COMMENT 'content hash (event_name, timestamp, properties) to detect"
        " idempotency conflicts',"
        " key_derived UInt8 COMMENT '1 when the idempotency key was derived from the content',"
        " ingested_at DateTime64(3, 'UTC'),"
        " INDEX idx_timestamp timestamp TYPE minmax GRANULARITY 1 )"
        " ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(timestamp)"
        " ORDER BY (customer_id, idempotency_key)"
        " SETTINGS non_replicated_deduplication_window = 1000;"
    )
    assert "key order ~ time order" in (MIGRATIONS_DIR / "0001_usage_events.sql").read_text()


@pytest.mark.parametrize(
    ("file", "fragments"),
    [
        (
            "0002_meter_windows.sql",
            [
                "value Decimal(38, 9),",
                "distinct_values Array(String),",
                "ENGINE = ReplacingMergeTree(version) PARTITION BY toYYYYMM(window_start)"
                " ORDER BY (meter, customer_id, group_key, window_start)"
                " SETTINGS non_replicated_deduplication_window = 1000;",
            ],
        ),
        (
            "0003_rejected_events.sql",
            [
                "reason LowCardinality(String),",
                "ENGINE = MergeTree PARTITION BY toYYYYMM(received_at)"
                " ORDER BY (reason, received_at)"
                " SETTINGS non_replicated_deduplication_window = 1000;",
            ],
        ),
        (
            "0004_stripe_meter_events.sql",
            [
                "exact_total Decimal(38, 9) COMMENT",
                "ENGINE = ReplacingMergeTree(version) ORDER BY identifier",
            ],
        ),
    ],
)
def test_table_ddl_fragments(file: str, fragments: list[str]) -> None:
    sql = _squash((MIGRATIONS_DIR / file).read_text())
    for fragment in fragments:
        assert fragment in sql


# ---------------------------------------------------------------- statement splitting


# ---------------------------------------------------------------- query builders


def test_existing_keys_sql_escapes_and_sorts() -> None:
    sql = q.existing_keys_sql([("c1", "k1"), ("c'2", "k\\2"), ("c1", "k0"), ("c1", "k1")])
    assert sql == (
        "SELECT customer_id, idempotency_key, any(fingerprint) AS fingerprint,"
        " max(has(refused_meters, '*')) AS excluded\n"
        "FROM usage_events\n"
        "WHERE customer_id IN ('c\\'2', 'c1')\n"
        "  AND (customer_id, idempotency_key)"
        " IN (('c\\'2', 'k\\\\2'), ('c1', 'k0'), ('c1', 'k1'))\n"
        "GROUP BY customer_id, idempotency_key"
    )


def test_events_in_range_sql_reads_the_effective_record() -> None:
    assert q.events_in_range_sql(["c2", "c1"], ["api_call"], 1000, 2000) == (
        "SELECT e.event_name AS event_name, e.customer_id AS customer_id,"
        " e.idempotency_key AS idempotency_key, e.timestamp_ms AS timestamp_ms,\n"
        "       if(c.action = 'amend', c.properties, e.properties) AS properties,"
        " e.key_derived AS key_derived, e.fingerprint AS fingerprint,"
        " e.refused_meters AS refused_meters\n"
        "FROM (\n"
        "  SELECT event_name, customer_id, idempotency_key,"
        " toUnixTimestamp64Milli(timestamp) AS timestamp_ms,\n"
        "         properties, key_derived, fingerprint, refused_meters\n"
        "  FROM usage_events\n"
        "  WHERE customer_id IN ('c1', 'c2')\n"
        "    AND event_name IN ('api_call')\n"
        "    AND timestamp >= fromUnixTimestamp64Milli(toInt64(1000), 'UTC')\n"
        "    AND timestamp < fromUnixTimestamp64Milli(toInt64(2000), 'UTC')\n"
        "  ORDER BY customer_id, idempotency_key, ingested_at\n"
        "  LIMIT 1 BY customer_id, idempotency_key\n"
        ") AS e\n"
        "LEFT JOIN (\n"
        "  SELECT customer_id, idempotency_key,\n"
        "      argMax(action, (corrected_at, correction_id)) AS action,\n"
        "      argMax(properties, (corrected_at, correction_id)) AS properties\n"
        "  FROM event_corrections\n"
        "  WHERE customer_id IN ('c1', 'c2')\n"
        "  GROUP BY customer_id, idempotency_key\n"
        ") AS c ON e.customer_id = c.customer_id AND e.idempotency_key = c.idempotency_key\n"
        "WHERE c.action != 'void'\n"
        "ORDER BY customer_id, idempotency_key"
    )
    assert "event_name IN" not in q.events_in_range_sql(["c1"], None, 0, 1)
    without = q.events_in_range_sql(["c1"], None, 0, 1, without_correction="cor_'x")
    assert "AND correction_id != 'cor_\\'x'" in without


def test_usage_sql_uses_the_view_merge_with_filters_on_key_columns() -> None:
    sql = q.usage_sql(q.UsageQuery("c1", "m", 0, 3_600_000, None))
    assert sql.startswith(
        "SELECT meter, aggregation, customer_id, group_key, value, event_count, windows\nFROM\n("
    )
    assert sql.endswith(")\nORDER BY meter, group_key")
    assert (
        "WHERE meter = 'm' AND customer_id = 'c1'"
        " AND window_start >= fromUnixTimestamp64Milli(toInt64(0), 'UTC')"
        " AND window_start < fromUnixTimestamp64Milli(toInt64(3600000), 'UTC')\n"
    ) in sql
    assert q.MERGED_VALUE_SQL.replace("\n", "\n    ") in sql
    assert "GROUP BY meter, aggregation, customer_id, group_key\n" in sql
    hourly = q.usage_sql(q.UsageQuery("c1", period="hour"))
    assert hourly.startswith(
        "SELECT period, toUnixTimestamp64Milli(period_start) AS period_start_ms, meter,"
    )
    assert "WHERE customer_id = 'c1'\n" in hourly
    assert hourly.endswith("ORDER BY period_start_ms, meter, group_key")


def test_usage_sql_without_filters_is_the_view_query() -> None:
    inner = q.merge_windows_sql("day")
    assert q.meter_usage_view_sql("day") == f"CREATE OR REPLACE VIEW meter_usage_daily AS\n{inner}"


def test_latest_windows_query_sql_filters() -> None:
    sql = q.latest_windows_query_sql("m", None, 5, None)
    assert (
        "WHERE meter = 'm' AND window_start >= fromUnixTimestamp64Milli(toInt64(5), 'UTC')\n" in sql
    )
    assert sql.endswith("ORDER BY meter, customer_id, group_key, window_start_ms")
    assert "WHERE" not in q.latest_windows_query_sql()


def test_rejected_counts_sql() -> None:
    assert q.REJECTED_COUNTS_SQL == (
        "SELECT reason, count() AS n FROM rejected_events GROUP BY reason ORDER BY reason"
    )


def test_existing_keys_chunks_only_past_the_size_limit() -> None:
    small = [(f"cust_{i % 7}", f"01J{i:037d}") for i in range(2000)]
    assert len(q._chunks_by_size(sorted(small), q.MAX_SQL_BYTES)) == 1
    big = [(f"c{i}", "k" * 200) for i in range(2000)]
    chunks = q._chunks_by_size(big, q.MAX_SQL_BYTES)
    assert len(chunks) > 1
    assert [p for c in chunks for p in c] == big


def test_customer_chunks_stay_under_the_limit() -> None:
    ids = [f"c{i}" for i in range(5000)] + ["c1"]  # a repeat is read once
    chunks = q.customer_chunks(ids, limit=1000)
    assert sorted(c for chunk in chunks for c in chunk) == sorted(set(ids))
    assert all(len(q.sql_string_list(chunk)) <= 1000 + 10 for chunk in chunks)
    assert q.customer_chunks([]) == []


# ---------------------------------------------------------------- row builders


def _event(**kw: Any) -> UsageEvent:
    base: dict[str, Any] = {
        "event_name": "api_call",
        "customer_id": "cus_1",
        "idempotency_key": "01J000",
        "timestamp_ms": 1_706_745_600_123,
        "properties": {"tokens": Decimal("1.50"), "model": "x", "nested": {"b": 1, "a": 2}},
    }
    base.update(kw)
    return UsageEvent(**base)


def test_usage_event_row() -> None:
    row = usage_event_row(_event(key_derived=True), 1_706_745_601_000)
    assert len(row) == len(USAGE_EVENTS_COLUMNS)
    assert row == (
        "01J000",
        "cus_1",
        "api_call",
        1_706_745_600_123,  # DateTime64(3) ticks: 2024-02-01 00:00:00.123 UTC
        '{"model":"x","nested":{"a":2,"b":1},"tokens":1.50}',
        content_fingerprint(
            "api_call",
            1_706_745_600_123,
            {"tokens": Decimal("1.50"), "model": "x", "nested": {"b": 1, "a": 2}},
        ),
        1,
        1_706_745_601_000,
        [],
        [],
    )
    assert usage_event_row(_event(fingerprint="given"), 0)[5] == "given"
    assert usage_event_row(_event(), 0, ["b", "a"])[-2] == ["a", "b"]
    assert usage_event_row(_event(), 0, ["a"], ["z", "y"])[-2:] == (["a"], ["y", "z"])


def test_rejected_row() -> None:
    rejection = Rejection(Reason.INVALID_JSON, "bad", b"\xff{", "c", "k", "m")
    assert rejected_row(rejection, 1000) == (
        datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC),
        "invalid_json",
        "bad",
        "\ufffd{",
        "c",
        "k",
        "m",
    )
    assert len(REJECTED_EVENTS_COLUMNS) == 7


def _state(**kw: Any) -> SimpleNamespace:
    base: dict[str, Any] = {
        "event_count": 3,
        "value": None,
        "distinct": None,
        "latest_ts": 0,
        "latest_key": "",
    }
    base.update(kw)
    return SimpleNamespace(**base)


def test_meter_window_row_per_aggregation() -> None:
    uniq = meter_window_row(
        "seats", "unique_count", "c", "{}", 0, 3_600_000,
        _state(distinct={"b", "a"}, latest_ts=5, latest_key="k"), 7, 9, value=Decimal(2),
    )  # fmt: skip
    assert len(uniq) == len(METER_WINDOWS_COLUMNS)
    assert uniq == (
        "seats", "unique_count", "c", "{}", 0, 3_600_000,
        Decimal("2.000000000"), 3, ["a", "b"], 0, "", 7, 9,
    )  # fmt: skip
    state = _state(distinct={"b", "a"})
    agg = aggregator_for("unique_count")
    presorted = agg.dump(agg.load({"distinct": ["b", "a"], "event_count": 3}))["distinct"]
    assert presorted == ["a", "b"]  # what the worker passes: the dump's sorted list
    assert meter_window_row(
        "seats", "unique_count", "c", "{}", 0, 3_600_000, state, 7, 9,
        value=Decimal(2), sorted_distinct=presorted,
    ) == uniq  # fmt: skip
    latest = meter_window_row(
        "plan", "latest", "c", '{"r":"eu"}', 0, 60_000,
        _state(distinct={"x"}, latest_ts=59_999, latest_key="k9"), 2, 9, value=Decimal("4.5"),
    )  # fmt: skip
    assert latest[8] == [] and latest[9] == 59_999 and latest[10] == "k9"
    assert latest[6] == Decimal("4.5")


def test_decimal_38_9_rounds_half_even_and_checks_range() -> None:
    assert decimal_38_9(Decimal("0.0000000015")) == Decimal("0.000000002")
    assert decimal_38_9(Decimal("0.0000000025")) == Decimal("0.000000002")
    assert decimal_38_9(Decimal("-1.1234567894")) == Decimal("-1.123456789")
    assert decimal_38_9(Decimal("-99999999999999999999999999999.999999999")) == Decimal(
        "-99999999999999999999999999999.999999999"
    )
    for bad in ("1e29", "1e100", "NaN", "Infinity"):
        with pytest.raises(ValueError):
            decimal_38_9(Decimal(bad))


def test_utc_datetime_is_exact() -> None:
    assert utc_datetime(1_706_745_600_999) == datetime(2024, 2, 1, 0, 0, 0, 999000, tzinfo=UTC)
    assert utc_datetime(-1) == datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)


def test_usage_event_rows_leave_out_refused_meters_unless_needed() -> None:
    from meterstream.sinks.clickhouse.writer import unprocessable_row, usage_event_rows

    a, b = _event(), _event(idempotency_key="01J001")
    counted = {("cus_1", "01J000"): ["m"], ("cus_1", "01J001"): ["m"]}
    rows, columns = usage_event_rows([a, b], 5, counted, {})
    assert columns == USAGE_EVENTS_COLUMNS[:-1] and all(len(r) == len(columns) for r in rows)
    rows, columns = usage_event_rows([a, b], 5, counted, {("cus_1", "01J001"): ["x"]})
    assert columns == USAGE_EVENTS_COLUMNS
    assert [r[-1] for r in rows] == [[], ["x"]]
    mark = unprocessable_row(a)
    assert (mark[-3], mark[-2], mark[-1]) == (0, [], ["*"])  # ingested at the epoch: read first
