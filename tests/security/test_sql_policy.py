"""The read-only SQL check on ClickHouse's live parse (``EXPLAIN AST`` and
``formatQuerySingleLine`` on a read-only connection), many spellings per class; and
what the engine itself refuses on the analyst connection, in case a check misses.

Runs on embedded chdb and, where Docker runs, on a ClickHouse server (skipped here).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meterstream.errors import ClickHouseError, QueryRefused
from meterstream.sinks.clickhouse.analyst import AnalystSQL, SqlLimits
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.migrate import migrate
from tests.integration.clickhouse_fixtures import *  # noqa: F403

pytestmark = pytest.mark.integration

# What analysts legitimately write: README and SCHEMA.md examples, views, EXPLAIN/DESCRIBE/SHOW.
ALLOWED = [
    "SELECT meter, group_key, value, event_count FROM meter_usage_monthly"
    " WHERE customer_id = 'acme' AND period_start = toStartOfMonth(now('UTC'))",
    "SELECT customer_id, sum(value) AS tokens FROM meter_usage_monthly WHERE meter = 'ai_tokens'"
    " GROUP BY customer_id ORDER BY tokens DESC LIMIT 10;",
    "SELECT toDate(received_at) AS day, countIf(reason = 'duplicate') AS exact FROM rejected_events"
    " GROUP BY day ORDER BY day",
    "SELECT event_name, count() FROM usage_events WHERE empty(meters) GROUP BY event_name",
    "SELECT customer_id, argMax(value, version), uniqExact(group_key), COUNT(*), Sum(1),"
    " count(DISTINCT customer_id), quantile(0.9)(1), sumMap(['a'], [1]) FROM meter_windows"
    " GROUP BY customer_id",
    "WITH recent AS (SELECT * FROM usage_events WHERE timestamp > now() - INTERVAL 1 DAY)"
    " SELECT customer_id, JSONExtractString(properties, 'model') AS model, count()"
    " FROM recent GROUP BY ALL",
    "SELECT x, row_number() OVER (PARTITION BY x % 2 ORDER BY x) FROM"
    " (SELECT number AS x FROM numbers(10))",
    "SELECT arrayMap(x -> x * 2, [1, 2]), CASE WHEN 1 THEN 'a' ELSE 'b' END, 1 IN (1, 2),"
    " customer_id IN (SELECT customer_id FROM usage_events), toDecimal128('1.5', 9)"
    " FROM usage_events LIMIT 1",
    "SELECT 1 UNION ALL SELECT 2",
    "SELECT * FROM values('x UInt8', 1, 2)",
    "SELECT name FROM system.tables WHERE database = currentDatabase()",
    "SELECT * FROM information_schema.columns WHERE table_name = 'usage_events'",
    "SELECT value FROM system.metrics WHERE metric = 'MemoryTracking'",
    "EXPLAIN SELECT count() FROM usage_events",
    "EXPLAIN PIPELINE SELECT count() FROM usage_events",
    "DESCRIBE TABLE usage_events",
    "DESC (SELECT 1 AS x)",
    "SHOW TABLES",
    "SHOW CREATE TABLE usage_events",
    "SHOW PROCESSLIST",
    "SELECT query_id, elapsed FROM system.processes",
    "SELECT value FROM system.settings WHERE name = 'max_execution_time'",
    "/* a comment */ select 1 -- and another",
]

REFUSED = [
    # scalar file(), every spelling
    "SELECT file('{secret}')",
    "SELECT FILE('{secret}')",
    "SELECT `file`('{secret}')",
    "SELECT fIlE('{secret}')",
    "SELECT file /* x */ ('{secret}')",
    "SELECT arrayMap(p -> file(p), ['{secret}'])",
    "SELECT file(concat('{dir}', '/secret.txt'))",
    "WITH '{secret}' AS p SELECT file(p)",
    "SELECT (SELECT file('{secret}'))",
    "SELECT 1 WHERE file('{secret}') != ''",
    "SELECT 1 ORDER BY 1 WITH FILL FROM length(file('{secret}')) TO 3",
    "SELECT 1 LIMIT length(file('{secret}'))",
    "SELECT x FROM (SELECT 1 AS x) QUALIFY length(file('{secret}')) > 0",
    "SELECT * EXCEPT (x) REPLACE (file('{secret}') AS y) FROM (SELECT 1 AS x, 2 AS y)",
    "SELECT $$'$$, file('{secret}') --'",
    # table functions and other sources
    "SELECT * FROM file('{secret}', 'LineAsString')",
    "SELECT * FROM numbers(1) AS a JOIN file('{secret}', 'LineAsString') AS b ON 1",
    "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
    "SELECT * FROM executable('id', 'TSV', 'x String')",
    "SELECT * FROM python(x)",
    "SELECT * FROM generateRandom('a String')",
    "SELECT 1 IN system.users",
    "SELECT * FROM system.disks",
    "SELECT * FROM `system`.`server_settings`",
    "SELECT dictGet('d', 'a', 1)",
    "SELECT joinGet('t', 'a', 1)",
    "SELECT getSetting('readonly')",
    "SELECT sleep(1)",
    "SELECT * APPLY(file) FROM (SELECT '{secret}' AS p)",
    # wrappers
    "DESCRIBE TABLE file('{secret}', 'LineAsString')",
    "DESCRIBE (SELECT file('{secret}'))",
    "EXPLAIN SELECT file('{secret}')",
    "EXPLAIN SYNTAX SELECT * FROM file('{secret}', 'LineAsString')",
    "EXPLAIN PIPELINE graph = 1 SELECT 1",
    # INTO OUTFILE in every place
    "SELECT 1 INTO OUTFILE '{out}'",
    "SELECT 1 INTO OUTFILE '{out}' APPEND",
    "SELECT 1 INTO OUTFILE '{out}' TRUNCATE",
    "SELECT 1 INTO OUTFILE '{out}' AND STDOUT",
    "SELECT 1 INTO OUTFILE '{out}' COMPRESSION 'gzip' LEVEL 3",
    "SELECT 1 UNION ALL SELECT 2 INTO OUTFILE '{out}'",
    "(SELECT 1) UNION DISTINCT (SELECT 2) INTO OUTFILE '{out}'",
    "(SELECT 1) EXCEPT (SELECT 2) INTO OUTFILE '{out}'",
    "((SELECT 1)) INTO OUTFILE '{out}'",
    "SELECT $$x$$ INTO OUTFILE '{out}'",
    "EXPLAIN SELECT 1 INTO OUTFILE '{out}'",
    "SHOW TABLES INTO OUTFILE '{out}'",
    # statements that are not reads, settings and formats
    "SELECT 1; SELECT 2",
    "INSERT INTO usage_events (idempotency_key) VALUES ('x')",
    "INSERT INTO FUNCTION file('{out}', 'CSV') SELECT 1",
    "SET readonly = 0",
    "SELECT 1 SETTINGS max_execution_time = 0",
    "SELECT 1 FORMAT CSV",
    "KILL QUERY WHERE 1",
    "SHOW GRANTS",
]


@pytest.fixture
def analyst(ch: ClickHouse) -> AnalystSQL:
    migrate(ch)
    sql = AnalystSQL(ch, SqlLimits())
    yield sql  # type: ignore[misc]
    sql.close()


@pytest.mark.parametrize("sql", ALLOWED)
def test_what_analysts_write_runs(analyst: AnalystSQL, sql: str) -> None:
    analyst.query(sql)


@pytest.mark.parametrize("sql", REFUSED)
def test_everything_else_is_refused(analyst: AnalystSQL, sql: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    out = tmp_path / "out.txt"
    text = sql.format(secret=secret, dir=tmp_path, out=out)
    with pytest.raises(ClickHouseError) as info:
        analyst.query(text)
    assert isinstance(info.value, QueryRefused) or info.value.code in (62, 164), info.value
    assert "SECRET" not in str(info.value)
    assert not out.exists()


def test_the_engine_refuses_what_a_check_might_miss(analyst: AnalystSQL, tmp_path: Path) -> None:
    """The analyst connection itself, given statements without the check."""
    runner = analyst._runner()
    for sql in [
        f"SELECT * FROM file('{tmp_path}/x', 'LineAsString')",  # readonly: no table functions
        "INSERT INTO usage_events (idempotency_key) VALUES ('x')",
        "SELECT sleep(1)",  # at most 1 us per block
        "SELECT addressToLine(1)",  # introspection off
        "SELECT 1 SETTINGS max_result_rows = 0",  # settings are fixed
    ]:
        with pytest.raises(ClickHouseError):
            runner.query_table(sql)
