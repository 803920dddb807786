"""Billing meters (``/v1/billing/meters``): create, list, get, deactivate, and
their event summaries by the meter's formula (sum, count, last)."""

from __future__ import annotations

import hashlib
from typing import Any

from aiohttp import web

from meterstream.sinks.stripe.emulator.protocol import (
    ApiError,
    authorized,
    int_param,
    list_object,
    new_id,
    read_params,
    require_api_key,
    required_str,
)
from meterstream.sinks.stripe.emulator.state import (
    MAX_EVENT_NAME_LENGTH,
    STATE_KEY,
    EmulatorState,
    MeterEvent,
)

_FORMULAS = ("sum", "count", "last")


def active_meter(state: EmulatorState, event_name: str) -> dict[str, Any] | None:
    for meter in state.meters.values():
        if meter["event_name"] == event_name and meter["status"] == "active":
            return meter
    return None


def find_meter(state: EmulatorState, meter_id: str) -> dict[str, Any]:
    meter = state.meters.get(meter_id)
    if meter is None:
        raise ApiError(
            404, f"No such billing meter: '{meter_id}'", code="resource_missing", param="id"
        )
    return meter


async def create_meter(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    display_name = required_str(params, "display_name", 250)
    event_name = required_str(params, "event_name", MAX_EVENT_NAME_LENGTH)
    aggregation = params.get("default_aggregation")
    if not isinstance(aggregation, dict) or "formula" not in aggregation:
        raise ApiError(
            400,
            "Missing required param: default_aggregation[formula].",
            code="parameter_missing",
            param="default_aggregation[formula]",
        )
    formula = aggregation["formula"]
    if formula not in _FORMULAS:
        raise ApiError(
            400,
            f"Invalid default_aggregation[formula]: must be one of {', '.join(_FORMULAS)}",
            param="default_aggregation[formula]",
        )
    mapping = params.get("customer_mapping") or {}
    value_settings = params.get("value_settings") or {}
    if not isinstance(mapping, dict) or not isinstance(value_settings, dict):
        raise ApiError(400, "customer_mapping and value_settings must be hashes.")
    if mapping.get("type", "by_id") != "by_id":
        raise ApiError(
            400, "Invalid customer_mapping[type]: must be by_id", param="customer_mapping[type]"
        )
    customer_key = mapping.get("event_payload_key") or "stripe_customer_id"
    value_key = value_settings.get("event_payload_key") or "value"
    if active_meter(state, event_name) is not None:
        raise ApiError(
            400,
            f"An active meter with event_name '{event_name}' already exists.",
            code="resource_already_exists",
            param="event_name",
        )
    now = int(state.clock())
    meter: dict[str, Any] = {
        "id": new_id("mtr"),
        "object": "billing.meter",
        "created": now,
        "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
        "default_aggregation": {"formula": formula},
        "display_name": display_name,
        "event_name": event_name,
        "event_time_window": params.get("event_time_window"),
        "livemode": False,
        "status": "active",
        "status_transitions": {"deactivated_at": None},
        "updated": now,
        "value_settings": {"event_payload_key": value_key},
    }
    state.meters[meter["id"]] = meter
    state.log("meter", meter=meter)
    return web.json_response(meter)


async def list_meters(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    status = params.get("status")
    meters = [m for m in state.meters.values() if status is None or m["status"] == status]
    return list_object(request, meters, params)


async def get_meter(request: web.Request) -> web.Response:
    require_api_key(request)
    return web.json_response(find_meter(request.app[STATE_KEY], request.match_info["id"]))


async def deactivate_meter(request: web.Request) -> web.Response:
    require_api_key(request)
    state = request.app[STATE_KEY]
    meter = find_meter(state, request.match_info["id"])
    now = int(state.clock())
    meter.update(status="inactive", updated=now, status_transitions={"deactivated_at": now})
    state.log("meter", meter=meter)
    return web.json_response(meter)


def live_events(
    state: EmulatorState, meter: dict[str, Any], customer: str, start: int, end: int
) -> list[MeterEvent]:
    """The meter's events of ``customer`` in ``[start, end)`` (seconds), cancelled ones left out."""
    return [
        e
        for e in state.events
        if e.meter == meter["id"]
        and e.customer == customer
        and not e.cancelled
        and start <= e.timestamp < end
    ]


def aggregate(formula: str, events: list[MeterEvent], state: EmulatorState | None = None) -> int:
    """The formula over live events. ``last``: the value of the event with the latest
    timestamp (Stripe's rule). Stripe does not define which of several events with that
    same timestamp wins, so the emulator does not pretend to know: when they disagree it
    flags the tie (``last_ties`` in stats, ``GET /_emulator/ties``) and answers the value
    of the earliest received of them, the one a sender correcting itself by resending at
    the same timestamp would not want (a tie must never decide a bill silently)."""
    if formula == "count":
        return len(events)
    if formula == "sum":
        return sum(int(e.value or 0) for e in events)
    latest = max(e.timestamp for e in events)
    tied = sorted((e for e in events if e.timestamp == latest), key=lambda e: e.seq)
    if len({e.value for e in tied}) > 1 and state is not None:
        key = (tied[0].meter, tied[0].customer, latest)
        if key not in state.ties:
            state.stats.last_ties += 1
        state.ties[key] = {
            "meter": tied[0].meter,
            "customer": tied[0].customer,
            "timestamp": latest,
            "identifiers": [e.identifier for e in tied],
            "values": [e.value for e in tied],
        }
    return int(tied[0].value or 0)


async def event_summaries(request: web.Request) -> web.Response:
    require_api_key(request)
    state = request.app[STATE_KEY]
    meter = find_meter(state, request.match_info["id"])
    params = await read_params(request)
    customer = required_str(params, "customer")
    start = int_param(params, "start_time", required=True)
    end = int_param(params, "end_time", required=True)
    assert start is not None and end is not None
    window = params.get("value_grouping_window")
    step = {None: end - start, "hour": 3600, "day": 86400}.get(window)
    if step is None:
        raise ApiError(
            400,
            "Invalid value_grouping_window: must be hour or day.",
            param="value_grouping_window",
        )
    align = {None: 60, "hour": 3600, "day": 86400}[window]
    for name, value in (("start_time", start), ("end_time", end)):
        if value % align:
            raise ApiError(
                400,
                f"Invalid {name}: must be aligned with {'minute' if align == 60 else window} "
                "boundaries.",
                param=name,
            )
    if end <= start:
        raise ApiError(400, "end_time must be after start_time.", param="end_time")
    matching = live_events(state, meter, customer, start, end)
    formula = meter["default_aggregation"]["formula"]
    summaries = []
    for lo in range(start, end, step):
        hi = min(lo + step, end)
        bucket = [e for e in matching if lo <= e.timestamp < hi]
        if not bucket and window is not None:
            continue
        digest = hashlib.sha256(f"{meter['id']}|{customer}|{lo}|{hi}".encode()).hexdigest()[:24]
        summaries.append(
            {
                "id": f"mtrusg_{digest}",
                "object": "billing.meter_event_summary",
                "aggregated_value": aggregate(formula, bucket, state) if bucket else 0,
                "end_time": hi,
                "livemode": False,
                "meter": meter["id"],
                "start_time": lo,
            }
        )
    return list_object(request, summaries, params)
