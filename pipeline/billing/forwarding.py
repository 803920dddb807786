"""Forward billing-period totals to Stripe meters from the verified record: each round
verifies (verify.py), plans (plan.py) and delivers (deliver.py); this module is the
round itself, the customers' Stripe ids, ``stripe retry`` and ``stripe reconcile``.

Every interval, for each meter with a ``stripe`` block and each customer whose
partition this worker owns:

1. **Verify** (pipeline/billing/verify.py). Recompute the period's closed windows
   (ended at least ``grace`` ago) from the record and repair any stored window that
   differs (pipeline/billing/record.py). What is forwarded is therefore the record's
   total, exact on any broker.
2. **Plan** (pipeline/billing/plan.py, :func:`plan_sends`, pure). The formula contract:

   * ``sum`` and ``count`` meters send the whole-number *delta* since the
     last send; the Stripe meter's formula is ``sum``, so Stripe's period
     total is the sum of what was sent.
   * ``max``, ``min``, ``unique_count`` and ``latest`` send the
     *period-to-date value* whenever its whole-number form changes; the
     Stripe meter's formula is ``last``. Each forward is stamped with the
     forward time (clamped into the period), so a later forward has a later
     timestamp and wins at Stripe.

   The billing period is the UTC calendar month; the previous month keeps
   being corrected for ``METERSTREAM_STRIPE_CORRECTION_DAYS`` (default
   ``LATE_PERIOD_DAYS``) into the next one. Each send is stamped later than the
   ones before it, so a ``last`` meter's winner is defined; a tie left by the
   stamps running out is cancelled within Stripe's 24 hours; a change of a
   period past the horizon, or a tie no longer cancellable, is reported in
   ``stripe_uncorrectable`` (pipeline/billing/stripe_corrections.py).
3. **Whole numbers, per meter** (``stripe.rounding``, default ``carry``).
   The rule applies to the *running* period total, never to one forward, so
   a fraction is carried to the next forward instead of being lost:

   * ``carry``: sum of sent == the exact total rounded half up; Stripe stays
     within +/-0.5 of the truth.
   * ``up``: sum of sent == ceil(exact total); never under-bills (< +1).
   * ``down``: sum of sent == floor(exact total); never over-bills (> -1).

   For ``last`` meters the period-to-date value is rounded once by the same
   rule (half up / ceil / floor).
4. **Identifiers.** ``ms_{meter}_{period}_{sequence}_{sha256 digest}`` (at most
   100 chars, sinks/stripe/payloads.py): deterministic per (meter, customer,
   period, sequence), so a resend is a no-op at Stripe and Stripe's
   duplicate answer counts as success.
5. **The ledger, then the send** (pipeline/billing/deliver.py). ClickHouse
   ``stripe_meter_events`` holds one row per identifier (newest version wins):
   written ``pending`` *before* the send, then ``sent`` or ``error`` (with Stripe's
   error code). A crash between the two leaves ``pending`` rows that the next
   forward resends with the same identifiers. The ledger is deliberately in
   ClickHouse and not in a Faust changelog table: the embedded broker keeps
   everything in memory and loses it on restart, and a lost ledger would restart the
   sequences and re-send the whole period under new identifiers (double billing).
   ClickHouse is the durable store we already trust with the record.
6. **Errors.** Retryable failures (429, 5xx, network) are retried by the
   client with jittered backoff and the same identifier; if they persist the
   row stays ``pending`` for the next forward. Permanent ones (unknown
   customer, no such meter, invalid value) mark the row ``error`` with
   Stripe's code and go to topic ``stripe-errors``; that (meter, customer)
   is then held, nothing newer is sent for it, until ``meterstream stripe
   retry`` re-sends the failed rows (same identifiers, the Stripe customer id
   re-resolved) after the cause is fixed.
7. **Customers.** The Stripe customer that pays is the operator's decision
   (pipeline/billing/stripe_ids.py): ``stripe.customer_id_from: mapping`` (the default)
   reads the operator's mapping from ClickHouse each round (pipeline/billing/customers.py);
   an event property is an opt-in whose first value per customer is pinned
   (durably, in ClickHouse) and whose later different values, or values that
   belong to another customer, are refused: not forwarded, logged with both ids,
   recorded in ``stripe_customer_refusals`` and counted, and the customer held
   until the operator maps it. An explicit mapping always wins. A customer with
   no Stripe id is held, not dropped, logged once and counted in
   ``meterstream_stripe_waiting_customers``; one held by a refusal in
   ``meterstream_stripe_refused_customers``.
8. **Transport** (``METERSTREAM_STRIPE_TRANSPORT``): ``v1`` sends each event
   with ``POST /v1/billing/meter_events`` (errors answered synchronously);
   ``v2`` sends batches of at most 100 through the v2 meter event stream (a
   session token renewed before its 15-minute expiry); Stripe validates
   stream events asynchronously, so a v2 event Stripe refuses later shows up
   in Stripe's meter error reports, not in the ledger. ``auto`` (default)
   is v2 with a live key (``sk_live_``/``rk_live_``) and v1 otherwise (test
   mode and the emulator). One thread sends, so there is at most one request
   in flight per (customer, meter) (and overall), under the client's rate
   limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal

from meterstream.billing.deliver import (
    Delivery,
    PublishError,
    PublishRefusal,
    Transport,
    choose_transport,
    refusal_message,
    stripe_period_values,
)
from meterstream.billing.plan import (
    Check,
    Plan,
    StripeDifference,
    build_checks,
    customer_totals,
    differences,
    event_timestamp_s,
    expected_whole,
    plan_sends,
)
from meterstream.billing.record import read_record
from meterstream.billing.stripe_corrections import Uncorrectable, correctable, uncorrectable
from meterstream.billing.stripe_ids import Pin, Refusal, Resolution, is_property_source
from meterstream.billing.stripe_ids import resolve as resolve_ids
from meterstream.billing.verify import Verifier
from meterstream.meters.config import Meter, MetersConfig
from meterstream.meters.windows import DAY_MS, month_bounds, period_label
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.stripe import customers as stripe_customers
from meterstream.sinks.stripe import ledger
from meterstream.sinks.stripe import uncorrectable as report
from meterstream.sinks.stripe.client import StripeMeterClient
from meterstream.sinks.stripe.ledger import LedgerRow
from meterstream.sinks.stripe.payloads import formula_for

log = logging.getLogger("meterstream.stripe")
LATE_PERIOD_DAYS = 3  # keep correcting the previous month for this long into the next
MAPPING_WAIT_SECONDS = 30.0


def period_data(
    ch: ClickHouse, meters: MetersConfig, period: str
) -> list[tuple[Meter, dict[str, Decimal], list[LedgerRow]]]:
    """Record totals and ledger rows of every Stripe meter for ``period`` (ClickHouse)."""
    start, end = month_bounds(period)
    out = []
    for meter in meters.meters:
        if meter.stripe is None:
            continue
        totals = customer_totals(meter, read_record(ch, meters, meter, start, end).states)
        out.append((meter, totals, ledger.for_period(ch, meter.name, period)))
    return out


class Forwarder:
    """A worker's Stripe forwarding: every round, for each Stripe meter that is due,
    verify -> plan -> deliver the customers this worker owns."""

    def __init__(
        self,
        settings: Settings,
        meters: MetersConfig,
        chio: ClickHouseIO,
        client: StripeMeterClient,
        owns_customer: Callable[[str], bool] | None = None,
        *,
        mapping_ready: asyncio.Event | None = None,
        publish_error: PublishError | None = None,
        publish_refusal: PublishRefusal | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.meters = meters
        self.chio = chio
        self.metrics = chio.metrics  # the worker's: ClickHouse's calls count in it too
        self.client = client
        self.owns_customer = owns_customer or (lambda customer: True)
        self.mapping_ready = mapping_ready
        # Customers held per meter (last round): customer -> why, for logs and the API.
        self.held: dict[str, dict[str, str]] = {}
        self._reported: set[tuple[str, str, str]] | None = None  # refusals recorded
        self.publish_refusal = publish_refusal
        self.stripe_meters = [m for m in meters.meters if m.stripe is not None]
        self.correction_days = settings.stripe_correction_days
        self._last_run: dict[str, float] = {}
        self._lock = asyncio.Lock()
        # 1. verify (incremental once the worker reports its inserts: track_changes)
        self.verifier = Verifier(meters, chio, self.metrics)
        # 3. deliver
        self.delivery = Delivery(
            chio,
            self.metrics,
            client,
            transport or choose_transport(settings),
            publish_error,
        )

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

    async def forward(self, meter: Meter, now_ms: int) -> int:
        assert meter.stripe is not None
        await self.delivery.ensure_meter(meter)
        closed_until = now_ms - meter.stripe.grace_seconds * 1000
        upto, _ = meter.window_bounds(closed_until)
        periods = [period_label(upto - 1)]
        previous = period_label(month_bounds(periods[0])[0] - 1)
        if upto - month_bounds(periods[0])[0] < self.correction_days * DAY_MS:
            periods.insert(0, previous)
        sent = 0
        held: dict[str, str] = {}
        async with self._lock:
            self.delivery.stalled = False
            stale = self.verifier.take_stale(meter, month_bounds(periods[0])[0])
            self.verifier.keep_periods(meter, periods, month_bounds(periods[0])[0])
            await self._check_stale(meter, stale, now_ms)
            for period in periods:
                p_start, p_end = month_bounds(period)
                end = min(upto, p_end)
                if end <= p_start:
                    continue
                sent += await self._forward_period(meter, period, p_start, end, now_ms, held)
            if not self.delivery.stalled:
                # A signal for whoever waits on Stripe (the demo's summary): every
                # window closed by now_ms - grace is delivered (or held with a reason).
                self.metrics.stripe_last_forward.set(now_ms / 1000, meter=meter.name)
            refused = sum(1 for why in held.values() if why.startswith("refused"))
            self.metrics.stripe_waiting.set(len(held) - refused, meter=meter.name)
            self.metrics.stripe_refused.set(refused, meter=meter.name)
            self._note_held(meter, held)
        return sent

    async def _forward_period(
        self, meter: Meter, period: str, start: int, end: int, now_ms: int, held: dict[str, str]
    ) -> int:
        """One period of one meter: verify -> plan -> deliver; the events sent."""
        assert meter.stripe is not None
        totals = await self._verified_totals(meter, period, start, end)
        plan, resolution = await self._plan(meter, period, totals, now_ms)
        self._note_plan_holds(meter, period, plan, resolution, held)
        return await self._deliver_plan(meter, period, plan, now_ms)

    async def _verified_totals(
        self, meter: Meter, period: str, start: int, end: int
    ) -> dict[str, Decimal]:
        """1. Verify: the record's totals of the customers this worker owns, the stored
        windows that differ repaired first."""
        diffs, record_totals = await self.verifier.verify(meter, period, start, end)
        if diffs:
            self.metrics.repairs.inc(len(diffs), meter=meter.name)
            for diff in diffs[:20]:
                log.warning("repaired from the record before forwarding: %s", diff.describe())
        return {c: v for c, v in record_totals.items() if self.owns_customer(c)}

    async def _plan(
        self, meter: Meter, period: str, totals: dict[str, Decimal], now_ms: int
    ) -> tuple[Plan, Resolution]:
        """2. Plan: the customers' Stripe ids, then the ledger rows to send."""
        resolution = await self.resolve(meter, sorted(totals))
        rows = await self.chio.call(ledger.for_period, meter.name, period)
        rows = [r for r in rows if self.owns_customer(r.customer_id)]
        plan = plan_sends(meter, period, totals, resolution.ids, rows, now_ms=now_ms)
        return plan, resolution

    def _note_plan_holds(
        self,
        meter: Meter,
        period: str,
        plan: Plan,
        resolution: Resolution,
        held: dict[str, str],
    ) -> None:
        """The customers the plan holds, each with why (``held``, logs, metrics)."""
        refused = {r.customer_id: r for r in resolution.refusals}
        for customer in plan.held_no_customer:
            if customer in refused:
                held[customer] = f"refused: {refused[customer].describe()}"
            else:
                held.setdefault(
                    customer,
                    f"no Stripe customer id (map it: `meterstream customers set {customer} "
                    "cus_...`)",
                )
        self.metrics.stripe_held_range.set(len(plan.held_out_of_range), meter=meter.name)
        self.metrics.held_errors(meter.name, period, len(plan.held_error))
        if plan.held_out_of_range:
            log.error(
                "%s: %d customer(s) held: the period total or the whole number to send does "
                "not fit Stripe's ledger (Int64, exact total Decimal(38, 9)); nothing is sent "
                "for them until the total is back in range: %s",
                meter.name,
                len(plan.held_out_of_range),
                ", ".join(plan.held_out_of_range[:10]),
            )
        if plan.held_error:
            log.warning(
                "%s: %d customer(s) held by a Stripe error until `meterstream stripe retry`: %s",
                meter.name,
                len(plan.held_error),
                ", ".join(plan.held_error[:10]),
            )

    async def _deliver_plan(self, meter: Meter, period: str, plan: Plan, now_ms: int) -> int:
        """3. Deliver: the new rows into the ledger (``pending``), then every row to
        send, resends first, each with its timestamp (rows from before the ledger kept
        one: the forward time); then the `last` ties the plan found are cancelled (for
        customers whose new event went out) and those Stripe no longer cancels
        reported. The events sent."""
        if plan.new:
            await self.chio.call(ledger.write, plan.new)
        timestamp_s = event_timestamp_s(period, now_ms)
        todo = [(r, r.timestamp_s or timestamp_s - 1) for r in plan.resend]
        todo += [(r, r.timestamp_s or timestamp_s) for r in plan.new]
        done = await self.delivery.deliver(meter, todo, now_ms) if todo else []
        went_out = {r.identifier for r in done if r.status == "sent"}
        waiting = {r.customer_id for r in plan.new if r.identifier not in went_out}
        cancel = [r for r in plan.cancel if r.customer_id not in waiting]
        if cancel:
            for row in await self.delivery.cancel(meter, cancel):
                log.info(
                    "%s: superseded `last` event %s: %s", meter.name, row.identifier, row.status
                )
        if plan.ties:
            await self._report(meter, period, plan.ties, None)
        return len(went_out)

    # -- what can no longer be corrected ---------------------------------------------------

    async def _report(
        self,
        meter: Meter,
        period: str,
        found: list[Uncorrectable],
        checked: set[str] | None,
    ) -> list[Uncorrectable]:
        """Record in ``stripe_uncorrectable`` what ``found`` changes (a finding already
        recorded as it is is not written again; each new one is logged and counted), and
        as resolved the customers reported before, among ``checked``, that are right
        again."""
        current = {
            r["customer_id"]: r for r in await self.chio.call(report.current, period, meter.name)
        }
        rows = []
        for item in found:
            doc = item.as_dict()
            had = current.get(item.customer_id)
            if had is None:
                log.error("Stripe can no longer be corrected: %s", item.describe())
                self.metrics.stripe_uncorrectable.inc(meter=meter.name)
            same = ("stripe_value", "expected", "difference", "reason")
            if had is None or any(had[k] != doc[k] for k in same):
                rows.append(doc)
        right = set(current) - {u.customer_id for u in found}
        formula = formula_for(meter.aggregation)
        for customer in sorted(right & checked if checked is not None else set()):
            ok = Uncorrectable(meter.name, customer, "", period, formula, 0, 0, Decimal(0), "")
            rows.append({**ok.as_dict(), "reason": "resolved"})
        if rows:
            await self.chio.call(report.write, rows)
        return found

    async def _check_stale(self, meter: Meter, stale: set[tuple[str, int]], now_ms: int) -> None:
        """Record changes told for periods no longer forwarded: check those periods'
        customers (:meth:`check_period`)."""
        by_period: dict[str, set[str]] = defaultdict(set)
        for customer, window_start in stale:
            if self.owns_customer(customer):
                by_period[period_label(window_start)].add(customer)
        for period, customers in sorted(by_period.items()):
            await self.check_period(meter, period, now_ms, sorted(customers))

    async def check_period(
        self, meter: Meter, period: str, now_ms: int, customers: list[str] | None = None
    ) -> list[Uncorrectable]:
        """What Stripe holds wrong for ``period`` (of ``customers``; None: all this worker
        owns) if the period is past the correction horizon: the record's totals against
        the ledger's sent events, recorded in ``stripe_uncorrectable``. A period still
        corrected gives [] (the next forward corrects it)."""
        if correctable(period, now_ms, self.correction_days):
            return []
        start, end = month_bounds(period)
        record = await self.chio.call(read_record, self.meters, meter, start, end, customers)
        totals = customer_totals(meter, record.states)
        rows = await self.chio.call(ledger.for_period, meter.name, period)
        chosen = set(customers) if customers is not None else None
        rows = [
            r
            for r in rows
            if self.owns_customer(r.customer_id) and (chosen is None or r.customer_id in chosen)
        ]
        expected = {
            c: (exact, expected_whole(meter, exact))
            for c, exact in totals.items()
            if self.owns_customer(c)
        }
        found = uncorrectable(
            meter.name, formula_for(meter.aggregation), period, expected, rows, {}
        )
        checked = set(expected) | {r.customer_id for r in rows}
        return await self._report(meter, period, found, checked)

    async def check_past_periods(
        self, period: str | None = None, now_ms: int | None = None
    ) -> list[Uncorrectable]:
        """``stripe corrections --check``: :meth:`check_period` for ``period``, or for every
        period with ledger rows that is past the correction horizon, of every meter."""
        now = now_ms or time.time_ns() // 1_000_000
        found: list[Uncorrectable] = []
        async with self._lock:
            for meter in self.stripe_meters:
                periods = (
                    [period]
                    if period is not None
                    else await self.chio.call(ledger.periods, meter.name)
                )
                for each in periods:
                    found += await self.check_period(meter, each, now)
        return found

    # -- customers' Stripe ids ------------------------------------------------------------

    async def resolve(self, meter: Meter, customers: list[str], *, pin: bool = True) -> Resolution:
        """The Stripe id of each customer, or why it is held (pipeline/billing/stripe_ids.py).

        New pins are recorded in ClickHouse before they are used (``pin``), and every
        refusal is reported (:meth:`report_refusals`).
        """
        assert meter.stripe is not None
        if not customers:
            return Resolution()
        if self.mapping_ready is not None and not self.mapping_ready.is_set():
            # Wait for the customers topic's records present at start-up to be
            # recorded; if it takes too long, go on: customers not found yet are
            # held, never dropped.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.mapping_ready.wait(), MAPPING_WAIT_SECONDS)
        source = meter.stripe.customer_id_from
        mapping = await self.chio.call(stripe_customers.current_mapping)
        if not is_property_source(source):
            return resolve_ids(source, customers, mapping)
        pins = {c: Pin(s, v) for c, (s, v) in (await self.chio.call(stripe_customers.pins)).items()}
        values = await self.chio.call(stripe_customers.property_values, source, customers)
        resolution = resolve_ids(source, customers, mapping, pins, values)
        if pin and resolution.new_pins:
            await self.chio.call(stripe_customers.write_pins, resolution.new_pins, source)
            for customer, stripe_id in sorted(resolution.new_pins.items()):
                log.info(
                    "%s: customer %s pinned to Stripe customer %s (first %s)",
                    meter.name,
                    customer,
                    stripe_id,
                    source,
                )
        if not pin:
            for customer in resolution.new_pins:
                resolution.ids.pop(customer, None)
        if resolution.refusals:
            await self.report_refusals(meter, resolution.refusals)
        return resolution

    async def stripe_ids(self, meter: Meter, customers: list[str]) -> dict[str, str]:
        """customer -> Stripe id of the customers not held."""
        return (await self.resolve(meter, customers)).ids

    async def report_refusals(self, meter: Meter, refusals: list[Refusal]) -> None:
        """Each new refusal: logged (ERROR, both ids), counted, recorded in ClickHouse
        ``stripe_customer_refusals`` and published on ``stripe-errors``, once (a refusal
        already recorded is not repeated)."""
        assert meter.stripe is not None
        if self._reported is None:
            self._reported = await self.chio.call(stripe_customers.refusal_keys)
        new = [r for r in refusals if r.key not in self._reported]
        if not new:
            return
        source = meter.stripe.customer_id_from
        await self.chio.call(
            stripe_customers.write_refusals,
            [
                (r.customer_id, r.claimed, r.reason, r.kept, r.other_customer, source, meter.name)
                for r in new
            ],
        )
        for refusal in new:
            self._reported.add(refusal.key)
            self.metrics.stripe_refusals.inc(reason=refusal.reason)
            log.error("%s: Stripe customer refused: %s", meter.name, refusal.describe())
            if self.publish_refusal is not None:
                key, value = refusal_message(meter, refusal)
                try:
                    await self.publish_refusal(key, value)
                except Exception as exc:  # recorded in ClickHouse already
                    log.warning("refusal not published on stripe-errors: %s", exc)

    def _note_held(self, meter: Meter, held: dict[str, str]) -> None:
        """Log each newly held customer once (WARNING), and each one no longer held."""
        before = self.held.get(meter.name, {})
        for customer, why in sorted(held.items()):
            if before.get(customer) != why:
                log.warning("%s: customer %s held: %s", meter.name, customer, why)
        for customer in sorted(set(before) - set(held)):
            log.info("%s: customer %s no longer held", meter.name, customer)
        self.held[meter.name] = held

    # -- the operator's commands -----------------------------------------------------------

    async def retry_errors(self, now_ms: int | None = None) -> list[LedgerRow]:
        """``stripe retry``: re-send every ``error`` row with its identifier.

        Each row's Stripe customer id is resolved again (the usual fix is a
        corrected mapping), the row becomes ``pending`` and is delivered now
        when this worker owns its customer (otherwise by the owner's next
        forward). Returns the rows in their new state.
        """
        now = now_ms or time.time_ns() // 1_000_000
        async with self._lock:
            failed = await self.chio.call(ledger.by_status, "error")
            by_meter: dict[str, list[LedgerRow]] = defaultdict(list)
            for row in failed:
                by_meter[row.meter].append(row)
            results: list[LedgerRow] = []
            for name, rows in sorted(by_meter.items()):
                try:
                    meter = self.meters.by_name(name)
                except KeyError:
                    log.warning("stripe retry: meter %s is no longer configured; skipped", name)
                    results += rows
                    continue
                if meter.stripe is None:
                    results += rows
                    continue
                await self.delivery.ensure_meter(meter)
                ids = await self.stripe_ids(meter, sorted({r.customer_id for r in rows}))
                unresolved = sorted({r.customer_id for r in rows if r.customer_id not in ids})
                if unresolved:
                    # Never resend to a Stripe customer the operator's mapping no longer
                    # gives (or a refused one): those rows stay in error until it does.
                    log.warning(
                        "stripe retry: %s: no Stripe customer id for %s (not mapped, or "
                        "refused); their rows stay in error",
                        name,
                        ", ".join(unresolved),
                    )
                results += [r for r in rows if r.customer_id not in ids]
                rows = [r for r in rows if r.customer_id in ids]
                if not rows:
                    continue
                flipped = [
                    dataclasses.replace(
                        r,
                        stripe_customer_id=ids[r.customer_id],
                        status="pending",
                        error_code="",
                    )
                    for r in rows
                ]
                await self.chio.call(ledger.write, flipped)
                mine = [r for r in flipped if self.owns_customer(r.customer_id)]
                todo = [(r, r.timestamp_s or event_timestamp_s(r.period, now)) for r in mine]
                done = (
                    {r.identifier: r for r in await self.delivery.deliver(meter, todo, now)}
                    if todo
                    else {}
                )
                results += [done.get(r.identifier, r) for r in flipped]
            return results

    async def compare_with_stripe(
        self, period: str, now_ms: int | None = None
    ) -> list[StripeDifference]:
        """``stripe reconcile``: Stripe's summaries against meterstream's period totals."""
        now = now_ms or time.time_ns() // 1_000_000
        data = await self.chio.call(period_data, self.meters, period)
        checks: list[Check] = []
        for meter, totals, rows in data:
            known = {r.customer_id for r in rows}
            resolution = await self.resolve(meter, sorted(set(totals) - known), pin=False)
            resolved = resolution.ids
            checks += build_checks(meter, totals, rows, resolved)
        values = await self.delivery.call(
            stripe_period_values, self.client, self.meters, checks, period, now
        )
        return differences(checks, values)
