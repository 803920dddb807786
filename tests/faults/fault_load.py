"""A reproducible faulty load and its reference totals, computed independently."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from tests.support.meters import FAST_STRIPE, meter_entry, meters_yaml, stripe

HOUR = 3_600_000

# The events name their Stripe customer; the meters opt in to that property (pinned).
FAULT_STRIPE = f"customer_id_from: properties.stripe_customer_id, {FAST_STRIPE}"
METERS = meters_yaml(
    meter_entry(
        "spend", "api_call", "sum", "properties.cost", stripe=stripe("fault_spend", FAULT_STRIPE)
    ),
    meter_entry("calls", "api_call", "count", stripe=stripe("fault_calls", FAULT_STRIPE)),
)


def make_load(
    unique: int, duplicates: int, seed: int, customers: int = 40, start_ms: int | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(records in produce order, the counted events): half the duplicates are exact
    resends, half change the payload. Event times are out of order within the two
    hours before the current hour, so every window is closed."""
    rng = random.Random(seed)
    now = time.time_ns() // 1_000_000
    base = start_ms if start_ms is not None else (now // HOUR - 2) * HOUR
    originals = [
        {
            "event_name": "api_call",
            "customer_id": f"cust-{rng.randrange(customers):03d}",
            "idempotency_key": f"{seed}-{i:06d}",
            "timestamp": base + rng.randrange(2 * HOUR),
            "properties": {
                "cost": str(Decimal(rng.randrange(1, 100_000)) / 1000),
                "stripe_customer_id": "",
            },
        }
        for i in range(unique)
    ]
    for event in originals:
        event["properties"]["stripe_customer_id"] = f"cus_{event['customer_id']}"
    records = list(originals)
    for n in range(duplicates):
        copy = dict(rng.choice(originals))
        if n % 2:
            copy["properties"] = {**copy["properties"], "cost": "999"}
        # anywhere in the stream: when a changed copy comes first, it is the one that counts
        records.insert(rng.randrange(len(records) + 1), copy)
    return records, first_copies(records)


def first_copies(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The copy that counts: the first per (customer, key) in produce order."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        seen.setdefault((r["customer_id"], r["idempotency_key"]), r)
    return list(seen.values())


def reference(counted: list[dict[str, Any]]) -> dict[tuple[str, str, int], Decimal]:
    """(meter, customer, hour window start) -> exact total."""
    out: dict[tuple[str, str, int], Decimal] = defaultdict(Decimal)
    for e in counted:
        window = e["timestamp"] // HOUR * HOUR
        out[("spend", e["customer_id"], window)] += Decimal(e["properties"]["cost"])
        out[("calls", e["customer_id"], window)] += 1
    return dict(out)


def stripe_reference(ref: dict[tuple[str, str, int], Decimal]) -> dict[tuple[str, str], int]:
    """What Stripe must hold per (Stripe event name, Stripe customer): carry rounding."""
    totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for (meter, customer, _), value in ref.items():
        totals[(f"fault_{meter}", f"cus_{customer}")] += value
    rounded = {k: int(v.quantize(Decimal(1), rounding=ROUND_HALF_UP)) for k, v in totals.items()}
    return {k: v for k, v in rounded.items() if v}
