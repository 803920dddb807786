"""Read-side commands: ``sql``, ``usage``, ``reconcile``.

While ``meterstream run`` holds the embedded engine (chdb allows one process
per data path) these go through the worker's web endpoints; otherwise they
open ClickHouse directly (clickhouse-connect and the optional chdb are loaded then,
in the function that opens it, so the commands that go through the worker do not
load them).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from meterstream.answers import dumps
from meterstream.api.keys import KeyStore, retire_cli_key_file
from meterstream.cli.output import format_table
from meterstream.endpoints import web_url
from meterstream.errors import ClickHouseError, MeterstreamError
from meterstream.events import parse_time
from meterstream.meters.config import load_meters, meters_path
from meterstream.meters.windows import month_bounds, period_label
from meterstream.settings import Settings

CLI_KEY_SECONDS = 900  # longer than any request the CLI makes (120 s timeout)


@contextlib.contextmanager
def cli_key(settings: Settings) -> Iterator[str]:
    """METERSTREAM_API_KEY, or a key for this one request to a worker on this machine.

    The key is made in the key file the worker shares (state dir), expires in
    CLI_KEY_SECONDS and is deleted when the block ends; its secret exists only
    in this process. An old ``cli.key`` file is revoked and deleted first.
    """
    if settings.api_key is not None:
        yield settings.api_key.get_secret_value()
        return
    store = KeyStore(settings.keys_file)
    retire_cli_key_file(store, settings.state_dir)
    try:
        key, token = store.create("local-cli", expires_in=CLI_KEY_SECONDS)
    except OSError as exc:
        raise MeterstreamError(
            f"cannot make a key for this command in {store.path} ({exc});"
            " set METERSTREAM_API_KEY to a key from `meterstream keys create`"
        ) from None
    try:
        yield token
    finally:
        store.discard(key.id)


def worker_request(settings: Settings, url: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body``) ``url`` of the running worker with the CLI's key; its JSON."""
    data = json.dumps(body).encode() if body is not None else None
    with cli_key(settings) as token:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        request = urllib.request.Request(
            url, data=data, headers=headers, method="POST" if data else "GET"
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read(), parse_float=Decimal)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            with contextlib.suppress(ValueError):
                detail = json.loads(detail).get("error", detail)
            raise ClickHouseError(str(detail)) from None
        except urllib.error.URLError as exc:
            raise MeterstreamError(f"worker at {url} not reachable: {exc.reason}") from None


def run_sql(settings: Settings, sql: str) -> tuple[list[str], list[list[Any]]]:
    url = web_url(settings)
    if url:
        result = worker_request(settings, f"{url}/v1/sql", {"sql": sql})
        return result["columns"], result["rows"]
    from meterstream.sinks.clickhouse.analyst import AnalystSQL
    from meterstream.sinks.clickhouse.client import open_clickhouse
    from meterstream.sinks.clickhouse.reads import sql_limits

    ch = open_clickhouse(settings)
    analyst = AnalystSQL(
        ch, sql_limits(settings), analyst_user=settings.sql_clickhouse_user is not None
    )
    try:
        columns, rows = analyst.query(sql)
        return list(columns), [list(r) for r in json.loads(dumps(rows))]
    finally:
        analyst.close()
        ch.close()


def usage_rows(
    settings: Settings, customer: str, meter: str | None, period: str | None
) -> list[dict[str, Any]]:
    period = period or period_label(time.time_ns() // 1_000_000)
    start, end = month_bounds(period)
    url = web_url(settings)
    if url:
        query = {"from": str(start), "to": str(end)}
        if meter:
            query["meter"] = meter
        path = urllib.parse.quote(customer, safe="")
        result = worker_request(
            settings, f"{url}/v1/customers/{path}/usage?{urllib.parse.urlencode(query)}"
        )
        return list(result["usage"])
    from meterstream.sinks.clickhouse import queries
    from meterstream.sinks.clickhouse.client import open_clickhouse

    ch = open_clickhouse(settings)
    try:
        return json.loads(dumps(queries.usage(ch, customer, meter, start, end, None)))
    finally:
        ch.close()


def print_usage(
    settings: Settings, customer: str, meter: str | None, period: str | None, fmt: str
) -> None:
    rows = usage_rows(settings, customer, meter, period)
    if fmt == "json":
        print(json.dumps(rows, default=str))
        return
    columns = ["meter", "aggregation", "group_key", "value", "event_count"]
    print(format_table(columns, [[r.get(c) for c in columns] for r in rows]))


def reconcile_command(settings: Settings, start: str | None, end: str | None, repair: bool) -> int:
    from meterstream.billing.record import reconcile_meter
    from meterstream.sinks.clickhouse.client import open_clickhouse

    if web_url(settings) and not (settings.clickhouse_dsn or "").startswith("http"):
        raise MeterstreamError(
            "the running worker holds the embedded ClickHouse; stop `meterstream run` first "
            "(or use a ClickHouse server)"
        )
    meters = load_meters(meters_path(settings))
    now = time.time_ns() // 1_000_000
    start_ms = parse_time(start) or month_bounds(period_label(now))[0]
    end_ms = parse_time(end) or now
    ch = open_clickhouse(settings)
    total = 0
    try:
        for meter in meters.meters:
            lo, _ = meter.window_bounds(start_ms)
            _, hi = meter.window_bounds(end_ms - 1)
            diffs, _, _ = reconcile_meter(ch, meters, meter, lo, hi, fix=repair)
            for diff in diffs:
                print(diff.describe())
            total += len(diffs)
    finally:
        ch.close()
    verb = "repaired" if repair else "found"
    print(f"{total} difference(s) {verb}", file=sys.stderr)
    return 0 if repair or total == 0 else 1
