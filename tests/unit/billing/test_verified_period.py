"""Incremental verification state (pipeline/billing/plan.py VerifiedPeriod, RecordDeltas):
built from a full read, then updated with re-verified customer-days, newly closed
windows and what the worker inserted, its totals equal a full recompute of the
record, and the check against the record finds what the deltas missed."""

from __future__ import annotations

import random
from collections import Counter
from decimal import Decimal

import yaml

from meterstream.billing.plan import (
    RecordDeltas,
    VerifiedPeriod,
    customer_totals,
    days_to_reverify,
)
from meterstream.events import UsageEvent
from meterstream.meters.aggregation import WindowState, aggregator_for
from meterstream.meters.config import Meter, parse_meters
from meterstream.meters.fold import WindowKey, contributions, recompute_windows, windows_of
from meterstream.meters.windows import DAY_MS

HOUR = 3_600_000
P0 = 1_790_000_000_000 // DAY_MS * DAY_MS

METERS_YAML = """
meters:
  - {name: tokens, event_name: chat, aggregation: sum, value: properties.tokens,
     group_by: [properties.model]}
  - {name: peak, event_name: chat, aggregation: max, value: properties.tokens}
  - {name: users, event_name: chat, aggregation: unique_count, value: properties.user,
     window: day}
  - {name: last, event_name: chat, aggregation: latest, value: properties.tokens}
"""
METERS = parse_meters(yaml.safe_load(METERS_YAML))


def event(rng: random.Random, i: int, end: int) -> UsageEvent:
    return UsageEvent(
        "chat",
        f"c{rng.randrange(4)}",
        f"k{i}",
        rng.randrange(P0, end),
        {
            "tokens": Decimal(rng.randrange(-50, 500)) / 10,
            "model": rng.choice("ab"),
            "user": f"u{rng.randrange(6)}",
        },
    )


def record_states(meter: Meter, record: list[UsageEvent], lo: int, hi: int, customers=None):  # type: ignore[no-untyped-def]
    """What reconcile_meter returns: windows with start in [lo, hi) from the record."""
    chosen = [
        e
        for e in record
        if lo <= e.timestamp_ms < hi and (customers is None or e.customer_id in customers)
    ]
    keys = {k for k in windows_of(METERS, chosen) if k.meter == meter.name}
    return recompute_windows(METERS, keys, chosen)


def test_incremental_totals_equal_a_full_read() -> None:
    rng = random.Random(7)
    for meter in METERS.meters:
        record: list[UsageEvent] = []
        changed: set[tuple[str, int]] = set()
        upto = P0 + 5 * HOUR
        record += [event(rng, i, P0 + 6 * HOUR) for i in range(200)]
        verified = VerifiedPeriod(upto, 0.0)
        verified.add(meter, record_states(meter, record, P0, upto))
        n = len(record)
        for _ in range(30):  # rounds: late events anywhere, then more windows close
            new = [event(rng, n + j, upto + 3 * DAY_MS) for j in range(rng.randrange(0, 15))]
            n += len(new)
            record += new
            changed |= {(k.customer_id, k.window_start_ms) for k in windows_of(METERS, new)
                        if k.meter == meter.name}  # fmt: skip
            end = upto + rng.choice([0, HOUR, 5 * HOUR, DAY_MS])
            taken = {c for c in changed if P0 <= c[1] < end}
            changed -= taken
            for day, customers in days_to_reverify(taken, verified.upto_ms).items():
                hi = min(day + DAY_MS, verified.upto_ms)
                ordered = sorted(customers)
                size = rng.choice([1, 2, len(ordered)])  # the forwarder re-reads in slices
                for i in range(0, len(ordered), size):
                    chunk = ordered[i : i + size]
                    states = record_states(meter, record, day, hi, chunk)
                    verified.replace_days(meter, day, chunk, states)
            if end > verified.upto_ms:
                verified.add(meter, record_states(meter, record, verified.upto_ms, end))
                verified.upto_ms = end
            upto = end
            full = customer_totals(meter, record_states(meter, record, P0, end))
            assert verified.totals(meter) == full, meter.name


def test_days_to_reverify_only_below_the_covered_range() -> None:
    changed = [("a", P0 + HOUR), ("b", P0 + DAY_MS + HOUR), ("a", P0 + 2 * DAY_MS)]
    assert days_to_reverify(changed, P0 + 2 * DAY_MS) == {P0: {"a"}, P0 + DAY_MS: {"b"}}


def test_window_keys_are_whole_days_apart() -> None:
    key = WindowKey("tokens", "c", "{}", P0 + 23 * HOUR)
    assert (key.window_start_ms - key.window_start_ms % DAY_MS) == P0


def record_events(record: list[UsageEvent], lo: int, hi: int, customers=None):  # type: ignore[no-untyped-def]
    """What reconcile_meter counts: events per (customer, UTC day) in [lo, hi)."""
    out: Counter[tuple[str, int]] = Counter()
    for e in record:
        if lo <= e.timestamp_ms < hi and (customers is None or e.customer_id in customers):
            out[(e.customer_id, e.timestamp_ms // DAY_MS * DAY_MS)] += 1
    return out


def stored_days(meter: Meter, states):  # type: ignore[no-untyped-def]
    """What day_check reads from meter_windows, for stored windows equal to ``states``."""
    agg = aggregator_for(meter.aggregation)
    merged: dict[tuple[str, int], WindowState] = {}
    for key, state in states.items():
        day = (key.customer_id, key.window_start_ms // DAY_MS * DAY_MS)
        merged[day] = state if day not in merged else agg.merge(merged[day], state)
    return {day: (agg.result(s), s.event_count) for day, s in merged.items()}


def told(meter: Meter, deltas: RecordDeltas, batch: list[UsageEvent]) -> None:
    """What Verifier.record_changed does with one batch the worker inserted."""
    for key, state in contributions(METERS, batch).states.items():
        if key.meter == meter.name:
            deltas.add(meter, key.customer_id, key.window_start_ms, state)
    for e in batch:
        deltas.count(e.customer_id, meter.window_bounds(e.timestamp_ms)[0])


def test_deltas_keep_the_verified_state_equal_to_a_full_read() -> None:
    """Rounds merge what the worker inserted (no re-read); the check against the record
    and the stored windows finds nothing; the totals equal a full read throughout."""
    rng = random.Random(11)
    for meter in METERS.meters:
        record = [event(rng, i, P0 + 6 * HOUR) for i in range(200)]

        def closed(ms: int, meter: Meter = meter) -> int:  # as Forwarder.forward bounds a round
            return meter.window_bounds(ms)[0]

        upto = closed(P0 + 5 * HOUR)
        verified = VerifiedPeriod(upto, 0.0)
        verified.add(meter, record_states(meter, record, P0, upto), record_events(record, P0, upto))
        deltas = RecordDeltas()
        n = len(record)
        for _ in range(30):
            batch = [event(rng, n + j, upto + 3 * DAY_MS) for j in range(rng.randrange(0, 15))]
            n += len(batch)
            record += batch
            told(meter, deltas, batch)
            end = closed(upto + rng.choice([0, HOUR, 5 * HOUR, DAY_MS]))
            taken = deltas.take(P0, verified.upto_ms)
            verified.add_deltas(meter, taken)
            days = taken.customer_days()
            stored = stored_days(meter, record_states(meter, record, P0, verified.upto_ms))
            counts = record_events(record, P0, verified.upto_ms)
            assert verified.differing_days(meter, days, counts, stored) == set()
            if end > verified.upto_ms:  # the newly closed windows: read, and no longer pending
                lo = verified.upto_ms
                verified.add(
                    meter, record_states(meter, record, lo, end), record_events(record, lo, end)
                )
                deltas.discard(None, lo, end)
                verified.upto_ms = end
            upto = end
            full = customer_totals(meter, record_states(meter, record, P0, end))
            assert verified.totals(meter) == full, meter.name


def test_the_check_finds_what_the_deltas_missed_and_a_reread_mends_it() -> None:
    rng = random.Random(5)
    meter = METERS.by_name("tokens")
    upto = P0 + 6 * HOUR
    record = [event(rng, i, upto) for i in range(100)]
    verified = VerifiedPeriod(upto, 0.0)
    verified.add(meter, record_states(meter, record, P0, upto), record_events(record, P0, upto))
    deltas = RecordDeltas()
    told_batch = [UsageEvent("chat", "c1", "t1", P0 + HOUR, {"tokens": 5, "model": "a"})]
    # in the record, never told: another writer, or an insert the worker lost track of
    untold = UsageEvent("chat", "c1", "u1", P0 + 2 * HOUR, {"tokens": 7, "model": "b"})
    record += [*told_batch, untold]
    told(meter, deltas, told_batch)
    taken = deltas.take(P0, upto)
    verified.add_deltas(meter, taken)
    truth = record_states(meter, record, P0, upto)
    counts = record_events(record, P0, upto)
    day = ("c1", P0)
    assert verified.differing_days(
        meter, taken.customer_days(), counts, stored_days(meter, truth)
    ) == {day}
    # stored windows that went wrong are found too, with the record's count right
    wrong = dict(truth)
    key = next(k for k in truth if k.customer_id == "c1")
    wrong[key] = WindowState(event_count=truth[key].event_count, value=Decimal(-1))
    assert day in verified.differing_days(meter, {day}, counts, stored_days(meter, wrong))
    # the re-read replaces the day: then nothing differs and the totals are the record's
    verified.replace_days(
        meter, P0, ["c1"], record_states(meter, record, P0, upto, ["c1"]),
        record_events(record, P0, upto, ["c1"]),
    )  # fmt: skip
    assert verified.differing_days(meter, {day}, counts, stored_days(meter, truth)) == set()
    assert verified.totals(meter) == customer_totals(meter, truth)


def test_deltas_take_and_discard_by_window_start_and_customer() -> None:
    meter = METERS.by_name("tokens")
    deltas = RecordDeltas()
    for customer, start in [("a", P0), ("a", P0 + HOUR), ("b", P0), ("b", P0 + DAY_MS)]:
        deltas.add(meter, customer, start, WindowState(event_count=1, value=Decimal(1)))
        deltas.count(customer, start)
    deltas.add(meter, "a", P0, WindowState(event_count=2, value=Decimal(3)))
    deltas.count("a", P0)
    deltas.discard(["b"], P0, P0 + HOUR)  # b's first hour was just read
    taken = deltas.take(P0, P0 + DAY_MS)
    assert taken.states == {
        ("a", P0): WindowState(event_count=3, value=Decimal(4)),
        ("a", P0 + HOUR): WindowState(event_count=1, value=Decimal(1)),
    }
    assert taken.events == {("a", P0): 2, ("a", P0 + HOUR): 1}
    assert taken.customer_days() == {("a", P0)}
    assert deltas.customer_days() == {("b", P0 + DAY_MS)}  # not yet closed: still pending
