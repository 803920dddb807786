"""``meterstream corrections void|amend|list|show`` and ``meterstream backfill``: fixing
history (issue #26), through the running worker's API (it owns the record, the windows
and the Faust tables, and rebuilds what a correction changes). See README "Fixing history".
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meterstream.cli.options import SettingsOf, command_group, group_parent
from meterstream.cli.output import add_format, print_doc
from meterstream.errors import MeterstreamError
from meterstream.events import canonical_json, loads_exact
from meterstream.settings import Settings

BATCH = 1000  # events per POST /v1/backfill (the route takes up to 5,000)


def _settings(args: argparse.Namespace) -> Settings:
    settings: Settings = args.settings_of(args)
    return settings


def _call(args: argparse.Namespace, method: str, tail: str, body: Any = None) -> Any:
    from meterstream.billing.customers import _request
    from meterstream.endpoints import web_url

    settings = _settings(args)
    url = web_url(settings)
    if not url:
        raise MeterstreamError(
            "corrections and backfills need the running worker (meterstream run): it "
            "rebuilds what they change"
        )
    data = None if body is None else canonical_json(body).encode()
    return _request(settings, method, f"{url}{tail}", data)


def _key(text: str) -> dict[str, str]:
    customer, sep, key = text.partition("/")
    if not sep or not customer or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CUSTOMER/IDEMPOTENCY_KEY")
    return {"customer_id": customer, "idempotency_key": key}


def _filter(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'{text!r}: expected a JSON filter {{"property": ..., "operator": ..., "value": ...}}'
        ) from None


def _common_body(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": kind, "reason": args.reason, "dry_run": args.dry_run}
    if args.author:
        body["author"] = args.author
    if args.correction_id:
        body["correction_id"] = args.correction_id
    return body


def _result_text(doc: Any) -> None:
    if doc.get("status") == "dry_run":
        print(f"dry run of a {doc['kind']}: {doc['events_affected']} event(s); nothing changed")
        for p in doc.get("periods", []):
            print(
                f"  {p['customer_id']}  {p['meter']}  {p['period']}:"
                f" {p['before']['value']} -> {p['after']['value']} ({p['change']})"
            )
        for s in doc.get("stripe", []):
            print(
                f"  stripe {s['customer_id']} {s['meter']} {s['period']}: {s['mode']} {s['value']}"
            )
        return
    note = " (repeat: nothing changed)" if doc.get("repeated") else ""
    print(
        f"{doc['correction_id']}: {doc['kind']} {doc['status']}, {doc['events_affected']}"
        f" event(s), {doc['windows_affected']} window(s) rebuilt{note}"
    )
    for missing in doc.get("not_found", []):
        key = f"{missing['customer_id']}/{missing['idempotency_key']}"
        print(f"  not found (never recorded, or voided): {key}")


def cmd_void(args: argparse.Namespace) -> int:
    body = _common_body(args, "void")
    if args.key:
        body["keys"] = args.key
    else:
        for name, field in (
            ("customer", "customer_id"),
            ("event_name", "event_name"),
            ("meter", "meter"),
            ("from_", "from"),
            ("to", "to"),
        ):
            if getattr(args, name):
                body[field] = getattr(args, name)
        if args.where:
            body["where"] = args.where
    print_doc(_call(args, "POST", "/v1/corrections", body), args.format, _result_text)
    return 0


def cmd_amend(args: argparse.Namespace) -> int:
    body = _common_body(args, "amend")
    item = _key(args.key)
    try:
        item["properties"] = loads_exact(args.properties)
    except ValueError:
        raise MeterstreamError("--properties must be a JSON object") from None
    body["keys"] = [item]
    print_doc(_call(args, "POST", "/v1/corrections", body), args.format, _result_text)
    return 0


def _list_text(doc: Any) -> None:
    for c in doc["corrections"]:
        print(
            f"{c['correction_id']}  {c['kind']:8}  {c['events_affected']:>7} event(s)  "
            f"{c['author']}: {c['reason']}"
        )


def cmd_list(args: argparse.Namespace) -> int:
    print_doc(_call(args, "GET", f"/v1/corrections?limit={args.limit}"), args.format, _list_text)
    return 0


def _show_text(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, default=str))


def cmd_show(args: argparse.Namespace) -> int:
    tail = f"/v1/corrections/{urllib.parse.quote(args.correction_id, safe='')}"
    print_doc(_call(args, "GET", tail), args.format, _show_text)
    return 0


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, loads_exact(line)
            except ValueError as exc:
                raise MeterstreamError(f"{path}:{number}: not JSON: {exc}") from None


def _merge_counts(total: dict[str, int], doc: Any) -> None:
    for outcome, n in doc.get("counts", {}).items():
        total[outcome] = total.get(outcome, 0) + n


def cmd_backfill(args: argparse.Namespace) -> int:
    from meterstream.cli.progress import progress

    base: dict[str, Any] = {"reason": args.reason, "dry_run": args.dry_run}
    if args.author:
        base["author"] = args.author
    totals: dict[str, int] = {}
    problems: list[Any] = []
    if args.rejected:
        body = {**base, "rejected": args.rejected}
        for name, field in (("customer", "customer_id"), ("from_", "from"), ("to", "to")):
            if getattr(args, name):
                body[field] = getattr(args, name)
        doc = _call(args, "POST", "/v1/backfill", body)
        _merge_counts(totals, doc)
        problems.extend(doc.get("outcomes", []))
    else:
        if not args.file:
            raise MeterstreamError("give a file of events (JSON lines) or --rejected too_late")
        path = Path(args.file)
        lines = sum(1 for line in path.open("rb") if line.strip())
        with progress(f"backfill {path.name}", lines) as advance:
            batch: list[Any] = []
            for _, event in _lines(path):
                batch.append(event)
                if len(batch) == args.batch_size:
                    doc = _call(args, "POST", "/v1/backfill", {**base, "events": batch})
                    _merge_counts(totals, doc)
                    problems.extend(doc.get("outcomes", []))
                    advance(len(batch))
                    batch = []
            if batch:
                doc = _call(args, "POST", "/v1/backfill", {**base, "events": batch})
                _merge_counts(totals, doc)
                problems.extend(doc.get("outcomes", []))
                advance(len(batch))
    result = {"counts": totals, "dry_run": args.dry_run, "outcomes": problems}
    if args.format == "json":
        print(json.dumps(result, sort_keys=True, default=str))
    else:
        what = "would be" if args.dry_run else "were"
        for outcome, n in sorted(totals.items()):
            print(f"{n} event(s) {what} {outcome}")
        for o in problems:
            if o.get("rejected"):
                print(
                    f"  event {o['index']}: rejected {o['rejected']}: {o.get('detail', '')}",
                    file=sys.stderr,
                )
    return 0


def register(sub: Any, common: argparse.ArgumentParser, settings_of: SettingsOf) -> None:
    """Add the ``corrections`` command group and ``backfill``."""
    base = group_parent(common, settings_of)
    add_format(base)
    change = argparse.ArgumentParser(add_help=False, parents=[base])
    change.add_argument("--reason", required=True, help="why history is changed (logged)")
    change.add_argument("--author", help="who asks (logged, with the API key)")
    change.add_argument("--dry-run", action="store_true", help="show the effect, change nothing")
    change.add_argument(
        "--id", dest="correction_id", help="an id of your own (a retry is harmless)"
    )
    csub = command_group(sub, "corrections", "void or amend recorded events; the log")
    p = csub.add_parser("void", parents=[change], help="void events by key or by range")
    p.add_argument(
        "--key", action="append", type=_key, help="CUSTOMER/IDEMPOTENCY_KEY (repeatable)"
    )
    p.add_argument("--customer")
    p.add_argument("--event-name", dest="event_name")
    p.add_argument("--meter")
    p.add_argument("--from", dest="from_", help="RFC 3339 or epoch ms (inclusive)")
    p.add_argument("--to", help="RFC 3339 or epoch ms (exclusive)")
    p.add_argument(
        "--where", action="append", type=_filter, help="a JSON property filter (repeatable)"
    )
    p.set_defaults(func=cmd_void)
    p = csub.add_parser("amend", parents=[change], help="replace an event's properties")
    p.add_argument("key", help="CUSTOMER/IDEMPOTENCY_KEY")
    p.add_argument("--properties", required=True, help="the new properties, a JSON object")
    p.set_defaults(func=cmd_amend)
    p = csub.add_parser("list", parents=[base], help="the corrections log, newest first")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_list)
    p = csub.add_parser("show", parents=[base], help="one correction and its events")
    p.add_argument("correction_id")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser(
        "backfill",
        parents=[base],
        help="import historical events (JSON lines) exactly once, or re-import too_late ones",
    )
    p.add_argument("file", nargs="?", help="events, one JSON object per line")
    p.add_argument("--rejected", choices=["too_late"], help="re-import rejected_events of it")
    p.add_argument("--customer")
    p.add_argument("--from", dest="from_", help="received at or after (with --rejected)")
    p.add_argument("--to", help="received before (with --rejected)")
    p.add_argument("--reason", required=True, help="why (logged)")
    p.add_argument("--author")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=BATCH)
    p.set_defaults(func=cmd_backfill)
