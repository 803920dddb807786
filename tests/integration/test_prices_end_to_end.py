"""Prices end to end (issue #24): after a stream, the invoice preview equals a reference
computed here from the events (by hand-written Stripe tier rules, not the pricing
package), ClickHouse ``priced_usage_daily`` equals the preview, the CLI answers the
same, and a customer-restricted key reads its own preview only.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from meterstream.api.keys import KeyStore
from meterstream.endpoints import write_endpoints
from meterstream.sinks.stripe.client import StripeMeterClient
from tests.harness import REPO, StackSlice, Worker, wait_until
from tests.support.http import request_json, status_of

pytestmark = pytest.mark.integration

MINUTE = 60_000
HOUR = 3_600_000
DAY = 24 * HOUR

STRIPE = "customer_id_from: properties.stripe_customer_id, interval: 1s, grace: 0s"
METERS = f"""
meters:
  - name: tokens
    event_name: chat
    aggregation: sum
    value: properties.tokens
    group_by: [properties.model]
    window: minute
    stripe: {{event_name: pr_tokens, {STRIPE}}}
  - name: calls
    event_name: call
    aggregation: count
    window: minute
    stripe: {{event_name: pr_calls, {STRIPE}}}
  - name: servers
    event_name: heartbeat
    aggregation: max
    value: properties.servers
    window: minute
    stripe: {{event_name: pr_servers, {STRIPE}}}
"""

PLANS = """
plans:
  - name: starter
    currency: usd
    prices:
      - {meter: tokens, unit_price: 0.000002}
  - name: basic
    currency: usd
    prices:
      - meter: tokens
        unit_price: 0.05
        transform_quantity: {divide_by: 1000, round: up}
      - {meter: calls, unit_price: 0.013}
  - name: pro
    currency: usd
    base_fee: 20
    prices:
      - meter: tokens
        unit_price: 0.04
        transform_quantity: {divide_by: 1000, round: down}
      - meter: calls
        billing_scheme: tiered
        tiers_mode: graduated
        tiers:
          - {up_to: 10, flat_price: 1}
          - {up_to: 50, unit_price: 0.015}
          - {up_to: inf, unit_price: 0.0075}
      - meter: servers
        billing_scheme: tiered
        tiers_mode: volume
        tiers:
          - {up_to: 5, unit_price: 2}
          - {up_to: 20, unit_price: 1.5, flat_price: 3}
          - {up_to: inf, unit_price: 0.99}
default_plan: starter
"""

# The plans again, as the reference prices them: (kind, parameters) per meter.
REFERENCE_PLANS: dict[str, dict[str, tuple[str, Any]]] = {
    "starter": {"tokens": ("unit", Fraction("0.000002"))},
    "basic": {
        "tokens": ("package_up", (1000, Fraction("0.05"))),
        "calls": ("unit", Fraction("0.013")),
    },
    "pro": {
        "tokens": ("package_down", (1000, Fraction("0.04"))),
        "calls": (
            "graduated",
            [(10, 0, 1), (50, Fraction("0.015"), 0), (None, Fraction("0.0075"), 0)],
        ),
        "servers": ("volume", [(5, 2, 0), (20, Fraction("1.5"), 3), (None, Fraction("0.99"), 0)]),
    },
}
BASE_FEES = {"pro": Fraction(20)}


def _cents(amount: Fraction) -> Decimal:
    """Half up to the cent, from the exact fraction (Stripe rounds each line once)."""
    cents, rest = divmod(amount * 100, 1)
    return Decimal(int(cents) + (rest >= Fraction(1, 2))).scaleb(-2)


def _price(kind: str, params: Any, quantity: Fraction) -> Fraction:
    """Stripe's price semantics, written out independently of pipeline/pricing."""
    q = max(quantity, Fraction(0))
    if kind == "unit":
        return q * params
    if kind in ("package_up", "package_down"):
        divide_by, unit = params
        packages = math.ceil(q / divide_by) if kind == "package_up" else math.floor(q / divide_by)
        return packages * unit
    if kind == "graduated":
        total, lower = Fraction(0), 0
        for i, (up_to, unit, flat) in enumerate(params):
            if i > 0 and q <= lower:
                break
            top = q if up_to is None else min(q, Fraction(up_to))
            total += max(top - lower, 0) * Fraction(unit) + flat
            if up_to is None:
                break
            lower = up_to
        return total
    assert kind == "volume"
    for up_to, unit, flat in params:
        if up_to is None or q <= up_to:
            return q * Fraction(unit) + flat
    raise AssertionError("unbounded last tier")


def _events(now_ms: int, month_start: int) -> list[dict[str, Any]]:
    """Events over the last two days of this month, all in closed (minute) windows: the
    forwarder sends a window to Stripe once it is closed."""
    rng = random.Random(24)
    start = max((now_ms // DAY - 2) * DAY, month_start)
    end = now_ms // MINUTE * MINUTE
    out = []
    for i in range(360):
        ts = start + rng.randrange(0, max(end - start, 1))
        customer = f"c{rng.randrange(3)}"
        kind = rng.choice(["chat", "chat", "call", "call", "call", "heartbeat"])
        props: dict[str, Any] = {"stripe_customer_id": f"cus_{customer}"}
        if kind == "chat":
            props |= {"tokens": rng.randrange(1, 5000), "model": rng.choice(["a", "b"])}
        elif kind == "heartbeat":
            props |= {"servers": rng.randrange(1, 30)}
        out.append(
            {
                "event_name": kind,
                "customer_id": customer,
                "idempotency_key": f"p-{i:04d}",
                "timestamp": ts,
                "properties": props,
            }
        )
    return out


def _quantities(
    events: list[dict[str, Any]], customer: str, lo: int, hi: int
) -> dict[str, Fraction]:
    q: dict[str, Fraction] = defaultdict(Fraction)
    servers: list[int] = []
    for e in events:
        if e["customer_id"] != customer or not lo <= e["timestamp"] < hi:
            continue
        if e["event_name"] == "chat":
            q["tokens"] += e["properties"]["tokens"]
        elif e["event_name"] == "call":
            q["calls"] += 1
        else:
            servers.append(e["properties"]["servers"])
    if servers:
        q["servers"] = Fraction(max(servers))
    return q


def _reference(
    events: list[dict[str, Any]],
    customer: str,
    segments: list[tuple[str, int, int]],
    period: tuple[int, int],
) -> tuple[dict[tuple[str, str, str], Decimal], Decimal]:
    """{(plan, kind, meter): rounded amount}, total."""
    lines: dict[tuple[str, str, str], Decimal] = {}
    for plan, lo, hi in segments:
        if plan in BASE_FEES:
            share = Fraction(hi - lo, period[1] - period[0])
            lines[(plan, "base_fee", "")] = _cents(BASE_FEES[plan] * share)
        quantities = _quantities(events, customer, lo, hi)
        for meter, (kind, params) in REFERENCE_PLANS[plan].items():
            lines[(plan, "usage", meter)] = _cents(_price(kind, params, quantities[meter]))
    return lines, sum(lines.values(), Decimal("0.00"))


def _preview_lines(doc: dict[str, Any]) -> dict[tuple[str, str, str], Decimal]:
    return {
        (line["plan"], line["kind"], line["meter"] or ""): Decimal(line["amount"])
        for line in doc["lines"]
    }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def _priced_view(worker: Worker, period_start: int) -> dict[tuple[str, str, str], Decimal]:
    rows = worker.sql(
        "SELECT customer_id, meter, plan, toString(sum(amount)) AS amount"
        " FROM priced_usage_daily"
        f" WHERE toUnixTimestamp64Milli(period_start) = {period_start}"
        " GROUP BY customer_id, meter, plan"
    )
    return {
        (r["customer_id"], r["plan"], r["meter"]): Decimal(r["amount"]).quantize(
            Decimal("0.01"), rounding=ROUND_HALF_UP
        )
        for r in rows
    }


def test_preview_equals_reference_and_the_priced_view(stack: StackSlice) -> None:
    now = time.time_ns() // 1_000_000
    today = datetime.fromtimestamp(now / 1000, UTC)
    first = today.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    nxt = first.replace(year=first.year + (first.month == 12), month=first.month % 12 + 1)
    period = (int(first.timestamp() * 1000), int(nxt.timestamp() * 1000))
    label = f"{first.year:04d}-{first.month:02d}"
    events = _events(now, period[0])
    start = min(e["timestamp"] for e in events)
    change = (start + (now - start) // 2) // MINUTE * MINUTE  # a window boundary

    plans_file = stack.tmp / "plans.yaml"
    plans_file.write_text(PLANS)
    keys = KeyStore(stack.tmp / "state" / "api_keys.json")
    _, operator = keys.create("operator")
    _, c1_key = keys.create("c1 only", "c1")
    stack.produce(events)
    worker = stack.start_worker(
        stack.meters_file(METERS),
        METERSTREAM_PLANS_FILE=str(plans_file),
        METERSTREAM_PRICING_REFRESH_SECONDS="1",
    )
    plans_url = f"{worker.web_url}/v1/customers/{{}}/plans"
    for customer, plan, when in (
        ("c1", "pro", f"{label}-01"),
        ("c2", "basic", f"{label}-01"),
        ("c2", "pro", _iso(change)),
    ):
        answer = request_json(
            plans_url.format(customer), operator, "PUT", {"plan": plan, "from": when}
        )
        assert answer["change"] is not None
    # an unknown plan and a restricted key are refused; nothing changes
    with pytest.raises(urllib.error.HTTPError) as refused:
        request_json(
            plans_url.format("c0"), operator, "PUT", {"plan": "gold", "from": f"{label}-01"}
        )
    assert refused.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as refused:
        request_json(
            plans_url.format("c1"), c1_key, "PUT", {"plan": "basic", "from": f"{label}-02"}
        )
    assert refused.value.code == 403
    assert [p["plan"] for p in request_json(plans_url.format("c2"))["plans"]] == ["basic", "pro"]

    wait_until(
        lambda: worker.sql("SELECT count() AS n FROM usage_events FINAL")[0]["n"] == len(events),
        what="record complete",
    )
    segments = {
        "c0": [("starter", period[0], period[1])],
        "c1": [("pro", period[0], period[1])],
        "c2": [("basic", period[0], change), ("pro", change, period[1])],
    }
    expected = {c: _reference(events, c, s, period) for c, s in segments.items()}
    preview_url = f"{worker.web_url}/v1/customers/{{}}/invoice-preview?period={label}"

    def previews() -> dict[str, Any]:
        return {c: request_json(preview_url.format(c)) for c in segments}

    deadline = time.monotonic() + 30  # the windows settle with the batch that wrote them
    while time.monotonic() < deadline:
        docs = previews()
        if all(_preview_lines(docs[c]) == expected[c][0] for c in segments):
            break
        time.sleep(0.5)
    for customer, (lines, total) in expected.items():
        doc = docs[customer]
        assert _preview_lines(doc) == lines, customer
        assert Decimal(doc["total"]) == Decimal(doc["subtotal"]) == total, customer
        assert doc["total_minor"] == int(total * 100)
        assert doc["currency"] == "usd"
    # per tier: c1's calls show each tier's units, and they add up to the quantity
    calls = next(line for line in docs["c1"]["lines"] if line["meter"] == "calls")
    assert sum(Decimal(t["units"]) for t in calls["tiers"]) == Decimal(calls["quantity"])
    assert calls["tiers"][0]["flat_price"] == "1"

    # a customer-restricted key reads its own customer only
    assert status_of(preview_url.format("c1"), c1_key) == 200
    assert status_of(preview_url.format("c2"), c1_key) == 403
    bad_period = f"{worker.web_url}/v1/customers/c1/invoice-preview?period=2026-13"
    assert status_of(bad_period, operator) == 400

    # ClickHouse priced_usage_daily, summed per customer, meter and plan and rounded once,
    # equals the preview's usage lines
    wanted = {
        (c, plan, meter): amount
        for c, (lines, _) in expected.items()
        for (plan, kind, meter), amount in lines.items()
        if kind == "usage"
    }
    wait_until(lambda: _priced_view(worker, period[0]) == wanted, timeout=60, what="priced view")
    days = worker.sql(
        "SELECT count() AS n, uniqExact(day) AS d FROM priced_usage_daily"
        f" WHERE customer_id = 'c0' AND toUnixTimestamp64Milli(period_start) = {period[0]}"
    )[0]
    c0_days = {
        e["timestamp"] // DAY
        for e in events
        if e["customer_id"] == "c0" and e["event_name"] == "chat"
    }
    assert int(days["n"]) == int(days["d"]) == len(c0_days)

    # `meterstream invoice preview` (through the running worker) answers the same
    state = stack.tmp / "cli-state"
    write_endpoints(state, {"web_url": worker.web_url})
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    cli = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "invoice", "preview", "c2", "--period", label,
         "--format", "json", "--state-dir", str(state)],
        cwd=REPO, env=clean, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert _preview_lines(json.loads(cli.stdout)) == expected["c2"][0]

    # Stripe: `meterstream stripe create-prices pro` creates the plan's products and
    # metered prices; once the forwarder has delivered c1's usage, the emulator's upcoming
    # invoice for c1 on those prices equals c1's preview, line by line and in total.
    env = stack.env(stack.meters_file(METERS), METERSTREAM_PLANS_FILE=str(plans_file))
    create = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "stripe", "create-prices", "pro"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert create.returncode == 0, create.stderr
    assert create.stdout.count("created price") == 4  # base fee + three metered prices
    again = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "stripe", "create-prices", "pro"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout and again.stdout.count("exists  price") == 4
    prices = [line.split()[2] for line in create.stdout.splitlines() if "price" in line]
    client = StripeMeterClient(None, stack.stripe_url, rate_limit_per_second=None)
    c1 = _quantities(events, "c1", *period)

    def stripe_invoice() -> dict[str, Any]:
        return client.invoice_preview(
            {
                "customer": "cus_c1",
                "subscription_details": {"items": [{"price": p} for p in prices]},
            }
        )

    def delivered() -> bool:
        quantities = {
            line["price"]["recurring"]["meter"]: Decimal(line["quantity"])
            for line in stripe_invoice()["lines"]["data"]
            if line["price"]["recurring"]["usage_type"] == "metered"
        }
        return sorted(quantities.values()) == sorted(
            Decimal(int(c1[m])) for m in ("tokens", "calls", "servers")
        )

    try:
        wait_until(delivered, timeout=60, what="c1's usage delivered to the emulator")
    except AssertionError:
        raise AssertionError((stripe_invoice()["lines"]["data"], dict(c1))) from None
    invoice = stripe_invoice()
    by_product = {
        line["price"]["product"]: Decimal(line["amount"]) / 100 for line in invoice["lines"]["data"]
    }
    lines = expected["c1"][0]
    assert by_product == {
        "ms_plan_pro": lines[("pro", "base_fee", "")],
        "ms_meter_tokens": lines[("pro", "usage", "tokens")],
        "ms_meter_calls": lines[("pro", "usage", "calls")],
        "ms_meter_servers": lines[("pro", "usage", "servers")],
    }
    assert Decimal(invoice["total"]) / 100 == expected["c1"][1] == Decimal(docs["c1"]["total"])

    # The customer-plans topic: a schedule produced there is recorded by the worker; a
    # record naming a plan the plans file lacks, or not JSON, is refused.
    async def produce_plans() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all")
        await producer.start()
        try:
            topic = f"{stack.prefix}customer-plans"
            good = {"plans": [{"plan": "basic", "from": f"{label}-03"}]}
            bad = {"plans": [{"plan": "gold", "from": f"{label}-03"}]}
            await producer.send_and_wait(topic, key=b"c9", value=json.dumps(good).encode())
            await producer.send_and_wait(topic, key=b"c8", value=json.dumps(bad).encode())
            await producer.send_and_wait(topic, key=b"c7", value=b"not json")
        finally:
            await producer.stop()

    asyncio.run(produce_plans())
    wait_until(
        lambda: (
            request_json(plans_url.format("c9"))["plans"]
            == [{"plan": "basic", "from": f"{label}-03T00:00:00.000Z"}]
        ),
        what="the topic's schedule recorded",
    )
    assert request_json(plans_url.format("c8"))["plans"] == []
    assert request_json(plans_url.format("c7"))["plans"] == []
    assert "customer-plans topic: record refused" in worker.log()
