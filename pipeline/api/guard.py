"""What stands in front of every route of the worker's web server (aiohttp under
``faust.web``), and of the Stripe emulator's.

- **The Host check** (DNS rebinding; rules in pipeline/hosts.py, the middleware in
  pipeline/webhosts.py, which the Stripe emulator uses too) runs before any
  handler, on every route except ``/healthz`` (liveness probes may send any Host or
  none; it answers ``{"status": "ok"}`` and nothing else). Refused: 400 or 421,
  JSON ``{"error": ...}``, counted in ``meterstream_api_requests_total{route="guard"}``.
- **Only meterstream's routes are served.** Faust mounts views of its own (``/``,
  ``/table/...``, ``/router/...``, and with ``debug`` ``/graph``, ``/stats``,
  ``/assignment``): they answer without a key and ``/table`` shows table data.
  pipeline/worker/app.py turns each off with Faust's own settings (``web_*_enabled``,
  and ``env={}`` so Faust's environment variables such as ``APP_WEB_TABLES_ENABLED``
  or ``WEB_BIND`` cannot turn them on again or move the server). Faust has no
  setting for its ``/`` index, so the guard answers 404 for every route that
  pipeline/api/web.py did not register, whatever a Faust version adds.
- **The request body timeout**: ``read_body`` (pipeline/api/http.py) reads a body for
  at most ``METERSTREAM_API_BODY_TIMEOUT_SECONDS`` (stored on the aiohttp app under
  :data:`BODY_TIMEOUT`), so a client that stalls or trickles its body gets 408.

Installed with aiohttp's own extension points (``Application.middlewares`` and an
``AppKey``), before the server starts; nothing in Faust is patched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from meterstream.hosts import HostPolicy
from meterstream.webhosts import Counter, Handler, error_response, host_check

if TYPE_CHECKING:
    import faust

    from meterstream.settings import Settings

DEFAULT_BODY_TIMEOUT_SECONDS = 10.0
BODY_TIMEOUT = web.AppKey("meterstream_body_timeout_seconds", float)


def route_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Whether a path is one of ``patterns`` (aiohttp syntax: ``/v1/customers/{id}/usage``)."""
    regexes = [
        re.compile(re.sub(r"\\{[^}/]+\\}", "[^/]+", re.escape(pattern))) for pattern in patterns
    ]
    return lambda path: any(rx.fullmatch(path) for rx in regexes)


def only_routes(served: Iterable[str], count: Counter | None = None) -> Any:
    """aiohttp middleware: 404 for every path that is not one of the ``served`` patterns
    (whatever else is mounted there, and whatever the method)."""
    ours = route_matcher(served)

    @web.middleware
    async def only_ours(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not ours(request.rel_url.raw_path):
            if count is not None:
                count(404)
            return error_response(404, "not found")
        return await handler(request)

    return only_ours


def body_timeout(request: Any) -> float:
    """Seconds a handler may spend reading the request body (see :data:`BODY_TIMEOUT`)."""
    app = getattr(request, "app", None)
    if isinstance(app, web.Application):
        return app.get(BODY_TIMEOUT, DEFAULT_BODY_TIMEOUT_SECONDS)
    return DEFAULT_BODY_TIMEOUT_SECONDS


def install(app: faust.App, settings: Settings, count: Counter | None = None) -> None:
    """Guard ``app``'s web server: Host check, then only the routes registered so far
    (call after the last ``app.page``), and the body timeout. Before the server starts."""
    from faust.web.drivers.aiohttp import Web

    driver = app.web
    if not isinstance(driver, Web):
        raise TypeError(f"meterstream needs Faust's aiohttp web driver, not {type(driver)}")
    web_app = cast(web.Application, driver.web_app)
    web_app[BODY_TIMEOUT] = settings.api_body_timeout_seconds
    policy = HostPolicy.for_server(settings.web_host, settings.allowed_hosts)
    web_app.middlewares.extend([host_check(policy, count), only_routes(driver.views, count)])
