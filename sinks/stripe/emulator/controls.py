"""The test controls under ``/_emulator`` (no key; behind the Host check, and a
change must be JSON): accepted events, the error report, stats, reset, faults
(webhook delivery's included), the customer registry, the webhook delivery
attempts and the release of held webhooks."""

from __future__ import annotations

from dataclasses import asdict, fields, replace

from aiohttp import web

from meterstream.sinks.stripe.emulator.protocol import ApiError, json_body
from meterstream.sinks.stripe.emulator.state import STATE_KEY, FaultConfig
from meterstream.sinks.stripe.emulator.webhooks import release


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


async def emulator_ties(request: web.Request) -> web.Response:
    """The `last` ties event summaries met (Stripe leaves their winner undefined)."""
    return web.json_response({"data": list(request.app[STATE_KEY].ties.values())})


async def emulator_clock(request: web.Request) -> web.Response:
    """``GET``: the emulator's time; ``POST {"advance_seconds": N}`` moves it forward
    (never back: identifiers and adjustments are judged by it)."""
    state = request.app[STATE_KEY]
    if request.method == "POST":
        advance = (await json_body(request)).get("advance_seconds")
        if isinstance(advance, bool) or not isinstance(advance, int | float) or advance < 0:
            raise ApiError(400, 'Body must be {"advance_seconds": N} with N >= 0.')
        state.clock_offset += float(advance)
    return web.json_response({"now": state.clock(), "offset_seconds": state.clock_offset})


async def emulator_stats(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[STATE_KEY].stats))


async def emulator_reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"reset": True})


async def emulator_faults(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "POST":
        body = await json_body(request)
        known = {f.name for f in fields(FaultConfig)}
        unknown = set(body) - known
        if unknown:
            raise ApiError(400, f"Unknown fault settings: {sorted(unknown)}")
        try:
            state.set_faults(replace(state.faults, **body))
        except (TypeError, ValueError) as err:
            raise ApiError(400, str(err)) from None
        if not state.faults.webhook_out_of_order:
            release(state)  # what was held goes out (newest first)
    return web.json_response(asdict(state.faults))


async def emulator_customers(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.method == "POST":
        ids = (await json_body(request)).get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise ApiError(400, 'Body must be {"ids": ["cus_...", ...]}.')
        state.customers.update(ids)
        state.log("customers", ids=sorted(state.customers))
    elif request.method == "DELETE":
        state.customers.clear()
        state.log("customers", ids=[])
    return web.json_response({"ids": sorted(state.customers)})


async def emulator_webhook_deliveries(request: web.Request) -> web.Response:
    """Every webhook attempt made, oldest first (filters: event, type, endpoint, outcome),
    and how many deliveries wait (queued for a retry or their first attempt) or are held."""
    pay = request.app[STATE_KEY].pay
    data = pay.attempts
    for name in ("event", "type", "endpoint", "outcome"):
        wanted = request.query.get(name)
        if wanted is not None:
            data = [a for a in data if a[name] == wanted]
    owed = sum(len(endpoints) for endpoints in pay.owed.values())
    return web.json_response(
        {"data": data, "queued": len(pay.queue), "held": len(pay.held), "owed": owed}
    )


async def emulator_webhook_release(request: web.Request) -> web.Response:
    """Send the held webhooks now, newest event first."""
    return web.json_response({"released": release(request.app[STATE_KEY])})
