"""``meterstream customers ...`` and ``meterstream stripe ...``.

* ``customers set ID STRIPE_ID`` / ``unset ID`` / ``get ID`` / ``list``: the
  operator's customer mapping, kept in ClickHouse (pipeline/billing/customers.py); through
  the running worker (``/v1/stripe/customers``) while it holds the embedded engine,
  otherwise directly; ``get`` also prints the customer's changes (who, when).
* ``stripe create-meters``: creates the missing Stripe meters with the formula
  each aggregation needs (sum/count -> ``sum``; max/min/unique_count/latest ->
  ``last``); refuses (exit 1) an existing meter whose formula or payload keys
  contradict it.
* ``stripe retry``: re-sends the ledger rows in ``error`` with their
  identifiers, the Stripe customer id resolved again (exit 1 if any still fails).
* ``stripe reconcile --period YYYY-MM``: Stripe's meter event summaries against
  meterstream's period totals, per meter and customer; prints every
  difference (exit 1 if any).
* ``stripe corrections [--period YYYY-MM] [--check]``: what Stripe holds wrong and
  meterstream can no longer correct (periods past the correction horizon, `last`
  ties past Stripe's 24 hours), per meter, customer and period, with the amount to
  credit (ClickHouse ``stripe_uncorrectable``); ``--check`` first compares the
  periods past the horizon with the record again (exit 1 if anything is listed).

retry and reconcile need ClickHouse: while a worker holds the embedded engine
(``endpoints.json`` names its web server, or ``--worker URL``) they run inside
it (``/v1/stripe/retry``, ``/v1/stripe/reconcile``); otherwise they open
ClickHouse directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

from meterstream.cli.options import command_group, settings_from
from meterstream.cli.output import add_format
from meterstream.cli.plans import register_stripe
from meterstream.cli.sql import worker_request
from meterstream.endpoints import kafka_bootstrap, web_url
from meterstream.errors import MeterstreamError, StripeError
from meterstream.meters.config import load_meters, meters_path
from meterstream.meters.windows import month_bounds
from meterstream.metrics import Metrics
from meterstream.settings import Settings
from meterstream.topics import STRIPE_ERRORS


def _worker_url(args: argparse.Namespace, settings: Settings) -> str | None:
    return getattr(args, "worker_url", None) or web_url(settings)


# ------------------------------------------------------------------ customers


def cmd_customers_set(args: argparse.Namespace) -> int:
    from meterstream.billing.customers import set_mapping

    try:
        result = set_mapping(settings_from(args), args.customer_id, args.stripe_customer_id)
    except ValueError as exc:
        raise MeterstreamError(str(exc)) from None
    note = "" if result.get("change") else " (unchanged)"
    print(f"{args.customer_id} -> {args.stripe_customer_id}{note}")
    return 0


def cmd_customers_unset(args: argparse.Namespace) -> int:
    from meterstream.billing.customers import set_mapping

    try:
        result = set_mapping(settings_from(args), args.customer_id, None)
    except ValueError as exc:
        raise MeterstreamError(str(exc)) from None
    note = "" if result.get("change") else " (was not mapped)"
    print(f"{args.customer_id} -> (no mapping){note}")
    return 0


def _print_held(held: list[dict[str, str]]) -> None:
    for item in held:
        print(f"held {item['meter']} {item['customer_id']}: {item['reason']}", file=sys.stderr)


def cmd_customers_get(args: argparse.Namespace) -> int:
    from meterstream.billing.customers import get_mapping

    found = get_mapping(settings_from(args), args.customer_id)
    if args.format == "json":
        print(json.dumps(found, sort_keys=True, default=str))
    elif found["stripe_customer_id"]:
        print(found["stripe_customer_id"])
    if args.format != "json":
        for change in found["history"]:
            print(
                f"  {change['changed_at']} {change['stripe_customer_id'] or '(removed)'} "
                f"by {change['changed_by']} ({change['origin']})",
                file=sys.stderr,
            )
        _print_held(found.get("held", []))
    if not found["stripe_customer_id"]:
        print(f"{args.customer_id}: no mapping", file=sys.stderr)
        return 1
    return 0


def cmd_customers_list(args: argparse.Namespace) -> int:
    from meterstream.billing.customers import list_mappings

    found = list_mappings(settings_from(args))
    mapping = {r["customer_id"]: r["stripe_customer_id"] for r in found["customers"]}
    if args.format == "json":
        print(json.dumps(mapping, sort_keys=True))
    else:
        for customer, stripe_id in sorted(mapping.items()):
            print(f"{customer}\t{stripe_id}")
        print(f"({len(mapping)} mapping(s))", file=sys.stderr)
        _print_held(found.get("held", []))
    return 0


# ------------------------------------------------------------------ stripe


def cmd_create_meters(args: argparse.Namespace) -> int:
    from meterstream.billing.deliver import meter_spec, stripe_client

    settings = settings_from(args)
    meters = load_meters(meters_path(settings))
    client = stripe_client(settings)
    existing = {m["event_name"] for m in client.list_meters() if m.get("status") == "active"}
    refused = 0
    for meter in meters.meters:
        block = meter.stripe
        if block is None:
            continue
        spec = meter_spec(meter)
        formula = spec.formula
        try:
            stripe_meter = client.ensure_meter(spec)
        except StripeError as exc:
            if exc.code != "meter_mismatch":
                raise
            refused += 1
            print(
                f"REFUSED {meter.name}: {exc}. A {meter.aggregation} meter needs formula "
                f"{formula!r}; Stripe meters cannot be changed: deactivate that meter in Stripe "
                "or use another stripe.event_name.",
                file=sys.stderr,
            )
            continue
        verb = "exists " if block.event_name in existing else "created"
        print(
            f"{verb} {meter.name}: Stripe meter {stripe_meter['id']} "
            f"(event {block.event_name}, formula {formula})"
        )
    return 1 if refused else 0


def _direct_forwarder(settings: Settings) -> tuple[Any, Any]:
    """A Forwarder over a direct ClickHouse connection (no worker is running)."""
    from meterstream.billing.deliver import error_message, stripe_client
    from meterstream.billing.forwarding import Forwarder
    from meterstream.sinks.clickhouse.calls import ClickHouseIO
    from meterstream.sinks.clickhouse.client import open_clickhouse
    from meterstream.sinks.clickhouse.migrate import migrate
    from meterstream.sinks.stripe.ledger import LedgerRow

    meters = load_meters(meters_path(settings))
    ch = open_clickhouse(settings)
    migrate(ch)  # the mapping's tables (0007) may be newer than the last worker's start
    calls = ClickHouseIO(ch, Metrics(), max_backoff=1.0)

    async def publish_error(row: LedgerRow, message: str) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap(settings), acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(
                settings.topic(STRIPE_ERRORS.name),
                key=row.identifier.encode(),
                value=error_message(row, message),
            )
        finally:
            await producer.stop()

    forwarder = Forwarder(
        settings, meters, calls, stripe_client(settings), publish_error=publish_error
    )
    return forwarder, calls


def _get_json(settings: Settings, url: str, body: dict[str, Any] | None = None) -> Any:
    try:
        return worker_request(settings, url, body)
    except MeterstreamError:
        raise
    except Exception as exc:  # pragma: no cover - reported, not raised
        raise MeterstreamError(f"worker request {url} failed: {exc}") from None


def _through_forwarder(
    args: argparse.Namespace,
    settings: Settings,
    request: tuple[str, dict[str, Any] | None],
    answer: str,
    direct: Callable[[Any], list[Any]],
) -> list[Any]:
    """``answer`` of the running worker's route (``request``: path and body), or, when no
    worker holds ClickHouse, ``direct(forwarder)`` on a forwarder of this process."""
    url = _worker_url(args, settings)
    if url:
        path, body = request
        result = _get_json(settings, f"{url}{path}", body)
        if "error" in result:
            verb = path.rsplit("/", 1)[-1].split("?")[0]  # retry, reconcile
            raise MeterstreamError(f"the worker could not {verb}: {result['error']}")
        return list(result[answer])
    forwarder, calls = _direct_forwarder(settings)
    try:
        return direct(forwarder)
    finally:
        calls.close()


def cmd_retry(args: argparse.Namespace) -> int:
    def retry(forwarder: Any) -> list[Any]:
        from meterstream.billing.deliver import row_summary  # the Stripe SDK: see main

        return [row_summary(r) for r in asyncio.run(forwarder.retry_errors())]

    settings = settings_from(args)
    rows = _through_forwarder(args, settings, ("/v1/stripe/retry", {}), "rows", retry)
    if not rows:
        print("nothing to retry: no ledger row is in error")
        return 0
    failed = 0
    for row in rows:
        status = row["status"]
        failed += status == "error"
        extra = f" ({row['error_code']})" if row.get("error_code") else ""
        if status == "pending":
            extra = " (queued: the worker that owns this customer sends it next)"
        print(
            f"{status:8} {row['identifier']} {row['meter']} customer={row['customer_id']} "
            f"stripe_customer={row['stripe_customer_id']} value={row['value']}{extra}"
        )
    print(f"{len(rows) - failed} of {len(rows)} delivered or queued", file=sys.stderr)
    return 1 if failed else 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    try:
        month_bounds(args.period)
    except ValueError as exc:
        raise MeterstreamError(str(exc)) from None
    query = urllib.parse.urlencode({"period": args.period})
    lines = _through_forwarder(
        args,
        settings,
        (f"/v1/stripe/reconcile?{query}", None),
        "lines",
        lambda forwarder: [
            d.describe() for d in asyncio.run(forwarder.compare_with_stripe(args.period))
        ],
    )
    for line in lines:
        print(line)
    print(
        f"{args.period}: {len(lines)} difference(s) between Stripe and meterstream", file=sys.stderr
    )
    return 1 if lines else 0


def _print_uncorrectable(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        held = "undefined (tie)" if r["stripe_value"] is None else r["stripe_value"]
        print(
            f"{r['period']} {r['meter']} customer={r['customer_id']} "
            f"stripe_customer={r['stripe_customer_id'] or '-'}: Stripe bills {held}, "
            f"meterstream {r['expected']} (exact {r['exact_total']}); difference "
            f"{r['difference']:+d}; credit {r['to_credit']} ({r['reason']})"
        )


def cmd_corrections(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.period is not None:
        try:
            month_bounds(args.period)
        except ValueError as exc:
            raise MeterstreamError(str(exc)) from None
    url = _worker_url(args, settings)
    if url:
        query = f"?{urllib.parse.urlencode({'period': args.period})}" if args.period else ""
        if args.check:
            body = {"period": args.period} if args.period else {}
            result = _get_json(settings, f"{url}/v1/stripe/corrections", body)
        else:
            result = _get_json(settings, f"{url}/v1/stripe/corrections{query}")
        if "error" in result:
            raise MeterstreamError(f"the worker could not list corrections: {result['error']}")
        rows = list(result["uncorrectable"])
    else:
        from meterstream.sinks.stripe import uncorrectable as report

        forwarder, calls = _direct_forwarder(settings)
        try:
            if args.check:
                asyncio.run(forwarder.check_past_periods(args.period))
            rows = report.current(calls.ch, args.period)
        finally:
            calls.close()
    _print_uncorrectable(rows, args.format == "json")
    credit = sum(r["to_credit"] for r in rows)
    print(
        f"{len(rows)} series Stripe holds wrong and meterstream no longer corrects; "
        f"{credit} unit(s) to credit",
        file=sys.stderr,
    )
    return 1 if rows else 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``customers`` and ``stripe`` command groups to the ``meterstream`` parser."""
    csub = command_group(sub, "customers", "customer -> Stripe customer mapping")
    p = csub.add_parser("set", parents=[common], help="map a customer to a Stripe customer id")
    p.add_argument("customer_id")
    p.add_argument("stripe_customer_id")
    p.set_defaults(func=cmd_customers_set)
    p = csub.add_parser("unset", parents=[common], help="delete a customer's mapping")
    p.add_argument("customer_id")
    p.set_defaults(func=cmd_customers_unset)
    p = csub.add_parser(
        "get", parents=[common], help="a customer's Stripe customer id and its changes"
    )
    p.add_argument("customer_id")
    add_format(p)
    p.set_defaults(func=cmd_customers_get)
    p = csub.add_parser("list", parents=[common], help="every mapping")
    add_format(p)
    p.set_defaults(func=cmd_customers_list)

    ssub = command_group(sub, "stripe", "Stripe meters, retries and reconciliation")
    p = ssub.add_parser(
        "create-meters", parents=[common], help="create missing Stripe meters (refuse mismatches)"
    )
    p.add_argument("--meters", help="meters YAML file")
    p.set_defaults(func=cmd_create_meters)
    register_stripe(ssub, common, settings_from)
    p = ssub.add_parser("retry", parents=[common], help="re-send ledger rows in error")
    p.add_argument("--meters", help="meters YAML file")
    p.add_argument("--worker", dest="worker_url", help="the running worker's web URL")
    p.set_defaults(func=cmd_retry)
    p = ssub.add_parser(
        "reconcile", parents=[common], help="compare Stripe's summaries with meterstream's totals"
    )
    p.add_argument("--period", required=True, help="billing period YYYY-MM")
    p.add_argument("--meters", help="meters YAML file")
    p.add_argument("--worker", dest="worker_url", help="the running worker's web URL")
    p.set_defaults(func=cmd_reconcile)
    p = ssub.add_parser(
        "corrections",
        parents=[common],
        help="what Stripe holds wrong and can no longer be corrected (amounts to credit)",
    )
    p.add_argument("--period", help="billing period YYYY-MM (default: every period)")
    p.add_argument(
        "--check", action="store_true", help="compare the periods past the horizon again first"
    )
    p.add_argument("--meters", help="meters YAML file")
    p.add_argument("--worker", dest="worker_url", help="the running worker's web URL")
    add_format(p)
    p.set_defaults(func=cmd_corrections)
