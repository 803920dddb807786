"""``meterstream meters diff OLD.yaml NEW.yaml``: the record's totals under two meters
files, per customer, meter, group and billing period (a UTC month), or per window; and
``meterstream meters recompute METER --from``: a meter's history rebuilt under the file
the worker runs with, an audited correction (pipeline/worker/recompute.py).

Both files are validated first (every problem with its path: exit 2). While
``meterstream run`` holds the embedded engine (chdb allows one process per data path)
the record is read through the worker's ``POST /v1/meters/diff`` (an operator key,
pipeline/api/routes/meters.py); otherwise straight from ClickHouse (the DSN), as
``sql`` and ``usage`` choose (pipeline/cli/sql.py).
"""

from __future__ import annotations

import json
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterstream.cli.output import format_table
from meterstream.cli.sql import worker_request
from meterstream.endpoints import web_url
from meterstream.errors import ConfigError, MeterstreamError
from meterstream.events import parse_time
from meterstream.meters.config import MetersConfig, load_meters, meters_path
from meterstream.meters.diff import DiffScope
from meterstream.meters.windows import month_bounds, period_label
from meterstream.settings import Settings


def time_range(period: str | None, start: str | None, end: str | None) -> tuple[int, int]:
    """[start, end) in epoch ms: ``--from``/``--to``, or the month ``--period`` (default:
    the current month); :class:`ConfigError` for a bad flag."""
    try:
        if start or end:
            if period:
                raise ValueError("give --period or --from/--to, not both")
            lo, hi = parse_time(start), parse_time(end)
            if lo is None:
                raise ValueError("--from is required with --to")
            hi = hi if hi is not None else time.time_ns() // 1_000_000
            if hi <= lo:
                raise ValueError("--to must be after --from")
            return lo, hi
        return month_bounds(period or period_label(time.time_ns() // 1_000_000))
    except ValueError as exc:
        raise ConfigError([str(exc)], source="meters diff") from None


def load_both(old_path: str, new_path: str) -> tuple[MetersConfig, MetersConfig]:
    """Both meters files, validated; one :class:`ConfigError` with every problem of
    either, each as ``FILE: path: problem``."""
    configs: list[MetersConfig] = []
    problems: list[str] = []
    for path in (old_path, new_path):
        try:
            configs.append(load_meters(Path(path)))
        except ConfigError as exc:
            problems += [f"{path}: {line}" for line in exc.problems]
    if problems:
        raise ConfigError(problems, source="meters diff")
    return configs[0], configs[1]


def meters_diff(
    settings: Settings, old_path: str, new_path: str, scope: DiffScope
) -> dict[str, Any]:
    """The diff's JSON (:meth:`meterstream.meters.diff.MetersDiff.as_json`)."""
    old, new = load_both(old_path, new_path)
    meter = scope.meter
    if meter is not None and meter not in {m.name for m in old.meters + new.meters}:
        raise ConfigError([f"--meter: {meter!r} is in neither file"], source="meters diff")
    url = web_url(settings)
    if url:
        body = {
            "old": Path(old_path).read_text(encoding="utf-8"),
            "new": Path(new_path).read_text(encoding="utf-8"),
            "from": scope.start_ms,
            "to": scope.end_ms,
            "customer": scope.customer,
            "meter": meter,
            "by_window": scope.by_window,
        }
        return dict(worker_request(settings, f"{url}/v1/meters/diff", body))
    from meterstream.billing.record import diff_from_record
    from meterstream.sinks.clickhouse.client import open_clickhouse

    ch = open_clickhouse(settings)
    try:
        return diff_from_record(ch, old, new, scope).as_json()
    finally:
        ch.close()


def format_diff(answer: dict[str, Any], by_window: bool) -> str:
    """The rows as a table; then each meter's status (and refusals decided now)."""
    columns = ["customer_id", "meter", "group_key", "period"]
    columns += ["window_start"] if by_window else []
    columns += ["status", "old", "new", "difference"]
    rows = []
    for row in answer["rows"]:
        line: list[Any] = [row["customer_id"], row["meter"], row["group_key"], row["period"]]
        if by_window:
            start = row["window_start_ms"]
            line.append(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start / 1000)))
        line += [row["status"], _side(row["old"]), _side(row["new"]), row["difference"]]
        rows.append(line)
    out = [format_table(columns, rows)]
    for name, status in answer["meters"].items():
        refused = answer["refused"].get(name)
        note = f"; {refused} event(s) refused by its range, decided now" if refused else ""
        out.append(f"{name}: {status}{note}")
    return "\n".join(out)


def _side(total: dict[str, Any] | None) -> str:
    if total is None:
        return "-"
    flag = " OUT OF RANGE" if total["out_of_range"] else ""
    return f"{total['value']} ({total['event_count']} ev){flag}"


def print_meters_diff(settings: Settings, args: Any) -> int:
    start, end = time_range(args.period, args.start, args.end)
    scope = DiffScope(start, end, customer=args.customer, meter=args.meter, by_window=args.window)
    answer = meters_diff(settings, args.old, args.new, scope)
    if args.format == "json":
        print(json.dumps(answer, sort_keys=True))
    else:
        print(format_diff(answer, args.window))
    changed = sum(1 for row in answer["rows"] if Decimal(str(row["difference"])) != 0)
    print(f"{changed} total(s) differ", file=sys.stderr)
    return 0


def meters_recompute(settings: Settings, args: Any) -> dict[str, Any]:
    """``meterstream meters recompute``'s answer: through the running worker (its
    ``POST /v1/meters/recompute``); a dry run without a worker reads ClickHouse itself,
    with the meters file of ``--meters`` / ``METERSTREAM_METERS_FILE``."""
    start, end = time_range(None, args.start, args.end)
    url = web_url(settings)
    if url:
        body = {
            "meter": args.meter,
            "from": start,
            "to": end,
            "customer": args.customer,
            "dry_run": args.dry_run,
            "by_window": args.window,
            "author": args.author or None,
            "reason": args.reason,
            "correction_id": args.correction_id,
        }
        return dict(worker_request(settings, f"{url}/v1/meters/recompute", body))
    if not args.dry_run:
        raise MeterstreamError(
            "a recompute needs the running worker (meterstream run): its corrections agent "
            "rebuilds the windows; --dry-run works without one"
        )
    from meterstream.sinks.clickhouse.client import open_clickhouse
    from meterstream.worker.recompute import preview

    meters = load_meters(meters_path(settings))
    if args.meter not in {m.name for m in meters.meters}:
        raise ConfigError([f"{args.meter!r} is not a meter of the file"], source="meters")
    ch = open_clickhouse(settings)
    try:
        return preview(ch, meters, args.meter, start, end, args.customer, args.window)
    finally:
        ch.close()


def print_meters_recompute(settings: Settings, args: Any) -> int:
    if not args.dry_run and not args.reason:
        raise ConfigError(["--reason is required (it goes into the corrections log)"])
    answer = meters_recompute(settings, args)
    if args.format == "json":
        print(json.dumps(answer, sort_keys=True, default=str))
    elif answer.get("status") == "dry_run":
        print(format_diff(answer, args.window))
    else:
        repeated = " (a repeat: rebuilt again)" if answer.get("repeated") else ""
        print(
            f"{answer['correction_id']}: recompute of {args.meter} by {answer['author']}:"
            f" {answer['windows_affected']} window(s) being rebuilt from the record,"
            f" {answer['events_affected']} event(s) counted{repeated}"
        )
    return 0
