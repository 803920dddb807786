"""Meter events: v1 (``/v1/billing/meter_events``, form), v2 (``/v2/billing/meter_events``,
JSON), and v2's session and stream; each event checked by Stripe's rules
(:func:`ingest`) and recorded, or refused with nothing recorded."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import datetime
from typing import Any, Literal

from aiohttp import web

from meterstream.sinks.stripe.emulator.meters import active_meter
from meterstream.sinks.stripe.emulator.protocol import (
    WHOLE_NUMBER,
    ApiError,
    authorized,
    bearer,
    int_param,
    new_id,
    read_params,
    require_api_key,
    required_str,
    rfc3339,
)
from meterstream.sinks.stripe.emulator.state import (
    DUPLICATE_MESSAGE,
    MAX_EVENT_NAME_LENGTH,
    MAX_FUTURE_SECONDS,
    MAX_IDENTIFIER_LENGTH,
    MAX_PAST_SECONDS,
    MAX_STREAM_EVENTS,
    MAX_VALUE_DIGITS,
    SESSION_TTL_SECONDS,
    STATE_KEY,
    EmulatorState,
    MeterEvent,
)


def ingest(
    state: EmulatorState,
    *,
    event_name: str,
    identifier: str | None,
    payload: Any,
    timestamp: int | None,
    api: Literal["v1", "v2"],
) -> MeterEvent:
    """Validate one meter event and record it; raise ApiError (nothing recorded) otherwise.

    The checks run in Stripe's order, each refusing with its own code: the meter,
    the payload (customer, then value), the timestamp, the customer registry, and
    last the identifier, which is claimed only by an event that passed them all.
    """
    now = state.clock()
    state.prune(now)
    meter = _meter_of(state, event_name)
    customer, customer_key = _customer_of(meter, payload)
    value = _value_of(meter, payload)
    ts = _timestamp_of(now, timestamp)
    if state.customers and customer not in state.customers and customer not in state.pay.customers:
        raise ApiError(
            400,
            f"No such customer: '{customer}'",
            code="resource_missing",
            param=f"payload[{customer_key}]",
        )
    identifier = _claim_identifier(state, identifier, now)
    event = MeterEvent(
        meter=meter["id"],
        event_name=event_name,
        identifier=identifier,
        payload=dict(payload),
        timestamp=ts,
        received_at=now,
        customer=customer,
        value=value,
        seq=next(state.seq),
        api=api,
    )
    state.events.append(event)
    state.log("event", event=asdict(event))
    state.stats.accepted += 1
    return event


def _meter_of(state: EmulatorState, event_name: str) -> dict[str, Any]:
    """The active meter of ``event_name``, or ``no_meter``."""
    meter = active_meter(state, event_name)
    if meter is None:
        raise ApiError(
            400,
            f"Invalid event_name: {event_name}. No active meter found with this event name.",
            code="no_meter",
            param="event_name",
        )
    return meter


def _customer_of(meter: dict[str, Any], payload: Any) -> tuple[str, str]:
    """``(customer, its payload key)``: a non-empty payload of strings naming a customer."""
    if not isinstance(payload, dict) or not payload:
        raise ApiError(
            400, "Missing required param: payload.", code="parameter_missing", param="payload"
        )
    for key, value in payload.items():
        if not isinstance(value, str):
            raise ApiError(
                400,
                f"Invalid payload[{key}]: payload values must be strings.",
                param=f"payload[{key}]",
            )
    customer_key = meter["customer_mapping"]["event_payload_key"]
    customer = payload.get(customer_key, "")
    if not customer.strip():
        raise ApiError(
            400,
            f"Missing customer mapping: the payload must contain '{customer_key}'.",
            code="meter_event_no_customer_defined",
            param=f"payload[{customer_key}]",
        )
    return customer, customer_key


def _value_of(meter: dict[str, Any], payload: dict[str, str]) -> str | None:
    """The payload's value: a whole number of at most MAX_VALUE_DIGITS digits (optional
    for a ``count`` meter)."""
    value_key = meter["value_settings"]["event_payload_key"]
    value = payload.get(value_key)
    formula = meter["default_aggregation"]["formula"]
    if value is None and formula != "count":
        raise ApiError(
            400,
            f"Missing value: the payload must contain '{value_key}'.",
            code="meter_event_invalid_value",
            param=f"payload[{value_key}]",
        )
    if value is not None:
        if not WHOLE_NUMBER.fullmatch(value):
            raise ApiError(
                400,
                f"Invalid value '{value}' for payload[{value_key}]: the value must be a "
                "whole number.",
                code="meter_event_invalid_value",
                param=f"payload[{value_key}]",
            )
        if len(value.lstrip("-")) > MAX_VALUE_DIGITS:
            raise ApiError(
                400,
                f"Invalid value for payload[{value_key}]: more than {MAX_VALUE_DIGITS} digits.",
                code="meter_event_value_too_many_digits",
                param=f"payload[{value_key}]",
            )
    return value


def _timestamp_of(now: float, timestamp: int | None) -> int:
    """The event's time (now when not given): within the past 35 days, at most 5 minutes
    ahead."""
    ts = int(now) if timestamp is None else timestamp
    if ts < now - MAX_PAST_SECONDS:
        raise ApiError(
            400,
            "Invalid timestamp: must be within the past 35 calendar days.",
            code="timestamp_too_far_in_past",
            param="timestamp",
        )
    if ts > now + MAX_FUTURE_SECONDS:
        raise ApiError(
            400,
            "Invalid timestamp: must be at most 5 minutes in the future.",
            code="timestamp_in_future",
            param="timestamp",
        )
    return ts


def _claim_identifier(state: EmulatorState, identifier: str | None, now: float) -> str:
    """The event's identifier (a new one when not given), taken for 24 hours; a repeat
    is refused as Stripe does (no code) and counted as a duplicate."""
    if identifier is None:
        identifier = new_id("ident")
    elif identifier in state.identifiers:
        state.stats.rejected_duplicates += 1
        raise ApiError(
            400,
            DUPLICATE_MESSAGE.format(identifier=identifier),
            param="identifier",
            duplicate=True,
        )
    state.identifiers[identifier] = now
    return identifier


def identifier_param(params: Mapping[str, Any]) -> str | None:
    if params.get("identifier") is None:
        return None
    return required_str(params, "identifier", MAX_IDENTIFIER_LENGTH)


def parse_rfc3339(value: Any, param: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(
            400, f"Invalid timestamp for {param}: expected an RFC 3339 string.", param=param
        )
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ApiError(400, f"Invalid timestamp for {param}: {value}", param=param) from None
    if parsed.tzinfo is None:
        raise ApiError(400, f"Invalid timestamp for {param}: a time zone is required.", param=param)
    return int(parsed.timestamp())


def counted(state: EmulatorState, fn: Callable[[], MeterEvent]) -> MeterEvent:
    try:
        return fn()
    except ApiError as err:
        if not err.duplicate:
            state.stats.rejected_other += 1
        raise


async def create_meter_event(request: web.Request) -> web.Response:
    state, params = await authorized(request)

    def run() -> MeterEvent:
        event_name = required_str(params, "event_name", MAX_EVENT_NAME_LENGTH)
        identifier = identifier_param(params)
        timestamp = int_param(params, "timestamp", required=False)
        payload = params.get("payload")
        if payload is None:
            raise ApiError(
                400, "Missing required param: payload.", code="parameter_missing", param="payload"
            )
        return ingest(
            state,
            event_name=event_name,
            identifier=identifier,
            payload=payload,
            timestamp=timestamp,
            api="v1",
        )

    event = counted(state, run)
    return web.json_response(
        {
            "object": "billing.meter_event",
            "created": int(event.received_at),
            "event_name": event.event_name,
            "identifier": event.identifier,
            "livemode": False,
            "payload": event.payload,
            "timestamp": event.timestamp,
        }
    )


def _v2_event_params(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ApiError(400, "Each event must be an object.", param="events")
    return {
        "event_name": required_str(raw, "event_name", MAX_EVENT_NAME_LENGTH),
        "identifier": identifier_param(raw),
        "payload": raw.get("payload"),
        "timestamp": parse_rfc3339(raw.get("timestamp"), "timestamp"),
    }


async def create_meter_event_v2(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    event = counted(state, lambda: ingest(state, **_v2_event_params(params), api="v2"))
    return web.json_response(
        {
            "object": "v2.billing.meter_event",
            "created": rfc3339(event.received_at),
            "event_name": event.event_name,
            "identifier": event.identifier,
            "livemode": False,
            "payload": event.payload,
            "timestamp": rfc3339(event.timestamp),
        }
    )


async def create_session(request: web.Request) -> web.Response:
    require_api_key(request)
    state = request.app[STATE_KEY]
    now = state.clock()
    token = f"meter_session_{secrets.token_urlsafe(24)}"
    expires = now + SESSION_TTL_SECONDS
    state.sessions[token] = expires
    state.log("session", token=token, expires=expires)
    return web.json_response(
        {
            "id": new_id("mes"),
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": rfc3339(now),
            "expires_at": rfc3339(expires),
            "livemode": False,
        }
    )


async def meter_event_stream(request: web.Request) -> web.Response:
    """Like Stripe's stream: the batch is checked at once, each event asynchronously.

    A malformed batch (not a list, more than 100 events, an event missing
    ``event_name`` or ``payload``) is refused whole. Each event is then
    ingested on its own: a repeated identifier is dropped silently and a
    rule violation is recorded in ``GET /_emulator/errors`` (Stripe's error
    report) rather than failing the request, as real Stripe does.
    """
    state = request.app[STATE_KEY]
    token = bearer(request)
    expires = state.sessions.get(token)
    if expires is None:
        raise ApiError(401, "Invalid meter event session token.", type="invalid_request_error")
    if state.clock() >= expires:
        raise ApiError(
            401,
            "The meter event session has expired; create a new one.",
            code="billing_meter_event_session_expired",
            type="temporary_session_expired",
        )
    params = await read_params(request)
    events = params.get("events")
    if not isinstance(events, list) or not events:
        raise ApiError(
            400, "Missing required param: events.", code="parameter_missing", param="events"
        )
    if len(events) > MAX_STREAM_EVENTS:
        raise ApiError(400, f"At most {MAX_STREAM_EVENTS} events per request.", param="events")
    parsed = []
    for raw in events:
        item = _v2_event_params(raw)
        if item["payload"] is None:
            raise ApiError(
                400, "Missing required param: payload.", code="parameter_missing", param="payload"
            )
        parsed.append(item)
    for item in parsed:
        try:
            ingest(state, **item, api="v2")
        except ApiError as err:
            if err.duplicate:
                continue
            state.stats.rejected_other += 1
            report = {"identifier": item["identifier"], "code": err.code, "message": err.message}
            state.errors.append(report)
            state.log("error", error=report)
    return web.json_response({})
