"""Stripe events and webhook endpoints: the signature, :func:`emit`, ``/v1/events`` and
``/v1/webhook_endpoints``. Sending is sinks/stripe/emulator/delivery.py's.

An event is Stripe's ``event`` object (``id: evt_...``, ``type``, ``created``,
``data.object`` = the object as it was then, ``livemode: false``, ``api_version``,
``pending_webhooks``, ``request: {id, idempotency_key}``). It is owed to every endpoint
that existed when it was made and enables its type (``*`` or the exact type), and
kept for ``GET /v1/events`` (newest first; ``type`` filter with a trailing ``*``
wildcard, ``types[]``, ``limit``, ``starting_after``), so a receiver can catch up on
what it missed, as Stripe recommends.

The signature is Stripe's: header ``Stripe-Signature: t=<unix seconds>,v1=<hex
HMAC-SHA256(secret, "<t>." + body)>`` over the exact body bytes, with the endpoint's
whole secret (``whsec_...``) as the key (:func:`signature_header`).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import re
import secrets
import time
import urllib.parse
from typing import Any

from aiohttp import web

from meterstream.sinks.stripe.emulator.payments_state import Delivery
from meterstream.sinks.stripe.emulator.protocol import (
    ApiError,
    authorized,
    known_params,
    list_object,
    metadata_param,
    new_id,
    no_such,
    required_str,
)
from meterstream.sinks.stripe.emulator.state import EmulatorState

API_VERSION = "2026-10-28.endive"  # what the stripe SDK in pyproject.toml sends
_EVENT_TYPE = re.compile(r"\*|[a-z_]+(\.[a-z_]+)+")


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """``t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>``: Stripe's
    ``Stripe-Signature`` value (the key is the whole secret, ``whsec_`` included)."""
    signed = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def new_secret() -> str:
    return "whsec_" + secrets.token_hex(16)


def enabled_for(endpoint: dict[str, Any], event_type: str) -> bool:
    events = endpoint["enabled_events"]
    return endpoint["status"] == "enabled" and ("*" in events or event_type in events)


def emit(state: EmulatorState, event_type: str, obj: dict[str, Any], key: str | None) -> None:
    """Make the event of ``obj``'s change and owe it to the matching endpoints.

    Journaled before the request that made it is answered; sent later, never inside
    the request (delivery.py), as Stripe does.
    """
    pay = state.pay
    owed = [e["id"] for e in pay.endpoints.values() if enabled_for(e, event_type)]
    event_id = new_id("evt")
    event: dict[str, Any] = {
        "id": event_id,
        "object": "event",
        "api_version": API_VERSION,
        "created": int(state.clock()),
        "data": {"object": copy.deepcopy(obj)},
        "livemode": False,
        "pending_webhooks": len(owed),
        "request": {"id": new_id("req"), "idempotency_key": key},
        "type": event_type,
    }
    pay.add_event(event, list(owed))
    state.log("stripe_event", event=event, owed=owed)
    faults = state.faults
    due = time.monotonic() + faults.webhook_delay_ms / 1000
    copies = 2 if faults.webhook_duplicates else 1
    fresh = [
        Delivery(event_id, endpoint_id, due, copy=n, generation=pay.generation)
        for endpoint_id in owed
        for n in range(copies)
    ]
    if faults.webhook_out_of_order:
        pay.held.extend(fresh)
        final = obj.get("object") == "payment_intent" and obj.get("status") in (
            "succeeded",
            "canceled",
        )
        if final:
            release(state, object_id=obj["id"])
    else:
        pay.queue.extend(fresh)
    pay.notify()


def release(state: EmulatorState, object_id: str | None = None) -> int:
    """Queue the held deliveries (of one object, or all), newest event first."""
    pay = state.pay

    def of(d: Delivery) -> bool:
        event = pay.events_by_id.get(d.event_id)
        return object_id is None or (
            event is not None and event["data"]["object"].get("id") == object_id
        )

    chosen = [d for d in pay.held if of(d)]
    pay.held = [d for d in pay.held if not of(d)]
    now = time.monotonic()
    for d in reversed(chosen):
        d.due = min(d.due, now)
        pay.queue.append(d)
    pay.notify()
    return len(chosen)


# ---------------------------------------------------------------------- /v1/events


async def list_events(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    known_params(params, ("ending_before", "expand", "limit", "starting_after", "type", "types"))
    wanted: list[str] = []
    if params.get("type") is not None:
        wanted.append(str(params["type"]))
    types = params.get("types")
    if types is not None:
        if not isinstance(types, list):
            raise ApiError(400, "Invalid types: must be an array.", param="types")
        wanted += [str(t) for t in types]

    def matches(event_type: str) -> bool:
        return not wanted or any(
            event_type == w or (w.endswith("*") and event_type.startswith(w[:-1])) for w in wanted
        )

    found = [e for e in reversed(state.pay.events) if matches(e["type"])]
    return list_object(request, found, params)


async def get_event(request: web.Request) -> web.Response:
    state, _ = await authorized(request)
    event = state.pay.events_by_id.get(request.match_info["id"])
    if event is None:
        raise no_such("event", request.match_info["id"], None, 404)
    return web.json_response(event)


# ------------------------------------------------------------ /v1/webhook_endpoints


def _url(params: dict[str, Any]) -> str:
    url = required_str(params, "url", 2048)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"Invalid URL: {url}. URLs must be http(s) URLs.", param="url")
    return url


def _enabled_events(params: dict[str, Any]) -> list[str]:
    events = params.get("enabled_events")
    if events is None:
        raise ApiError(
            400,
            "Missing required param: enabled_events.",
            code="parameter_missing",
            param="enabled_events",
        )
    if not isinstance(events, list) or not events:
        raise ApiError(400, "Invalid enabled_events: must be an array.", param="enabled_events")
    for event_type in events:
        if not isinstance(event_type, str) or not _EVENT_TYPE.fullmatch(event_type):
            raise ApiError(400, f"Invalid enabled_events: {event_type!r}", param="enabled_events")
    return list(events)


def endpoint_object(
    state: EmulatorState,
    url: str,
    enabled_events: list[str],
    *,
    endpoint_id: str | None = None,
    secret: str | None = None,
    description: str | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "id": endpoint_id or new_id("we"),
        "object": "webhook_endpoint",
        "api_version": None,
        "application": None,
        "created": int(state.clock()),
        "description": description,
        "enabled_events": enabled_events,
        "livemode": False,
        "metadata": metadata or {},
        "secret": secret or new_secret(),
        "status": "enabled",
        "url": url,
    }


def _public(endpoint: dict[str, Any]) -> dict[str, Any]:
    """An endpoint as Stripe shows it after its creation: without its secret."""
    return {k: v for k, v in endpoint.items() if k != "secret"}


def _save_endpoint(state: EmulatorState, endpoint: dict[str, Any]) -> None:
    state.pay.endpoints[endpoint["id"]] = endpoint
    state.log("webhook_endpoint", endpoint=endpoint)


async def create_webhook_endpoint(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    known_params(
        params,
        ("api_version", "connect", "description", "enabled_events", "expand", "metadata", "url"),
    )
    description = params.get("description")
    endpoint = endpoint_object(
        state,
        _url(params),
        _enabled_events(params),
        description=description if isinstance(description, str) else None,
        metadata=metadata_param(params),
    )
    _save_endpoint(state, endpoint)
    return web.json_response(endpoint)  # the only answer that shows the secret


def _endpoint(state: EmulatorState, request: web.Request) -> dict[str, Any]:
    found = state.pay.endpoints.get(request.match_info["id"])
    if found is None:
        raise no_such("webhook endpoint", request.match_info["id"], None, 404)
    return found


async def get_webhook_endpoint(request: web.Request) -> web.Response:
    state, _ = await authorized(request)
    return web.json_response(_public(_endpoint(state, request)))


async def update_webhook_endpoint(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    known_params(params, ("description", "disabled", "enabled_events", "expand", "metadata", "url"))
    endpoint = dict(_endpoint(state, request))
    if params.get("url") is not None:
        endpoint["url"] = _url(params)
    if params.get("enabled_events") is not None:
        endpoint["enabled_events"] = _enabled_events(params)
    if params.get("disabled") is not None:
        endpoint["status"] = "disabled" if params["disabled"] == "true" else "enabled"
    endpoint["metadata"] = metadata_param(params, endpoint["metadata"])
    _save_endpoint(state, endpoint)
    return web.json_response(_public(endpoint))


async def list_webhook_endpoints(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    endpoints = [_public(e) for e in reversed(state.pay.endpoints.values())]
    return list_object(request, endpoints, params)


async def delete_webhook_endpoint(request: web.Request) -> web.Response:
    state, _ = await authorized(request)
    endpoint = _endpoint(state, request)
    del state.pay.endpoints[endpoint["id"]]
    state.log("webhook_endpoint_deleted", id=endpoint["id"])
    return web.json_response({"id": endpoint["id"], "object": "webhook_endpoint", "deleted": True})
