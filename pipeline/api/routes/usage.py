"""``GET /v1/customers/{customer_id}/usage?meter=&from=&to=&window=``: usage totals.
A key restricted to a customer reads that customer only."""

from __future__ import annotations

from typing import cast

from faust.web import Request, Response, View

from meterstream.api.http import Routes
from meterstream.errors import Denied, DependencyError
from meterstream.events import parse_time
from meterstream.sinks.clickhouse import queries
from meterstream.sinks.clickhouse.reads import ReadIO


def register(routes: Routes, reads: ReadIO) -> None:
    respond = routes.respond

    @routes.page("/v1/customers/{customer_id}/usage")
    class Usage(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            key = routes.reader(request)
            if key is not None and key.customer_id not in (None, customer_id):
                raise Denied(403, f"this key may only read customer {key.customer_id!r}")
            q = request.query
            window = q.get("window")
            if window not in (None, "hour", "day", "month"):
                return respond(self, {"error": "window must be hour, day or month"}, 400)
            try:
                start, end = parse_time(q.get("from")), parse_time(q.get("to"))
            except ValueError as exc:
                return respond(self, {"error": f"bad time: {exc}"}, 400)
            try:
                period = cast("queries.Period | None", window)  # checked above
                query = queries.UsageQuery(customer_id, q.get("meter") or None, start, end, period)
                rows = await reads.read(queries.usage, query)
            except DependencyError as exc:
                return respond(self, {"error": f"ClickHouse: {exc}"}, 503)
            return respond(self, {"customer_id": customer_id, "usage": rows})
