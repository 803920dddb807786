"""``POST /v1/stripe/retry``, ``GET /v1/stripe/reconcile?period=YYYY-MM``: what the
``meterstream stripe`` commands use while this worker holds ClickHouse (only when a
meter forwards to Stripe). Retry writes, so it always needs a key; reconcile reads,
like SQL, and a customer-restricted key can do neither."""

from __future__ import annotations

import time

from faust.web import Request, Response, View

from meterstream.api.http import Routes, unrestricted
from meterstream.billing.deliver import row_summary
from meterstream.billing.forwarding import Forwarder
from meterstream.errors import StripeError
from meterstream.meters.windows import month_bounds, period_label

FORWARDING = "manage Stripe forwarding"


def register(routes: Routes, stripe: Forwarder) -> None:
    respond = routes.respond

    @routes.app.page("/v1/stripe/retry")
    class StripeRetry(View):
        @routes.guarded
        async def post(self, request: Request) -> Response:
            unrestricted(routes.key(request), FORWARDING)
            try:
                rows = await stripe.retry_errors()
            except StripeError as exc:
                return respond(self, {"error": str(exc), "code": exc.code}, 502)
            return respond(self, {"rows": [row_summary(r) for r in rows]})

    @routes.app.page("/v1/stripe/reconcile")
    class StripeReconcile(View):
        @routes.guarded
        async def get(self, request: Request) -> Response:
            unrestricted(routes.reader(request), FORWARDING)
            period = request.query.get("period") or period_label(time.time_ns() // 1_000_000)
            try:
                month_bounds(period)
            except ValueError as exc:
                return respond(self, {"error": str(exc)}, 400)
            try:
                diffs = await stripe.compare_with_stripe(period)
            except StripeError as exc:
                return respond(self, {"error": str(exc), "code": exc.code}, 502)
            return respond(
                self,
                {
                    "period": period,
                    "differences": [d.as_dict() for d in diffs],
                    "lines": [d.describe() for d in diffs],
                },
            )
