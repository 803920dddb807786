"""``/healthz`` (liveness), ``/readyz`` (dependencies reachable), ``/metrics``
(Prometheus text) and ``/openapi.json``: no key needed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from faust.web import Request, Response, View

from meterstream.answers import dumps
from meterstream.api.http import Routes
from meterstream.api.openapi import document

ReadyCheck = Callable[[], Awaitable[dict[str, str]]]


def register(routes: Routes, ready: ReadyCheck) -> None:
    respond, keys, metrics = routes.respond, routes.keys, routes.metrics
    openapi = dumps(document())

    @routes.app.page("/healthz")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return respond(self, {"status": "ok"})

    @routes.app.page("/readyz")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            checks = await ready()
            ok = all(v == "ok" for v in checks.values())
            body = {"ready": ok, "checks": checks, "api_keys": keys.status()}
            return respond(self, body, 200 if ok else 503)

    @routes.app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.text(metrics.render(), content_type="text/plain; version=0.0.4")

    @routes.app.page("/openapi.json")
    class OpenAPI(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(openapi, content_type="application/json")
