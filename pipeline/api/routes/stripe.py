"""``POST /v1/stripe/retry``, ``GET /v1/stripe/reconcile?period=YYYY-MM``,
``GET /v1/stripe/corrections[?period=YYYY-MM]`` (what Stripe holds wrong and can no
longer be corrected) and ``POST /v1/stripe/corrections`` (``{"period": ...}`` optional:
check the periods past the correction horizon again): what the ``meterstream stripe``
commands use while this worker holds ClickHouse (only when a meter forwards to Stripe).
Retry and the check write, so they always need a key; reconcile and the report read,
like SQL, and a customer-restricted key can do neither."""

from __future__ import annotations

import time

import orjson
from faust.web import Request, Response, View

from meterstream.api.http import Routes, unrestricted
from meterstream.billing.deliver import row_summary
from meterstream.billing.forwarding import Forwarder
from meterstream.errors import StripeError
from meterstream.meters.windows import month_bounds, period_label
from meterstream.sinks.stripe import uncorrectable as report

FORWARDING = "manage Stripe forwarding"


def register(routes: Routes, stripe: Forwarder) -> None:
    respond = routes.respond

    @routes.page("/v1/stripe/retry")
    class StripeRetry(View):
        async def post(self, request: Request) -> Response:
            unrestricted(routes.key(request), FORWARDING)
            try:
                rows = await stripe.retry_errors()
            except StripeError as exc:
                return respond(self, {"error": str(exc), "code": exc.code}, 502)
            return respond(self, {"rows": [row_summary(r) for r in rows]})

    @routes.page("/v1/stripe/reconcile")
    class StripeReconcile(View):
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

    @routes.page("/v1/stripe/corrections")
    class StripeCorrections(View):
        async def get(self, request: Request) -> Response:
            unrestricted(routes.reader(request), FORWARDING)
            period = request.query.get("period") or None
            if period is not None:
                try:
                    month_bounds(period)
                except ValueError as exc:
                    return respond(self, {"error": str(exc)}, 400)
            rows = await stripe.chio.call(report.current, period)
            return respond(self, {"period": period, "uncorrectable": rows})

        async def post(self, request: Request) -> Response:
            routes.operator(request, FORWARDING)
            raw = await routes.json_body(request)
            try:
                body = orjson.loads(raw) if raw.strip() else {}
                if not isinstance(body, dict):
                    raise ValueError("expected an object")
                period = body.get("period")
                if period is not None:
                    month_bounds(str(period))
            except (ValueError, orjson.JSONDecodeError) as exc:
                return respond(self, {"error": f'body must be {{"period": "YYYY-MM"}}: {exc}'}, 400)
            found = await stripe.check_past_periods(None if period is None else str(period))
            rows = await stripe.chio.call(report.current, period)
            return respond(self, {"period": period, "checked": len(found), "uncorrectable": rows})
