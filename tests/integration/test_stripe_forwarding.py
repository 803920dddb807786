"""Stripe forwarding on real components: a worker process on the embedded broker and
chdb, the real ``stripe`` SDK against the emulator, the ``meterstream`` CLI.

Expected totals are computed by hand in the tests from the events produced."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

from meterstream.endpoints import write_endpoints
from meterstream.meters.windows import month_bounds, period_label
from meterstream.sinks.stripe.client import MeterSpec, StripeMeterClient
from tests.harness import REPO, StackSlice, Worker, http_json, wait_until
from tests.support.kafka import consume_all
from tests.support.meters import meter_entry, meters_yaml, stripe

pytestmark = pytest.mark.integration

HOUR = 3_600_000
DAY_S = 86_400
STRIPE = "interval: 1s, grace: 0s"
# These events name their Stripe customer; the meters opt in to that property (pinned).
BY_PROPERTY = "customer_id_from: properties.stripe_customer_id"
V = "properties.v"


def pinned(event_name: str, rounding: str = "") -> str:
    """A Stripe block sent at once, its customer named by the event's property (pinned)."""
    rounding_option = f"rounding: {rounding}, " if rounding else ""
    return stripe(event_name, f"{rounding_option}{BY_PROPERTY}, {STRIPE}")


AGG_METERS = meters_yaml(
    meter_entry("tokens_carry", "agg", "sum", V, stripe=pinned("agg_sum_carry", "carry")),
    meter_entry("tokens_up", "agg", "sum", V, stripe=pinned("agg_sum_up", "up")),
    meter_entry("tokens_down", "agg", "sum", V, stripe=pinned("agg_sum_down", "down")),
    meter_entry("calls", "agg", "count", stripe=pinned("agg_count")),
    meter_entry("peak", "agg", "max", V, stripe=pinned("agg_max")),
    meter_entry("floor_v", "agg", "min", V, stripe=pinned("agg_min", "up")),
    meter_entry("users", "agg", "unique_count", "properties.user", stripe=pinned("agg_unique")),
    meter_entry("seats", "agg", "latest", V, stripe=pinned("agg_latest", "down")),
)

_ROUND = {"carry": ROUND_HALF_UP, "up": ROUND_CEILING, "down": ROUND_FLOOR}
# meter's Stripe event name -> (aggregation, rounding)
AGG_EXPECT = {
    "agg_sum_carry": ("sum", "carry"),
    "agg_sum_up": ("sum", "up"),
    "agg_sum_down": ("sum", "down"),
    "agg_count": ("count", "carry"),
    "agg_max": ("max", "carry"),
    "agg_min": ("min", "up"),
    "agg_unique": ("unique_count", "carry"),
    "agg_latest": ("latest", "down"),
}


def cli(
    stack: StackSlice, meters_file: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterstream.cli", *args],
        cwd=REPO,
        env=stack.env(meters_file),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stripe_client(stack: StackSlice) -> StripeMeterClient:
    return StripeMeterClient(None, stack.stripe_url, rate_limit_per_second=None)


def stripe_totals(
    client: StripeMeterClient, customers: list[str], start_s: int, end_s: int
) -> dict[tuple[str, str], Decimal]:
    """(Stripe event name, Stripe customer) -> Stripe's aggregated value over [start, end)."""
    out: dict[tuple[str, str], Decimal] = {}
    for meter in client.list_meters():
        for customer in customers:
            summaries = client.event_summaries(meter["id"], customer, start_s, end_s)
            value = sum((s.aggregated_value for s in summaries), Decimal(0))
            if value:
                out[(meter["event_name"], customer)] = value
    return out


def summary_range() -> tuple[int, int]:
    """Two days back to the end of the current minute: read at each poll, since the
    forwarder stamps a meter event with the minute it sends it in."""
    now_s = int(time.time())
    return (now_s // 60) * 60 - 2 * DAY_S, (now_s // 60 + 1) * 60


def ledger(worker: Worker) -> list[dict[str, Any]]:
    return worker.sql(
        """SELECT identifier, argMax(meter, version) AS meter,
                  argMax(customer_id, version) AS customer_id,
                  argMax(stripe_customer_id, version) AS stripe_customer_id,
                  argMax(value, version) AS value, argMax(status, version) AS status,
                  argMax(error_code, version) AS error_code
           FROM stripe_meter_events GROUP BY identifier ORDER BY identifier"""
    )


def expected_aggregates(events: list[dict[str, Any]]) -> dict[tuple[str, str], Decimal]:
    """Meterstream's period totals by hand, rounded by each meter's rule (zero omitted)."""
    by_customer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_customer[e["customer_id"]].append(e)
    out: dict[tuple[str, str], Decimal] = {}
    for customer, evs in by_customer.items():
        values = [Decimal(str(e["properties"]["v"])) for e in evs]
        latest = max(evs, key=lambda e: (e["timestamp"], e["idempotency_key"].encode()))
        exact = {
            "sum": sum(values, Decimal(0)),
            "count": Decimal(len(evs)),
            "max": max(values),
            "min": min(values),
            "unique_count": Decimal(len({e["properties"]["user"] for e in evs})),
            "latest": Decimal(str(latest["properties"]["v"])),
        }
        for event_name, (aggregation, rounding) in AGG_EXPECT.items():
            whole = exact[aggregation].to_integral_value(rounding=_ROUND[rounding])
            if whole:
                out[(event_name, f"cus_{customer}")] = whole
    return out


@pytest.mark.parametrize("transport", ["v1", "v2"])
def test_every_aggregation_matches_stripe(stack: StackSlice, transport: str) -> None:
    now = time.time_ns() // 1_000_000
    base = (now // HOUR - 3) * HOUR
    month_start = month_bounds(period_label(now))[0]
    if base < month_start <= base + 2 * HOUR:
        # in a month's first hours: keep every event in the previous month, since each
        # billing period is rounded on its own and the expected totals are not split
        base = month_start - 3 * HOUR
    raw = [
        ("acme", base + 1_000, "1.4", "u1"),
        ("acme", base + 2_000, "2.35", "u2"),
        ("acme", base + HOUR + 10, "0.3", "u1"),
        ("acme", base + HOUR + 20, "10.5", "u3"),
        ("acme", base + HOUR + 5, "7.75", "u2"),  # produced last, not the latest by time
        ("globex", base + 10, "0.2", "x"),
        ("globex", base + 20, "0.2", "y"),
        ("initech", base + 30, "3", "z"),
    ]
    events = [
        {
            "event_name": "agg",
            "customer_id": c,
            "idempotency_key": f"k{i}",
            "timestamp": ts,
            "properties": {"stripe_customer_id": f"cus_{c}", "v": v, "user": u},
        }
        for i, (c, ts, v, u) in enumerate(raw)
    ]
    expected = expected_aggregates(events)
    # Fractions make the rules differ: acme sums to 22.3, globex to 0.4.
    assert expected[("agg_sum_carry", "cus_acme")] == 22
    assert expected[("agg_sum_up", "cus_acme")] == 23
    assert ("agg_sum_carry", "cus_globex") not in expected  # 0.4 rounds to 0: nothing sent
    assert expected[("agg_sum_up", "cus_globex")] == 1
    stack.produce(events)
    worker = stack.start_worker(
        stack.meters_file(AGG_METERS), METERSTREAM_STRIPE_TRANSPORT=transport
    )
    client = stripe_client(stack)
    customers = ["cus_acme", "cus_globex", "cus_initech"]
    lo, hi = summary_range()
    got: dict[tuple[str, str], Decimal] = {}

    def matches() -> bool:
        nonlocal lo, hi
        lo, hi = summary_range()  # a send after a minute boundary is stamped past the old hi
        got.clear()
        got.update(stripe_totals(client, customers, lo, hi))
        return got == expected

    try:
        wait_until(matches, timeout=120, interval=1, what="Stripe summaries")
    except AssertionError:
        sent = http_json(f"{stack.stripe_url}/_emulator/events")["data"]
        meters = [(m["id"], m["event_name"]) for m in client.list_meters()]
        detail = f"range {lo}-{hi}; meters {meters}; emulator events {sent[:10]}"
        assert got == expected, detail + "\n" + worker.log()[-3000:]
    accepted = http_json(f"{stack.stripe_url}/_emulator/events")["data"]
    assert {e["api"] for e in accepted} == {transport}
    assert all(str(e["value"]).lstrip("-").isdigit() for e in accepted)
    stats = http_json(f"{stack.stripe_url}/_emulator/stats")
    assert stats["rejected_other"] == 0
    rows = ledger(worker)
    assert rows and {r["status"] for r in rows} == {"sent"}
    assert len({r["identifier"] for r in rows}) == len(accepted)

    # The same comparison by the command (through the worker's web server).
    write_endpoints(stack.tmp / "state", {"web_url": worker.web_url})
    period = time.strftime("%Y-%m", time.gmtime(base / 1000))
    result = cli(stack, stack.meters_file(AGG_METERS), "stripe", "reconcile", "--period", period)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 difference(s)" in result.stderr


MAPPED_METERS = f"""
meters:
  - name: api_calls
    event_name: api_call
    aggregation: count
    stripe: {{event_name: mapped_calls, customer_id_from: mapping, {STRIPE}}}
"""


def test_mapping_unknown_customer_error_and_retry(stack: StackSlice) -> None:
    meters_file = stack.meters_file(MAPPED_METERS)
    emulator = stack.stripe_url
    http_json(f"{emulator}/_emulator/customers", {"ids": ["cus_acme_real", "cus_globex"]})
    # acme is mapped to a Stripe customer that does not exist; newco has no mapping yet.
    for customer, stripe_id in (("acme", "cus_acme_typo"), ("globex", "cus_globex")):
        result = cli(stack, meters_file, "customers", "set", customer, stripe_id)
        assert result.returncode == 0, result.stderr
    listed = cli(stack, meters_file, "customers", "list", "--format", "json")
    assert json.loads(listed.stdout) == {"acme": "cus_acme_typo", "globex": "cus_globex"}

    now = time.time_ns() // 1_000_000
    base = (now // HOUR - 2) * HOUR
    events = [
        {"event_name": "api_call", "customer_id": c, "idempotency_key": f"{c}{i}", "timestamp": t}
        for i, (c, t) in enumerate(
            [("acme", base + 1), ("acme", base + 2), ("globex", base + 3), ("newco", base + 4)]
        )
    ]
    stack.produce(events)
    worker = stack.start_worker(meters_file)

    def rows_by_customer() -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in ledger(worker):
            out[row["customer_id"]].append(row)
        return out

    wait_until(
        lambda: (
            [r["status"] for r in rows_by_customer()["acme"]] == ["error"]
            and [r["status"] for r in rows_by_customer()["globex"]] == ["sent"]
        ),
        timeout=40,
        what="acme in error, globex sent",
    )
    (acme_row,) = rows_by_customer()["acme"]
    assert acme_row["error_code"] == "resource_missing"
    assert acme_row["stripe_customer_id"] == "cus_acme_typo"
    assert "newco" not in rows_by_customer()  # held, not dropped
    assert 'meterstream_stripe_waiting_customers{meter="api_calls"} 1' in worker.metrics()

    errors = consume_all(stack.bootstrap, f"{stack.prefix}stripe-errors")
    assert len(errors) == 1
    key, value = errors[0]
    message = json.loads(value)
    assert key.decode() == acme_row["identifier"] == message["identifier"]
    assert message["error_code"] == "resource_missing"
    assert message["customer_id"] == "acme" and message["value"] == 2

    # Reconcile sees the difference (acme: Stripe 0, meterstream 2; newco: no Stripe id).
    write_endpoints(stack.tmp / "state", {"web_url": worker.web_url})
    period = time.strftime("%Y-%m", time.gmtime(base / 1000))
    result = cli(stack, meters_file, "stripe", "reconcile", "--period", period)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "customer=acme" in result.stdout and "customer=newco" in result.stdout
    assert "customer=globex" not in result.stdout

    # The mapping appears: newco is forwarded by the running worker.
    http_json(f"{emulator}/_emulator/customers", {"ids": ["cus_newco"]})
    assert cli(stack, meters_file, "customers", "set", "newco", "cus_newco").returncode == 0
    wait_until(
        lambda: [r["status"] for r in rows_by_customer()["newco"]] == ["sent"],
        timeout=30,
        what="newco forwarded once mapped",
    )
    wait_until(
        lambda: 'meterstream_stripe_waiting_customers{meter="api_calls"} 0' in worker.metrics(),
        timeout=10,
        what="no customer waiting",
    )
    # acme stays held until the retry, even though the forwarder keeps running.
    assert [r["status"] for r in rows_by_customer()["acme"]] == ["error"]

    # Fix the mapping, then retry: the same identifier reaches the right Stripe customer.
    assert cli(stack, meters_file, "customers", "set", "acme", "cus_acme_real").returncode == 0
    wait_until(
        lambda: (
            cli(stack, meters_file, "customers", "get", "acme").stdout.strip() == "cus_acme_real"
        ),
        timeout=10,
        what="mapping written",
    )
    time.sleep(2)  # the forwarder reads the mapping at its next round
    result = cli(stack, meters_file, "stripe", "retry")
    assert result.returncode == 0, result.stdout + result.stderr
    assert acme_row["identifier"] in result.stdout and "sent" in result.stdout
    (fixed,) = rows_by_customer()["acme"]
    assert (fixed["identifier"], fixed["status"], fixed["error_code"]) == (
        acme_row["identifier"],
        "sent",
        "",
    )
    assert fixed["stripe_customer_id"] == "cus_acme_real"
    accepted = http_json(f"{emulator}/_emulator/events?customer=cus_acme_real")["data"]
    assert [(e["identifier"], e["value"]) for e in accepted] == [(acme_row["identifier"], "2")]

    result = cli(stack, meters_file, "stripe", "reconcile", "--period", period)
    assert result.returncode == 0, result.stdout + result.stderr
    assert cli(stack, meters_file, "stripe", "retry").stdout.startswith("nothing to retry")
    stats = http_json(f"{emulator}/_emulator/stats")
    assert stats["rejected_duplicates"] == 0


def test_create_meters_refuses_a_contradicting_formula(stack: StackSlice) -> None:
    meters_file = stack.meters_file(
        f"""
meters:
  - name: tokens
    event_name: chat
    aggregation: sum
    value: properties.tokens
    stripe: {{event_name: cm_tokens, {STRIPE}}}
  - name: peak
    event_name: chat
    aggregation: max
    value: properties.tokens
    stripe: {{event_name: cm_peak, {STRIPE}}}
"""
    )
    client = stripe_client(stack)
    client.create_meter(MeterSpec("legacy", "cm_tokens", "last"))  # a sum meter needs formula sum
    result = cli(stack, meters_file, "stripe", "create-meters")
    assert result.returncode == 1
    assert "REFUSED tokens" in result.stderr and "'sum'" in result.stderr
    assert "created peak" in result.stdout
    formulas = {m["event_name"]: m["default_aggregation"]["formula"] for m in client.list_meters()}
    assert formulas == {"cm_tokens": "last", "cm_peak": "last"}

    ok = stack.meters_file(
        f"""
meters:
  - name: peak
    event_name: chat
    aggregation: max
    value: properties.tokens
    stripe: {{event_name: cm_peak, {STRIPE}}}
  - name: calls
    event_name: chat
    aggregation: count
    stripe: {{event_name: cm_calls, {STRIPE}}}
"""
    )
    result = cli(stack, ok, "stripe", "create-meters")
    assert result.returncode == 0, result.stderr
    assert "exists  peak" in result.stdout and "created calls" in result.stdout
    assert {m["event_name"]: m["default_aggregation"]["formula"] for m in client.list_meters()}[
        "cm_calls"
    ] == "sum"
