"""``meterstream run --demo``: produce the demo load, show live totals, check the end result."""

from __future__ import annotations

import asyncio
import sys
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaProducer

from pipeline.demo import DemoLoad
from pipeline.meters import MetersConfig
from pipeline.query import format_table
from pipeline.run import TOTALS_SQL, map_demo_customers, period_totals, sql_rows, stripe_totals
from sinks.stripe.payloads import Rounding, period_value
from topics import USAGE_EVENTS

if TYPE_CHECKING:
    from pipeline.run import Stack

HISTORY_EVENTS = 2000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _to_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def live_table(stack: Stack, meters: MetersConfig, produced: int) -> str:
    web = stack.endpoints["web_url"]
    totals = period_totals(sql_rows(web, TOTALS_SQL.format(where="")))
    stripe = stripe_totals(stack.endpoints["stripe_api_base"], meters)
    rows = [
        [meter, customer, value, stripe.get((meter, customer), "")]
        for (meter, customer), value in sorted(totals.items())
    ]
    return f"events produced: {produced}\n" + format_table(
        ["meter", "customer", "total (ClickHouse)", "sent to Stripe"], rows
    )


async def run_demo(stack: Stack, meters: MetersConfig, duration: float | None, rate: float) -> int:
    load = DemoLoad()
    await _to_thread(map_demo_customers, stack.settings)  # who pays: the operator's mapping
    topic = stack.settings.topic(USAGE_EVENTS.name)
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.endpoints["kafka_bootstrap"], acks="all", linger_ms=5
    )
    await producer.start()
    tty = sys.stdout.isatty()
    started = time.monotonic()
    try:
        for value in load.next_batch(HISTORY_EVENTS, _now_ms(), live=False):
            await producer.send(topic, key=_key(value), value=value)
        await producer.flush()
        next_show = 0.0
        while duration is None or time.monotonic() - started < duration:
            assert stack.worker is not None
            if stack.worker.poll() is not None:
                print("the worker stopped:\n" + stack.log_tail("worker.log"), file=sys.stderr)
                return 1
            for value in load.next_batch(max(1, int(rate / 5)), _now_ms()):
                await producer.send(topic, key=_key(value), value=value)
            await asyncio.sleep(0.2)
            if time.monotonic() >= next_show:
                next_show = time.monotonic() + 2
                try:
                    table = await _to_thread(live_table, stack, meters, load.produced)
                except OSError as exc:
                    table = f"(totals not available yet: {exc})"
                print(("\x1b[2J\x1b[H" if tty else "\n") + table, flush=True)
        await producer.flush()
    except (KeyboardInterrupt, asyncio.CancelledError):
        # Ctrl-C: stop now. The record and the windows stay exact (offsets are
        # committed only after ClickHouse has the rows); the summary is for --duration.
        print("\ninterrupted: stopping without the final summary", flush=True)
        return 130
    finally:
        await producer.stop()
    return await summary(stack, meters, load)


def _key(value: bytes) -> bytes:
    import orjson

    try:
        return str(orjson.loads(value).get("customer_id", "")).encode()
    except (ValueError, AttributeError):
        return b""


async def summary(stack: Stack, meters: MetersConfig, load: DemoLoad) -> int:
    web = stack.endpoints["web_url"]
    unique = len(load.sent)
    deadline = time.monotonic() + 120
    recorded = 0
    while time.monotonic() < deadline:
        rows = await _to_thread(sql_rows, web, "SELECT count() AS n FROM usage_events FINAL")
        recorded = int(rows[0]["n"])
        if recorded >= unique:
            break
        await asyncio.sleep(1)
    # Let the forwarder run once more over what just closed.
    interval = min((m.stripe.interval_seconds for m in meters.meters if m.stripe), default=0)
    await asyncio.sleep(interval + 2 if interval else 0)
    expected = load.expected()
    totals = period_totals(await _to_thread(sql_rows, web, TOTALS_SQL.format(where="")))
    grace = max((m.stripe.grace_seconds for m in meters.meters if m.stripe), default=0)
    cutoff = (_now_ms() - grace * 1000 - interval * 1000) / 1000
    closed_sql = TOTALS_SQL.format(where=f"WHERE toUnixTimestamp(window_end) <= {int(cutoff)}")
    closed = period_totals(await _to_thread(sql_rows, web, closed_sql))
    stripe = await _to_thread(stripe_totals, stack.endpoints["stripe_api_base"], meters)
    rows = []
    ok = recorded == unique
    for meter in meters.meters:
        for customer in sorted(
            {c for (m, c) in totals if m == meter.name} | set(expected.get(meter.name, {}))
        ):
            want = expected.get(meter.name, {}).get(customer)
            have = totals.get((meter.name, customer), Decimal(0))
            match = want is None or want == have
            ok &= match
            sent = stripe.get((meter.name, customer), Decimal(0))
            rows.append(
                [
                    meter.name,
                    customer,
                    "" if want is None else want,
                    have,
                    "yes" if match else "NO",
                    closed.get((meter.name, customer), "") if meter.stripe else "",
                    sent if meter.stripe else "",
                ]
            )
    print("\nfinal summary")
    print(
        f"events produced {load.produced}: unique valid {unique}, retries {load.duplicates}, "
        f"conflicting copies {load.conflicts}, invalid {load.invalid}; in ClickHouse: {recorded}"
    )
    print(
        format_table(
            ["meter", "customer", "expected", "ClickHouse", "match", "closed windows", "Stripe"],
            rows,
        )
    )
    stripe_ok = all(
        stripe.get(k, Decimal(0)) == period_value(v, Rounding.CARRY) or not v
        for k, v in closed.items()
        if meters.by_name(k[0]).stripe
    )
    print(
        "\nClickHouse equals the generator's totals: "
        + ("yes" if ok else "NO")
        + "\nStripe equals the closed windows (rounded): "
        + ("yes" if stripe_ok else "not yet: a window closed after the last forward")
    )
    return 0 if ok else 1
