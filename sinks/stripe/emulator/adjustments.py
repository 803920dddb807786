"""Meter event adjustments (v1 form, v2 JSON; ``type=cancel``): cancel one accepted
event, found by ``event_name`` and identifier, within 24 hours of its receipt."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from meterstream.sinks.stripe.emulator.protocol import (
    ApiError,
    new_id,
    read_params,
    require_api_key,
    required_str,
    rfc3339,
)
from meterstream.sinks.stripe.emulator.state import (
    IDENTIFIER_TTL_SECONDS,
    MAX_EVENT_NAME_LENGTH,
    MAX_IDENTIFIER_LENGTH,
    STATE_KEY,
    EmulatorState,
    MeterEvent,
)


def _cancel_event(
    state: EmulatorState, *, event_name: str, identifier: str, param: str
) -> MeterEvent:
    """Cancel the latest event with this identifier under ``event_name``, or raise ApiError."""
    now = state.clock()
    if not any(m["event_name"] == event_name for m in state.meters.values()):
        raise ApiError(
            400,
            f"Invalid event_name: {event_name}. No meter found with this event name.",
            code="no_meter",
            param="event_name",
        )
    event = next(
        (
            e
            for e in reversed(state.events)
            if e.identifier == identifier and e.event_name == event_name
        ),
        None,
    )
    if event is None:
        raise ApiError(
            400,
            f"No such meter event: no event with identifier '{identifier}' and event_name "
            f"'{event_name}'.",
            code="resource_missing",
            param=param,
        )
    if event.cancelled:
        raise ApiError(
            400,
            f"The meter event with identifier '{identifier}' has already been canceled.",
            param=param,
        )
    if now - event.received_at > IDENTIFIER_TTL_SECONDS:
        raise ApiError(
            400,
            f"The meter event with identifier '{identifier}' can no longer be canceled: "
            "events can only be canceled within 24 hours of Stripe receiving them.",
            param=param,
        )
    event.cancelled = True
    event.cancelled_at = now
    state.log("cancel", seq=event.seq, at=now)
    state.stats.cancelled += 1
    return event


def _adjustment_params(params: Mapping[str, Any], *, v2: bool) -> tuple[str, str, str]:
    """``(event_name, identifier, identifier param name)`` of a cancel adjustment."""
    event_name = required_str(params, "event_name", MAX_EVENT_NAME_LENGTH)
    kind = required_str(params, "type")
    if kind != "cancel":
        raise ApiError(400, f"Invalid type: must be one of cancel (got '{kind}').", param="type")
    cancel = params.get("cancel")
    raw = cancel.get("identifier") if isinstance(cancel, dict) else None
    param = "cancel.identifier" if v2 else "cancel[identifier]"
    if v2 and (not isinstance(raw, str) or not raw.strip()):
        raise ApiError(
            400,
            "The adjustment configuration is invalid for the adjustment type: "
            "cancel.identifier is required.",
            code="invalid_cancel_configuration",
            param=param,
        )
    identifier = required_str({param: raw}, param, MAX_IDENTIFIER_LENGTH)
    return event_name, identifier, param


def _cancel_request(state: EmulatorState, params: Mapping[str, Any], *, v2: bool) -> MeterEvent:
    try:
        event_name, identifier, param = _adjustment_params(params, v2=v2)
        return _cancel_event(state, event_name=event_name, identifier=identifier, param=param)
    except ApiError:
        state.stats.rejected_cancellations += 1
        raise


async def create_meter_event_adjustment(request: web.Request) -> web.Response:
    require_api_key(request)
    state = request.app[STATE_KEY]
    event = _cancel_request(state, await read_params(request), v2=False)
    return web.json_response(
        {
            "object": "billing.meter_event_adjustment",
            "cancel": {"identifier": event.identifier},
            "event_name": event.event_name,
            "livemode": False,
            "status": "pending",
            "type": "cancel",
        }
    )


async def create_meter_event_adjustment_v2(request: web.Request) -> web.Response:
    require_api_key(request)
    state = request.app[STATE_KEY]
    event = _cancel_request(state, await read_params(request), v2=True)
    assert event.cancelled_at is not None
    return web.json_response(
        {
            "id": new_id("mtr_event_adj"),
            "object": "v2.billing.meter_event_adjustment",
            "cancel": {"identifier": event.identifier},
            "created": rfc3339(event.cancelled_at),
            "event_name": event.event_name,
            "livemode": False,
            "status": "pending",
            "type": "cancel",
        }
    )
