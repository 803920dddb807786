"""Every aggregation, group_by and filter operator through the real pipeline.

The reference is computed here, independently of the pipeline's meter code,
from the unique events; ClickHouse's daily and monthly views must equal it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from meterstream.endpoints import write_endpoints
from tests.harness import REPO, StackSlice, wait_until

pytestmark = pytest.mark.integration

METERS = """
meters:
  - name: m_sum
    event_name: usage
    aggregation: sum
    value: properties.amount
    group_by: [properties.region]
    filters: [{property: properties.tier, operator: in, value: [gold, silver]}]
  - name: m_count
    event_name: usage
    aggregation: count
    filters: [{property: properties.region, operator: not_in, value: [moon]}]
  - name: m_max
    event_name: usage
    aggregation: max
    value: properties.amount
    window: minute
    filters: [{property: properties.amount, operator: gt, value: 1}]
  - name: m_min
    event_name: usage
    aggregation: min
    value: properties.amount
    filters:
      - {property: properties.amount, operator: gte, value: 0.5}
      - {property: properties.amount, operator: lt, value: 90}
  - name: m_unique
    event_name: usage
    aggregation: unique_count
    value: properties.user
    window: day
    filters:
      - {property: properties.user, operator: exists}
      - {property: properties.debug, operator: not_exists}
  - name: m_latest
    event_name: usage
    aggregation: latest
    value: properties.level
    filters:
      - {property: properties.tier, operator: eq, value: gold}
      - {property: properties.region, operator: neq, value: eu}
      - {property: properties.level, operator: lte, value: 50}
"""

HOUR = 3_600_000
DAY = 24 * HOUR


def _reference_filters() -> dict[str, Callable[[dict[str, Any]], bool]]:
    def has(p: dict[str, Any], k: str) -> bool:
        return p.get(k) is not None

    return {
        "m_sum": lambda p: p.get("tier") in ("gold", "silver"),
        "m_count": lambda p: has(p, "region") and p["region"] != "moon",
        "m_max": lambda p: has(p, "amount") and p["amount"] > 1,
        "m_min": lambda p: has(p, "amount") and Decimal("0.5") <= p["amount"] < 90,
        "m_unique": lambda p: has(p, "user") and not has(p, "debug"),
        "m_latest": lambda p: (
            p.get("tier") == "gold"
            and has(p, "region")
            and p["region"] != "eu"
            and has(p, "level")
            and p["level"] <= 50
        ),
    }


def _make_events(now_ms: int) -> list[dict[str, Any]]:
    rng = random.Random(2026)
    today = datetime.fromtimestamp(now_ms / 1000, UTC)
    month_start = int(today.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
    # two days ago at UTC midnight, but inside this month so one month holds everything
    start = max((now_ms // DAY - 2) * DAY, month_start * 1000)
    events = []
    for i in range(400):
        props: dict[str, Any] = {
            "region": rng.choice(["eu", "us", "moon"]),
            "tier": rng.choice(["gold", "silver", "bronze"]),
            "amount": Decimal(rng.randrange(0, 10_000)) / 100,
            "level": rng.randrange(0, 60),
        }
        if rng.random() < 0.8:
            props["user"] = f"u{rng.randrange(12)}"
        if rng.random() < 0.1:
            props["debug"] = True
        events.append(
            {
                "event_name": "usage",
                "customer_id": f"c{rng.randrange(3)}",
                "idempotency_key": f"key-{i:04d}",
                # two days of event time, produced out of order; some share a timestamp
                "timestamp": min(start + rng.randrange(0, 2 * DAY) // 1000 * 1000, now_ms - 1000),
                "properties": props,
            }
        )
    return events


def _reference(events: list[dict[str, Any]], period: str) -> dict[tuple[str, ...], Decimal]:
    filters = _reference_filters()
    sums: dict[tuple[str, ...], Decimal] = defaultdict(Decimal)
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    maxes: dict[tuple[str, ...], Decimal] = {}
    mins: dict[tuple[str, ...], Decimal] = {}
    sets: dict[tuple[str, ...], set[str]] = defaultdict(set)
    latest: dict[tuple[str, ...], tuple[int, bytes, int]] = {}
    for e in events:
        p, ts = e["properties"], e["timestamp"]
        dt = datetime.fromtimestamp(ts / 1000, UTC)
        start = dt.replace(hour=0, minute=0, second=0, microsecond=0)
        if period == "month":
            start = start.replace(day=1)
        ps = str(int(start.timestamp() * 1000))
        c = e["customer_id"]
        if filters["m_sum"](p):
            sums[("m_sum", c, f'{{"properties.region":"{p["region"]}"}}', ps)] += p["amount"]
        if filters["m_count"](p):
            counts[("m_count", c, "{}", ps)] += 1
        if filters["m_max"](p):
            k = ("m_max", c, "{}", ps)
            maxes[k] = max(maxes.get(k, p["amount"]), p["amount"])
        if filters["m_min"](p):
            k = ("m_min", c, "{}", ps)
            mins[k] = min(mins.get(k, p["amount"]), p["amount"])
        if filters["m_unique"](p):
            sets[("m_unique", c, "{}", ps)].add(p["user"])
        if filters["m_latest"](p):
            k = ("m_latest", c, "{}", ps)
            cand = (ts, e["idempotency_key"].encode(), p["level"])
            if k not in latest or cand[:2] > latest[k][:2]:
                latest[k] = cand
    out: dict[tuple[str, ...], Decimal] = {}
    out.update(sums)
    out.update({k: Decimal(v) for k, v in counts.items()})
    out.update(maxes)
    out.update(mins)
    out.update({k: Decimal(len(v)) for k, v in sets.items()})
    out.update({k: Decimal(v[2]) for k, v in latest.items()})
    return out


@pytest.mark.brokers("session", "kafka")
def test_views_equal_an_independent_reference(stack: StackSlice) -> None:
    now = time.time_ns() // 1_000_000
    events = _make_events(now)
    rng = random.Random(7)
    sent: list[dict[str, Any]] = events + rng.sample(events, 40)  # exact duplicates
    rng.shuffle(sent)
    stack.produce(sent)
    worker = stack.start_worker(stack.meters_file(METERS))
    wait_until(
        lambda: worker.sql("SELECT count() AS n FROM usage_events FINAL")[0]["n"] == len(events),
        what="record complete",
    )

    def view(name: str) -> dict[tuple[str, ...], Decimal]:
        rows = worker.sql(
            f"SELECT meter, customer_id, group_key,"
            f" toString(toUnixTimestamp64Milli(period_start)) AS ps, value FROM {name}"
        )
        return {
            (r["meter"], r["customer_id"], r["group_key"], r["ps"]): Decimal(str(r["value"]))
            for r in rows
        }

    for period, view_name in (("day", "meter_usage_daily"), ("month", "meter_usage_monthly")):
        expected = _reference(events, period)
        assert {m for m, *_ in expected} == {
            "m_sum",
            "m_count",
            "m_max",
            "m_min",
            "m_unique",
            "m_latest",
        }
        # the views settle once the batch that completed the record has written its windows
        deadline = time.monotonic() + 30
        while view(view_name) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        assert view(view_name) == expected

    # The usage endpoint agrees with the monthly view, per customer.
    month = _reference(events, "month")
    usage = worker.get("/v1/customers/c1/usage")["usage"]
    by_meter = {(u["meter"], u["group_key"]): Decimal(str(u["value"])) for u in usage}
    assert by_meter == {(m, g): v for (m, c, g, _), v in month.items() if c == "c1"}

    # So does `meterstream usage` (through the running worker, as with `meterstream run`).
    state = stack.tmp / "cli-state"
    write_endpoints(state, {"web_url": worker.web_url})
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    cli = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "usage", "c1", "--format", "json",
         "--state-dir", str(state)],
        cwd=REPO, env=clean, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    rows = json.loads(cli.stdout)
    assert {(r["meter"], r["group_key"]): Decimal(str(r["value"])) for r in rows} == by_meter
