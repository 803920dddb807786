"""``GET /v1/events/{customer_id}/{idempotency_key}``: one event's fate
(pipeline/api/fate.py). A key restricted to a customer reads that customer only."""

from __future__ import annotations

from faust.web import Request, Response, View

from meterstream.api.fate import read_fate
from meterstream.api.http import Routes
from meterstream.errors import DependencyError
from meterstream.meters.config import MetersConfig
from meterstream.sinks.clickhouse.reads import ReadIO


def register(routes: Routes, reads: ReadIO, meters: MetersConfig) -> None:
    respond = routes.respond

    @routes.page("/v1/events/{customer_id}/{idempotency_key}")
    class EventFate(View):
        async def get(self, request: Request, customer_id: str, idempotency_key: str) -> Response:
            routes.customer_reader(request, customer_id)
            try:
                answer = await reads.read(read_fate, customer_id, idempotency_key, meters)
            except DependencyError as exc:
                return respond(self, {"error": f"ClickHouse: {exc}"}, 503)
            return respond(self, answer)
