"""The emulator's aiohttp app (its routes, behind sinks/stripe/emulator/guard.py),
served on a loop (:func:`serve_emulator`), from the CLI (:func:`run_emulator`,
``stripe-emulator``) or in a thread of its own (:class:`BackgroundEmulator`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from meterstream.hosts import HostPolicy, split_list
from meterstream.sinks.stripe.emulator.adjustments import (
    create_meter_event_adjustment,
    create_meter_event_adjustment_v2,
)
from meterstream.sinks.stripe.emulator.controls import (
    emulator_clock,
    emulator_customers,
    emulator_errors,
    emulator_events,
    emulator_faults,
    emulator_reset,
    emulator_stats,
    emulator_ties,
    emulator_webhook_deliveries,
    emulator_webhook_release,
)
from meterstream.sinks.stripe.emulator.customers import (
    attach_payment_method,
    create_customer,
    get_customer,
    get_payment_method,
    list_customers,
    update_customer,
)
from meterstream.sinks.stripe.emulator.delivery import install_sender
from meterstream.sinks.stripe.emulator.guard import (
    api_middleware,
    controls_take_json,
    emulator_hosts,
)
from meterstream.sinks.stripe.emulator.journal import Journal
from meterstream.sinks.stripe.emulator.meter_events import (
    create_meter_event,
    create_meter_event_v2,
    create_session,
    meter_event_stream,
)
from meterstream.sinks.stripe.emulator.meters import (
    create_meter,
    deactivate_meter,
    event_summaries,
    get_meter,
    list_meters,
)
from meterstream.sinks.stripe.emulator.options import (
    WebhookOption,
    add_webhook_arguments,
    webhook_options,
)
from meterstream.sinks.stripe.emulator.payment_intents import (
    cancel_payment_intent,
    confirm_payment_intent,
    create_payment_intent,
    get_payment_intent,
    list_payment_intents,
)
from meterstream.sinks.stripe.emulator.prices import (
    create_price,
    create_product,
    get_product,
    invoice_preview,
    list_prices,
)
from meterstream.sinks.stripe.emulator.state import STATE_KEY, Clock, EmulatorState, FaultConfig
from meterstream.sinks.stripe.emulator.webhooks import (
    create_webhook_endpoint,
    delete_webhook_endpoint,
    endpoint_object,
    get_event,
    get_webhook_endpoint,
    list_events,
    list_webhook_endpoints,
    new_secret,
    update_webhook_endpoint,
)
from meterstream.webhosts import host_check

DEFAULT_PORT = 12111


def _configure_webhooks(state: EmulatorState, webhooks: Iterable[WebhookOption]) -> None:
    for option in webhooks:
        endpoint = endpoint_object(
            state,
            option.url,
            list(option.enabled_events),
            endpoint_id=option.endpoint_id,
            secret=option.secret,
            description="--webhook-url",
        )
        known = state.pay.endpoints.get(endpoint["id"])
        if known is not None:
            endpoint["created"] = known["created"]
        if known != endpoint:
            state.pay.endpoints[endpoint["id"]] = endpoint
            state.log("webhook_endpoint", endpoint=endpoint)
        state.pay.configured.append(endpoint)


def create_emulator_app(
    *,
    faults: FaultConfig | None = None,
    clock: Clock = time.time,
    hosts: HostPolicy | None = None,
    state_file: str | os.PathLike[str] | None = None,
    webhooks: Iterable[WebhookOption] = (),
) -> web.Application:
    """The emulator as an aiohttp app (v1, v2 and ``/_emulator`` routes on one base).

    ``hosts``: the names it answers to (default: loopback names only).
    With ``state_file`` the state survives restarts (an account does not forget):
    it is read and compacted here, every change is journaled before its request
    is answered, and the file is locked against a second emulator until the app
    is cleaned up. Without it (tests) the state lives in memory only.
    ``webhooks``: endpoints to send events to from the start (sinks/stripe/emulator/delivery.py
    sends them while the app runs).
    """
    if hosts is None:
        hosts = emulator_hosts("127.0.0.1")
    app = web.Application(middlewares=[host_check(hosts), controls_take_json, api_middleware])
    state = EmulatorState(clock=clock, initial_faults=faults or FaultConfig())
    app[STATE_KEY] = state
    install_sender(app)  # before the journal's close: the sender stops first
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
    _configure_webhooks(state, webhooks)
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
            web.post("/v1/customers", create_customer),
            web.get("/v1/customers", list_customers),
            web.get("/v1/customers/{id}", get_customer),
            web.post("/v1/customers/{id}", update_customer),
            web.get("/v1/payment_methods/{id}", get_payment_method),
            web.post("/v1/payment_methods/{id}/attach", attach_payment_method),
            web.post("/v1/payment_intents", create_payment_intent),
            web.get("/v1/payment_intents", list_payment_intents),
            web.get("/v1/payment_intents/{id}", get_payment_intent),
            web.post("/v1/payment_intents/{id}/confirm", confirm_payment_intent),
            web.post("/v1/payment_intents/{id}/cancel", cancel_payment_intent),
            web.get("/v1/events", list_events),
            web.get("/v1/events/{id}", get_event),
            web.post("/v1/webhook_endpoints", create_webhook_endpoint),
            web.get("/v1/webhook_endpoints", list_webhook_endpoints),
            web.get("/v1/webhook_endpoints/{id}", get_webhook_endpoint),
            web.post("/v1/webhook_endpoints/{id}", update_webhook_endpoint),
            web.delete("/v1/webhook_endpoints/{id}", delete_webhook_endpoint),
            web.get("/_emulator/events", emulator_events),
            web.get("/_emulator/errors", emulator_errors),
            web.get("/_emulator/stats", emulator_stats),
            web.get("/_emulator/ties", emulator_ties),
            web.get("/_emulator/clock", emulator_clock),
            web.post("/_emulator/clock", emulator_clock),
            web.post("/_emulator/reset", emulator_reset),
            web.get("/_emulator/faults", emulator_faults),
            web.post("/_emulator/faults", emulator_faults),
            web.get("/_emulator/customers", emulator_customers),
            web.post("/_emulator/customers", emulator_customers),
            web.delete("/_emulator/customers", emulator_customers),
            web.get("/_emulator/webhook_deliveries", emulator_webhook_deliveries),
            web.post("/_emulator/webhook_release", emulator_webhook_release),
        ]
    )
    return app


async def serve_emulator(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    faults: FaultConfig | None = None,
    clock: Clock = time.time,
    allowed_hosts: Iterable[str] = (),
    state_file: str | os.PathLike[str] | None = None,
    webhooks: Iterable[WebhookOption] = (),
) -> tuple[web.AppRunner, int]:
    """Start the emulator on the running loop.

    Returns the runner (stop it with ``await runner.cleanup()``) and the bound port.
    """
    app = create_emulator_app(
        faults=faults,
        clock=clock,
        hosts=emulator_hosts(host, allowed_hosts),
        state_file=state_file,
        webhooks=webhooks,
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
    *,
    faults: FaultConfig | None = None,
    webhooks: Iterable[WebhookOption] = (),
) -> None:
    """Serve the emulator until interrupted (blocking; for the CLI).

    ``state_file``: keep the state there across restarts (``meterstream run``
    uses ``<state dir>/stripe-emulator.jsonl``). ``faults``: the settings to start
    with (and return to on reset); ``webhooks``: endpoints configured at start.
    """
    app = create_emulator_app(
        hosts=emulator_hosts(host, allowed_hosts),
        state_file=state_file,
        faults=faults,
        webhooks=webhooks,
    )
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
        webhooks: Iterable[WebhookOption] = (),
    ) -> None:
        self.host = host
        self._webhooks = tuple(webhooks)
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
                webhooks=self._webhooks,
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

    def advance_clock(self, seconds: float) -> float:
        """Move the emulator's time forward; returns its new time (epoch seconds)."""
        return float(self.request("POST", "/_emulator/clock", {"advance_seconds": seconds})["now"])

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

    def webhook_deliveries(self, **filters: str) -> dict[str, Any]:
        """``/_emulator/webhook_deliveries``: ``data`` (the attempts), ``queued``, ``held``,
        ``owed``."""
        query = urllib.parse.urlencode(filters)
        path = "/_emulator/webhook_deliveries" + (f"?{query}" if query else "")
        return dict(self.request("GET", path))

    def release_webhooks(self) -> int:
        return int(self.request("POST", "/_emulator/webhook_release", {})["released"])


def run_from_args(args: argparse.Namespace) -> None:
    """:func:`run_emulator` with the command line's options (``--host``, ``--port``,
    ``--allowed-hosts``, ``--state-file`` and sinks/stripe/emulator/options.py's);
    a ``ValueError`` before it starts says what is wrong with them."""
    retry_base_ms, max_attempts, webhooks = webhook_options(args, new_secret)
    faults = FaultConfig(webhook_retry_base_ms=retry_base_ms, webhook_max_attempts=max_attempts)
    hosts = split_list(args.allowed_hosts)
    run_emulator(args.host, args.port, hosts, args.state_file, faults=faults, webhooks=webhooks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local Stripe Billing meter API emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--allowed-hosts", default="", help="names to answer to besides loopback")
    parser.add_argument("--state-file", help="keep the state in this file across restarts")
    add_webhook_arguments(parser)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        try:
            run_from_args(args)
        except ValueError as err:
            parser.error(str(err))


if __name__ == "__main__":
    main()
