"""Incremental verification state (pipeline/billing.py VerifiedPeriod): built from
a full read, then updated with re-verified customer-days and newly closed windows,
its totals equal a full recompute of the record."""

from __future__ import annotations

import random
from decimal import Decimal

import yaml

from pipeline.billing import DAY_MS, VerifiedPeriod, customer_totals, days_to_reverify
from pipeline.events import UsageEvent
from pipeline.meters import Meter, parse_meters
from pipeline.processor import WindowKey, recompute_windows, windows_of

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
