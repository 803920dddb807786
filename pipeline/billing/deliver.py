"""Deliver to Stripe: send the planned ledger rows (pipeline/billing/plan.py) in order,
record each outcome in the ledger, publish the failures on ``stripe-errors``; and
every other call to Stripe (creating its meters, reading its totals back).

Points 5, 6 and 8 of pipeline/billing/forwarding.py's docstring: the ledger row is
``pending`` before its send and ``sent`` or ``error`` after; retryable failures stay
``pending`` for the next forward; the transport is v1 or v2. One thread sends, so
there is at most one request in flight (under the client's rate limit).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

import orjson

from meterstream.billing.plan import Check
from meterstream.billing.stripe_corrections import CANCEL_REFUSED
from meterstream.billing.stripe_ids import Refusal
from meterstream.errors import StripeError
from meterstream.meters.config import Meter, MetersConfig
from meterstream.meters.windows import month_bounds
from meterstream.metrics import Metrics
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.stripe import ledger
from meterstream.sinks.stripe.client import MAX_V2_BATCH, MeterSpec, StripeMeterClient
from meterstream.sinks.stripe.ledger import LedgerRow
from meterstream.sinks.stripe.payloads import build_meter_event, formula_for

log = logging.getLogger("meterstream.stripe")

Transport = Literal["v1", "v2"]
ALREADY_CANCELLED = "already been canceled"
"""In Stripe's refusal of a cancellation that already happened (the emulator's wording:
Stripe documents no code for it): success, the event no longer counts."""
PublishError = Callable[[LedgerRow, str], Awaitable[None]]
PublishRefusal = Callable[[str, bytes], Awaitable[None]]  # (record key, record value)


def choose_transport(settings: Settings, requested: str | None = None) -> Transport:
    """v1 or v2 (see the module docstring, point 8)."""
    choice = requested or settings.stripe_transport
    if choice in ("v1", "v2"):
        return choice  # type: ignore[return-value]
    key = settings.stripe_api_key.get_secret_value() if settings.stripe_api_key else ""
    return "v2" if key.startswith(("sk_live_", "rk_live_")) else "v1"


def stripe_client(settings: Settings) -> StripeMeterClient:
    return StripeMeterClient(
        api_key=settings.stripe_api_key,
        api_base=settings.stripe_api_base,
        meter_events_base=settings.stripe_meter_events_base,
        rate_limit_per_second=settings.stripe_rate_limit_per_second,
    )


def meter_spec(meter: Meter) -> MeterSpec:
    """The Stripe meter a meter with a ``stripe`` block forwards to: its description (or
    name), the block's event name and payload keys, the formula of its aggregation."""
    block = meter.stripe
    assert block is not None
    return MeterSpec(
        meter.description or meter.name,
        block.event_name,
        formula_for(meter.aggregation),
        block.customer_key,
        block.value_key,
    )


@dataclass(eq=False)
class Delivery:
    """The forwarder's side of Stripe: one thread for every call, the Stripe meters
    known to exist, and the delivery of ledger rows."""

    chio: ClickHouseIO
    metrics: Metrics
    client: StripeMeterClient
    transport: Transport
    publish_error: PublishError | None = None
    # a delivery stopped at a retryable failure this round
    stalled: bool = field(default=False, init=False)
    _meter_ready: set[str] = field(default_factory=set, init=False)
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="stripe"),
        init=False,
    )

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the one thread that talks to Stripe."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args))

    async def ensure_meter(self, meter: Meter) -> None:
        """Create the Stripe meter if missing; refuse one whose formula contradicts ours."""
        if meter.name in self._meter_ready:
            return
        await self.call(self.client.ensure_meter, meter_spec(meter))
        self._meter_ready.add(meter.name)

    async def deliver(
        self, meter: Meter, todo: list[tuple[LedgerRow, int]], now_ms: int | None = None
    ) -> list[LedgerRow]:
        """Send ``pending`` rows (with their timestamps) in order; record each outcome
        (``sent_at``: ``now_ms``, the forward's time, default the clock's).

        Stops at a retryable failure that outlived the client's retries: that
        row and the rest stay ``pending`` for the next forward.
        """
        stripe_block = meter.stripe
        assert stripe_block is not None
        params = [
            build_meter_event(
                stripe_block.event_name,
                row.identifier,
                row.stripe_customer_id,
                row.value,
                ts,
                customer_key=stripe_block.customer_key,
                value_key=stripe_block.value_key,
            )
            for row, ts in todo
        ]
        rows = [row for row, _ in todo]
        done: list[LedgerRow] = []
        failed: list[tuple[LedgerRow, str]] = []
        step = 1 if self.transport == "v1" else MAX_V2_BATCH
        for i in range(0, len(rows), step):
            chunk, chunk_params = rows[i : i + step], params[i : i + step]
            try:
                if self.transport == "v1":
                    result = await self.call(self.client.send_meter_event, chunk_params[0])
                else:
                    result = await self.call(self.client.send_batch_v2, chunk_params)
            except StripeError as exc:
                if exc.retryable:
                    self.stalled = True
                    self.metrics.stripe_requests.inc(outcome="retry_later")
                    log.warning(
                        "Stripe unavailable for %s (%s); %d row(s) stay pending",
                        meter.name,
                        exc,
                        len(rows) - i,
                    )
                    break
                self.metrics.stripe_requests.inc(outcome="error")
                code = exc.code or f"http_{exc.status}"
                for row in chunk:
                    log.error("Stripe rejected %s: %s (%s)", row.identifier, exc, code)
                    bad = row.with_status("error", code, attempts=row.attempts + 1)
                    done.append(bad)
                    failed.append((bad, str(exc)))
                continue
            self.metrics.stripe_requests.inc(outcome=result.status)
            self.metrics.stripe_arrivals.delivered(meter.name, (r.customer_id for r in chunk))
            done += [
                r.with_status("sent", attempts=r.attempts + max(1, result.attempts), at_ms=now_ms)
                for r in chunk
            ]
        if done:
            await self.chio.call(ledger.write, done)
        if self.publish_error is not None:
            for row, message in failed:
                await self.publish_error(row, message)
        return done

    async def cancel(self, meter: Meter, rows: list[LedgerRow]) -> list[LedgerRow]:
        """Cancel ``rows``' events (superseded `last` events) with meter event adjustments:
        ``cancelled`` when Stripe took it, still ``sent`` with ``error_code``
        ``cancel_refused`` when Stripe refused it (never tried again: reported as a tie);
        a retryable failure leaves the rest for the next forward. Recorded in the ledger."""
        stripe_block = meter.stripe
        assert stripe_block is not None
        done: list[LedgerRow] = []
        for row in rows:
            try:
                await self.call(
                    self.client.cancel_meter_event, stripe_block.event_name, row.identifier
                )
            except StripeError as exc:
                if exc.retryable:
                    self.stalled = True
                    break
                if ALREADY_CANCELLED not in str(exc):
                    log.error("Stripe refused to cancel %s: %s", row.identifier, exc)
                    self.metrics.stripe_cancellations.inc(outcome="refused")
                    done.append(row.with_status("sent", CANCEL_REFUSED))
                    continue
            self.metrics.stripe_cancellations.inc(outcome="cancelled")
            done.append(row.with_status("cancelled"))
        if done:
            await self.chio.call(ledger.write, done)
        return done


def stripe_period_values(
    client: StripeMeterClient, meters: MetersConfig, checks: list[Check], period: str, now_ms: int
) -> dict[tuple[str, str], Decimal]:
    """Stripe's aggregated value per (meter, stripe customer) over the period (so far)."""
    start, end = month_bounds(period)
    end = min(end, (now_ms // 60_000 + 1) * 60_000)
    by_event = {m["event_name"]: m["id"] for m in client.list_meters() if m["status"] == "active"}
    values: dict[tuple[str, str], Decimal] = {}
    for check in checks:
        key = (check.meter, check.stripe_customer_id)
        if not check.stripe_customer_id or key in values:
            continue
        stripe_block = meters.by_name(check.meter).stripe
        assert stripe_block is not None
        meter_id = by_event.get(stripe_block.event_name)
        if meter_id is None:
            values[key] = Decimal(0)
            continue
        summaries = client.event_summaries(
            meter_id, check.stripe_customer_id, start // 1000, end // 1000
        )
        values[key] = sum((s.aggregated_value for s in summaries), Decimal(0))
    return values


def row_summary(row: LedgerRow) -> dict[str, Any]:
    return {
        "identifier": row.identifier,
        "meter": row.meter,
        "customer_id": row.customer_id,
        "stripe_customer_id": row.stripe_customer_id,
        "period": row.period,
        "value": row.value,
        "status": row.status,
        "error_code": row.error_code,
    }


def error_message(row: LedgerRow, message: str) -> bytes:
    """The ``stripe-errors`` record value: the failed ledger row and Stripe's message."""
    return orjson.dumps(
        {
            **row_summary(row),
            "exact_total": str(row.exact_total),
            "attempts": row.attempts,
            "message": message,
            "failed_at": time.time_ns() // 1_000_000,
        }
    )


def refusal_message(meter: Meter, refusal: Refusal) -> tuple[str, bytes]:
    """The ``stripe-errors`` record of a refused Stripe customer id: key and value.

    Told apart from a failed ledger row by ``error_code`` ``stripe_customer_refused``
    (and an empty ``identifier``: nothing was sent).
    """
    assert meter.stripe is not None
    key = f"refused:{refusal.customer_id}:{refusal.reason}:{refusal.claimed}"
    return key, orjson.dumps(
        {
            "identifier": "",
            "meter": meter.name,
            "customer_id": refusal.customer_id,
            "stripe_customer_id": refusal.claimed,
            "kept_stripe_customer_id": refusal.kept,
            "other_customer_id": refusal.other_customer,
            "source": meter.stripe.customer_id_from,
            "status": "refused",
            "error_code": "stripe_customer_refused",
            "reason": refusal.reason,
            "message": refusal.describe(),
            "failed_at": time.time_ns() // 1_000_000,
        }
    )
