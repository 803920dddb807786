"""Sending webhooks: one task per app (:class:`Sender`), started and stopped with it.

Each delivery (one event to one endpoint) is sent by ``POST`` to the endpoint's URL:
the body is the event as JSON (the same bytes at every attempt), the header
``Stripe-Signature`` is made afresh at each attempt with the emulator clock's time
(sinks/stripe/emulator/webhooks.py ``signature_header``), ``Content-Type:
application/json; charset=utf-8``. A 2xx answer delivers it; any other answer, no
answer within ``webhook_timeout_ms``, a refused connection or a redirect (not
followed) fails the attempt, and the next one follows after ``webhook_retry_base_ms``
doubling after each failure, until ``webhook_max_attempts`` (then it is given up;
the event stays in ``GET /v1/events``). The order of side effects: the attempt is
recorded (``/_emulator/webhook_deliveries``), then an ended delivery is journaled as
no longer owed (``webhook_done``), so a restart resends only what was not delivered.

Deliveries to one endpoint go one at a time, in queue order (so a held, reordered
batch arrives in the order given); a slow endpoint holds up only its own. When the app
stops, the attempts under way get ``STOP_GRACE_S`` to finish and be recorded; one cut
off is sent again after a restart (webhooks are delivered at least once, as Stripe's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from meterstream.sinks.stripe.emulator.payments_state import Delivery
from meterstream.sinks.stripe.emulator.protocol import new_id
from meterstream.sinks.stripe.emulator.state import STATE_KEY, EmulatorState
from meterstream.sinks.stripe.emulator.webhooks import signature_header

log = logging.getLogger(__name__)

USER_AGENT = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
STOP_GRACE_S = 2.0


def event_body(event: dict[str, Any]) -> bytes:
    """The bytes sent for ``event`` (pretty-printed JSON, as Stripe sends it)."""
    return json.dumps(event, indent=2).encode("utf-8")


class Sender:
    """Sends the state's queued deliveries, woken by :meth:`PaymentsState.notify`."""

    def __init__(self, state: EmulatorState) -> None:
        self.state = state
        self.wake = asyncio.Event()
        self.busy: dict[str, asyncio.Task[None]] = {}  # endpoint id -> its sending task
        self.task: asyncio.Task[None] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.stopping = False

    async def start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession()
        self.state.pay.wake = self.wake.set
        self.task = asyncio.get_running_loop().create_task(self.run(), name="webhook-sender")

    async def stop(self, app: web.Application) -> None:
        """Stop sending: the attempts under way get up to ``STOP_GRACE_S`` to finish and be
        recorded (an attempt cut off is sent again after a restart: at least once)."""
        self.state.pay.wake = None
        self.stopping = True
        if self.task is not None:
            self.task.cancel()
        under_way = list(self.busy.values())
        if under_way:
            await asyncio.wait(under_way, timeout=STOP_GRACE_S)
        tasks = [t for t in (self.task, *under_way) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.session is not None:
            await self.session.close()

    async def run(self) -> None:
        pay = self.state.pay
        while True:
            self.wake.clear()
            now = time.monotonic()
            due: dict[str, list[Delivery]] = {}
            waiting: list[Delivery] = []
            for d in pay.queue:
                if d.due <= now and d.endpoint_id not in self.busy:
                    due.setdefault(d.endpoint_id, []).append(d)
                else:
                    waiting.append(d)
            pay.queue = waiting
            for endpoint_id, batch in due.items():
                task = asyncio.get_running_loop().create_task(self._send_all(endpoint_id, batch))
                self.busy[endpoint_id] = task
            idle = [d.due for d in pay.queue if d.endpoint_id not in self.busy]
            timeout = max(0.0, min(idle) - time.monotonic()) if idle else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def _send_all(self, endpoint_id: str, batch: list[Delivery]) -> None:
        try:
            for n, delivery in enumerate(batch):
                if self.stopping:
                    self.state.pay.queue.extend(batch[n:])
                    return
                try:
                    await self._attempt(delivery)
                except Exception:  # a bug here must not lose the delivery
                    log.exception("webhook delivery of %s failed", delivery.event_id)
                    delivery.due = time.monotonic() + 1.0
                    self.state.pay.queue.append(delivery)
        finally:
            self.busy.pop(endpoint_id, None)
            self.wake.set()

    async def _attempt(self, d: Delivery) -> None:
        state, pay = self.state, self.state.pay
        event = pay.events_by_id.get(d.event_id)
        endpoint = pay.endpoints.get(d.endpoint_id)
        if d.generation != pay.generation or event is None:
            return  # from before a reset
        if endpoint is None:
            self._end(d)  # its endpoint was deleted
            return
        faults = state.faults
        d.attempts += 1
        body = event_body(event)
        timestamp = int(state.clock())
        header = signature_header(endpoint["secret"], timestamp, body)
        attempt: dict[str, Any] = {
            "id": new_id("wha"),
            "event": event["id"],
            "type": event["type"],
            "endpoint": endpoint["id"],
            "url": endpoint["url"],
            "attempt": d.attempts,
            "duplicate": d.copy > 0,
            "timestamp": timestamp,
            "signature": header,
            "status": None,
            "outcome": "dropped",
            "error": None,
            "sent_at": state.clock(),
        }
        if d.attempts <= faults.webhook_drop_first:
            attempt["error"] = "dropped by the emulator (webhook_drop_first)"
        else:
            attempt.update(
                await self._post(endpoint["url"], body, header, faults.webhook_timeout_ms)
            )
        if d.generation != pay.generation:
            return  # reset while it was sent
        delivered = attempt["outcome"] == "delivered"
        if not delivered and d.attempts >= faults.webhook_max_attempts:
            attempt["gave_up"] = True
        pay.attempts.append(attempt)
        if delivered or attempt.get("gave_up"):
            self._end(d)
            return
        d.due = time.monotonic() + faults.webhook_retry_base_ms / 1000 * 2 ** (d.attempts - 1)
        pay.queue.append(d)

    async def _post(self, url: str, body: bytes, header: str, timeout_ms: int) -> dict[str, Any]:
        assert self.session is not None
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": header,
            "User-Agent": USER_AGENT,
        }
        try:
            async with self.session.post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout_ms / 1000),
            ) as response:
                await response.read()
                ok = 200 <= response.status < 300
                return {"status": response.status, "outcome": "delivered" if ok else "failed"}
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            return {"outcome": "error", "error": f"{type(err).__name__}: {err}"}

    def _end(self, d: Delivery) -> None:
        """The delivery is over (delivered, given up, endpoint gone): no longer owed."""
        if d.copy == 0 and self.state.pay.settle(d.event_id, d.endpoint_id):
            self.state.log("webhook_done", event=d.event_id, endpoint=d.endpoint_id)


SENDER_KEY = web.AppKey("meterstream_emulator_sender", Sender)


def install_sender(app: web.Application) -> None:
    """Start the sender with the app and stop it at cleanup."""
    sender = Sender(app[STATE_KEY])
    app[SENDER_KEY] = sender
    app.on_startup.append(sender.start)
    app.on_cleanup.append(sender.stop)
