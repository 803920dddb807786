"""The billing page (README, The billing page): one static page and the read routes it
needs besides usage, invoice preview and event lookup.

The page holds no data: its script asks the API, with the customer link's token (the URL
fragment, never sent in a request line or a Referer) or the operator's key (typed into the
page, kept in the tab's session storage). Everything it needs is served from here, under a
Content-Security-Policy that allows this server only: no CDN, no outside font.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any, TypeVar

from faust.web import Request, Response, View

from meterstream.api.fate import rejection_doc
from meterstream.api.http import Routes
from meterstream.errors import Denied, DependencyError
from meterstream.sinks.clickhouse import lookup
from meterstream.sinks.clickhouse.reads import ReadIO

ASSETS = {"billing.js": "text/javascript", "billing.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
REJECTED_LIMIT_MAX = 200
T = TypeVar("T")


def _asset(name: str) -> bytes:
    return (resources.files("meterstream.api") / "page" / name).read_bytes()


def register(routes: Routes, reads: ReadIO) -> None:
    """The page, its two assets, and the customer's rejected events and Stripe status."""
    app, respond, allowed = routes.app, routes.respond, routes.customer_reader
    html = _asset("billing.html")

    async def read(fn: Callable[..., T], *args: Any) -> T:
        """:meth:`ReadIO.read`, ClickHouse out of reach answered 503 (as :class:`Denied`)."""
        try:
            return await reads.read(fn, *args)
        except DependencyError as exc:
            raise Denied(503, f"ClickHouse: {exc}") from None

    assets = {name: (_asset(name), kind) for name, kind in ASSETS.items()}

    def page(view: View) -> Response:
        return view.bytes(html, content_type="text/html", headers=SECURITY_HEADERS)

    @app.page("/billing")
    class OperatorPage(View):
        async def get(self, request: Request) -> Response:
            return page(self)

    @app.page("/billing/{customer_id}")
    class CustomerPage(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            return page(self)

    @app.page("/billing/assets/{name}")
    class Asset(View):
        async def get(self, request: Request, name: str) -> Response:
            if name not in assets:
                return respond(self, {"error": "not found"}, 404)
            body, kind = assets[name]
            return self.bytes(body, content_type=kind, headers=SECURITY_HEADERS)

    @routes.page("/v1/customers/{customer_id}/rejected")
    class Rejected(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            allowed(request, customer_id)
            try:
                limit = int(request.query.get("limit", "20"))
            except ValueError:
                return respond(self, {"error": "limit must be a whole number"}, 400)
            if not 1 <= limit <= REJECTED_LIMIT_MAX:
                return respond(self, {"error": f"limit must be 1-{REJECTED_LIMIT_MAX}"}, 400)
            rows = await read(lookup.recent_rejections, customer_id, limit)
            shown = [_rejection(row) for row in rows]
            return respond(self, {"customer_id": customer_id, "rejected": shown})

    @routes.page("/v1/customers/{customer_id}/stripe-status")
    class StripeStatus(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            allowed(request, customer_id)
            status = await read(lookup.stripe_status, customer_id)
            return respond(self, {"customer_id": customer_id, **status})


def _rejection(row: dict[str, Any]) -> dict[str, Any]:
    return rejection_doc(row, idempotency_key=row["idempotency_key"], meter=row["meter"])
