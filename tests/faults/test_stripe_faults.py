"""Stripe forwarding under faults: 30% 429s, 10% 500s and a worker SIGKILL mid-forward,
then a second worker on the same ClickHouse path. Stripe's totals still equal
meterstream's and the emulator never accepted an identifier twice."""

from __future__ import annotations

import time
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest

from tests.faults.fault_load import FAULT_STRIPE
from tests.harness import StackSlice, http_json, wait_until
from tests.support.meters import meter_entry, meters_yaml, stripe

pytestmark = [pytest.mark.integration, pytest.mark.faults]

HOUR = 3_600_000
CUSTOMERS = 30
# The events name their Stripe customer; the meters opt in to that property (pinned).
METERS = meters_yaml(
    meter_entry(
        "tokens", "chat", "sum", "properties.tokens", stripe=stripe("fault_tokens", FAULT_STRIPE)
    ),
    meter_entry(
        "peak", "chat", "max", "properties.tokens", stripe=stripe("fault_peak", FAULT_STRIPE)
    ),
)


def stripe_view(url: str) -> tuple[dict[tuple[str, str], int], list[dict[str, Any]]]:
    """Stripe's totals per (event name, customer): sum formula sums, last formula takes
    the event with the greatest timestamp (ties: the later accepted)."""
    events = http_json(f"{url}/_emulator/events")["data"]
    sums: dict[tuple[str, str], int] = defaultdict(int)
    last: dict[tuple[str, str], tuple[int, int, int]] = {}
    for i, e in enumerate(events):
        key = (e["event_name"], e["customer"])
        if e["event_name"] == "fault_tokens":
            sums[key] += int(e["value"])
        elif key not in last or (e["timestamp"], i) > last[key][:2]:
            last[key] = (e["timestamp"], i, int(e["value"]))
    totals = dict(sums)
    totals.update({k: v[2] for k, v in last.items()})
    return totals, events


def test_faults_and_a_killed_worker_do_not_change_stripe_totals(stack: StackSlice) -> None:
    now = time.time_ns() // 1_000_000
    base = (now // HOUR - 3) * HOUR
    events = []
    for c in range(CUSTOMERS):
        for j in range(3):
            events.append(
                {
                    "event_name": "chat",
                    "customer_id": f"c{c:02d}",
                    "idempotency_key": f"c{c}-{j}",
                    "timestamp": base + j * HOUR + c,
                    "properties": {"stripe_customer_id": f"cus_c{c:02d}", "tokens": f"{c}.{j}5"},
                }
            )
    expected: dict[tuple[str, str], int] = {}
    for c in range(CUSTOMERS):
        values = [
            Decimal(e["properties"]["tokens"]) for e in events if e["customer_id"] == f"c{c:02d}"
        ]
        for name, exact in (("fault_tokens", sum(values, Decimal(0))), ("fault_peak", max(values))):
            whole = int(exact.to_integral_value(rounding=ROUND_HALF_UP))
            if whole or name == "fault_peak":  # a last meter sends its value, even 0
                expected[(name, f"cus_c{c:02d}")] = whole

    http_json(
        f"{stack.stripe_url}/_emulator/faults",
        {"rate_429": 0.3, "rate_500": 0.1, "latency_ms": 20, "seed": 7},
    )
    stack.produce(events)
    meters_file = stack.meters_file(METERS)
    env = {"METERSTREAM_SESSION_TIMEOUT_SECONDS": "4"}
    first = stack.start_worker(meters_file, **env)
    accepted = wait_until(
        lambda: (
            http_json(f"{stack.stripe_url}/_emulator/stats")["accepted"] >= 8
            and http_json(f"{stack.stripe_url}/_emulator/stats")["accepted"]
        ),
        timeout=40,
        interval=0.05,
        what="forwarding under way",
    )
    first.kill()  # SIGKILL, mid-forward
    assert accepted < len(expected), "the kill came after everything was forwarded"

    second = stack.start_worker(meters_file, **env)
    got: dict[tuple[str, str], int] = {}

    def matches() -> bool:
        got.clear()
        got.update(stripe_view(stack.stripe_url)[0])
        return got == expected

    try:
        wait_until(matches, timeout=50, interval=1, what="Stripe totals")
    except AssertionError:
        assert got == expected, second.log()[-3000:]

    _, accepted_events = stripe_view(stack.stripe_url)
    identifiers = [e["identifier"] for e in accepted_events]
    assert len(identifiers) == len(set(identifiers))
    stats = http_json(f"{stack.stripe_url}/_emulator/stats")
    assert stats["accepted"] == len(accepted_events)
    assert stats["faults_injected"] > 0
    assert stats["rejected_other"] == 0
    ledger = second.sql(
        """SELECT identifier, argMax(status, version) AS status, argMax(value, version) AS value
           FROM stripe_meter_events GROUP BY identifier"""
    )
    assert {r["status"] for r in ledger} == {"sent"}
    assert sorted(r["identifier"] for r in ledger) == sorted(identifiers)
