"""``GET /v1/stripe/customers``, ``GET|PUT|DELETE /v1/stripe/customers/{customer_id}``
(``{"stripe_customer_id": "cus_..."}``): the operator's customer mapping
(pipeline/billing/customers.py), what ``meterstream customers`` uses while this
worker holds ClickHouse. Reads like SQL; writes always need a key; a key restricted
to one customer can do neither (it must not pick who pays)."""

from __future__ import annotations

import orjson
from faust.web import Request, Response, View

from meterstream.api.http import Routes, unrestricted
from meterstream.api.keys import ApiKey
from meterstream.billing.customers import MappingStore, check_customer_id, mapping_document
from meterstream.billing.forwarding import Forwarder
from meterstream.billing.stripe_ids import check_stripe_customer_id
from meterstream.errors import Denied, DependencyError


def operator_only(key: ApiKey | None) -> None:
    """403 for a key restricted to one customer (it must not pick who pays)."""
    unrestricted(key, "manage the customer mapping")


def customer_of(customer_id: str) -> str:
    """The path's customer id, or 400."""
    try:
        return check_customer_id(customer_id)
    except ValueError as exc:
        raise Denied(400, str(exc)) from None


def held(forwarder: Forwarder | None, customer: str | None = None) -> list[dict[str, str]]:
    """The customers the forwarder holds (all, or ``customer``), with the reason."""
    if forwarder is None:
        return []
    return [
        {"meter": meter, "customer_id": c, "reason": why}
        for meter, by_customer in sorted(forwarder.held.items())
        for c, why in sorted(by_customer.items())
        if customer in (None, c)
    ]


def register(routes: Routes, mappings: MappingStore, forwarder: Forwarder | None) -> None:
    respond = routes.respond

    def read_key(request: Request) -> ApiKey | None:
        """Reads follow the read rule, but a key that is sent is always checked."""
        if request.headers.get("Authorization"):
            return routes.key(request)
        return routes.reader(request)

    async def change(view: View, key: ApiKey, customer: str, stripe_id: str | None) -> Response:
        changed_by = f"key {key.id} ({key.name})"
        try:
            row, published = await mappings.change(customer, stripe_id, "api", changed_by)
        except DependencyError as exc:
            return respond(view, {"error": f"ClickHouse: {exc}"}, 503)
        return respond(view, {"change": row.public() if row else None, "published": published})

    @routes.page("/v1/stripe/customers")
    class StripeCustomers(View):
        async def get(self, request: Request) -> Response:
            operator_only(read_key(request))
            try:
                rows = await mappings.rows()
            except DependencyError as exc:
                return respond(self, {"error": f"ClickHouse: {exc}"}, 503)
            current = [r.public() for r in rows.values() if r.stripe_customer_id]
            return respond(self, {"customers": current, "held": held(forwarder)})

    @routes.page("/v1/stripe/customers/{customer_id}")
    class StripeCustomer(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            operator_only(read_key(request))
            customer = customer_of(customer_id)
            try:
                history = await mappings.history(customer)
            except DependencyError as exc:
                return respond(self, {"error": f"ClickHouse: {exc}"}, 503)
            return respond(self, mapping_document(customer, history, held(forwarder, customer)))

        async def put(self, request: Request, customer_id: str) -> Response:
            key = routes.key(request)
            operator_only(key)
            customer = customer_of(customer_id)
            try:
                body = orjson.loads(await routes.json_body(request))
                stripe_id = check_stripe_customer_id(body["stripe_customer_id"])
            except (ValueError, KeyError, TypeError) as exc:
                detail = exc if isinstance(exc, ValueError) else "missing stripe_customer_id"
                return respond(
                    self,
                    {"error": f'body must be JSON {{"stripe_customer_id": "cus_..."}}: {detail}'},
                    400,
                )
            return await change(self, key, customer, stripe_id)

        async def delete(self, request: Request, customer_id: str) -> Response:
            key = routes.key(request)
            operator_only(key)
            return await change(self, key, customer_of(customer_id), None)
