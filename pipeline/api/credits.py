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
"""

from __future__ import annotations

import functools
import time
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from faust.web import Request, Response, View

from meterstream.api.http import Routes
from meterstream.billing.assignments import BadSchedule, parse_instant
from meterstream.errors import CreditsError
from meterstream.sinks.clickhouse import credits as store
from meterstream.sinks.clickhouse.reads import ReadIO
from meterstream.worker.alerts import thresholds_of
from meterstream.worker.credits import CreditService, ledger_document, new_grant


def grant_from_body(customer: str, body: Any, default_currency: str) -> Any:
    """A grant from a request body; :class:`CreditsError` with every problem otherwise."""
    if not isinstance(body, dict):
        raise CreditsError('body must be JSON {"amount": "20.00", ...}')
    unknown = set(body) - {"amount", "priority", "effective", "expires", "currency", "grant_id"}
    if unknown:
        raise CreditsError(f"unknown field(s): {', '.join(sorted(unknown))}")
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, str | int):
        raise CreditsError('amount must be a decimal string (never a float), e.g. "20.00"')
    try:
        value = Decimal(amount)
    except InvalidOperation:
        raise CreditsError(f"amount is not a decimal: {amount!r}") from None
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


def register(routes: Routes, reads: ReadIO, credits: CreditService) -> None:
    """Add the routes; call before the guard is installed (pipeline/api/web.py)."""
    app, respond = routes.app, routes.respond
    guarded = functools.partial(routes.guarded, bad_input=(CreditsError,))

    def not_ready(view: View) -> Response | None:
        if credits.ready.is_set():
            return None
        return respond(view, {"error": "credits are being rebuilt; retry shortly"}, 503)

    async def json_body(request: Request) -> Any:
        raw = await routes.json_body(request)
        try:
            return orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            raise CreditsError("body is not JSON") from None

    @app.page("/v1/customers/{customer_id}/credits")
    class Credits(View):
        @guarded
        async def get(self, request: Request, customer_id: str) -> Response:
            customer = routes.readable_customer(request, customer_id)
            if (busy := not_ready(self)) is not None:
                return busy
            doc = credits.balance_document(customer)
            if doc is None:
                return respond(self, {"error": f"no credits for customer {customer!r}"}, 404)
            return respond(self, doc)

    @app.page("/v1/customers/{customer_id}/credits/grants")
    class CreditGrants(View):
        @guarded
        async def post(self, request: Request, customer_id: str) -> Response:
            key = routes.operator(request, "change credits")
            customer = routes.checked_customer(customer_id)
            grant = grant_from_body(
                customer, await json_body(request), credits.plans.default.money.code
            )
            result = await credits.grant(grant, f"key {key.id} ({key.name})")
            return respond(self, result, 201)

    @app.page("/v1/customers/{customer_id}/credits/grants/{grant_id}/void")
    class CreditVoid(View):
        @guarded
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

    @app.page("/v1/customers/{customer_id}/credits/ledger")
    class CreditLedger(View):
        @guarded
        async def get(self, request: Request, customer_id: str) -> Response:
            customer = routes.readable_customer(request, customer_id)
            rows = await reads.read(store.ledger_rows, [customer])
            return respond(self, ledger_document(rows, customer))

    @app.page("/v1/customers/{customer_id}/credits/alerts")
    class CreditAlerts(View):
        @guarded
        async def get(self, request: Request, customer_id: str) -> Response:
            customer = routes.readable_customer(request, customer_id)
            if (busy := not_ready(self)) is not None:
                return busy
            assert credits.alerts is not None
            return respond(self, credits.alerts.document(customer))

        @guarded
        async def put(self, request: Request, customer_id: str) -> Response:
            key = routes.operator(request, "change credits")
            customer = routes.checked_customer(customer_id)
            found = thresholds_of(await json_body(request))
            await credits.ready.wait()
            assert credits.alerts is not None
            await credits.alerts.set_thresholds(customer, found, f"key {key.id} ({key.name})")
            await credits.refresh(customer, f"alerts:{key.id}:{time.time_ns()}")
            return respond(self, credits.alerts.document(customer))

    @app.page("/v1/customers/{customer_id}/entitlements")
    class Entitlements(View):
        @guarded
        async def get(self, request: Request, customer_id: str) -> Response:
            customer = routes.readable_customer(request, customer_id)
            if (busy := not_ready(self)) is not None:
                return busy
            doc = await credits.entitlement_document(customer)
            meter = request.query.get("meter")
            if meter:
                doc["usage"] = {m: u for m, u in doc["usage"].items() if m == meter}
            return respond(self, doc)
