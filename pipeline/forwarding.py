"""Forward billing-period totals to Stripe meters from the verified record.

Every interval, for each meter with a ``stripe`` block and each customer whose
partition this worker owns:

1. Verify: recompute the period's closed windows (ended at least ``grace``
   ago) from the record and repair any stored window that differs
   (pipeline/reconcile.py). What is forwarded is therefore the record's total,
   exact on any broker.
2. Plan (:func:`plan_sends`, pure): sum/count meters send the whole-number
   delta since the last send (fraction carried, Stripe formula ``sum``);
   max/min/unique_count/latest send the period-to-date value when it changed
   (Stripe formula ``last``).
3. Side effects, in this order: write the ledger rows as ``pending``
   (ClickHouse ``stripe_meter_events``), send each with its deterministic
   identifier, write ``sent`` or ``error``. A crash between 1 and 3 leaves a
   ``pending`` row that the next run resends with the same identifier;
   Stripe's duplicate answer counts as success, so nothing is billed twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import faust

from pipeline.aggregation import WindowState, aggregator_for
from pipeline.chio import ClickHouseIO
from pipeline.errors import StripeError
from pipeline.meters import Meter, MetersConfig
from pipeline.metrics import Metrics
from pipeline.processor import WindowKey
from pipeline.reconcile import reconcile_meter
from pipeline.settings import Settings
from pipeline.windows import month_bounds, period_label
from sinks.clickhouse.client import ClickHouse
from sinks.stripe import ledger
from sinks.stripe.client import StripeMeterClient
from sinks.stripe.ledger import LedgerRow
from sinks.stripe.payloads import (
    Rounding,
    build_meter_event,
    formula_for,
    meter_event_identifier,
    next_delta,
    period_value,
)

log = logging.getLogger("meterstream.stripe")
LATE_PERIOD_DAYS = 3  # keep correcting the previous month for this long into the next


@dataclass(frozen=True)
class Plan:
    resend: list[LedgerRow]
    new: list[LedgerRow]
    held_no_customer: list[str]
    held_error: list[str]


def customer_totals(meter: Meter, states: dict[WindowKey, WindowState]) -> dict[str, Decimal]:
    """Period-to-date total per customer: all its windows (and groups) merged."""
    agg = aggregator_for(meter.aggregation)
    merged: dict[str, WindowState] = {}
    for key, state in states.items():
        base = merged.get(key.customer_id)
        merged[key.customer_id] = state if base is None else agg.merge(base, state)
    return {customer: agg.result(state) for customer, state in merged.items()}


def plan_sends(
    meter: Meter,
    period: str,
    totals: dict[str, Decimal],
    stripe_ids: dict[str, str],
    rows: Iterable[LedgerRow],
) -> Plan:
    """What to send for one meter and period, given the ledger so far (pure)."""
    assert meter.stripe is not None
    rounding = Rounding(meter.stripe.rounding)
    by_customer: dict[str, list[LedgerRow]] = defaultdict(list)
    for row in rows:
        by_customer[row.customer_id].append(row)
    resend: list[LedgerRow] = []
    new: list[LedgerRow] = []
    held_no_customer: list[str] = []
    held_error: list[str] = []
    formula = formula_for(meter.aggregation)
    for customer in sorted(set(totals) | set(by_customer)):
        history = sorted(by_customer.get(customer, []), key=lambda r: r.identifier)
        if any(r.status == "error" for r in history):
            held_error.append(customer)
            continue
        resend.extend(r for r in history if r.status == "pending")
        if customer not in totals:
            continue
        stripe_id = stripe_ids.get(customer)
        if not stripe_id:
            held_no_customer.append(customer)
            continue
        exact = totals[customer]
        counted = [r for r in history if r.status in ("sent", "pending")]
        if formula == "sum":
            value = next_delta(exact, sum(r.value for r in counted), rounding)
            if value == 0:
                continue
        else:
            value = period_value(exact, rounding)
            last = max(counted, key=lambda r: r.identifier, default=None)
            if last is not None and last.value == value:
                continue
        identifier = meter_event_identifier(meter.name, customer, period, len(history) + 1)
        new.append(
            LedgerRow(identifier, meter.name, customer, stripe_id, period, value, exact, "pending")
        )
    return Plan(resend, new, held_no_customer, held_error)


def stripe_customer_ids(ch: ClickHouse, path: str, customers: list[str]) -> dict[str, str]:
    """The latest non-empty value of ``path`` (e.g. properties.stripe_customer_id) per customer."""
    if not customers or not path.startswith("properties."):
        return {}
    parts = path.split(".")[1:]
    args = ", ".join(f"{{p{i}:String}}" for i in range(len(parts)))
    params: dict[str, Any] = {f"p{i}": p for i, p in enumerate(parts)}
    params["customers"] = customers
    rows = ch.query_rows(
        f"""
        SELECT customer_id, argMax(JSONExtractString(properties, {args}), timestamp)
        FROM usage_events
        WHERE customer_id IN {{customers:Array(String)}}
          AND JSONExtractString(properties, {args}) != ''
        GROUP BY customer_id
        """,
        parameters=params,
    )
    return {str(c): str(s) for c, s in rows}


class Forwarder:
    def __init__(
        self,
        settings: Settings,
        meters: MetersConfig,
        chio: ClickHouseIO,
        metrics: Metrics,
        client: StripeMeterClient,
        owns_customer: Any = None,
    ) -> None:
        self.meters = meters
        self.chio = chio
        self.metrics = metrics
        self.client = client
        self.owns_customer = owns_customer or (lambda customer: True)
        self.stripe_meters = [m for m in meters.meters if m.stripe is not None]
        self._last_run: dict[str, float] = {}
        self._meter_ready: set[str] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stripe")

    @property
    def tick_seconds(self) -> float:
        intervals = [m.stripe.interval_seconds for m in self.stripe_meters if m.stripe]
        return max(1.0, min(intervals, default=60) / 2)

    async def tick(self, now_ms: int | None = None, force: bool = False) -> int:
        """Forward every meter that is due; returns the number of events sent."""
        sent = 0
        now = now_ms or time.time_ns() // 1_000_000
        for meter in self.stripe_meters:
            assert meter.stripe is not None
            last = self._last_run.get(meter.name, 0.0)
            if not force and time.monotonic() - last < meter.stripe.interval_seconds:
                continue
            self._last_run[meter.name] = time.monotonic()
            sent += await self.forward(meter, now)
        return sent

    async def ensure_stripe_meter(self, meter: Meter) -> None:
        """Create the Stripe meter if missing; refuse one whose formula contradicts ours."""
        assert meter.stripe is not None
        if meter.name in self._meter_ready:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            self._executor,
            lambda: self.client.ensure_meter(
                meter.description or meter.name,
                meter.stripe.event_name,  # type: ignore[union-attr]
                formula_for(meter.aggregation),
                meter.stripe.customer_key,  # type: ignore[union-attr]
                meter.stripe.value_key,  # type: ignore[union-attr]
            ),
        )
        self._meter_ready.add(meter.name)

    async def forward(self, meter: Meter, now_ms: int) -> int:
        assert meter.stripe is not None
        await self.ensure_stripe_meter(meter)
        closed_until = now_ms - meter.stripe.grace_seconds * 1000
        upto, _ = meter.window_bounds(closed_until)
        periods = [period_label(upto - 1)]
        previous = period_label(month_bounds(periods[0])[0] - 1)
        if upto - month_bounds(periods[0])[0] < LATE_PERIOD_DAYS * 86_400_000:
            periods.insert(0, previous)
        sent = 0
        for period in periods:
            p_start, p_end = month_bounds(period)
            end = min(upto, p_end)
            if end <= p_start:
                continue
            sent += await self._forward_period(meter, period, p_start, end, now_ms)
        return sent

    async def _forward_period(
        self, meter: Meter, period: str, start: int, end: int, now_ms: int
    ) -> int:
        assert meter.stripe is not None
        diffs, record = await self.chio.call(
            reconcile_meter, self.meters, meter, start, end, fix=True
        )
        if diffs:
            self.metrics.repairs.inc(len(diffs), meter=meter.name)
            for diff in diffs[:20]:
                log.warning("repaired from the record before forwarding: %s", diff.describe())
        totals = {c: v for c, v in customer_totals(meter, record).items() if self.owns_customer(c)}
        path = meter.stripe.customer_id_from
        ids = await self.chio.call(stripe_customer_ids, path, sorted(totals))
        rows = await self.chio.call(ledger.for_period, meter.name, period)
        rows = [r for r in rows if self.owns_customer(r.customer_id)]
        plan = plan_sends(meter, period, totals, ids, rows)
        self.metrics.stripe_waiting.set(len(plan.held_no_customer), meter=meter.name)
        todo = plan.resend + plan.new
        if not todo:
            return 0
        if plan.new:
            await self.chio.call(ledger.write, plan.new)
        timestamp_s = (min(now_ms, end) - 1000) // 1000
        done = []
        for row in todo:
            done.append(await self._send(meter, row, timestamp_s))
        await self.chio.call(ledger.write, done)
        return sum(1 for r in done if r.status == "sent")

    async def _send(self, meter: Meter, row: LedgerRow, timestamp_s: int) -> LedgerRow:
        assert meter.stripe is not None
        params = build_meter_event(
            meter.stripe.event_name,
            row.identifier,
            row.stripe_customer_id,
            row.value,
            timestamp_s,
            customer_key=meter.stripe.customer_key,
            value_key=meter.stripe.value_key,
        )
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(
                self._executor, self.client.send_meter_event, params
            )
        except StripeError as exc:
            self.metrics.stripe_requests.inc(outcome="error")
            log.error("Stripe rejected %s: %s (%s)", row.identifier, exc, exc.code)
            return row.with_status("error", exc.code or "unknown")
        self.metrics.stripe_requests.inc(outcome=result.status)
        return row.with_status("sent", attempts=result.attempts)


def stripe_client(settings: Settings) -> StripeMeterClient:
    return StripeMeterClient(
        api_key=settings.stripe_api_key,
        api_base=settings.stripe_api_base,
        meter_events_base=settings.stripe_meter_events_base,
        rate_limit_per_second=settings.stripe_rate_limit_per_second,
    )


def install_forwarder(
    app: faust.App, settings: Settings, meters: MetersConfig, chio: ClickHouseIO, metrics: Metrics
) -> Forwarder | None:
    """A timer on the worker that forwards the customers of its own partitions."""
    if not any(m.stripe for m in meters.meters):
        return None
    from pipeline.app import customer_partition

    source = settings.topic("usage-events")

    def owns(customer: str) -> bool:
        assigned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == source}
        return customer_partition(customer, settings.partitions) in assigned

    forwarder = Forwarder(settings, meters, chio, metrics, stripe_client(settings), owns)

    @app.timer(forwarder.tick_seconds)
    async def forward_to_stripe() -> None:
        try:
            await forwarder.tick()
        except StripeError as exc:
            log.error("Stripe forwarding failed, will retry next interval: %s", exc)

    return forwarder
