"""A local emulator of Stripe's Billing meter API (aiohttp), for tests and the embedded stack.

It speaks what the official ``stripe`` SDK (``StripeClient``) sends: v1 bodies
are form-encoded with bracket notation (``payload[value]=12``), v2 bodies are
JSON, and every API route needs ``Authorization: Bearer <key>``. It enforces
Stripe's documented rules so the pipeline meets them before production does:

* ``identifier`` at most 100 characters and unique over a rolling 24 hours
  (v1 and v2 share one store);
* ``timestamp`` within the past 35 days and at most 5 minutes ahead;
* payload values are strings; the meter's customer key and value key must be
  present, and the value is a whole number: ``-?[0-9]+`` (Stripe's docs:
  "only accepts whole number values"; negative values are accepted, as
  Stripe floors a negative cycle total at 0 on the invoice, so ``"1.5"``,
  ``"1e3"``, ``"+1"`` and ``" 1"`` are refused);
* ``event_name`` must belong to an active meter; meter event names are
  unique among active meters.

Error bodies are Stripe-shaped (``{"error": {"type", "code", "message",
"param"}}``). Codes, and where they come from:

* ``parameter_missing``, ``parameter_invalid_integer``,
  ``parameter_invalid_string_empty``, ``resource_missing``,
  ``resource_already_exists``, ``rate_limit`` — Stripe's general API error
  codes (the ``code`` enum in the stripe-python SDK).
* ``no_meter``, ``meter_event_no_customer_defined``,
  ``meter_event_invalid_value``, ``meter_event_value_too_many_digits``,
  ``timestamp_too_far_in_past``, ``timestamp_in_future`` — the codes Stripe
  uses for these very conditions in its meter error reports
  (``v1.billing.meter.error_report_triggered``, stripe-python 16.x). Real
  Stripe reports some of them asynchronously; the emulator answers
  synchronously so tests see them at once.
* A repeated identifier: ``400 invalid_request_error`` with the message
  ``An event already exists with identifier <id>.`` and **no code**, which is
  what Stripe is observed to return (integrations match on this message).
* An unknown customer, only while the customer registry is non-empty:
  ``resource_missing`` (``No such customer: '<id>'``). Real Stripe accepts
  the event and reports ``meter_event_customer_not_found`` asynchronously.
* An expired v2 meter event session: ``401``, type
  ``temporary_session_expired``, code ``billing_meter_event_session_expired``.

Meter event adjustments (``POST /v1/billing/meter_event_adjustments``, form;
``POST /v2/billing/meter_event_adjustments``, JSON; both ``type=cancel`` with
``cancel[identifier]``) cancel one accepted event, found by ``event_name`` and
``identifier``, within 24 hours of its receipt (emulator clock). A cancelled
event stays in ``/_emulator/events`` (``cancelled: true``) but no longer counts
in event summaries; its identifier stays taken for the rest of its 24 hours.
The answer is Stripe's object with ``status: "pending"`` (Stripe applies
adjustments asynchronously; the emulator applies them at once). As Stripe
documents them, the v1 ``billing.meter_event_adjustment`` has no ``id``; the
v2 ``v2.billing.meter_event_adjustment`` has ``id`` and ``created``. Errors:

* a missing ``event_name``/``type``/v1 ``cancel[identifier]``:
  ``parameter_missing``; a ``type`` other than ``cancel``: no code (Stripe's
  usual answer to an invalid enum value);
* v2 without ``cancel.identifier``: ``invalid_cancel_configuration``, the one
  error code Stripe documents for this endpoint (OpenAPI
  ``v2.error.invalid_cancel_configuration``);
* no meter has that ``event_name``: ``no_meter``, as for meter events;
* no event with that identifier under that ``event_name`` (unknown, or sent
  under another event name): ``resource_missing``;
* the event was received more than 24 hours ago, or is already cancelled:
  ``400 invalid_request_error`` with **no code** and a descriptive message.
  Stripe documents the 24-hour limit but no code or message for these cases,
  so these messages are the emulator's own.

Products and prices (``POST /v1/products``, ``GET /v1/products/{id}``, ``POST`` and
``GET /v1/prices``) and the upcoming invoice of a customer on a list of prices
(``POST /v1/invoices/create_preview``, ``GET /v1/invoices/upcoming``), priced from the
meter events received by Stripe's tier rules: see "products, prices, invoices" below.

With a state file (``--state-file``, what ``meterstream run`` uses) the
emulator keeps what an account keeps across restarts (meters, meter events,
products, prices, identifiers, customers, idempotent replies;
sinks/stripe/emulator/journal.py);
without one (tests' ``BackgroundEmulator``) it starts empty.

Test controls live under ``/_emulator``: accepted events, stats, reset,
customer registry, fault injection (429/500 with a seeded RNG, latency) and a
per-second rate limit. Faults are injected before anything is recorded: a
faulted request accepts nothing.

The controls need no key, and the accepted events carry customer ids and usage,
so the emulator is guarded like the worker's web server (pipeline/hosts.py): it
answers only to loopback names (plus IP addresses and ``--allowed-hosts`` names
when it listens beyond loopback), so a web page cannot reach it by DNS rebinding;
and a control that changes something (POST, DELETE) needs ``Content-Type:
application/json``, which a cross-site page cannot send without a CORS preflight
that the emulator does not grant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import re
import secrets
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from meterstream.api.guard import host_check
from meterstream.hosts import HostPolicy, split_list
from meterstream.sinks.stripe.emulator.journal import Journal

MAX_IDENTIFIER_LENGTH = 100
MAX_EVENT_NAME_LENGTH = 100
IDENTIFIER_TTL_SECONDS = 24 * 3600
MAX_PAST_SECONDS = 35 * 24 * 3600
MAX_FUTURE_SECONDS = 5 * 60
MAX_VALUE_DIGITS = 19
SESSION_TTL_SECONDS = 15 * 60
MAX_STREAM_EVENTS = 100
DEFAULT_PORT = 12111
DUPLICATE_MESSAGE = "An event already exists with identifier {identifier}."

_WHOLE_NUMBER = re.compile(r"-?[0-9]+")
_FORM_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_FORMULAS = ("sum", "count", "last")

Clock = Callable[[], float]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection and rate limiting; changeable at run time via ``POST /_emulator/faults``.

    ``rate_429`` and ``rate_500`` are probabilities per API request (drawn from
    ``random.Random(seed)``); ``latency_ms`` delays every API request;
    ``rate_limit_per_second`` (``None`` = off) answers ``429 rate_limit`` to
    API requests beyond that many in one clock second.
    """

    rate_429: float = 0.0
    rate_500: float = 0.0
    latency_ms: int = 0
    seed: int | None = None
    rate_limit_per_second: int | None = None

    def __post_init__(self) -> None:
        for name in ("rate_429", "rate_500"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {rate}")
        if self.rate_429 + self.rate_500 > 1.0:
            raise ValueError("rate_429 + rate_500 must not exceed 1")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.rate_limit_per_second is not None and self.rate_limit_per_second < 1:
            raise ValueError("rate_limit_per_second must be >= 1 or null")


class ApiError(Exception):
    """A Stripe-shaped error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",
        duplicate: bool = False,
    ) -> None:
        super().__init__(message)
        self.duplicate = duplicate
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type

    def response(self) -> web.Response:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
        if self.param is not None:
            error["param"] = self.param
        retry = self.status == 429 or self.status >= 500
        headers = {"Stripe-Should-Retry": "true" if retry else "false"}
        return web.json_response({"error": error}, status=self.status, headers=headers)


@dataclass
class Stats:
    accepted: int = 0
    rejected_duplicates: int = 0
    rejected_other: int = 0
    faults_injected: int = 0
    rate_limited: int = 0
    requests: int = 0
    cancelled: int = 0
    rejected_cancellations: int = 0


@dataclass
class _Event:
    meter: str
    event_name: str
    identifier: str
    payload: dict[str, str]
    timestamp: int
    received_at: float
    customer: str
    value: str | None
    seq: int
    api: Literal["v1", "v2"]
    cancelled: bool = False
    cancelled_at: float | None = None

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("seq")
        return out


@dataclass
class EmulatorState:
    """Everything the emulator knows; one per app."""

    clock: Clock
    initial_faults: FaultConfig
    faults: FaultConfig = field(init=False)
    rng: random.Random = field(init=False)
    meters: dict[str, dict[str, Any]] = field(default_factory=dict)
    products: dict[str, dict[str, Any]] = field(default_factory=dict)
    prices: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[_Event] = field(default_factory=list)
    identifiers: dict[str, float] = field(default_factory=dict)
    customers: set[str] = field(default_factory=set)
    sessions: dict[str, float] = field(default_factory=dict)
    idempotency: dict[str, tuple[float, str, int, str]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    rate_window: tuple[int, int] = (0, 0)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    journal: Journal | None = None

    def __post_init__(self) -> None:
        self.set_faults(self.initial_faults)

    # -- persistence (``--state-file``; sinks/stripe/emulator/journal.py) ---------------
    #
    # What a Stripe account keeps is journaled: meters, meter events (with their
    # cancellations), the customer registry, idempotent replies, v2 sessions and
    # the v2 error report. Identifiers seen are the events' identifiers, so they
    # are rebuilt from the events. Counters (``/_emulator/stats``), fault settings
    # and the rate-limit window start afresh with each process.

    def log(self, op: str, **fields: Any) -> None:
        """Journal one change (before the request that made it is answered)."""
        if self.journal is not None:
            self.journal.append({"op": op, **fields})

    def records(self) -> list[dict[str, Any]]:
        """The current state as journal records (what compaction writes)."""
        out: list[dict[str, Any]] = [{"op": "meter", "meter": m} for m in self.meters.values()]
        out += [{"op": "product", "product": p} for p in self.products.values()]
        out += [{"op": "price", "price": p} for p in self.prices.values()]
        out += [{"op": "event", "event": asdict(e)} for e in self.events]
        if self.customers:
            out.append({"op": "customers", "ids": sorted(self.customers)})
        out += [
            {"op": "idempotency", "key": k, "value": list(v)} for k, v in self.idempotency.items()
        ]
        out += [{"op": "session", "token": t, "expires": x} for t, x in self.sessions.items()]
        out += [{"op": "error", "error": e} for e in self.errors]
        return out

    def restore(self, records: Iterable[dict[str, Any]]) -> None:
        """Replay journal records (from :meth:`records` and :meth:`log`)."""
        by_seq: dict[int, _Event] = {}
        for record in records:
            op = record["op"]
            if op == "meter":
                self.meters[record["meter"]["id"]] = record["meter"]
            elif op == "product":
                self.products[record["product"]["id"]] = record["product"]
            elif op == "price":
                self.prices[record["price"]["id"]] = record["price"]
            elif op == "event":
                event = _Event(**record["event"])
                self.events.append(event)
                by_seq[event.seq] = event
            elif op == "cancel":
                cancelled = by_seq[record["seq"]]
                cancelled.cancelled, cancelled.cancelled_at = True, record["at"]
            elif op == "customers":
                self.customers = set(record["ids"])
            elif op == "idempotency":
                at, fingerprint, status, text = record["value"]
                self.idempotency[record["key"]] = (at, fingerprint, status, text)
            elif op == "session":
                self.sessions[record["token"]] = record["expires"]
            elif op == "error":
                self.errors.append(record["error"])
            elif op == "reset":
                self.reset(journal=False)
                by_seq.clear()
            else:
                raise ValueError(f"unknown emulator journal record {op!r}")
        now = self.clock()
        self.identifiers = {e.identifier: e.received_at for e in self.events}
        self.sessions = {t: x for t, x in self.sessions.items() if x > now}
        self.seq = itertools.count(max((e.seq for e in self.events), default=-1) + 1)
        self.prune(now)

    def set_faults(self, faults: FaultConfig) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)

    def reset(self, journal: bool = True) -> None:
        if journal:
            self.log("reset")
        self.meters.clear()
        self.products.clear()
        self.prices.clear()
        self.events.clear()
        self.identifiers.clear()
        self.customers.clear()
        self.sessions.clear()
        self.idempotency.clear()
        self.errors.clear()
        self.stats = Stats()
        self.rate_window = (0, 0)
        self.set_faults(self.initial_faults)

    def prune(self, now: float) -> None:
        horizon = now - IDENTIFIER_TTL_SECONDS
        if self.identifiers and next(iter(self.identifiers.values())) < horizon:
            self.identifiers = {k: t for k, t in self.identifiers.items() if t >= horizon}
        if self.idempotency and next(iter(self.idempotency.values()))[0] < horizon:
            self.idempotency = {k: v for k, v in self.idempotency.items() if v[0] >= horizon}


STATE_KEY = web.AppKey("meterstream_emulator_state", EmulatorState)


# ---------------------------------------------------------------- helpers


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _rfc3339(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def parse_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Nest Stripe's bracket notation: ``payload[value]=1`` -> ``{"payload": {"value": "1"}}``.

    ``a[]=x`` and ``a[0]=x`` build lists; other brackets build dicts.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        match = _FORM_KEY.match(key)
        if match is None:
            raise ApiError(400, f"Invalid parameter name: {key}", code="parameter_unknown")
        parts = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt_is_list = not last and (parts[i + 1] == "" or parts[i + 1].isdigit())
            if isinstance(node, list):
                if part == "" or int(part) >= len(node):
                    node.append(value if last else ([] if nxt_is_list else {}))
                    node = node[-1]
                elif last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif last:
                node[part] = value
            else:
                node = node.setdefault(part, [] if nxt_is_list else {})
    return out


async def _params(request: web.Request) -> dict[str, Any]:
    if request.method == "GET":
        return parse_form(request.query.items())
    raw = await request.read()
    if not raw:
        return {}
    if (request.content_type or "").endswith("json"):
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "Invalid JSON body.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return body
    pairs = urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
    return parse_form(pairs)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "You did not provide an API key. Provide it in the Authorization header "
            "(Authorization: Bearer YOUR_SECRET_KEY).",
        )
    return token.strip()


def _require_api_key(request: web.Request) -> None:
    key = _bearer(request)
    if not key.startswith(("sk_", "rk_")):
        raise ApiError(401, "Invalid API Key provided.")


def _required_str(params: Mapping[str, Any], name: str, max_len: int | None = None) -> str:
    value = params.get(name)
    if value is None:
        raise ApiError(
            400, f"Missing required param: {name}.", code="parameter_missing", param=name
        )
    if not isinstance(value, str):
        raise ApiError(400, f"Invalid string: {name} must be a string.", param=name)
    if value.strip() == "":
        raise ApiError(
            400,
            f"You passed an empty string for '{name}'.",
            code="parameter_invalid_string_empty",
            param=name,
        )
    if max_len is not None and len(value) > max_len:
        raise ApiError(400, f"Invalid {name}: must be at most {max_len} characters.", param=name)
    return value


def _int_param(params: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    value = params.get(name)
    if value is None:
        if required:
            raise ApiError(
                400, f"Missing required param: {name}.", code="parameter_missing", param=name
            )
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value):
        return int(value)
    raise ApiError(
        400, "Invalid integer: " + str(value), code="parameter_invalid_integer", param=name
    )


def _list_object(
    request: web.Request, items: list[dict[str, Any]], params: Mapping[str, Any]
) -> web.Response:
    limit = _int_param(params, "limit", required=False) or 10
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit must be between 1 and 100.", param="limit")
    start = 0
    after = params.get("starting_after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(
                404, f"No such object: '{after}'", code="resource_missing", param="starting_after"
            )
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return web.json_response(
        {
            "object": "list",
            "data": page,
            "has_more": start + limit < len(items),
            "url": request.path,
        }
    )


# ---------------------------------------------------------------- middleware


def _is_api(request: web.Request) -> bool:
    return request.path.startswith(("/v1/", "/v2/"))


@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Order: count, latency, faults, rate limit, idempotent replay, handler."""
    if not _is_api(request):
        try:
            return await handler(request)
        except ApiError as err:
            return err.response()
    state = request.app[STATE_KEY]
    state.stats.requests += 1
    faults = state.faults
    if faults.latency_ms:
        await asyncio.sleep(faults.latency_ms / 1000)
    draw = state.rng.random() if (faults.rate_429 or faults.rate_500) else 1.0
    if draw < faults.rate_429:
        state.stats.faults_injected += 1
        return _rate_limit_error().response()
    if draw < faults.rate_429 + faults.rate_500:
        state.stats.faults_injected += 1
        return ApiError(
            500, "An unknown error occurred (injected by the emulator).", type="api_error"
        ).response()
    if faults.rate_limit_per_second is not None:
        second = int(state.clock())
        window_second, count = state.rate_window
        count = count + 1 if window_second == second else 1
        state.rate_window = (second, count)
        if count > faults.rate_limit_per_second:
            state.stats.rate_limited += 1
            return _rate_limit_error().response()

    key = request.headers.get("Idempotency-Key") if request.method == "POST" else None
    fingerprint = ""
    if key:
        body = await request.read()
        auth = request.headers.get("Authorization", "")
        fingerprint = hashlib.sha256(
            b"\0".join([request.path.encode(), auth.encode(), body])
        ).hexdigest()
        saved = state.idempotency.get(key)
        if saved is not None:
            _, saved_fingerprint, status, text = saved
            if saved_fingerprint != fingerprint:
                return ApiError(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters "
                    "they were first used with. Try using a key other than "
                    f"'{key}' if you meant to execute a different request.",
                    type="idempotency_error",
                ).response()
            return web.Response(
                text=text,
                status=status,
                content_type="application/json",
                headers={"Idempotent-Replayed": "true"},
            )
    try:
        response = await handler(request)
    except ApiError as err:
        return err.response()
    # Like Stripe, only executed requests are saved for replay; a request that
    # failed validation, or was faulted or rate limited, is not.
    if key and 200 <= response.status < 300 and isinstance(response, web.Response):
        assert response.text is not None
        saved_reply = (state.clock(), fingerprint, response.status, response.text)
        state.idempotency[key] = saved_reply
        state.log("idempotency", key=key, value=list(saved_reply))
    return response


def _rate_limit_error() -> ApiError:
    return ApiError(
        429,
        "Too many requests hit the API too quickly. We recommend an exponential backoff "
        "of your requests.",
        code="rate_limit",
    )


# ---------------------------------------------------------------- meters


def _meter_by_event_name(state: EmulatorState, event_name: str) -> dict[str, Any] | None:
    for meter in state.meters.values():
        if meter["event_name"] == event_name and meter["status"] == "active":
            return meter
    return None


def _get_meter(state: EmulatorState, meter_id: str) -> dict[str, Any]:
    meter = state.meters.get(meter_id)
    if meter is None:
        raise ApiError(
            404, f"No such billing meter: '{meter_id}'", code="resource_missing", param="id"
        )
    return meter


async def create_meter(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = request.app[STATE_KEY]
    params = await _params(request)
    display_name = _required_str(params, "display_name", 250)
    event_name = _required_str(params, "event_name", MAX_EVENT_NAME_LENGTH)
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
    if _meter_by_event_name(state, event_name) is not None:
        raise ApiError(
            400,
            f"An active meter with event_name '{event_name}' already exists.",
            code="resource_already_exists",
            param="event_name",
        )
    now = int(state.clock())
    meter: dict[str, Any] = {
        "id": _new_id("mtr"),
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
    _require_api_key(request)
    state = request.app[STATE_KEY]
    params = await _params(request)
    status = params.get("status")
    meters = [m for m in state.meters.values() if status is None or m["status"] == status]
    return _list_object(request, meters, params)


async def get_meter(request: web.Request) -> web.Response:
    _require_api_key(request)
    return web.json_response(_get_meter(request.app[STATE_KEY], request.match_info["id"]))


async def deactivate_meter(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = request.app[STATE_KEY]
    meter = _get_meter(state, request.match_info["id"])
    now = int(state.clock())
    meter.update(status="inactive", updated=now, status_transitions={"deactivated_at": now})
    state.log("meter", meter=meter)
    return web.json_response(meter)


# ---------------------------------------------------------------- meter events


def _ingest(
    state: EmulatorState,
    *,
    event_name: str,
    identifier: str | None,
    payload: Any,
    timestamp: int | None,
    api: Literal["v1", "v2"],
) -> _Event:
    """Validate one meter event and record it; raise ApiError (nothing recorded) otherwise."""
    now = state.clock()
    state.prune(now)
    meter = _meter_by_event_name(state, event_name)
    if meter is None:
        raise ApiError(
            400,
            f"Invalid event_name: {event_name}. No active meter found with this event name.",
            code="no_meter",
            param="event_name",
        )
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
    value_key = meter["value_settings"]["event_payload_key"]
    customer = payload.get(customer_key, "")
    if not customer.strip():
        raise ApiError(
            400,
            f"Missing customer mapping: the payload must contain '{customer_key}'.",
            code="meter_event_no_customer_defined",
            param=f"payload[{customer_key}]",
        )
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
        if not _WHOLE_NUMBER.fullmatch(value):
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
    if state.customers and customer not in state.customers:
        raise ApiError(
            400,
            f"No such customer: '{customer}'",
            code="resource_missing",
            param=f"payload[{customer_key}]",
        )
    if identifier is None:
        identifier = _new_id("ident")
    elif identifier in state.identifiers:
        state.stats.rejected_duplicates += 1
        raise ApiError(
            400,
            DUPLICATE_MESSAGE.format(identifier=identifier),
            param="identifier",
            duplicate=True,
        )
    state.identifiers[identifier] = now
    event = _Event(
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


def _identifier_param(params: Mapping[str, Any]) -> str | None:
    if params.get("identifier") is None:
        return None
    return _required_str(params, "identifier", MAX_IDENTIFIER_LENGTH)


def _parse_rfc3339(value: Any, param: str) -> int | None:
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


def _counted(state: EmulatorState, fn: Callable[[], _Event]) -> _Event:
    try:
        return fn()
    except ApiError as err:
        if not err.duplicate:
            state.stats.rejected_other += 1
        raise


async def create_meter_event(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = request.app[STATE_KEY]
    params = await _params(request)

    def run() -> _Event:
        event_name = _required_str(params, "event_name", MAX_EVENT_NAME_LENGTH)
        identifier = _identifier_param(params)
        timestamp = _int_param(params, "timestamp", required=False)
        payload = params.get("payload")
        if payload is None:
            raise ApiError(
                400, "Missing required param: payload.", code="parameter_missing", param="payload"
            )
        return _ingest(
            state,
            event_name=event_name,
            identifier=identifier,
            payload=payload,
            timestamp=timestamp,
            api="v1",
        )

    event = _counted(state, run)
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
        "event_name": _required_str(raw, "event_name", MAX_EVENT_NAME_LENGTH),
        "identifier": _identifier_param(raw),
        "payload": raw.get("payload"),
        "timestamp": _parse_rfc3339(raw.get("timestamp"), "timestamp"),
    }


async def create_meter_event_v2(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = request.app[STATE_KEY]
    params = await _params(request)
    event = _counted(state, lambda: _ingest(state, **_v2_event_params(params), api="v2"))
    return web.json_response(
        {
            "object": "v2.billing.meter_event",
            "created": _rfc3339(event.received_at),
            "event_name": event.event_name,
            "identifier": event.identifier,
            "livemode": False,
            "payload": event.payload,
            "timestamp": _rfc3339(event.timestamp),
        }
    )


async def create_session(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = request.app[STATE_KEY]
    now = state.clock()
    token = f"meter_session_{secrets.token_urlsafe(24)}"
    expires = now + SESSION_TTL_SECONDS
    state.sessions[token] = expires
    state.log("session", token=token, expires=expires)
    return web.json_response(
        {
            "id": _new_id("mes"),
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": _rfc3339(now),
            "expires_at": _rfc3339(expires),
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
    token = _bearer(request)
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
    params = await _params(request)
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
            _ingest(state, **item, api="v2")
        except ApiError as err:
            if err.duplicate:
                continue
            state.stats.rejected_other += 1
            report = {"identifier": item["identifier"], "code": err.code, "message": err.message}
            state.errors.append(report)
            state.log("error", error=report)
    return web.json_response({})


# ---------------------------------------------------------------- adjustments


def _cancel_event(state: EmulatorState, *, event_name: str, identifier: str, param: str) -> _Event:
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
    event_name = _required_str(params, "event_name", MAX_EVENT_NAME_LENGTH)
    kind = _required_str(params, "type")
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
    identifier = _required_str({param: raw}, param, MAX_IDENTIFIER_LENGTH)
    return event_name, identifier, param


def _cancel_request(state: EmulatorState, params: Mapping[str, Any], *, v2: bool) -> _Event:
    try:
        event_name, identifier, param = _adjustment_params(params, v2=v2)
        return _cancel_event(state, event_name=event_name, identifier=identifier, param=param)
    except ApiError:
        state.stats.rejected_cancellations += 1
        raise


async def create_meter_event_adjustment(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = request.app[STATE_KEY]
    event = _cancel_request(state, await _params(request), v2=False)
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
    _require_api_key(request)
    state = request.app[STATE_KEY]
    event = _cancel_request(state, await _params(request), v2=True)
    assert event.cancelled_at is not None
    return web.json_response(
        {
            "id": _new_id("mtr_event_adj"),
            "object": "v2.billing.meter_event_adjustment",
            "cancel": {"identifier": event.identifier},
            "created": _rfc3339(event.cancelled_at),
            "event_name": event.event_name,
            "livemode": False,
            "status": "pending",
            "type": "cancel",
        }
    )


# ---------------------------------------------------------------- summaries


def _aggregate(formula: str, events: list[_Event]) -> int:
    if formula == "count":
        return len(events)
    if formula == "sum":
        return sum(int(e.value or 0) for e in events)
    last = max(events, key=lambda e: (e.timestamp, e.seq))
    return int(last.value or 0)


async def event_summaries(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = request.app[STATE_KEY]
    meter = _get_meter(state, request.match_info["id"])
    params = await _params(request)
    customer = _required_str(params, "customer")
    start = _int_param(params, "start_time", required=True)
    end = _int_param(params, "end_time", required=True)
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
    matching = [
        e
        for e in state.events
        if e.meter == meter["id"]
        and e.customer == customer
        and not e.cancelled
        and start <= e.timestamp < end
    ]
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
                "aggregated_value": _aggregate(formula, bucket) if bucket else 0,
                "end_time": hi,
                "livemode": False,
                "meter": meter["id"],
                "start_time": lo,
            }
        )
    return _list_object(request, summaries, params)


# ---------------------------------------------------------------- products, prices, invoices
#
# Enough of Stripe's catalog for metered prices (issue #24): products, prices with
# billing_scheme per_unit | tiered, tiers_mode graduated | volume, transform_quantity,
# recurring[usage_type=metered, meter] or licensed; and an invoice preview
# (POST /v1/invoices/create_preview, GET /v1/invoices/upcoming) for a customer and a list
# of prices, from the meter events received, by Stripe's documented price semantics:
# a metered price's quantity is the meter's aggregate over the period (sum, count or
# last; a negative total is 0), packages are the quantity divided by divide_by and
# rounded up or down, graduated tiers price each tier's units (up_to inclusive) plus the
# flat amount of every tier reached (the first always), volume tiers price every unit at
# the tier holding the total, and each line's exact amount (Stripe's *_decimal amounts
# are in minor units) is rounded once, half up, to a whole minor unit; the total is the
# sum of the lines. The period is the calendar month (UTC) holding the emulator's clock,
# or ``period[start]``/``period[end]`` (epoch seconds, an emulator extension: previews
# here have no subscription to take a billing cycle from).


def _decimal_param(value: Any, param: str) -> Decimal:
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise ApiError(400, f"Invalid decimal: {value}", param=param) from None
    if not number.is_finite() or number < 0:
        raise ApiError(400, f"Invalid decimal: {value}", param=param)
    return number


def _amount(params: Mapping[str, Any], name: str, param: str) -> Decimal | None:
    """``name`` (integer) or ``name_decimal`` (decimal string), in minor units."""
    if params.get(f"{name}_decimal") is not None:
        return _decimal_param(params[f"{name}_decimal"], f"{param}_decimal")
    if params.get(name) is not None:
        return Decimal(_int_param(params, name, required=True) or 0)
    return None


def _price_tiers(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(
            400, "Missing required param: tiers.", code="parameter_missing", param="tiers"
        )
    tiers: list[dict[str, Any]] = []
    previous = 0
    for i, tier in enumerate(raw):
        if not isinstance(tier, dict):
            raise ApiError(400, f"Invalid tiers[{i}]: must be a hash.", param=f"tiers[{i}]")
        up_to = tier.get("up_to")
        last = i == len(raw) - 1
        if up_to == "inf":
            if not last:
                raise ApiError(400, "Only the last tier may have up_to=inf.", param="tiers")
            bound = None
        else:
            bound = _int_param(tier, "up_to", required=True)
            if last or bound is None or bound <= previous:
                raise ApiError(
                    400,
                    "Tiers must have ascending up_to values and the last must be inf.",
                    param=f"tiers[{i}][up_to]",
                )
            previous = bound
        unit = _amount(tier, "unit_amount", f"tiers[{i}][unit_amount]") or Decimal(0)
        flat = _amount(tier, "flat_amount", f"tiers[{i}][flat_amount]") or Decimal(0)
        tiers.append(
            {
                "up_to": bound,
                "unit_amount_decimal": str(unit),
                "flat_amount_decimal": str(flat),
                "unit_amount": int(unit) if unit == unit.to_integral() else None,
                "flat_amount": int(flat) if flat == flat.to_integral() else None,
            }
        )
    return tiers


async def create_product(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = request.app[STATE_KEY]
    params = await _params(request)
    name = _required_str(params, "name", 250)
    product_id = params.get("id") or _new_id("prod")
    if not isinstance(product_id, str) or len(product_id) > 250:
        raise ApiError(400, "Invalid id.", param="id")
    if product_id in state.products:
        raise ApiError(
            400,
            f"Product already exists: {product_id}",
            code="resource_already_exists",
            param="id",
        )
    metadata = params.get("metadata") or {}
    product = {
        "id": product_id,
        "object": "product",
        "active": True,
        "created": int(state.clock()),
        "livemode": False,
        "metadata": metadata if isinstance(metadata, dict) else {},
        "name": name,
    }
    state.products[product_id] = product
    state.log("product", product=product)
    return web.json_response(product)


async def get_product(request: web.Request) -> web.Response:
    _require_api_key(request)
    product = request.app[STATE_KEY].products.get(request.match_info["id"])
    if product is None:
        raise ApiError(
            404,
            f"No such product: '{request.match_info['id']}'",
            code="resource_missing",
            param="id",
        )
    return web.json_response(product)


async def create_price(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = request.app[STATE_KEY]
    params = await _params(request)
    currency = _required_str(params, "currency").lower()
    if not re.fullmatch(r"[a-z]{3}", currency):
        raise ApiError(400, f"Invalid currency: {currency}", param="currency")
    product = _required_str(params, "product")
    if product not in state.products:
        raise ApiError(
            404, f"No such product: '{product}'", code="resource_missing", param="product"
        )
    scheme = params.get("billing_scheme") or "per_unit"
    if scheme not in ("per_unit", "tiered"):
        raise ApiError(
            400, "Invalid billing_scheme: must be per_unit or tiered.", param="billing_scheme"
        )
    recurring = params.get("recurring")
    if recurring is not None:
        if not isinstance(recurring, dict) or recurring.get("interval") not in (
            "day", "week", "month", "year",
        ):  # fmt: skip
            raise ApiError(400, "Invalid recurring[interval].", param="recurring[interval]")
        usage_type = recurring.get("usage_type") or "licensed"
        if usage_type not in ("licensed", "metered"):
            raise ApiError(400, "Invalid recurring[usage_type].", param="recurring[usage_type]")
        meter = recurring.get("meter")
        if usage_type == "metered" and meter not in state.meters:
            raise ApiError(
                400 if meter is None else 404,
                f"No such billing meter: '{meter}'" if meter else "A metered price needs a meter.",
                code="resource_missing" if meter else "parameter_missing",
                param="recurring[meter]",
            )
        recurring = {
            "interval": recurring["interval"],
            "interval_count": 1,
            "usage_type": usage_type,
            "meter": meter if usage_type == "metered" else None,
        }
    transform = params.get("transform_quantity")
    unit = _amount(params, "unit_amount", "unit_amount")
    tiers = None
    tiers_mode = None
    if scheme == "per_unit":
        if unit is None:
            raise ApiError(
                400, "Missing required param: unit_amount.", code="parameter_missing",
                param="unit_amount",
            )  # fmt: skip
        if transform is not None:
            if not isinstance(transform, dict) or transform.get("round") not in ("up", "down"):
                raise ApiError(400, "Invalid transform_quantity.", param="transform_quantity")
            divide_by = _int_param(transform, "divide_by", required=True)
            if divide_by is None or divide_by < 1:
                raise ApiError(
                    400, "Invalid transform_quantity[divide_by].", param="transform_quantity"
                )
            transform = {"divide_by": divide_by, "round": transform["round"]}
    else:
        if transform is not None:
            raise ApiError(
                400,
                "Quantity transformation isn't compatible with tiered pricing.",
                param="transform_quantity",
            )
        tiers_mode = params.get("tiers_mode")
        if tiers_mode not in ("graduated", "volume"):
            raise ApiError(
                400, "Invalid tiers_mode: must be graduated or volume.", param="tiers_mode"
            )
        tiers = _price_tiers(params.get("tiers"))
    lookup_key = params.get("lookup_key")
    if lookup_key is not None and any(
        p["lookup_key"] == lookup_key and p["active"] for p in state.prices.values()
    ):
        raise ApiError(
            400,
            f"A price (with lookup_key {lookup_key}) already exists.",
            param="lookup_key",
        )
    metadata = params.get("metadata") or {}
    price_id = _new_id("price")
    price: dict[str, Any] = {
        "id": price_id,
        "object": "price",
        "active": True,
        "billing_scheme": scheme,
        "created": int(state.clock()),
        "currency": currency,
        "livemode": False,
        "lookup_key": lookup_key,
        "metadata": metadata if isinstance(metadata, dict) else {},
        "nickname": params.get("nickname"),
        "product": product,
        "recurring": recurring,
        "tiers": tiers,
        "tiers_mode": tiers_mode,
        "transform_quantity": transform,
        "type": "recurring" if recurring else "one_time",
        "unit_amount": int(unit) if unit is not None and unit == unit.to_integral() else None,
        "unit_amount_decimal": None if unit is None else str(unit),
    }
    state.prices[price_id] = price
    state.log("price", price=price)
    return web.json_response(price)


async def list_prices(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = request.app[STATE_KEY]
    params = await _params(request)
    keys = params.get("lookup_keys")
    prices = [
        p
        for p in state.prices.values()
        if (keys is None or p["lookup_key"] in keys)
        and params.get("product") in (None, p["product"])
    ]
    return _list_object(request, prices, params)


def _price_amount(price: Mapping[str, Any], quantity: Decimal) -> Decimal:
    """The exact amount of ``quantity`` under ``price``, in minor units (Stripe's rules)."""
    q = max(quantity, Decimal(0))
    if price["billing_scheme"] == "per_unit":
        transform = price.get("transform_quantity")
        if transform:
            ratio = Fraction(q) / transform["divide_by"]
            q = Decimal(math.ceil(ratio) if transform["round"] == "up" else math.floor(ratio))
        return q * Decimal(price["unit_amount_decimal"])
    tiers = price["tiers"]
    if price["tiers_mode"] == "volume":
        for tier in tiers:
            if tier["up_to"] is None or q <= tier["up_to"]:
                return q * Decimal(tier["unit_amount_decimal"]) + Decimal(
                    tier["flat_amount_decimal"]
                )
    total, lower = Decimal(0), 0
    for i, tier in enumerate(tiers):
        if i > 0 and q <= lower:
            break
        top = q if tier["up_to"] is None else min(q, Decimal(tier["up_to"]))
        units = max(top - lower, Decimal(0))
        total += units * Decimal(tier["unit_amount_decimal"]) + Decimal(tier["flat_amount_decimal"])
        if tier["up_to"] is None:
            break
        lower = tier["up_to"]
    return total


def _month(epoch: float) -> tuple[int, int]:
    now = datetime.fromtimestamp(epoch, UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    return int(start.timestamp()), int(end.timestamp())


async def invoice_preview(request: web.Request) -> web.Response:
    _require_api_key(request)
    state = request.app[STATE_KEY]
    params = await _params(request)
    customer = _required_str(params, "customer")
    details = params.get("subscription_details") or {}
    items = details.get("items") if isinstance(details, dict) else None
    if items is None:
        items = params.get("subscription_items")
    if not isinstance(items, list) or not items:
        raise ApiError(
            400,
            "Missing required param: subscription_details[items].",
            code="parameter_missing",
            param="subscription_details[items]",
        )
    period = params.get("period") or {}
    start, end = _month(state.clock())
    if isinstance(period, dict) and period:
        start = _int_param(period, "start", required=True) or 0
        end = _int_param(period, "end", required=True) or 0
    lines = []
    currencies = set()
    for i, item in enumerate(items):
        price_id = item.get("price") if isinstance(item, dict) else None
        price = state.prices.get(price_id) if isinstance(price_id, str) else None
        if price is None:
            raise ApiError(
                404,
                f"No such price: '{price_id}'",
                code="resource_missing",
                param=f"subscription_details[items][{i}][price]",
            )
        currencies.add(price["currency"])
        recurring = price.get("recurring") or {}
        if recurring.get("usage_type") == "metered":
            meter = state.meters[recurring["meter"]]
            events = [
                e
                for e in state.events
                if e.meter == meter["id"]
                and e.customer == customer
                and not e.cancelled
                and start <= e.timestamp < end
            ]
            formula = meter["default_aggregation"]["formula"]
            quantity = max(_aggregate(formula, events), 0) if events else 0
        else:
            quantity = _int_param(item, "quantity", required=False) or 1
        exact = _price_amount(price, Decimal(quantity))
        amount = int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
        lines.append(
            {
                "object": "line_item",
                "amount": amount,
                "currency": price["currency"],
                "description": price.get("nickname") or price["id"],
                "period": {"start": start, "end": end},
                "price": price,
                "quantity": quantity,
            }
        )
    if len(currencies) > 1:
        raise ApiError(400, "All prices of an invoice must use one currency.")
    total = sum(line["amount"] for line in lines)
    invoice = {
        "object": "invoice",
        "id": None,
        "amount_due": total,
        "currency": currencies.pop(),
        "customer": customer,
        "lines": {"object": "list", "data": lines, "has_more": False, "url": request.path},
        "livemode": False,
        "period_end": end,
        "period_start": start,
        "status": "draft",
        "subtotal": total,
        "total": total,
    }
    return web.json_response(invoice)


# ---------------------------------------------------------------- /_emulator


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "Invalid JSON body.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


async def emulator_events(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    data = [e.public() for e in state.events]
    for name in ("event_name", "customer", "identifier"):
        wanted = request.query.get(name)
        if wanted is not None:
            data = [e for e in data if e[name] == wanted]
    return web.json_response({"data": data})


async def emulator_errors(request: web.Request) -> web.Response:
    return web.json_response({"data": request.app[STATE_KEY].errors})


async def emulator_stats(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[STATE_KEY].stats))


async def emulator_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"reset": True})


async def emulator_faults(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "POST":
        body = await _json_body(request)
        known = {f.name for f in fields(FaultConfig)}
        unknown = set(body) - known
        if unknown:
            raise ApiError(400, f"Unknown fault settings: {sorted(unknown)}")
        try:
            state.set_faults(replace(state.faults, **body))
        except (TypeError, ValueError) as err:
            raise ApiError(400, str(err)) from None
    return web.json_response(asdict(state.faults))


async def emulator_customers(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "POST":
        ids = (await _json_body(request)).get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise ApiError(400, 'Body must be {"ids": ["cus_...", ...]}.')
        state.customers.update(ids)
        state.log("customers", ids=sorted(state.customers))
    elif request.method == "DELETE":
        state.customers.clear()
        state.log("customers", ids=[])
    return web.json_response({"ids": sorted(state.customers)})


# ---------------------------------------------------------------- app


@web.middleware
async def _controls_take_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A change through ``/_emulator`` must be JSON: no cross-site form or text/plain post."""
    if (
        request.path.startswith("/_emulator/")
        and request.method not in ("GET", "HEAD", "OPTIONS")
        and request.content_type != "application/json"
    ):
        message = "The /_emulator controls take Content-Type: application/json."
        return ApiError(415, message).response()
    return await handler(request)


def create_emulator_app(
    *,
    faults: FaultConfig | None = None,
    clock: Clock = time.time,
    hosts: HostPolicy | None = None,
    state_file: str | os.PathLike[str] | None = None,
) -> web.Application:
    """The emulator as an aiohttp app (v1, v2 and ``/_emulator`` routes on one base).

    ``hosts``: the names it answers to (default: loopback names only).
    With ``state_file`` the state survives restarts (an account does not forget):
    it is read and compacted here, every change is journaled before its request
    is answered, and the file is locked against a second emulator until the app
    is cleaned up. Without it (tests) the state lives in memory only.
    """
    if hosts is None:
        hosts = emulator_hosts("127.0.0.1")
    app = web.Application(middlewares=[host_check(hosts), _controls_take_json, _api_middleware])
    state = EmulatorState(clock=clock, initial_faults=faults or FaultConfig())
    app[STATE_KEY] = state
    if state_file is not None:
        journal = Journal(Path(state_file)).open()
        try:
            state.restore(journal.read())
            journal.compact(state.records())
        except BaseException:
            journal.close()
            raise
        state.journal = journal

        async def close_journal(app: web.Application) -> None:
            journal.close()

        app.on_cleanup.append(close_journal)
    app.add_routes(
        [
            web.post("/v1/billing/meters", create_meter),
            web.get("/v1/billing/meters", list_meters),
            web.get("/v1/billing/meters/{id}", get_meter),
            web.post("/v1/billing/meters/{id}/deactivate", deactivate_meter),
            web.get("/v1/billing/meters/{id}/event_summaries", event_summaries),
            web.post("/v1/billing/meter_events", create_meter_event),
            web.post("/v1/billing/meter_event_adjustments", create_meter_event_adjustment),
            web.post("/v2/billing/meter_event_adjustments", create_meter_event_adjustment_v2),
            web.post("/v2/billing/meter_event_session", create_session),
            web.post("/v2/billing/meter_event_stream", meter_event_stream),
            web.post("/v2/billing/meter_events", create_meter_event_v2),
            web.post("/v1/products", create_product),
            web.get("/v1/products/{id}", get_product),
            web.post("/v1/prices", create_price),
            web.get("/v1/prices", list_prices),
            web.post("/v1/invoices/create_preview", invoice_preview),
            web.get("/v1/invoices/upcoming", invoice_preview),
            web.get("/_emulator/events", emulator_events),
            web.get("/_emulator/errors", emulator_errors),
            web.get("/_emulator/stats", emulator_stats),
            web.post("/_emulator/reset", emulator_reset),
            web.get("/_emulator/faults", emulator_faults),
            web.post("/_emulator/faults", emulator_faults),
            web.get("/_emulator/customers", emulator_customers),
            web.post("/_emulator/customers", emulator_customers),
            web.delete("/_emulator/customers", emulator_customers),
        ]
    )
    return app


def emulator_hosts(bind_host: str, allowed: Iterable[str] = ()) -> HostPolicy:
    """The names an emulator bound to ``bind_host`` answers to (pipeline/hosts.py)."""
    return HostPolicy.for_server(bind_host, allowed, hint="stripe-emulator --allowed-hosts")


async def serve_emulator(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    faults: FaultConfig | None = None,
    clock: Clock = time.time,
    allowed_hosts: Iterable[str] = (),
    state_file: str | os.PathLike[str] | None = None,
) -> tuple[web.AppRunner, int]:
    """Start the emulator on the running loop.

    Returns the runner (stop it with ``await runner.cleanup()``) and the bound port.
    """
    app = create_emulator_app(
        faults=faults,
        clock=clock,
        hosts=emulator_hosts(host, allowed_hosts),
        state_file=state_file,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    actual_port = int(runner.addresses[0][1])
    return runner, actual_port


def run_emulator(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    allowed_hosts: Iterable[str] = (),
    state_file: str | os.PathLike[str] | None = None,
) -> None:
    """Serve the emulator until interrupted (blocking; for the CLI).

    ``state_file``: keep the state there across restarts (``meterstream run``
    uses ``<state dir>/stripe-emulator.jsonl``).
    """
    app = create_emulator_app(hosts=emulator_hosts(host, allowed_hosts), state_file=state_file)
    web.run_app(app, host=host, port=port, access_log=None)


class BackgroundEmulator:
    """The emulator on its own event loop in a daemon thread, with a small control client.

    ``with BackgroundEmulator() as emu: emu.url, emu.stats(), emu.set_faults(...)``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        faults: FaultConfig | None = None,
        clock: Clock = time.time,
        state_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._faults = faults
        self._clock = clock
        self._state_file = state_file
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundEmulator:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="stripe-emulator", daemon=True
        )
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            serve_emulator(
                self.host,
                self._requested_port,
                faults=self._faults,
                clock=self._clock,
                state_file=self._state_file,
            ),
            loop,
        )
        try:
            self._runner, self.port = future.result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is None:
            return
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()
        self._loop = self._runner = self._thread = None

    def __enter__(self) -> BackgroundEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, int]:
        return dict(self.request("GET", "/_emulator/stats"))

    def events(self, **filters: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(filters)
        return list(
            self.request("GET", "/_emulator/events" + (f"?{query}" if query else ""))["data"]
        )

    def reset(self) -> None:
        self.request("POST", "/_emulator/reset", {})

    def set_faults(self, **settings: Any) -> dict[str, Any]:
        return dict(self.request("POST", "/_emulator/faults", settings))

    def register_customers(self, *ids: str) -> None:
        self.request("POST", "/_emulator/customers", {"ids": list(ids)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local Stripe Billing meter API emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--allowed-hosts", default="", help="names to answer to besides loopback")
    parser.add_argument("--state-file", help="keep the state in this file across restarts")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        run_emulator(args.host, args.port, split_list(args.allowed_hosts), args.state_file)


if __name__ == "__main__":
    main()
