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
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

from meterstream.answers import dumps
from meterstream.api.fate import read_fate
from meterstream.api.keys import KeyStore, retire_cli_key_file
from meterstream.cli.output import format_table
from meterstream.endpoints import web_url
from meterstream.errors import ClickHouseError, MeterstreamError
from meterstream.events import parse_time
from meterstream.meters.config import load_meters, meters_path
from meterstream.meters.windows import month_bounds, period_label
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.client import open_clickhouse

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


def call_worker(
    settings: Settings,
    method: str,
    url: str,
    data: bytes | None,
    timeout: float,
    refused: Callable[[int, str], Exception],
) -> Any:
    """``method`` ``url`` of the running worker with the CLI's key and the JSON ``data``;
    its JSON answer (exact decimals). A refusal raises ``refused(status, body text)``, an
    unreachable worker a :class:`MeterstreamError` naming the URL."""
    with cli_key(settings) as token:
        headers = {"Authorization": f"Bearer {token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read(), parse_float=Decimal)
        except urllib.error.HTTPError as exc:
            raise refused(exc.code, exc.read().decode(errors="replace")) from None
        except urllib.error.URLError as exc:
            raise MeterstreamError(f"worker at {url} not reachable: {exc.reason}") from None


def worker_request(settings: Settings, url: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body``) ``url`` of the running worker with the CLI's key; its JSON."""
    data = json.dumps(body).encode() if body is not None else None
    return call_worker(settings, "POST" if data else "GET", url, data, 120, _query_refused)


def _query_refused(status: int, detail: str) -> Exception:
    """The worker's error (and each problem, with its path) as a :class:`ClickHouseError`."""
    with contextlib.suppress(ValueError, AttributeError):
        answer = json.loads(detail)
        detail = answer.get("error", detail)
        if isinstance(answer.get("problems"), list):  # each with its path
            detail = "\n  - ".join([str(detail), *map(str, answer["problems"])])
    return ClickHouseError(str(detail))


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
        rows = queries.usage(ch, queries.UsageQuery(customer, meter, start, end))
        return json.loads(dumps(rows))
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


def event_fate(settings: Settings, customer: str, key: str) -> dict[str, Any]:
    """The fate of one event: from the running worker, or straight from ClickHouse."""
    url = web_url(settings)
    if url:
        path = "/".join(urllib.parse.quote(part, safe="") for part in (customer, key))
        return dict(worker_request(settings, f"{url}/v1/events/{path}"))
    ch = open_clickhouse(settings)
    try:
        answer = read_fate(ch, customer, key, load_meters(meters_path(settings)))
        return dict(json.loads(dumps(answer), parse_float=Decimal))
    finally:
        ch.close()


def format_fate(answer: dict[str, Any]) -> str:
    """An event's fate for a person: the verdict, then the evidence, one line each."""
    lines = [f"{answer['fate']}: {answer['summary']}"]
    event = answer.get("event")
    if event:
        lines.append(
            f"  event {event['event_name']} at {event['timestamp']},"
            f" recorded {event['recorded_at']}"
        )
    for line in answer.get("counted", []):
        if "window_start" not in line:
            lines.append(f"  counted by {line['meter']}: {line['note']}")
            continue
        lines.append(
            f"  counted by {line['meter']} ({line['aggregation']}): took {line['value_taken']}"
            f" in window {line['window_start']} .. {line['window_end']}"
            f" group {line['group_key']}; window now {line['window_value']}"
            f" ({line['window_event_count']} events)"
        )
    for line in answer.get("not_counted", []):
        lines.append(f"  not counted by {line['meter'] or '-'}: {line['reason']}: {line['detail']}")
    if answer.get("duplicates"):
        lines.append(f"  resent (not counted) at {', '.join(answer['duplicates'])}")
    for copy in answer.get("conflicting_copies", []) + answer.get("rejections", []):
        meter = f" [{copy['meter']}]" if copy.get("meter") else ""
        lines.append(f"  {copy['received_at']} {copy['reason']}{meter}: {copy['detail']}")
        if copy.get("raw"):
            lines.append(f"    as received: {copy['raw']}")
    shown = len(answer.get("conflicting_copies", [])) + len(answer.get("rejections", []))
    shown += len(answer.get("duplicates", []))
    if answer.get("rejections_total", 0) > shown:
        lines.append(f"  ({answer['rejections_total']} dead-letter rows in all)")
    return "\n".join(lines)


def print_event_fate(settings: Settings, customer: str, key: str, fmt: str) -> int:
    """Print the fate; exit 0 when the event is counted (once), 1 otherwise."""
    answer = event_fate(settings, customer, key)
    print(json.dumps(answer, default=str) if fmt == "json" else format_fate(answer))
    return 0 if answer["fate"] in ("counted", "duplicate", "conflicting") else 1


def reconcile_command(
    settings: Settings, start: str | None, end: str | None, repair: bool, as_json: bool = False
) -> int:
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
    from meterstream.cli.progress import progress

    ch = open_clickhouse(settings)
    found: list[dict[str, Any]] = []
    total = 0
    try:
        with progress("reconcile", len(meters.meters)) as advance:
            for meter in meters.meters:
                advance(0, f"reconcile {meter.name}")
                lo, _ = meter.window_bounds(start_ms)
                _, hi = meter.window_bounds(end_ms - 1)
                diffs, _, _ = reconcile_meter(ch, meters, meter, lo, hi, fix=repair)
                for diff in diffs:
                    if as_json:
                        found.append(difference_json(diff))
                    else:
                        print(diff.describe())
                total += len(diffs)
                advance()
    finally:
        ch.close()
    verb = "repaired" if repair else "found"
    if as_json:
        print(json.dumps({"differences": found, "repaired": repair}, sort_keys=True))
    print(f"{total} difference(s) {verb}", file=sys.stderr)
    return 0 if repair or total == 0 else 1


def difference_json(diff: Any) -> dict[str, Any]:
    """A reconcile difference for scripts: values as exact decimal strings."""
    key = diff.key
    return {
        "meter": key.meter,
        "customer_id": key.customer_id,
        "group_key": key.group_key,
        "window_start": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(key.window_start_ms / 1000)
        ),
        "stored_value": None if diff.stored_value is None else str(diff.stored_value),
        "stored_count": diff.stored_count,
        "record_value": str(diff.record_value),
        "record_count": diff.record_count,
    }
