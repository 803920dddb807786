"""Verify before billing: the closed windows of a period recomputed from the record,
stored windows that differ repaired (pipeline/billing/record.py), and the record's
period totals per customer, which are what the forwarder plans from
(pipeline/billing/plan.py) and delivers (pipeline/billing/deliver.py).

Incremental when the worker that writes the record reports its inserts
(:meth:`Verifier.track_changes`, :meth:`Verifier.record_changed`): see the comment
in :class:`Verifier`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from meterstream.billing.plan import (
    RecordDeltas,
    VerifiedPeriod,
    customer_totals,
    days_to_reverify,
)
from meterstream.billing.record import (
    Difference,
    reconcile_meter,
    reconcile_snapshot,
    record_snapshot,
)
from meterstream.events import UsageEvent
from meterstream.meters.aggregation import WindowState
from meterstream.meters.config import Meter, MetersConfig
from meterstream.meters.fold import WindowKey
from meterstream.meters.windows import DAY_MS
from meterstream.metrics import Metrics
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.queries import day_check, meter_customers

log = logging.getLogger("meterstream.stripe")
FULL_VERIFY_SECONDS = 600.0  # incremental verification still re-reads the period this often
REVERIFY_CUSTOMERS_PER_CALL = 100
REVERIFY_PAUSE_FACTOR = 2.0  # pause after a re-read slice, in multiples of its time


class Verifier:
    """The record's totals of a Stripe meter's closed windows, each stored window that
    differs from the record repaired first; one per forwarder."""

    def __init__(self, meters: MetersConfig, chio: ClickHouseIO, metrics: Metrics) -> None:
        self.meters = meters
        self.chio = chio
        self.metrics = metrics
        stripe_meters = [m for m in meters.meters if m.stripe is not None]
        # Incremental verification (track_changes): what was verified, and the
        # (customer, window start) of record changes since, per meter.
        self.incremental = False
        # The writer's record lock (track_changes); a lock of its own otherwise.
        self._record_lock = asyncio.Lock()
        self._verified: dict[tuple[str, str], VerifiedPeriod] = {}
        self._changed: dict[str, set[tuple[str, int]]] = {m.name: set() for m in stripe_meters}
        self._deltas: dict[str, RecordDeltas] = {m.name: RecordDeltas() for m in stripe_meters}
        self._stripe_meter = {m.name: m for m in stripe_meters}
        # event name -> (its meter's pending deltas' counter, the meter's window in ms)
        self._event_counters: dict[str, list[tuple[Callable[[str, int], None], int]]] = defaultdict(
            list
        )
        for m in stripe_meters:
            size = m.window_bounds(0)[1]
            self._event_counters[m.event_name].append((self._deltas[m.name].count, size))
        self._epoch = 0  # invalidate() count: a round that saw one keeps nothing it read

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
    #   while it still holds the record lock (pipeline/worker/batch.py). Each verification
    #   read takes that lock, and whatever it reads it also drops from the pending
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

    async def _verify_range(
        self, meter: Meter, start: int, end: int, customers: list[str] | None = None
    ) -> tuple[list[Difference], Any, Any]:
        """Reconcile (and repair) [start, end); what it read is no longer pending as
        deltas. Returns the differences, the record's window states and its events per
        (customer, day).

        The record and the stored windows are read under the record lock (the batch's
        two inserts are never half seen), the deltas they cover dropped under it, and
        the events folded and compared after it is released, off the writer's thread:
        the fold is most of the time, and the next batch waits on that lock. Where
        something differs, the range is reconciled again under the lock, read afresh
        and repaired there (as the record is then, never from an older read)."""
        deltas = self._deltas[meter.name]
        async with self._record_lock:
            snapshot = await self.chio.call(record_snapshot, meter, start, end, customers)
            deltas.discard(customers, start, end)
        found = await asyncio.to_thread(reconcile_snapshot, self.meters, meter, snapshot)
        if not found[0]:
            return found
        async with self._record_lock:
            found = await self.chio.call(
                reconcile_meter, self.meters, meter, start, end, fix=True, customers=customers
            )
            deltas.discard(customers, start, end)  # the fresh read covers those too
            return found

    async def _verify_slices(
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
            found, record, events = await self._verify_range(meter, start, end, chunk)
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
        # Per event: each Stripe meter of its name counts it in its window (the loop's
        # lookups hoisted: this runs for every event the worker inserts).
        counters = self._event_counters
        for event in inserted:
            targets = counters.get(event.event_name)
            if targets:
                ts = event.timestamp_ms
                customer = event.customer_id
                for count, size in targets:
                    count(customer, ts - ts % size)
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

    async def verify(
        self, meter: Meter, period: str, start: int, end: int
    ) -> tuple[list[Difference], dict[str, Decimal]]:
        """Verify (and repair) the closed windows [start, end); the record's totals."""
        if not self.incremental:
            diffs, record, _ = await self._verify_range(meter, start, end)
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
            diffs = await self._verify_slices(meter, start, end, customers, verified)
            if self._epoch == epoch:
                self._verified[(meter.name, period)] = verified
            return diffs, verified.totals(meter)
        reread = days_to_reverify(changed, verified.upto_ms)
        for customer, day in await self._merge_and_check(meter, start, verified):
            reread.setdefault(day, set()).add(customer)
        diffs = []
        for day, day_customers in sorted(reread.items()):
            lo, hi = max(day, start), min(day + DAY_MS, verified.upto_ms)
            diffs += await self._verify_slices(
                meter, lo, hi, sorted(day_customers), verified, day=day
            )
        if end > verified.upto_ms:
            found, record, events = await self._verify_range(meter, verified.upto_ms, end)
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

    def take_stale(self, meter: Meter, before_ms: int) -> set[tuple[str, int]]:
        """(customer, window start) of the record changes told since the last call to
        windows before ``before_ms``, of periods no longer forwarded: the forwarder checks
        them for what Stripe can no longer be corrected on. Call before keep_periods."""
        changed = self._changed.get(meter.name)
        if changed is None:
            return set()
        stale = {c for c in changed if c[1] < before_ms}
        changed.difference_update(stale)
        deltas = self._deltas[meter.name]
        stale |= {k for k in (*deltas.states, *deltas.events) if k[1] < before_ms}
        return stale

    def keep_periods(self, meter: Meter, periods: Sequence[str], start_ms: int) -> None:
        """Forget what was verified of ``meter`` outside ``periods`` and the pending
        deltas before ``start_ms`` (the first period's start): the forwarder no longer
        bills them."""
        for key in [k for k in self._verified if k[0] == meter.name and k[1] not in periods]:
            del self._verified[key]
        self._deltas[meter.name].discard(None, 0, start_ms)
