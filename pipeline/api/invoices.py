"""Routes of prices (issue #24), registered before the guard is installed:

- ``GET /v1/customers/{customer_id}/invoice-preview?period=YYYY-MM`` (default: this
  month): the customer's invoice so far from the verified record
  (pipeline/worker/invoices.py), every amount a decimal string. Reads like usage: a
  key unless the server listens on loopback only; a customer-restricted key reads its
  own customer only (403).
- ``GET /v1/customers/{customer_id}/plans``: the customer's plan schedule (same rule).
- ``PUT /v1/customers/{customer_id}/plans`` ``{"plan": NAME, "from": DATE}`` and
  ``DELETE ...?from=DATE``: assign a plan from a date (``YYYY-MM-DD`` or RFC 3339), or
  remove the one at that date. Always an operator key: a customer-restricted key cannot
  choose its own price (403).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from faust.web import Request, Response, View

from meterstream.api.http import Routes
from meterstream.billing.assignments import (
    AssignmentStore,
    BadSchedule,
    check_plan_name,
    parse_instant,
)
from meterstream.errors import DependencyError, PricingError
from meterstream.meters.windows import period_label
from meterstream.pricing.invoice import Period
from meterstream.pricing.plans import PlansConfig
from meterstream.sinks.clickhouse.reads import ReadIO
from meterstream.worker.invoices import preview_document


def register(
    routes: Routes, reads: ReadIO, plans: PlansConfig, assignments: AssignmentStore
) -> None:
    """Add the routes; call before ``web.register`` (which installs the guard)."""
    respond = routes.respond

    def schedule_document(customer: str, row: Any) -> dict[str, Any]:
        plans_now = row.public()["plans"] if row is not None else []
        return {"customer_id": customer, "default_plan": plans.default.name, "plans": plans_now}

    @routes.page("/v1/customers/{customer_id}/invoice-preview")
    class InvoicePreview(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            customer = routes.readable_customer(request, customer_id)
            label = request.query.get("period") or period_label(time.time_ns() // 1_000_000)
            try:
                period = Period.month(label)
            except PricingError as exc:
                return respond(self, {"error": str(exc)}, 400)
            try:
                body = await reads.read(preview_document, plans, customer, period)
            except PricingError as exc:
                return respond(self, {"error": str(exc)}, 409)
            except DependencyError as exc:
                return respond(self, {"error": f"ClickHouse: {exc}"}, 503)
            return respond(self, body)

    @routes.page("/v1/customers/{customer_id}/plans")
    class CustomerPlans(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            customer = routes.readable_customer(request, customer_id)
            try:
                row = await assignments.current(customer)
            except DependencyError as exc:
                return respond(self, {"error": f"ClickHouse: {exc}"}, 503)
            return respond(self, schedule_document(customer, row))

        async def put(self, request: Request, customer_id: str) -> Response:
            key = routes.operator(request, "assign plans")
            customer = routes.checked_customer(customer_id)
            try:
                body = orjson.loads(await routes.json_body(request))
                if not isinstance(body, dict):
                    raise BadSchedule('body must be JSON {"plan": NAME, "from": DATE}')
                plan, when = check_plan_name(body.get("plan")), parse_instant(body.get("from"))
                row, published = await assignments.change(
                    customer, plan, when, "api", f"key {key.id} ({key.name})"
                )
            except (BadSchedule, orjson.JSONDecodeError) as exc:
                return respond(self, {"error": str(exc)}, 400)
            return respond(self, {"change": row.public() if row else None, "published": published})

        async def delete(self, request: Request, customer_id: str) -> Response:
            key = routes.operator(request, "assign plans")
            customer = routes.checked_customer(customer_id)
            try:
                when = parse_instant(request.query.get("from"))
                row, published = await assignments.change(
                    customer, None, when, "api", f"key {key.id} ({key.name})"
                )
            except BadSchedule as exc:
                return respond(self, {"error": str(exc)}, 400)
            return respond(self, {"change": row.public() if row else None, "published": published})
