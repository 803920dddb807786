"""``meterstream credits grant|void|balance|ledger|purchase|purchases|recharge``: prepaid
credits (issue #25).

Through the running worker's API while it holds the embedded ClickHouse (the worker keeps
the credit books: a grant burns at once). Without a worker, ``grant`` and ``void`` are
recorded in ClickHouse ``credit_grants`` and applied when a worker next starts (it
rebuilds every book at start), and ``balance``/``ledger`` read the ledger table.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from meterstream.cli.options import SettingsOf, command_group, group_parent
from meterstream.cli.output import add_format, print_doc
from meterstream.errors import CreditsError, MeterstreamError
from meterstream.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    settings: Settings = args.settings_of(args)
    return settings


def _url(base: str, customer: str, tail: str = "") -> str:
    return f"{base}/v1/customers/{urllib.parse.quote(customer, safe='')}/credits{tail}"


def _customer(text: str) -> str:
    from meterstream.billing.customers import check_customer_id

    try:
        return check_customer_id(text)
    except ValueError as exc:
        raise MeterstreamError(str(exc)) from None


def cmd_grant(args: argparse.Namespace) -> int:
    from meterstream.api.credits import grant_from_body
    from meterstream.billing.customers import _direct, _operator, _request
    from meterstream.endpoints import web_url
    from meterstream.sinks.clickhouse import credits as store
    from meterstream.worker.credits import grant_row
    from meterstream.worker.invoices import load_plans_for

    settings = _settings(args)
    customer = _customer(args.customer)
    body: dict[str, Any] = {"amount": args.amount, "priority": args.priority}
    for name in ("effective", "expires", "currency", "grant_id"):
        if getattr(args, name):
            body[name] = getattr(args, name)
    url = web_url(settings)
    if url:
        result = _request(settings, "POST", _url(url, customer, "/grants"), body)
        note = f"; balance {result['balance']}"
        grant = result["grant"]
    else:
        currency = load_plans_for(settings).default.money.code
        try:
            made = grant_from_body(customer, body, currency)
        except CreditsError as exc:
            raise MeterstreamError(str(exc)) from None
        ch = _direct(settings)
        try:
            store.append_grants(ch, [grant_row(made, _operator())])
        finally:
            ch.close()
        grant = made.to_json()
        note = " (recorded; applied when a worker starts)"
    print(f"{customer}: granted {grant['amount']} {grant['currency']} as {grant['grant_id']}{note}")
    return 0


def cmd_void(args: argparse.Namespace) -> int:
    from meterstream.billing.customers import _direct, _operator, _request
    from meterstream.credits.grants import Void
    from meterstream.endpoints import web_url
    from meterstream.sinks.clickhouse import credits as store
    from meterstream.worker.credits import now_ms, void_row

    settings = _settings(args)
    customer = _customer(args.customer)
    url = web_url(settings)
    if url:
        tail = f"/grants/{urllib.parse.quote(args.grant_id, safe='')}/void"
        result = _request(settings, "POST", _url(url, customer, tail), {"reason": args.reason})
        print(f"{customer}: {args.grant_id} voided; balance {result['balance']}")
        return 0
    ch = _direct(settings)
    try:
        rows = [
            r
            for r in store.grant_rows(ch, [customer])
            if r["grant_id"] == args.grant_id and r["kind"] == "grant"
        ]
        if not rows:
            raise MeterstreamError(f"no grant {args.grant_id!r} for {customer!r}")
        void = Void(args.grant_id, customer, now_ms(), args.reason)
        store.append_grants(ch, [void_row(void, rows[0]["currency"], _operator())])
    finally:
        ch.close()
    print(f"{customer}: {args.grant_id} voided (recorded; applied when a worker starts)")
    return 0


def _balance_text(doc: Any) -> None:
    print(f"{doc['customer_id']}: balance {doc['balance']} {doc['currency']}")
    for g in doc.get("grants", []):
        ends = f", expires {g['expires_ms']}" if g.get("expires_ms") else ""
        print(
            f"  {g['grant_id']}  {g['amount']} (left {g['remaining']})  priority {g['priority']}"
            f"{ends}{'  voided' if g.get('voided_ms') else ''}"
        )


def _read(args: argparse.Namespace, tail: str, direct: Callable[[Any, str], Any]) -> Any:
    """The running worker's answer to ``GET /v1/customers/{customer}/credits{tail}``, or,
    without a worker, ``direct(ch, customer)`` on ClickHouse's credit tables."""
    from meterstream.billing.customers import _direct, _request
    from meterstream.endpoints import web_url

    settings = _settings(args)
    customer = _customer(args.customer)
    url = web_url(settings)
    if url:
        return _request(settings, "GET", _url(url, customer, tail))
    ch = _direct(settings)
    try:
        return direct(ch, customer)
    finally:
        ch.close()


def _balance_direct(ch: Any, customer: str) -> dict[str, Any]:
    from meterstream.sinks.clickhouse import credits as store

    rows = store.ledger_rows(ch, [customer])
    total = store.ledger_balance(ch, customer)
    currency = rows[0]["currency"] if rows else ""
    return {"customer_id": customer, "balance": str(total), "currency": currency}


def cmd_balance(args: argparse.Namespace) -> int:
    print_doc(_read(args, "", _balance_direct), args.format, _balance_text)
    return 0


def _ledger_text(doc: Any) -> None:
    for e in doc["entries"]:
        print(
            f"{e['at_ms']}\t{e['kind']}\t{e['amount']}\t{e['grant_id'] or '-'}\t"
            f"{e['source'] or '-'}\tseq {e['seq']}"
        )
    t = doc["totals"]
    print(
        f"granted {t['granted']}, burned {t['burned']}, expired {t['expired']}, voided "
        f"{t['voided']}, uncovered {t['uncovered']}: balance {t['balance']}"
    )


def _ledger_direct(ch: Any, customer: str) -> dict[str, Any]:
    from meterstream.sinks.clickhouse import credits as store
    from meterstream.worker.credits import ledger_document

    return ledger_document(store.ledger_rows(ch, [customer]), customer)


def cmd_ledger(args: argparse.Namespace) -> int:
    print_doc(_read(args, "/ledger", _ledger_direct), args.format, _ledger_text)
    return 0


def _through_worker(
    args: argparse.Namespace, method: str, tail: str, body: Any = None
) -> tuple[str, Any]:
    """(customer, the worker's answer) of a purchase or recharge request: these need a
    running worker (it calls Stripe and receives its webhook)."""
    from meterstream.billing.customers import _request
    from meterstream.endpoints import web_url

    settings = _settings(args)
    customer = _customer(args.customer)
    url = web_url(settings)
    if not url:
        raise MeterstreamError(
            "credit purchases and auto-recharge need a running worker (it calls Stripe and "
            "receives its webhook): start one with meterstream run or meterstream worker"
        )
    return customer, _request(settings, method, _url(url, customer, tail), body)


def _purchase_line(doc: Any) -> str:
    failure = f" ({doc['failure_code']})" if doc.get("failure_code") else ""
    return (
        f"{doc['purchase_id']}  {doc['amount']} {doc['currency']}  {doc['status']}{failure}"
        f"  {doc.get('payment_intent_id') or '-'}  {doc['origin']}"
    )


def cmd_purchase(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"amount": args.amount, "priority": args.priority}
    for name in ("expires", "purchase_id"):
        if getattr(args, name):
            body[name] = getattr(args, name)
    customer, doc = _through_worker(args, "POST", "/purchases", body)
    if args.format == "json":
        print(json.dumps(doc, sort_keys=True))
    else:
        print(f"{customer}: {_purchase_line(doc)}")
        if doc["status"] == "created":
            print("  paid on Stripe's confirmation: see meterstream credits purchases")
    return 0 if doc["status"] != "failed" else 1


def cmd_purchases(args: argparse.Namespace) -> int:
    _, doc = _through_worker(args, "GET", "/purchases")
    print_doc(doc, args.format, lambda d: print("\n".join(map(_purchase_line, d["purchases"]))))
    return 0


def cmd_recharge(args: argparse.Namespace) -> int:
    if args.off:
        customer, doc = _through_worker(args, "PUT", "/recharge", {"enabled": False})
    elif args.threshold is not None and args.target is not None:
        rule = {"threshold": args.threshold, "target": args.target, "priority": args.priority}
        customer, doc = _through_worker(args, "PUT", "/recharge", rule)
    elif args.threshold is None and args.target is None:
        customer, doc = _through_worker(args, "GET", "/recharge")
    else:
        raise MeterstreamError("give both --threshold and --target (or --off)")

    def text(d: Any) -> None:
        rule, state = d.get("rule"), d.get("state") or {}
        if rule is None:
            print(f"{customer}: no auto-recharge")
            return
        how = "on" if d["enabled"] else f"off ({state.get('disabled_reason') or 'off'})"
        print(
            f"{customer}: auto-recharge {how}: at {rule['threshold']} {rule['currency']} "
            f"back to {rule['target']}"
        )

    print_doc(doc, args.format, text)
    return 0


def register(sub: Any, common: argparse.ArgumentParser, settings_of: SettingsOf) -> None:
    """Add the ``credits`` command group."""
    base = group_parent(common, settings_of)
    base.add_argument("--plans", help="plans YAML file (default METERSTREAM_PLANS_FILE)")
    csub = command_group(sub, "credits", "prepaid credits: grants, balance, ledger")
    p = csub.add_parser("grant", parents=[base], help="grant a customer credit")
    p.add_argument("customer")
    p.add_argument("amount", type=_amount, help="in the plan's currency, e.g. 20.00")
    p.add_argument("--priority", type=int, default=50, help="burned lowest first (default 50)")
    p.add_argument("--effective", help="YYYY-MM-DD or RFC 3339 (default: now)")
    p.add_argument("--expires", help="YYYY-MM-DD or RFC 3339 (default: never)")
    p.add_argument("--currency", help="default: the default plan's")
    p.add_argument("--grant-id", dest="grant_id", help="an id of your own (a retry is harmless)")
    p.set_defaults(func=cmd_grant)
    p = csub.add_parser("void", parents=[base], help="void what is left of a grant")
    p.add_argument("customer")
    p.add_argument("grant_id")
    p.add_argument("--reason", default="")
    p.set_defaults(func=cmd_void)
    p = csub.add_parser("purchase", parents=[base], help="buy credits on the customer's card")
    p.add_argument("customer")
    p.add_argument("amount", type=_amount, help="in the customer's credit currency")
    p.add_argument("--priority", type=int, default=50, help="of the grant (default 50)")
    p.add_argument("--expires", help="the grant's expiry, YYYY-MM-DD or RFC 3339")
    p.add_argument(
        "--purchase-id",
        dest="purchase_id",
        help="an id of your own (Stripe's idempotency key: a retry never charges twice)",
    )
    add_format(p)
    p.set_defaults(func=cmd_purchase)
    p = csub.add_parser("recharge", parents=[base], help="auto-recharge: show, set or turn off")
    p.add_argument("customer")
    p.add_argument("--threshold", type=_amount, help="buy when the balance reaches this")
    p.add_argument("--target", type=_amount, help="back up to this balance")
    p.add_argument("--priority", type=int, default=50, help="of the grants bought")
    p.add_argument("--off", action="store_true", help="turn auto-recharge off")
    add_format(p)
    p.set_defaults(func=cmd_recharge)
    for name, func, what in (
        ("purchases", cmd_purchases, "a customer's credit purchases and their status"),
        ("balance", cmd_balance, "a customer's balance and grants"),
        ("ledger", cmd_ledger, "a customer's credit ledger"),
    ):
        p = csub.add_parser(name, parents=[base], help=what)
        p.add_argument("customer")
        add_format(p)
        p.set_defaults(func=func)


def _amount(text: str) -> str:
    try:
        Decimal(text)
    except ArithmeticError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a decimal amount") from None
    return text
