"""``POST /v1/events``: one event or ``{"events": [...]}`` (1-100), all or nothing,
written to ``usage-events`` with acks=all; always needs an API key, and a key
restricted to a customer sends that customer's events only."""

from __future__ import annotations

import time
from typing import Any

from faust.web import Request, Response, View

from meterstream.api.http import Routes
from meterstream.api.ingest import IngestCheck, check_body
from meterstream.api.publisher import EventPublisher, PublishError
from meterstream.errors import MalformedBody


def register(routes: Routes, publisher: EventPublisher) -> None:
    respond, metrics = routes.respond, routes.metrics
    horizon_ms = routes.settings.dedup_horizon_seconds * 1000

    @routes.page("/v1/events")
    class Events(View):
        async def post(self, request: Request) -> Response:
            key = routes.key(request)
            body = await routes.json_body(request)
            try:
                check, problems = check_body(
                    body,
                    now_ms=time.time_ns() // 1_000_000,
                    horizon_ms=horizon_ms,
                    customer_id=key.customer_id,
                )
            except MalformedBody as exc:
                return respond(self, {"error": str(exc)}, 400)
            refused = _refusal(check, problems)
            if refused is not None:
                return respond(self, *refused)
            try:
                await publisher.publish(check.records)
            except PublishError as exc:
                return respond(
                    self,
                    {"error": f"{exc}; retry with the same idempotency keys"},
                    503,
                    {"Retry-After": "1"},
                )
            metrics.api_events.inc(len(check.records))
            accepted = [
                {"idempotency_key": r.idempotency_key, "generated": r.generated}
                for r in check.records
            ]
            return respond(self, {"accepted": len(accepted), "events": accepted}, 202)


def _refusal(check: IngestCheck, problems: list[str]) -> tuple[dict[str, Any], int] | None:
    """Why nothing of the batch is written (422 invalid, 403 another customer's), or None."""
    if problems or check.errors:
        bad = len(check.errors)
        error = problems[0] if problems else f"{bad} event(s) invalid"
        return {"error": f"{error}; nothing was written", "errors": check.errors}, 422
    if check.forbidden:
        return {
            "error": "events for another customer; nothing was written",
            "errors": check.forbidden,
        }, 403
    return None
