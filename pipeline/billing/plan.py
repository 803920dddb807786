"""The billing plan, pure: what to send to Stripe for a period, and how Stripe's
totals are compared with ours. No I/O; pipeline/billing/deliver.py does the sending.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from meterstream.billing.stripe_corrections import (
    Uncorrectable,
    next_timestamp,
    stamped_at,
    ties_to_cancel,
)
from meterstream.meters.aggregation import WindowState, aggregator_for
from meterstream.meters.config import Meter
from meterstream.meters.fold import WindowKey
from meterstream.meters.windows import day_of, month_bounds
from meterstream.sinks.stripe.ledger import LedgerRow
from meterstream.sinks.stripe.payloads import (
    Rounding,
    formula_for,
    meter_event_identifier,
    next_delta,
    period_value,
)


@dataclass(frozen=True)
class Plan:
    resend: list[LedgerRow]
    new: list[LedgerRow]
    held_no_customer: list[str]
    held_error: list[str]
    # customers whose total, or the whole number to send, does not fit the ledger
    # (Int64 value, Decimal(38, 9) exact_total): nothing is planned for them
    held_out_of_range: list[str] = field(default_factory=list)
    # `last` meters: earlier events tied with (or stamped after) the newest one, which
    # must lose: cancelled once the newest is sent (``cancel``), or no longer cancellable
    # at Stripe (``ties``: reported; pipeline/billing/stripe_corrections.py)
    cancel: list[LedgerRow] = field(default_factory=list)
    ties: list[Uncorrectable] = field(default_factory=list)


INT64_MAX = 2**63 - 1
EXACT_TOTAL_LIMIT = Decimal(10) ** 29  # stripe_meter_events.exact_total: Decimal(38, 9)


def fits_ledger(exact: Decimal, value: int) -> bool:
    """Whether a ledger row with this exact total and whole-number value can be written
    (and sent): the ingest ranges (pipeline/meters/config.py) keep every total inside; this is
    the defence in depth that keeps the forwarder running if one ever is not."""
    return -INT64_MAX - 1 <= value <= INT64_MAX and exact.copy_abs() < EXACT_TOTAL_LIMIT


def customer_totals(meter: Meter, states: Mapping[WindowKey, WindowState]) -> dict[str, Decimal]:
    """Period-to-date total per customer: all its windows (and groups) merged."""
    agg = aggregator_for(meter.aggregation)
    merged: dict[str, WindowState] = {}
    for key, state in states.items():
        base = merged.get(key.customer_id)
        merged[key.customer_id] = state if base is None else agg.merge(base, state)
    return {customer: agg.result(state) for customer, state in merged.items()}


@dataclass
class VerifiedPeriod:
    """One meter's closed windows of one billing period, as last verified against the
    record: the record's states merged per (customer, UTC day), which is all the
    period totals need and far smaller than one state per window, and the record's
    events of the meter's event name per (customer, UTC day) (``events``, matching the
    meter or not). Windows (minute, hour, day) never straddle a UTC day, so a
    customer-day can be re-verified alone.

    ``upto_ms``: windows starting in [period start, upto_ms) are covered.
    """

    upto_ms: int
    built_at: float
    buckets: dict[tuple[str, int], WindowState] = field(default_factory=dict)
    events: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(
        self,
        meter: Meter,
        record: Mapping[WindowKey, WindowState],
        events: Mapping[tuple[str, int], int] | None = None,
    ) -> None:
        """Merge the record's states of windows not yet in the buckets (and their events)."""
        self._merge(meter, ((k.customer_id, k.window_start_ms, s) for k, s in record.items()))
        for bucket, n in (events or {}).items():
            self.events[bucket] = self.events.get(bucket, 0) + n

    def _merge(self, meter: Meter, states: Iterable[tuple[str, int, WindowState]]) -> None:
        """Merge (customer, window start, state) into the customer-day buckets."""
        agg = aggregator_for(meter.aggregation)
        for customer, window_start, state in states:
            bucket = (customer, day_of(window_start))
            base = self.buckets.get(bucket)
            self.buckets[bucket] = state if base is None else agg.merge(base, state)

    def replace_days(
        self,
        meter: Meter,
        day: int,
        customers: Iterable[str],
        record: Mapping[WindowKey, WindowState],
        events: Mapping[tuple[str, int], int] | None = None,
    ) -> None:
        """The record's states of ``customers`` on ``day`` (every covered window of it)."""
        for customer in customers:
            self.buckets.pop((customer, day), None)
            self.events.pop((customer, day), None)
        self.add(meter, record, events)

    def add_deltas(self, meter: Meter, deltas: RecordDeltas) -> None:
        """Merge what the worker inserted since (taken from :class:`RecordDeltas`)."""
        self._merge(meter, ((c, ws, s) for (c, ws), s in deltas.states.items()))
        for (customer, window_start), n in deltas.events.items():
            bucket = (customer, day_of(window_start))
            self.events[bucket] = self.events.get(bucket, 0) + n

    def totals(self, meter: Meter) -> dict[str, Decimal]:
        agg = aggregator_for(meter.aggregation)
        merged: dict[str, WindowState] = {}
        for (customer, _), state in self.buckets.items():
            base = merged.get(customer)
            merged[customer] = state if base is None else agg.merge(base, state)
        return {customer: agg.result(state) for customer, state in merged.items()}

    def differing_days(
        self,
        meter: Meter,
        days: Iterable[tuple[str, int]],
        record_events: Mapping[tuple[str, int], int],
        stored: Mapping[tuple[str, int], tuple[Decimal, int]],
    ) -> set[tuple[str, int]]:
        """Which of ``days`` (customer, day) disagree with the record's event count or
        with the stored windows' merged value and event count (absent = none)."""
        agg = aggregator_for(meter.aggregation)
        out = set()
        for day in days:
            state = self.buckets.get(day) or agg.start()  # (a repair may store 0, 0)
            value, count = agg.result(state), state.event_count
            have = stored.get(day)
            if record_events.get(day, 0) != self.events.get(day, 0):
                out.add(day)
            elif have is None:
                if count:
                    out.add(day)
            elif have != (value, count):
                out.add(day)
        return out


@dataclass
class RecordDeltas:
    """What the worker inserted into the record for one meter since it was last taken,
    per (customer, window start): the merged states of the inserted events (``states``,
    computed by the same meter code as a re-read) and how many events of the meter's
    event name were inserted (``events``, matching the meter or not)."""

    states: dict[tuple[str, int], WindowState] = field(default_factory=dict)
    events: dict[tuple[str, int], int] = field(default_factory=dict)

    def add(self, meter: Meter, customer: str, window_start: int, state: WindowState) -> None:
        key = (customer, window_start)
        base = self.states.get(key)
        self.states[key] = (
            state if base is None else aggregator_for(meter.aggregation).merge(base, state)
        )

    def count(self, customer: str, window_start: int) -> None:
        key = (customer, window_start)
        self.events[key] = self.events.get(key, 0) + 1

    def take(self, lo: int, hi: int) -> RecordDeltas:
        """Remove and return the entries with window start in [lo, hi)."""
        taken = RecordDeltas(
            {k: v for k, v in self.states.items() if lo <= k[1] < hi},
            {k: v for k, v in self.events.items() if lo <= k[1] < hi},
        )
        for k in taken.states:
            del self.states[k]
        for k in taken.events:
            del self.events[k]
        return taken

    def discard(self, customers: Iterable[str] | None, lo: int, hi: int) -> None:
        """Forget entries with window start in [lo, hi) (of ``customers``; None: all), which a
        read of the record taken under the same lock has just covered."""
        chosen = None if customers is None else set(customers)
        for table in (self.states, self.events):
            for k in [k for k in table if lo <= k[1] < hi and (chosen is None or k[0] in chosen)]:
                del table[k]

    def customer_days(self) -> set[tuple[str, int]]:
        return {(c, day_of(ws)) for c, ws in (*self.states, *self.events)}


def days_to_reverify(
    changed: Iterable[tuple[str, int]], covered_upto_ms: int
) -> dict[int, set[str]]:
    """Customers per UTC day whose already-verified windows changed (window_start below
    ``covered_upto_ms``); changes at or above it are verified with the new range."""
    out: dict[int, set[str]] = defaultdict(set)
    for customer, window_start in changed:
        if window_start < covered_upto_ms:
            out[day_of(window_start)].add(customer)
    return dict(out)


def sequence_of(
    meter: str, customer: str, period: str, rows: Iterable[LedgerRow]
) -> dict[str, int]:
    """identifier -> sequence number of one (meter, customer, period)'s ledger rows.

    Identifiers do not sort by sequence (``_10_`` < ``_9_``, and the readable
    part may be truncated), so the sequence is found by recomputing them.
    Unknown identifiers (none expected) get 0.
    """
    rows = list(rows)
    known = {meter_event_identifier(meter, customer, period, i): i for i in range(1, len(rows) + 1)}
    return {r.identifier: known.get(r.identifier, 0) for r in rows}


def expected_whole(meter: Meter, exact: Decimal) -> int:
    """What Stripe's period total should be once ``exact`` is fully forwarded."""
    assert meter.stripe is not None
    rounding = Rounding(meter.stripe.rounding)
    if formula_for(meter.aggregation) == "sum":
        return next_delta(exact, 0, rounding)
    return period_value(exact, rounding)


def plan_sends(
    meter: Meter,
    period: str,
    totals: dict[str, Decimal],
    stripe_ids: dict[str, str],
    rows: Iterable[LedgerRow],
    now_ms: int | None = None,
) -> Plan:
    """What to send for one meter and period, given the ledger so far (pure).

    Per customer: an ``error`` row holds the customer (nothing resent or
    planned); ``pending`` rows are resent as they are; a customer with rows sent
    or pending but no total any more (all its events voided) has a total of 0,
    sent to the Stripe customer of its last row; a new row is planned
    when the whole-number value to send is not zero (``sum``: the delta
    against everything sent or pending) or differs from the last one sent
    (``last``); a customer without a Stripe id is held, and so is one whose
    total or value to send does not fit the ledger (:func:`fits_ledger`).

    With ``now_ms`` a new row carries its timestamp, later than every live earlier
    one (:func:`~meterstream.billing.stripe_corrections.next_timestamp`), and for
    ``last`` meters the earlier events it ties with are to be cancelled (``cancel``)
    or, past Stripe's 24 hours, reported (``ties``).
    """
    assert meter.stripe is not None
    rounding = Rounding(meter.stripe.rounding)
    by_customer: dict[str, list[LedgerRow]] = defaultdict(list)
    for row in rows:
        by_customer[row.customer_id].append(row)
    resend: list[LedgerRow] = []
    new: list[LedgerRow] = []
    held_no_customer: list[str] = []
    held_error: list[str] = []
    held_out_of_range: list[str] = []
    cancel: list[LedgerRow] = []
    ties: list[Uncorrectable] = []
    formula = formula_for(meter.aggregation)
    for customer in sorted(set(totals) | set(by_customer)):
        history = by_customer.get(customer, [])
        seq = sequence_of(meter.name, customer, period, history)
        history = sorted(history, key=lambda r: (seq[r.identifier], r.identifier))
        if any(r.status == "error" for r in history):
            held_error.append(customer)
            continue
        resend.extend(r for r in history if r.status == "pending")
        counted = [r for r in history if r.status in ("sent", "pending")]
        if customer not in totals and not counted:
            continue
        # A customer forwarded before but absent from the totals now (every event of
        # the period voided): its total is 0, corrected at the Stripe customer it went to.
        stripe_id = stripe_ids.get(customer) or (
            counted[-1].stripe_customer_id if customer not in totals else ""
        )
        if not stripe_id:
            held_no_customer.append(customer)
            continue
        exact = totals.get(customer, Decimal(0))
        if not exact.is_finite() or exact.copy_abs() >= EXACT_TOTAL_LIMIT:
            held_out_of_range.append(customer)
            continue
        value: int | None  # None: nothing to send
        if formula == "sum":
            value = next_delta(exact, sum(r.value for r in counted), rounding) or None
        else:
            value = period_value(exact, rounding)
            last = counted[-1] if counted else None
            if last is not None and last.value == value:
                value = None
        if value is None:
            if formula == "last" and now_ms is not None:
                _ties(history, now_ms, cancel, ties)
            continue
        if not fits_ledger(exact, value):
            held_out_of_range.append(customer)
            continue
        next_seq = max(seq.values(), default=0) + 1
        identifier = meter_event_identifier(meter.name, customer, period, next_seq)
        stamp = 0
        if now_ms is not None:
            stamp = next_timestamp(period, now_ms, max(map(stamped_at, counted), default=None))
        row = LedgerRow(
            identifier, meter.name, customer, stripe_id, period, value, exact, "pending"
        )
        row = dataclasses.replace(row, timestamp_s=stamp)
        new.append(row)
        if formula == "last" and now_ms is not None:
            _ties([*history, row], now_ms, cancel, ties)
    return Plan(
        resend, new, held_no_customer, held_error, held_out_of_range, cancel=cancel, ties=ties
    )


def _ties(
    history: list[LedgerRow], now_ms: int, cancel: list[LedgerRow], ties: list[Uncorrectable]
) -> None:
    """Add one customer's `last` ties (:func:`ties_to_cancel`; ``history`` in sequence
    order, the newest last) to ``cancel``, and those Stripe no longer cancels to ``ties``
    as a report of the value that should win."""
    to_cancel, stuck = ties_to_cancel(history, now_ms)
    cancel.extend(to_cancel)
    if stuck:
        newest = [r for r in history if r.status in ("sent", "pending")][-1]
        ties.append(
            Uncorrectable(
                newest.meter,
                newest.customer_id,
                newest.stripe_customer_id,
                newest.period,
                "last",
                None,
                newest.value,
                newest.exact_total,
                "tie",
            )
        )


def event_timestamp_s(period: str, now_ms: int) -> int:
    """The timestamp of a send of a row planned without one (``timestamp_s`` 0, rows from
    before the ledger kept it): now, clamped into the period, minus 1 s."""
    _, p_end = month_bounds(period)
    return (min(now_ms, p_end) - 1000) // 1000


# ------------------------------------------------------------------ reconcile (pure parts)


@dataclass(frozen=True)
class Check:
    """One (meter, customer) of a period: what Stripe should hold."""

    meter: str
    customer_id: str
    stripe_customer_id: str
    exact: Decimal
    expected: int
    unsent: int  # ledger rows pending or in error


@dataclass(frozen=True)
class StripeDifference:
    check: Check
    stripe_value: Decimal | None

    def describe(self) -> str:
        c = self.check
        got = "no Stripe customer id" if self.stripe_value is None else str(self.stripe_value)
        note = f", {c.unsent} unsent ledger row(s)" if c.unsent else ""
        return (
            f"{c.meter} customer={c.customer_id} stripe_customer={c.stripe_customer_id or '-'}: "
            f"stripe {got}, meterstream {c.expected} (exact {c.exact}){note}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.check), "stripe_value": self.stripe_value}


def build_checks(
    meter: Meter,
    totals: dict[str, Decimal],
    rows: list[LedgerRow],
    resolved: dict[str, str],
) -> list[Check]:
    """Per customer: the expected Stripe total; the Stripe id from the ledger, else ``resolved``."""
    ids: dict[str, str] = {}
    unsent: dict[str, int] = defaultdict(int)
    for row in rows:
        if row.status == "sent" or row.customer_id not in ids:
            ids[row.customer_id] = row.stripe_customer_id
        if row.status != "sent":
            unsent[row.customer_id] += 1
    checks = []
    for customer in sorted(set(totals) | set(ids)):
        exact = totals.get(customer, Decimal(0))
        checks.append(
            Check(
                meter.name,
                customer,
                ids.get(customer) or resolved.get(customer, ""),
                exact,
                expected_whole(meter, exact),
                unsent[customer],
            )
        )
    return checks


def differences(
    checks: list[Check], stripe_values: dict[tuple[str, str], Decimal]
) -> list[StripeDifference]:
    """Checks whose Stripe value (keyed by (meter, stripe customer)) differs."""
    out = []
    for check in checks:
        if not check.stripe_customer_id:
            if check.expected != 0:
                out.append(StripeDifference(check, None))
            continue
        got = stripe_values.get((check.meter, check.stripe_customer_id), Decimal(0))
        if got != check.expected:
            out.append(StripeDifference(check, got))
    return out
