"""Routes of prepaid credits (issue #25), registered before the guard is installed.

Reads follow the usage API's read rule (a key unless the server listens on loopback only;
a customer-restricted key or billing link reads its own customer only, 403 otherwise);
writes always need an unrestricted (operator) key: a customer cannot grant itself credit.

- ``GET /v1/customers/{id}/credits``: balance, uncovered spend and every grant with what
  is left of it (the worker's books; 404 when the customer has no grant).
- ``POST /v1/customers/{id}/credits/grants`` ``{"amount": "20.00", "priority": 10,
  "effective": DATE, "expires": DATE, "currency": "usd", "grant_id": ID}`` (all but
  ``amount`` optional; ``grant_id`` makes a retry idempotent): 201 with the grant and the
  balance after it.
- ``POST /v1/customers/{id}/credits/grants/{grant_id}/void`` ``{"reason": ...}``: voids
  what is left of the grant from now on.
- ``GET /v1/customers/{id}/credits/ledger``: the ledger lines in ClickHouse and their sums.
- ``PUT /v1/customers/{id}/credits/alerts`` ``{"thresholds": [{"threshold_id": "low",
  "kind": "balance_below", "amount": "5"}, ...]}`` (kinds: pipeline/credits/alerts.py) and
  ``GET``: the customer's alert thresholds and their states (pipeline/worker/alerts.py).
- ``GET /v1/customers/{id}/entitlements[?meter=NAME]``: access, balance, usage this period
  per meter (served from the worker's state; 503 until the books are rebuilt at start).
- ``POST /v1/customers/{id}/credits/purchases`` ``{"amount": "20.00", "priority": 10,
  "expires": DATE, "purchase_id": ID}`` (all but ``amount`` optional; ``purchase_id``, also
  Stripe's idempotency key, makes a retry answer the same purchase): 201 with the purchase
  (``created``, or ``failed`` at once on a declined card); 409 when the customer has no
  Stripe customer or default payment method (nothing charged). ``GET``: every purchase of
  the customer with its status (pipeline/worker/purchases.py).
- ``PUT /v1/customers/{id}/credits/recharge`` ``{"threshold": "5", "target": "20"}`` or
  ``{"enabled": false}``, and ``GET``: the customer's auto-recharge and its state.
- ``POST /v1/stripe/webhooks``: Stripe's webhook; no API key, authenticated by its
  ``Stripe-Signature`` (400 when missing or wrong; 404 without
  ``METERSTREAM_STRIPE_WEBHOOK_SECRET``: the route is off).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson
from faust.web import Request, Response, View

from meterstream.api.http import Routes, read_body
from meterstream.billing.assignments import BadSchedule, parse_instant
from meterstream.credits.money import json_decimal
from meterstream.credits.purchases import Purchase
from meterstream.credits.recharge import AutoRecharge
from meterstream.errors import CreditsError, Denied, PurchaseRefused
from meterstream.sinks.clickhouse import credits as store
from meterstream.sinks.clickhouse.reads import ReadIO
from meterstream.worker.alerts import thresholds_of
from meterstream.worker.credits import CreditService, ledger_document, new_grant, now_ms
from meterstream.worker.purchases import PurchaseDesk

MAX_STRIPE_WEBHOOK_BYTES = 256 * 1024  # Stripe's events are a few kB


def _decimal(body: dict[str, Any], name: str) -> Decimal:
    return json_decimal(body.get(name), name)


def _fields(body: Any, allowed: set[str], example: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise CreditsError(f"body must be JSON {example}")
    unknown = set(body) - allowed
    if unknown:
        raise CreditsError(f"unknown field(s): {', '.join(sorted(unknown))}")
    return body


def purchase_from_body(customer: str, body: Any, currency: str) -> Purchase:
    """A purchase from a request body (a fresh ``pur_`` id unless ``purchase_id`` is given)."""
    body = _fields(
        body, {"amount", "priority", "expires", "purchase_id"}, '{"amount": "20.00", ...}'
    )
    made = now_ms()
    try:
        expires = parse_instant(body["expires"]) if body.get("expires") else None
    except BadSchedule as exc:
        raise CreditsError(str(exc)) from None
    return Purchase(
        purchase_id=body.get("purchase_id") or f"pur_{uuid.uuid4().hex}",
        customer_id=customer,
        amount=_decimal(body, "amount"),
        currency=currency,
        created_ms=made,
        priority=body.get("priority", 50),
        expires_ms=expires,
    )


def recharge_from_body(customer: str, body: Any, currency: str) -> AutoRecharge | None:
    """An auto-recharge rule from a request body; ``None`` for ``{"enabled": false}``."""
    body = _fields(
        body, {"threshold", "target", "priority", "enabled"}, '{"threshold": "5", "target": "20"}'
    )
    if body.get("enabled", True) is False:
        if set(body) - {"enabled"}:
            raise CreditsError('{"enabled": false} takes no other field')
        return None
    return AutoRecharge(
        customer_id=customer,
        currency=currency,
        threshold=_decimal(body, "threshold"),
        target=_decimal(body, "target"),
        priority=body.get("priority", 50),
    )


def grant_from_body(customer: str, body: Any, default_currency: str) -> Any:
    """A grant from a request body; :class:`CreditsError` with every problem otherwise."""
    body = _fields(
        body,
        {"amount", "priority", "effective", "expires", "currency", "grant_id"},
        '{"amount": "20.00", ...}',
    )
    value = _decimal(body, "amount")
    try:
        effective = parse_instant(body["effective"]) if body.get("effective") else None
        expires = parse_instant(body["expires"]) if body.get("expires") else None
    except BadSchedule as exc:
        raise CreditsError(str(exc)) from None
    return new_grant(
        customer,
        value,
        body.get("currency") or default_currency,
        effective_ms=effective,
        expires_ms=expires,
        priority=body.get("priority", 50),
        grant_id=body.get("grant_id"),
    )


def register(
    routes: Routes, reads: ReadIO, credits: CreditService, purchases: PurchaseDesk | None = None
) -> None:
    """Add the routes; call before the guard is installed (pipeline/api/web.py)."""
    respond = routes.respond
    page = functools.partial(routes.page, bad_input=(CreditsError,))

    def ready_customer(request: Request, customer_id: str) -> str:
        """``customer_id``, once the request's key may read it and the books are rebuilt
        (503 while they are: what they would answer is not yet the customer's)."""
        customer = routes.readable_customer(request, customer_id)
        if not credits.ready.is_set():
            raise Denied(503, "credits are being rebuilt; retry shortly")
        return customer

    async def json_body(request: Request) -> Any:
        raw = await routes.json_body(request)
        try:
            return orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            raise CreditsError("body is not JSON") from None

    @page("/v1/customers/{customer_id}/credits")
    class Credits(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            customer = ready_customer(request, customer_id)
            doc = credits.balance_document(customer)
            if doc is None:
                return respond(self, {"error": f"no credits for customer {customer!r}"}, 404)
            return respond(self, doc)

    @page("/v1/customers/{customer_id}/credits/grants")
    class CreditGrants(View):
        async def post(self, request: Request, customer_id: str) -> Response:
            key = routes.operator(request, "change credits")
            customer = routes.checked_customer(customer_id)
            grant = grant_from_body(
                customer, await json_body(request), credits.plans.default.money.code
            )
            result = await credits.grant(grant, f"key {key.id} ({key.name})")
            return respond(self, result, 201)

    @page("/v1/customers/{customer_id}/credits/grants/{grant_id}/void")
    class CreditVoid(View):
        async def post(self, request: Request, customer_id: str, grant_id: str) -> Response:
            key = routes.operator(request, "change credits")
            customer = routes.checked_customer(customer_id)
            body = await json_body(request)
            reason = body.get("reason", "") if isinstance(body, dict) else ""
            try:
                result = await credits.void(
                    customer, grant_id, f"key {key.id} ({key.name})", str(reason)
                )
            except KeyError:
                return respond(self, {"error": f"no grant {grant_id!r} for {customer!r}"}, 404)
            return respond(self, result)

    @page("/v1/customers/{customer_id}/credits/ledger")
    class CreditLedger(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            customer = routes.readable_customer(request, customer_id)
            rows = await reads.read(store.ledger_rows, [customer])
            return respond(self, ledger_document(rows, customer))

    @page("/v1/customers/{customer_id}/credits/alerts")
    class CreditAlerts(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            customer = ready_customer(request, customer_id)
            assert credits.alerts is not None
            return respond(self, credits.alerts.document(customer))

        async def put(self, request: Request, customer_id: str) -> Response:
            key = routes.operator(request, "change credits")
            customer = routes.checked_customer(customer_id)
            found = thresholds_of(await json_body(request))
            await credits.ready.wait()
            assert credits.alerts is not None
            await credits.alerts.set_thresholds(customer, found, f"key {key.id} ({key.name})")
            await credits.refresh(customer, f"alerts:{key.id}:{time.time_ns()}")
            return respond(self, credits.alerts.document(customer))

    @page("/v1/customers/{customer_id}/entitlements")
    class Entitlements(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            customer = ready_customer(request, customer_id)
            doc = await credits.entitlement_document(customer)
            meter = request.query.get("meter")
            if meter:
                doc["usage"] = {m: u for m, u in doc["usage"].items() if m == meter}
            return respond(self, doc)

    if purchases is not None:
        _register_purchases(routes, credits, purchases, json_body)


def _register_purchases(
    routes: Routes, credits: CreditService, purchases: PurchaseDesk, json_body: Any
) -> None:
    respond = routes.respond
    page = functools.partial(routes.page, bad_input=(CreditsError,))

    async def operator_input(request: Request, customer_id: str, parse: Any) -> Any:
        """(what the body asks, who asks): an operator's request about a customer."""
        key = routes.operator(request, "change credits")
        customer = routes.checked_customer(customer_id)
        await credits.ready.wait()
        body = await json_body(request)
        return parse(customer, body, credits.currency_of(customer)), f"key {key.id} ({key.name})"

    def customer_document(document: Callable[[str], Any]) -> Any:
        """A GET handler: ``document(customer)``, to a key that may read the customer."""

        async def get(view: View, request: Request, customer_id: str) -> Response:
            return respond(view, document(routes.readable_customer(request, customer_id)))

        return get

    @page("/v1/customers/{customer_id}/credits/purchases")
    class CreditPurchases(View):
        get = customer_document(purchases.purchases_document)

        async def post(self, request: Request, customer_id: str) -> Response:
            made, who = await operator_input(request, customer_id, purchase_from_body)
            try:
                doc = await purchases.purchase(made, who)
            except PurchaseRefused as exc:
                return respond(self, {"error": str(exc)}, 409)
            return respond(self, doc, 201)

    @page("/v1/customers/{customer_id}/credits/recharge")
    class CreditRecharge(View):
        get = customer_document(purchases.recharge_document)

        async def put(self, request: Request, customer_id: str) -> Response:
            rule, who = await operator_input(request, customer_id, recharge_from_body)
            customer = routes.checked_customer(customer_id)
            return respond(self, await purchases.set_recharge(customer, rule, who))

    @page("/v1/stripe/webhooks")
    class StripeWebhooks(View):
        async def post(self, request: Request) -> Response:
            body = await read_body(request, MAX_STRIPE_WEBHOOK_BYTES)
            status, doc = await purchases.webhook(body, request.headers.get("Stripe-Signature"))
            return respond(self, doc, status)
