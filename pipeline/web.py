"""The worker's HTTP endpoints (Faust's web server).

- ``GET /healthz``: liveness (the process serves requests); never shows settings.
- ``GET /readyz``: broker, ClickHouse and Stripe reachable.
- ``GET /metrics``: Prometheus text format.
- ``POST /v1/sql`` ``{"sql": "SELECT ..."}``: read-only SQL (ClickHouse ``readonly=1``);
  the way to query the embedded engine while the worker holds it.
- ``GET /v1/customers/{customer_id}/usage?meter=&from=&to=&window=``: usage totals.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import faust
import orjson
from faust.web import Request, Response, View

from pipeline.chio import ClickHouseIO
from pipeline.events import parse_timestamp
from pipeline.metrics import Metrics
from sinks.clickhouse import queries

ReadyCheck = Callable[[], Awaitable[dict[str, str]]]


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    if isinstance(obj, dt.datetime):
        if obj.tzinfo is None:
            obj = obj.replace(tzinfo=dt.UTC)
        return obj.isoformat()
    if isinstance(obj, dt.date):
        return obj.isoformat()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, default=_default)


def parse_time(text: str | None) -> int | None:
    """RFC 3339 or epoch ms -> epoch ms."""
    if not text:
        return None
    if text.lstrip("-").isdigit():
        return int(text)
    if dt.datetime.fromisoformat(text).tzinfo is None:
        text += "+00:00"  # a query parameter without an offset means UTC
    return parse_timestamp(text)


def register(app: faust.App, chio: ClickHouseIO, metrics: Metrics, ready: ReadyCheck) -> None:
    def respond(view: View, body: Any, status: int = 200) -> Response:
        return view.bytes(dumps(body), content_type="application/json", status=status)

    @app.page("/healthz")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return respond(self, {"status": "ok"})

    @app.page("/readyz")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            checks = await ready()
            ok = all(v == "ok" for v in checks.values())
            return respond(self, {"ready": ok, "checks": checks}, 200 if ok else 503)

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.text(metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/v1/sql")
    class SQL(View):
        async def post(self, request: Request) -> Response:
            try:
                body = orjson.loads(await request.read())
                sql = body["sql"]
                if not isinstance(sql, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return respond(self, {"error": 'body must be JSON {"sql": "SELECT ..."}'}, 400)
            try:
                columns, rows = await chio.call_once(lambda ch: ch.readonly_query(sql))
            except Exception as exc:  # the analyst's SQL error, reported back
                return respond(self, {"error": str(exc)}, 400)
            return respond(self, {"columns": columns, "rows": rows})

    @app.page("/v1/customers/{customer_id}/usage")
    class Usage(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            q = request.query
            window = q.get("window") or None
            if window not in (None, "hour", "day", "month"):
                return respond(self, {"error": "window must be hour, day or month"}, 400)
            try:
                start, end = parse_time(q.get("from")), parse_time(q.get("to"))
            except ValueError as exc:
                return respond(self, {"error": f"bad time: {exc}"}, 400)
            rows = await chio.call_once(
                queries.usage, customer_id, q.get("meter") or None, start, end, window
            )
            return respond(self, {"customer_id": customer_id, "usage": rows})
