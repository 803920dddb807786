"""``meterstream plans ...``, ``meterstream invoice preview`` and ``stripe create-prices``.

* ``plans check [FILE]``: validates a plans file (default: ``--plans`` or
  ``METERSTREAM_PLANS_FILE``), every problem at once, each
  priced meter checked against the meters file when one is found.
* ``plans assign CUSTOMER PLAN --from DATE`` / ``plans unassign CUSTOMER --from DATE`` /
  ``plans list [CUSTOMER]``: the customers' plan schedules
  (pipeline/billing/assignments.py), through the running worker while it holds the
  embedded ClickHouse, otherwise directly (and published on ``customer-plans``).
* ``invoice preview CUSTOMER [--period YYYY-MM]``: the invoice so far, from the
  verified record (pipeline/worker/invoices.py), through the worker or directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meterstream.cli.options import command_group
from meterstream.cli.output import add_format
from meterstream.errors import ConfigError, MeterstreamError
from meterstream.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from the common flags, by the function ``register`` was given."""
    settings: Settings = args.settings_of(args)
    return settings


def _meters_or_none(settings: Settings) -> Any:
    from meterstream.meters.config import load_meters, meters_path

    try:
        return load_meters(meters_path(settings))
    except ConfigError as exc:
        if any("not found" in p for p in exc.problems):
            return None
        raise


def _plans(settings: Settings) -> Any:
    from meterstream.worker.invoices import load_plans_for

    return load_plans_for(settings, _meters_or_none(settings))


# ------------------------------------------------------------------ plans check


def cmd_plans_check(args: argparse.Namespace) -> int:
    from meterstream.pricing.money import plain
    from meterstream.pricing.plans import load_plans

    settings = _settings(args)
    path = Path(args.file) if args.file else settings.plans_file
    if path is None:
        raise ConfigError(["no plans file: give FILE, --plans or METERSTREAM_PLANS_FILE"], "plans")
    meters = _meters_or_none(settings)
    plans = load_plans(path, meters)
    for plan in plans.plans:
        fee = f", base fee {plan.base_fee} {plan.currency}" if not plan.base_fee.is_zero() else ""
        priced = ", ".join(
            f"{p.meter} ({p.tiers_mode or p.billing_scheme})" for p in plan.prices
        )  # fmt: skip
        limited = "".join(f"; limit {m} {plain(v)}/month" for m, v in sorted(plan.limits.items()))
        print(f"ok  {plan.name}: {plan.currency}{fee}; {priced or 'no prices'}{limited}")
    note = "" if meters is not None else " (no meters file found: priced meters not checked)"
    print(
        f"{path}: {len(plans.plans)} plan(s), default plan {plans.default.name}, no problems{note}"
    )
    return 0


# ------------------------------------------------------------------ schedules


def _plans_url(base: str, customer_id: str) -> str:
    return f"{base}/v1/customers/{urllib.parse.quote(customer_id, safe='')}/plans"


def _operator() -> str:
    from meterstream.billing.customers import _operator as who

    return who()


def _direct_change(
    settings: Settings, customer: str, plan: str | None, when: int
) -> dict[str, Any]:
    from meterstream.billing.assignments import (
        publish,
        with_assignment,
        without_assignment,
    )
    from meterstream.billing.customers import direct_change
    from meterstream.sinks.clickhouse import pricing as store

    def record(ch: Any) -> store.ScheduleRow | None:
        current = store.current_schedules(ch, [customer]).get(customer)
        schedule = current.schedule if current else ()
        if plan is None:
            schedule = without_assignment(schedule, when)
        else:
            schedule = with_assignment(schedule, plan, when)
        return store.append_schedule(ch, customer, schedule, "cli", _operator())

    return direct_change(
        settings,
        record,
        lambda row, bootstrap: publish(settings, bootstrap, customer, row.schedule, row.version),
    )


def _change(args: argparse.Namespace, plan: str | None) -> int:
    from meterstream.billing.assignments import BadSchedule, check_plan_name, iso, parse_instant
    from meterstream.billing.customers import _request, check_customer_id
    from meterstream.endpoints import web_url

    settings = _settings(args)
    try:
        customer = check_customer_id(args.customer)
        when = parse_instant(args.start)
        if plan is not None:
            check_plan_name(plan, [p.name for p in _plans(settings).plans])
    except (BadSchedule, ValueError) as exc:
        raise MeterstreamError(str(exc)) from None
    url = web_url(settings)
    if url:
        if plan is None:
            query = urllib.parse.urlencode({"from": iso(when)})
            result = _request(settings, "DELETE", f"{_plans_url(url, customer)}?{query}")
        else:
            body = {"plan": plan, "from": iso(when)}
            result = _request(settings, "PUT", _plans_url(url, customer), body)
    else:
        try:
            result = _direct_change(settings, customer, plan, when)
        except BadSchedule as exc:
            raise MeterstreamError(str(exc)) from None
    what = f"{plan} from {iso(when)}" if plan else f"plan change at {iso(when)} removed"
    note = "" if result.get("change") else " (unchanged)"
    print(f"{customer}: {what}{note}")
    return 0


def cmd_plans_assign(args: argparse.Namespace) -> int:
    return _change(args, args.plan)


def cmd_plans_unassign(args: argparse.Namespace) -> int:
    return _change(args, None)


def cmd_plans_list(args: argparse.Namespace) -> int:
    from meterstream.billing.customers import _direct, _request
    from meterstream.endpoints import web_url
    from meterstream.sinks.clickhouse import pricing as store

    settings = _settings(args)
    default = _plans(settings).default.name
    url = web_url(settings)
    schedules: dict[str, list[dict[str, str]]] = {}
    if url and args.customer:
        schedules[args.customer] = _request(settings, "GET", _plans_url(url, args.customer))[
            "plans"
        ]
    elif url:
        raise MeterstreamError(
            "listing every customer's plans needs ClickHouse: while the worker runs, use "
            "`meterstream plans list CUSTOMER` or `meterstream sql` on customer_plans"
        )
    else:
        ch = _direct(settings)
        try:
            rows = store.current_schedules(ch, [args.customer] if args.customer else None)
        finally:
            ch.close()
        schedules = {c: r.public()["plans"] for c, r in rows.items() if r.schedule}
        if args.customer:
            schedules.setdefault(args.customer, [])
    if args.format == "json":
        print(json.dumps({"default_plan": default, "customers": schedules}, sort_keys=True))
        return 0
    for customer, plans in sorted(schedules.items()):
        steps = ", then ".join(f"{p['plan']} from {p['from']}" for p in plans)
        print(f"{customer}\t{default} until the first plan" + (f", then {steps}" if steps else ""))
    print(f"({len(schedules)} customer(s); default plan {default})", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ invoice preview


def preview_of(settings: Settings, customer: str, period: str | None) -> dict[str, Any]:
    """The preview document, through the worker or directly."""
    from meterstream.billing.customers import _direct, _request
    from meterstream.endpoints import web_url
    from meterstream.meters.windows import period_label
    from meterstream.pricing.invoice import Period
    from meterstream.worker.invoices import preview_document

    label = period or period_label(time.time_ns() // 1_000_000)
    month = Period.month(label)
    url = web_url(settings)
    if url:
        query = urllib.parse.urlencode({"period": label})
        path = urllib.parse.quote(customer, safe="")
        return dict(_request(settings, "GET", f"{url}/v1/customers/{path}/invoice-preview?{query}"))
    plans = _plans(settings)
    ch = _direct(settings)
    try:
        return preview_document(ch, plans, customer, month)
    finally:
        ch.close()


def _tiers(line: dict[str, Any]) -> str:
    tiers = line.get("tiers")
    if not tiers:
        return ""
    return "; ".join(
        f"tier {t['tier']}: {t['units']} x {t['unit_price']} + {t['flat_price']} = {t['amount']}"
        for t in tiers
    )


def cmd_invoice_preview(args: argparse.Namespace) -> int:
    from meterstream.cli.sql import format_table

    doc = preview_of(_settings(args), args.customer, args.period)
    if args.format == "json":
        print(json.dumps(doc, sort_keys=True))
        return 0
    rows = [
        [
            line["kind"],
            line["plan"],
            line.get("meter") or "",
            line.get("quantity", ""),
            line.get("units", ""),
            _tiers(line),
            line["amount"],
        ]
        for line in doc["lines"]
    ]
    columns = ["line", "plan", "meter", "quantity", "units", "tiers", "amount"]
    print(format_table(columns, rows))
    period = doc["period"]
    currency = doc["currency"].upper()
    print(f"period   {period['start']} .. {period['end']}")
    print(f"subtotal {doc['subtotal']} {currency}")
    print(f"total    {doc['total']} {currency}")
    return 0


# ------------------------------------------------------------------ stripe create-prices


def cmd_create_prices(args: argparse.Namespace) -> int:
    """Create the plan's products and prices on Stripe; what exists already is kept."""
    from meterstream.billing.deliver import stripe_client
    from meterstream.meters.config import load_meters, meters_path
    from meterstream.pricing.stripe_prices import plan_requests, unsupported

    settings = _settings(args)
    meters = load_meters(meters_path(settings))
    from meterstream.worker.invoices import load_plans_for

    plans = load_plans_for(settings, meters)
    try:
        plan = plans.by_name(args.plan)
    except KeyError:
        known = ", ".join(p.name for p in plans.plans)
        raise MeterstreamError(f"no plan named {args.plan!r} (plans: {known})") from None
    by_name = {m.name: m for m in meters.meters}
    client = stripe_client(settings)
    active = {m["event_name"]: m["id"] for m in client.list_meters() if m.get("status") == "active"}
    meter_ids: dict[str, str] = {}
    missing = []
    for price in plan.prices:
        block = by_name[price.meter].stripe
        if block is None:
            missing.append(f"{price.meter}: the meter has no stripe block (it is not forwarded)")
        elif block.event_name not in active:
            missing.append(
                f"{price.meter}: no active Stripe meter for event {block.event_name!r} "
                "(run `meterstream stripe create-meters` first)"
            )
        else:
            meter_ids[price.meter] = active[block.event_name]
    if missing:
        raise MeterstreamError(
            f"plan {plan.name} cannot be created on Stripe:\n  " + "\n  ".join(missing)
        )
    titles = {m.name: m.description or m.name for m in meters.meters}
    for request in plan_requests(plan, meter_ids, titles):
        if request.kind == "product":
            found = client.find_product(request.lookup)
            made = found or client.create_product(request.params, request.idempotency_key)
            verb = "exists " if found else "created"
            print(f"{verb} product {made['id']}")
        else:
            found = client.find_price(request.lookup)
            made = found or client.create_price(request.params, request.idempotency_key)
            verb = "exists " if found else "created"
            print(f"{verb} price {made['id']} ({request.lookup})")
    for line in unsupported(plan):
        print(
            f"warning: {line}; the preview applies it, Stripe's invoice will not", file=sys.stderr
        )
    return 0


def register_stripe(
    stripe_sub: Any,
    common: argparse.ArgumentParser,
    settings_of: Callable[[argparse.Namespace], Settings],
) -> None:
    """Add ``stripe create-prices`` to the ``meterstream stripe`` group."""
    p = stripe_sub.add_parser(
        "create-prices", parents=[common], help="create a plan's products and prices on Stripe"
    )
    p.add_argument("plan")
    p.add_argument("--plans", help="plans YAML file (default METERSTREAM_PLANS_FILE)")
    p.add_argument("--meters", help="meters YAML file")
    p.set_defaults(func=cmd_create_prices, settings_of=settings_of)


# ------------------------------------------------------------------ registration


def register(
    sub: Any, common: argparse.ArgumentParser, settings_of: Callable[[argparse.Namespace], Settings]
) -> None:
    """Add the ``plans`` and ``invoice`` command groups to the ``meterstream`` parser;
    ``settings_of`` makes the settings from the common flags (cli.main's)."""
    with_plans = argparse.ArgumentParser(add_help=False, parents=[common])
    with_plans.set_defaults(settings_of=settings_of)
    with_plans.add_argument("--plans", help="plans YAML file (default METERSTREAM_PLANS_FILE)")
    with_plans.add_argument("--meters", help="meters YAML file")

    psub = command_group(sub, "plans", "plans and the customers on them")
    p = psub.add_parser("check", parents=[with_plans], help="validate a plans file")
    p.add_argument("file", nargs="?", help="plans YAML file (default: --plans)")
    p.set_defaults(func=cmd_plans_check)
    p = psub.add_parser("assign", parents=[with_plans], help="put a customer on a plan from a date")
    p.add_argument("customer")
    p.add_argument("plan")
    p.add_argument(
        "--from", dest="start", required=True, help="YYYY-MM-DD (UTC midnight) or RFC 3339"
    )
    p.set_defaults(func=cmd_plans_assign)
    p = psub.add_parser("unassign", parents=[with_plans], help="remove the plan change at a date")
    p.add_argument("customer")
    p.add_argument("--from", dest="start", required=True, help="the date of the change")
    p.set_defaults(func=cmd_plans_unassign)
    p = psub.add_parser("list", parents=[with_plans], help="customers' plan schedules")
    p.add_argument("customer", nargs="?")
    add_format(p)
    p.set_defaults(func=cmd_plans_list)

    isub = command_group(sub, "invoice", "what the usage costs")
    p = isub.add_parser(
        "preview", parents=[with_plans], help="a customer's invoice so far, from the record"
    )
    p.add_argument("customer")
    p.add_argument("--period", help="YYYY-MM (default: this month)")
    add_format(p)
    p.set_defaults(func=cmd_invoice_preview)
