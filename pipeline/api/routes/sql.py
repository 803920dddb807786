"""``POST /v1/sql`` ``{"sql": "SELECT ..."}``: read-only SQL, checked on ClickHouse's
parse of it and run within the operator's limits on threads and connections of its
own (:mod:`meterstream.sinks.clickhouse.reads`), stopped when the client goes away;
the way to query the embedded engine while the worker holds it. A key restricted to
a customer cannot run SQL (on loopback too, when sent)."""

from __future__ import annotations

import orjson
from faust.web import Request, Response, View

from meterstream.api.http import Routes, client_gone, unrestricted
from meterstream.errors import QueryCancelled, QueryLimitExceeded, QueryRefused
from meterstream.sinks.clickhouse.reads import ReadIO, SqlBusy


def register(routes: Routes, reads: ReadIO) -> None:
    respond = routes.respond

    @routes.page("/v1/sql")
    class SQL(View):
        async def post(self, request: Request) -> Response:
            unrestricted(routes.reader(request), "run SQL")
            try:
                body = orjson.loads(await routes.json_body(request))
                sql = body["sql"]
                if not isinstance(sql, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return respond(self, {"error": 'body must be JSON {"sql": "SELECT ..."}'}, 400)
            try:
                columns, rows = await reads.sql(sql, lambda: client_gone(request))
            except QueryRefused as exc:
                return respond(self, {"error": str(exc), "problems": exc.problems}, 400)
            except QueryLimitExceeded as exc:
                return respond(self, {"error": str(exc), "limit": exc.setting}, 400)
            except QueryCancelled as exc:  # nobody is listening; for the access log
                return respond(self, {"error": str(exc)}, 499)
            except SqlBusy as exc:
                return respond(self, {"error": str(exc)}, 503, {"Retry-After": "5"})
            except Exception as exc:  # the analyst's SQL error, reported back
                return respond(self, {"error": str(exc)}, 400)
            return respond(self, {"columns": columns, "rows": rows})
