"""The Host check as aiohttp middleware (rules: pipeline/hosts.py), in front of the
worker's web server (pipeline/api/guard.py) and of the Stripe emulator
(sinks/stripe/emulator/). ``/healthz`` is open: liveness probes may send any Host
or none. Refused: 400 or 421, JSON ``{"error": ...}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from meterstream.hosts import HostPolicy

OPEN_PATHS = frozenset({"/healthz"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Counter = Callable[[int], None]


def error_response(status: int, error: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": error}), status=status, content_type="application/json"
    )


def target_authority(request: web.Request) -> str | None:
    """The authority of an absolute-form request target (``GET http://h:p/x HTTP/1.1``)."""
    target = request.raw_path
    if target.startswith("/"):
        return None
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return target  # authority-form or garbage: checked (and refused) as a name
    return rest.split("/", 1)[0].split("?", 1)[0]


def forwarded_hosts(request: web.Request) -> list[str]:
    """Every host an ``X-Forwarded-Host`` or ``Forwarded: host=`` header claims."""
    hosts = [
        part.strip()
        for value in request.headers.getall("X-Forwarded-Host", [])
        for part in value.split(",")
    ]
    if "Forwarded" in request.headers:
        hosts.extend(entry["host"] for entry in request.forwarded if "host" in entry)
    return hosts


def host_check(policy: HostPolicy, count: Counter | None = None) -> Any:
    """aiohttp middleware: refuse requests for names ``policy`` does not serve."""

    @web.middleware
    async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            refused = policy.refusal(
                request.headers.getall("Host", []),
                target_authority(request),
                forwarded_hosts(request),
            )
            if refused is not None:
                if count is not None:
                    count(refused.status)
                return error_response(refused.status, refused.error)
        return await handler(request)

    return check_host
