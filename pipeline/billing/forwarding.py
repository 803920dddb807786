"""Forward billing-period totals to Stripe meters from the verified record.

Every interval, for each meter with a ``stripe`` block and each customer whose
partition this worker owns:

1. **Verify.** Recompute the period's closed windows (ended at least
   ``grace`` ago) from the record and repair any stored window that differs
   (pipeline/billing/record.py). What is forwarded is therefore the record's
   total, exact on any broker.
2. **Plan** (:func:`plan_sends`, pure). The formula contract:

   * ``sum`` and ``count`` meters send the whole-number *delta* since the
     last send; the Stripe meter's formula is ``sum``, so Stripe's period
     total is the sum of what was sent.
   * ``max``, ``min``, ``unique_count`` and ``latest`` send the
     *period-to-date value* whenever its whole-number form changes; the
     Stripe meter's formula is ``last``. Each forward is stamped with the
     forward time (clamped into the period), so a later forward has a later
     timestamp and wins at Stripe.

   The billing period is the UTC calendar month; the previous month keeps
   being corrected for ``LATE_PERIOD_DAYS`` into the next one.
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
5. **The ledger, then the send.** ClickHouse ``stripe_meter_events`` holds one
   row per identifier (newest version wins): written ``pending`` *before*
   the send, then ``sent`` or ``error`` (with Stripe's error code). A crash
   between the two leaves ``pending`` rows that the next forward resends with
   the same identifiers. The ledger is deliberately in ClickHouse and not in a
   Faust changelog table: the embedded broker keeps everything in memory and
   loses it on restart, and a lost ledger would restart the sequences and
   re-send the whole period under new identifiers (double billing).
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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any, Literal

import orjson

from meterstream.billing.plan import (
    Check,
    RecordDeltas,
    StripeDifference,
    VerifiedPeriod,
    build_checks,
    customer_totals,
    days_to_reverify,
    differences,
    event_timestamp_s,
    plan_sends,
)
from meterstream.billing.record import Difference, reconcile_meter, record_states
from meterstream.billing.stripe_ids import Pin, Refusal, Resolution, is_property_source
from meterstream.billing.stripe_ids import resolve as resolve_ids
from meterstream.errors import StripeError
from meterstream.events import UsageEvent
from meterstream.meters.aggregation import WindowState
from meterstream.meters.config import Meter, MetersConfig
from meterstream.meters.fold import WindowKey
from meterstream.meters.windows import DAY_MS, month_bounds, period_label
from meterstream.metrics import Metrics
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.queries import day_check, meter_customers
from meterstream.sinks.stripe import customers as stripe_customers
from meterstream.sinks.stripe import ledger
from meterstream.sinks.stripe.client import MAX_V2_BATCH, StripeMeterClient
from meterstream.sinks.stripe.ledger import LedgerRow
from meterstream.sinks.stripe.payloads import build_meter_event, formula_for

log = logging.getLogger("meterstream.stripe")
LATE_PERIOD_DAYS = 3  # keep correcting the previous month for this long into the next
FULL_VERIFY_SECONDS = 600.0  # incremental verification still re-reads the period this often
REVERIFY_CUSTOMERS_PER_CALL = 100
REVERIFY_PAUSE_FACTOR = 2.0  # pause after a re-read slice, in multiples of its time
MAPPING_WAIT_SECONDS = 30.0

Transport = Literal["v1", "v2"]
ResolveIds = Callable[[Meter, list[str]], Awaitable[dict[str, str]]]
PublishError = Callable[[LedgerRow, str], Awaitable[None]]
PublishRefusal = Callable[[str, bytes], Awaitable[None]]  # (record key, record value)


def choose_transport(settings: Settings, requested: str | None = None) -> Transport:
    """v1 or v2 (see the module docstring, point 8)."""
    choice = requested or settings.stripe_transport
    if choice in ("v1", "v2"):
        return choice  # type: ignore[return-value]
    key = settings.stripe_api_key.get_secret_value() if settings.stripe_api_key else ""
    return "v2" if key.startswith(("sk_live_", "rk_live_")) else "v1"


def period_data(
    ch: ClickHouse, meters: MetersConfig, period: str
) -> list[tuple[Meter, dict[str, Decimal], list[LedgerRow]]]:
    """Record totals and ledger rows of every Stripe meter for ``period`` (ClickHouse)."""
    start, end = month_bounds(period)
    out = []
    for meter in meters.meters:
        if meter.stripe is None:
            continue
        totals = customer_totals(meter, record_states(ch, meters, meter, start, end))
        out.append((meter, totals, ledger.for_period(ch, meter.name, period)))
    return out


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


# ------------------------------------------------------------------ side effects


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


def error_message(row: LedgerRow, message: str) -> bytes:
    """The ``stripe-errors`` record value: the failed ledger row and Stripe's message."""
    return orjson.dumps(
        {
            "identifier": row.identifier,
            "meter": row.meter,
            "customer_id": row.customer_id,
            "stripe_customer_id": row.stripe_customer_id,
            "period": row.period,
            "value": row.value,
            "exact_total": str(row.exact_total),
            "status": row.status,
            "error_code": row.error_code,
            "attempts": row.attempts,
            "message": message,
            "failed_at": time.time_ns() // 1_000_000,
        }
    )


class Forwarder:
    def __init__(
        self,
        settings: Settings,
        meters: MetersConfig,
        chio: ClickHouseIO,
        metrics: Metrics,
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
        self.metrics = metrics
        self.client = client
        self.owns_customer = owns_customer or (lambda customer: True)
        self.mapping_ready = mapping_ready
        # Customers held per meter (last round): customer -> why, for logs and the API.
        self.held: dict[str, dict[str, str]] = {}
        self._reported: set[tuple[str, str, str]] | None = None  # refusals recorded
        self.publish_error = publish_error
        self.publish_refusal = publish_refusal
        self.transport: Transport = transport or choose_transport(settings)
        self.stripe_meters = [m for m in meters.meters if m.stripe is not None]
        self._last_run: dict[str, float] = {}
        self._meter_ready: set[str] = set()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stripe")
        self._lock = asyncio.Lock()
        # Incremental verification (track_changes): what was verified, and the
        # (customer, window start) of record changes since, per meter.
        self.incremental = False
        # The writer's record lock (track_changes); a lock of its own otherwise.
        self._record_lock = asyncio.Lock()
        self._verified: dict[tuple[str, str], VerifiedPeriod] = {}
        self._changed: dict[str, set[tuple[str, int]]] = {m.name: set() for m in self.stripe_meters}
        self._deltas: dict[str, RecordDeltas] = {m.name: RecordDeltas() for m in self.stripe_meters}
        self._stripe_meter = {m.name: m for m in self.stripe_meters}
        self._by_event: dict[str, list[Meter]] = defaultdict(list)
        for m in self.stripe_meters:
            self._by_event[m.event_name].append(m)
        self._epoch = 0  # invalidate() count: a round that saw one keeps nothing it read
        self._stalled = False  # a delivery stopped at a retryable failure this round

    # -- incremental verification ------------------------------------------------------
    #
    # "Verify before billing" re-reads the whole period from the record each round
    # unless the worker that writes the record tells the forwarder what it inserted.
    # With track_changes(), a period is read in full once (and every
    # FULL_VERIFY_SECONDS), then kept up to date from what the worker inserts, checked
    # against the record each round, and re-read only where the check fails
    # (VerifiedPeriod: the record's states and event counts per (customer, UTC day)).
    # A round's cost follows what changed since the last round, not what the changed
    # customer-days hold (a re-read of every changed day made each round of a busy
    # day, or of a catch-up, read the whole period again). Why the totals are still
    # exactly the record's:
    #
    # * The worker calls record_changed() with the events of every batch it inserted
    #   into the record, their windows' states (the same meter code over the same
    #   events as a re-read), and the windows it counted from the record
    #   (re-read), after both the record and meter_windows inserts returned and
    #   while it still holds the record lock (pipeline/worker/batch.py). Each reconciliation
    #   query takes that lock, and whatever it reads it also drops from the pending
    #   deltas under the same lock: so every inserted event is either in a read or
    #   in the deltas merged afterwards, never both and never neither.
    # * Each round merges the deltas of windows already covered and, under the record
    #   lock, checks every changed customer-day against the record (its events of the
    #   meter's event name, counted as a re-read counts them) and against the stored
    #   windows (merged value and event count). A customer-day that differs in
    #   either is re-read from the record and its stored windows repaired, as before.
    #   So an event the worker counted but the record lacks, or holds twice, or one
    #   another writer added, or a stored window that went wrong, are all found the
    #   round they change.
    # * Only the worker writes usage_events, and only for customers of its own
    #   partitions; a rebalance (invalidate()) drops everything verified, so a
    #   customer that moves between workers is read in full again.
    # * Repairs write the record's state, which is what the cache holds.
    # * Defence in depth: each period is re-read in full every FULL_VERIFY_SECONDS.

    def track_changes(self, record_lock: asyncio.Lock | None = None) -> None:
        """The caller will report every record insert (record_changed); verify incrementally.

        ``record_lock`` is held by the writer between its record and meter_windows
        inserts; reconciliation takes it so it never sees one without the other.
        """
        self.incremental = True
        if record_lock is not None:
            self._record_lock = record_lock

    async def _reconcile(
        self, meter: Meter, start: int, end: int, customers: list[str] | None = None
    ) -> tuple[list[Difference], Any, Any]:
        """Reconcile (and repair) [start, end) under the record lock; what it read is no
        longer pending as deltas. Returns the differences, the record's window states
        and its events per (customer, day)."""
        async with self._record_lock:
            found = await self.chio.call(
                reconcile_meter, self.meters, meter, start, end, fix=True, customers=customers
            )
            self._deltas[meter.name].discard(customers, start, end)
            return found

    async def _reconcile_slices(
        self,
        meter: Meter,
        start: int,
        end: int,
        customers: list[str],
        verified: VerifiedPeriod,
        day: int | None = None,
    ) -> list[Difference]:
        """Reconcile [start, end) for ``customers``, REVERIFY_CUSTOMERS_PER_CALL at a
        time, into ``verified`` (the customers' ``day`` replaced when given, else added).

        In slices, so the worker's inserts (and the record lock) are taken in between:
        a round after a catch-up re-reads every customer's day. Paced: after each
        slice the forwarder waits twice as long as the slice took, so the re-read
        (Python work, under the worker's GIL) takes at most a third of the process
        while the worker keeps up with its input.
        """
        diffs: list[Difference] = []
        for i in range(0, len(customers), REVERIFY_CUSTOMERS_PER_CALL):
            chunk = customers[i : i + REVERIFY_CUSTOMERS_PER_CALL]
            started = time.monotonic()
            found, record, events = await self._reconcile(meter, start, end, chunk)
            diffs += found
            if day is None:
                verified.add(meter, record, events)
            else:
                verified.replace_days(meter, day, chunk, record, events)
            if i + REVERIFY_CUSTOMERS_PER_CALL < len(customers):
                await asyncio.sleep(REVERIFY_PAUSE_FACTOR * (time.monotonic() - started))
        return diffs

    def record_changed(
        self,
        inserted: Iterable[UsageEvent],
        states: Mapping[WindowKey, WindowState],
        reread: Iterable[WindowKey],
    ) -> None:
        """A batch's record inserts (see the comment above): the events inserted, the
        states of their windows, and windows whose record changed otherwise."""
        for key, state in states.items():
            pending = self._deltas.get(key.meter)
            if pending is not None:
                pending.add(
                    self._stripe_meter[key.meter], key.customer_id, key.window_start_ms, state
                )
        by_event = self._by_event
        for event in inserted:
            for meter in by_event.get(event.event_name, ()):
                window_start, _ = meter.window_bounds(event.timestamp_ms)
                self._deltas[meter.name].count(event.customer_id, window_start)
        self.windows_changed(reread)

    def windows_changed(self, keys: Iterable[WindowKey]) -> None:
        """Re-read these windows' customer-days from the record next round."""
        for key in keys:
            changed = self._changed.get(key.meter)
            if changed is not None:
                changed.add((key.customer_id, key.window_start_ms))

    def invalidate(self) -> None:
        """Partitions moved: verify every period in full next round."""
        self._verified.clear()
        self._epoch += 1

    def _take_changed(self, meter: str, start: int, end: int) -> list[tuple[str, int]]:
        changed = self._changed[meter]
        taken = [c for c in changed if start <= c[1] < end]
        changed.difference_update(taken)
        return taken

    async def _verify(
        self, meter: Meter, period: str, start: int, end: int
    ) -> tuple[list[Difference], dict[str, Decimal]]:
        """Verify (and repair) the closed windows [start, end); the record's totals."""
        if not self.incremental:
            diffs, record, _ = await self._reconcile(meter, start, end)
            return diffs, customer_totals(meter, record)
        changed = self._take_changed(meter.name, start, end)
        verified = self._verified.get((meter.name, period))
        epoch = self._epoch
        if (
            verified is None
            or end < verified.upto_ms
            or time.monotonic() - verified.built_at > FULL_VERIFY_SECONDS
        ):
            verified = VerifiedPeriod(end, time.monotonic())
            # The whole period, read in the same paced customer slices as a re-read:
            # at most REVERIFY_CUSTOMERS_PER_CALL customers' events are in memory at
            # once, not every event of the period (measured: one full read at once
            # of a soak's ~1M events added ~100 MB to the worker, for a moment, every
            # FULL_VERIFY_SECONDS). Customers who appear after the list was read have
            # all their events in the deltas, merged by the next round.
            customers = await self.chio.call(
                meter_customers, meter.name, meter.event_name, start, end
            )
            diffs = await self._reconcile_slices(meter, start, end, customers, verified)
            if self._epoch == epoch:
                self._verified[(meter.name, period)] = verified
            return diffs, verified.totals(meter)
        reread = days_to_reverify(changed, verified.upto_ms)
        for customer, day in await self._merge_and_check(meter, start, verified):
            reread.setdefault(day, set()).add(customer)
        diffs = []
        for day, day_customers in sorted(reread.items()):
            lo, hi = max(day, start), min(day + DAY_MS, verified.upto_ms)
            diffs += await self._reconcile_slices(
                meter, lo, hi, sorted(day_customers), verified, day=day
            )
        if end > verified.upto_ms:
            found, record, events = await self._reconcile(meter, verified.upto_ms, end)
            diffs += found
            verified.add(meter, record, events)
            verified.upto_ms = end
        return diffs, verified.totals(meter)

    async def _merge_and_check(
        self, meter: Meter, start: int, verified: VerifiedPeriod
    ) -> set[tuple[str, int]]:
        """Merge the pending deltas of covered windows into ``verified``; the changed
        customer-days that then differ from the record or from the stored windows."""
        async with self._record_lock:  # no insert between the deltas and the check
            taken = self._deltas[meter.name].take(start, verified.upto_ms)
            verified.add_deltas(meter, taken)
            days = taken.customer_days()
            if not days:
                return set()
            record, stored = await self.chio.call(
                day_check,
                meter.name,
                meter.event_name,
                sorted({customer for customer, _ in days}),
                min(day for _, day in days),
                verified.upto_ms,
            )
        differ = verified.differing_days(meter, days, record, stored)
        self.metrics.verify_days.inc(len(days), meter=meter.name, result="checked")
        if differ:
            self.metrics.verify_days.inc(len(differ), meter=meter.name, result="reread")
            log.info(
                "%s: %d of %d changed customer-day(s) differ from the record or the stored "
                "windows; re-reading them",
                meter.name,
                len(differ),
                len(days),
            )
        return differ

    @property
    def tick_seconds(self) -> float:
        intervals = [m.stripe.interval_seconds for m in self.stripe_meters if m.stripe]
        return max(1.0, min(intervals, default=60) / 2)

    async def _stripe(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args))

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
        stripe_block = meter.stripe
        assert stripe_block is not None
        if meter.name in self._meter_ready:
            return
        await self._stripe(
            self.client.ensure_meter,
            meter.description or meter.name,
            stripe_block.event_name,
            formula_for(meter.aggregation),
            stripe_block.customer_key,
            stripe_block.value_key,
        )
        self._meter_ready.add(meter.name)

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

    async def forward(self, meter: Meter, now_ms: int) -> int:
        assert meter.stripe is not None
        await self.ensure_stripe_meter(meter)
        closed_until = now_ms - meter.stripe.grace_seconds * 1000
        upto, _ = meter.window_bounds(closed_until)
        periods = [period_label(upto - 1)]
        previous = period_label(month_bounds(periods[0])[0] - 1)
        if upto - month_bounds(periods[0])[0] < LATE_PERIOD_DAYS * DAY_MS:
            periods.insert(0, previous)
        sent = 0
        held: dict[str, str] = {}
        async with self._lock:
            self._stalled = False
            for key in [k for k in self._verified if k[0] == meter.name and k[1] not in periods]:
                del self._verified[key]
            self._deltas[meter.name].discard(None, 0, month_bounds(periods[0])[0])
            for period in periods:
                p_start, p_end = month_bounds(period)
                end = min(upto, p_end)
                if end <= p_start:
                    continue
                sent += await self._forward_period(meter, period, p_start, end, now_ms, held)
            if not self._stalled:
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
        assert meter.stripe is not None
        diffs, record_totals = await self._verify(meter, period, start, end)
        if diffs:
            self.metrics.repairs.inc(len(diffs), meter=meter.name)
            for diff in diffs[:20]:
                log.warning("repaired from the record before forwarding: %s", diff.describe())
        totals = {c: v for c, v in record_totals.items() if self.owns_customer(c)}
        resolution = await self.resolve(meter, sorted(totals))
        rows = await self.chio.call(ledger.for_period, meter.name, period)
        rows = [r for r in rows if self.owns_customer(r.customer_id)]
        plan = plan_sends(meter, period, totals, resolution.ids, rows)
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
        if plan.new:
            await self.chio.call(ledger.write, plan.new)
        timestamp_s = event_timestamp_s(period, now_ms)
        todo = [(r, timestamp_s - 1) for r in plan.resend] + [(r, timestamp_s) for r in plan.new]
        if not todo:
            return 0
        done = await self.deliver(meter, todo)
        return sum(1 for r in done if r.status == "sent")

    # -- delivery ------------------------------------------------------------------

    async def deliver(self, meter: Meter, todo: list[tuple[LedgerRow, int]]) -> list[LedgerRow]:
        """Send ``pending`` rows (with their timestamps) in order; record each outcome.

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
                    result = await self._stripe(self.client.send_meter_event, chunk_params[0])
                else:
                    result = await self._stripe(self.client.send_batch_v2, chunk_params)
            except StripeError as exc:
                if exc.retryable:
                    self._stalled = True
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
            done += [
                r.with_status("sent", attempts=r.attempts + max(1, result.attempts)) for r in chunk
            ]
        if done:
            await self.chio.call(ledger.write, done)
        if self.publish_error is not None:
            for row, message in failed:
                await self.publish_error(row, message)
        return done

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
                await self.ensure_stripe_meter(meter)
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
                todo = [(r, event_timestamp_s(r.period, now)) for r in mine]
                done = {r.identifier: r for r in await self.deliver(meter, todo)} if todo else {}
                results += [done.get(r.identifier, r) for r in flipped]
            return results

    async def reconcile(self, period: str, now_ms: int | None = None) -> list[StripeDifference]:
        """``stripe reconcile``: Stripe's summaries against meterstream's period totals."""
        now = now_ms or time.time_ns() // 1_000_000
        data = await self.chio.call(period_data, self.meters, period)
        checks: list[Check] = []
        for meter, totals, rows in data:
            known = {r.customer_id for r in rows}
            resolution = await self.resolve(meter, sorted(set(totals) - known), pin=False)
            resolved = resolution.ids
            checks += build_checks(meter, totals, rows, resolved)
        values = await self._stripe(
            stripe_period_values, self.client, self.meters, checks, period, now
        )
        return differences(checks, values)


def stripe_client(settings: Settings) -> StripeMeterClient:
    return StripeMeterClient(
        api_key=settings.stripe_api_key,
        api_base=settings.stripe_api_base,
        meter_events_base=settings.stripe_meter_events_base,
        rate_limit_per_second=settings.stripe_rate_limit_per_second,
    )


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
