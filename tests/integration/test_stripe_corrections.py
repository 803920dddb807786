"""Corrections of a period already forwarded, on real components: the forwarder
(verify -> plan -> deliver) over a real ClickHouse, the real ``stripe`` SDK against the
emulator, whose clock follows the test's.

The forwarder runs in this process, not in a worker, because these tests move time: a
month closes, corrections arrive hours and days later, Stripe's 24 hours pass. The test
clock is the wall clock plus an offset, given to the forwarder as ``now_ms`` and to the
emulator as its clock (the ledger's ``sent_at`` stays the wall clock, so every interval
the forwarder judges is the test's). A correction of the record is a row deleted from
(a void) or inserted into (a backfill) ``usage_events``; the forwarder's verification
repairs the stored windows from the record before it forwards, as in production.

Expected values are computed by hand from the events of each test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterstream.api.keys import KeyStore
from meterstream.billing.forwarding import Forwarder
from meterstream.endpoints import write_endpoints
from meterstream.events import UsageEvent
from meterstream.meters.config import MetersConfig, parse_meters
from meterstream.meters.fold import WindowKey
from meterstream.meters.windows import month_bounds, period_label
from meterstream.metrics import Metrics
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.migrate import migrate
from meterstream.sinks.clickhouse.writer import USAGE_EVENTS, USAGE_EVENTS_COLUMNS, usage_event_row
from meterstream.sinks.stripe import ledger
from meterstream.sinks.stripe import uncorrectable as report
from meterstream.sinks.stripe.client import MeterSpec, StripeMeterClient
from meterstream.sinks.stripe.emulator.server import BackgroundEmulator
from meterstream.sinks.stripe.ledger import LedgerRow
from meterstream.sinks.stripe.payloads import build_meter_event, meter_event_identifier
from tests.harness import REPO, StackSlice, Worker, http_json, wait_until
from tests.integration.clickhouse_fixtures import *  # noqa: F403
from tests.support.meters import chat as poison_chat
from tests.support.meters import meter_entry, meters_yaml, stripe

pytestmark = pytest.mark.integration

HOUR = 3_600_000
DAY = 24 * HOUR
CUSTOMER = "cus_acme"  # customer_id_from: customer_id (the id is the Stripe customer's)
# the previous month: closed now, and within Stripe's 35 days for its last hour
PERIOD = period_label(month_bounds(period_label(time.time_ns() // 1_000_000))[0] - 1)
START, END = month_bounds(PERIOD)
STRIPE = "customer_id_from: customer_id, interval: 1s, grace: 0s"


def meters_config() -> MetersConfig:
    meters = [
        ("peak", "max", "c_peak"),
        ("tokens", "sum", "c_tokens"),
        ("calls", "count", "c_calls"),
    ]
    return parse_meters(
        {
            "meters": [
                {
                    "name": name,
                    "event_name": "chat",
                    "aggregation": aggregation,
                    **({} if aggregation == "count" else {"value": "properties.v"}),
                    "window": "hour",
                    "stripe": {
                        "event_name": event_name,
                        "customer_id_from": "customer_id",
                        "interval": "1s",
                        "grace": "0s",
                    },
                }
                for name, aggregation, event_name in meters
            ]
        }
    )


class SimClock:
    """The wall clock plus an offset, set to the instant a test needs."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def ms(self) -> int:
        return int(self.time() * 1000)

    def set(self, ms: int) -> int:
        self.offset = ms / 1000 - time.time()
        return ms


@pytest.fixture
def clock() -> SimClock:
    return SimClock()


@pytest.fixture
def emulator(clock: SimClock) -> Iterator[BackgroundEmulator]:
    with BackgroundEmulator(clock=clock.time) as emu:
        yield emu


class Stack:
    def __init__(self, ch: ClickHouse, emulator: BackgroundEmulator, days: int) -> None:
        migrate(ch)
        self.ch = ch
        self.emulator = emulator
        self.meters = meters_config()
        self.client = StripeMeterClient(None, emulator.url, rate_limit_per_second=None)
        settings = Settings(
            stripe_api_base=emulator.url, stripe_transport="v1", stripe_correction_days=days
        )
        self.forwarder = Forwarder(settings, self.meters, ClickHouseIO(ch, Metrics()), self.client)

    def record(self, *events: tuple[str, int, str]) -> None:
        """(idempotency key, timestamp, value) events of CUSTOMER into the record."""
        rows = [
            usage_event_row(
                UsageEvent("chat", CUSTOMER, key, ts, {"v": Decimal(v)}),
                ts,
                ["peak", "tokens", "calls"],
            )
            for key, ts, v in events
        ]
        self.ch.insert(USAGE_EVENTS, rows, column_names=list(USAGE_EVENTS_COLUMNS))

    def void(self, key: str) -> None:
        self.ch.command(f"DELETE FROM usage_events WHERE idempotency_key = '{key}'")

    def forward(self, meter: str, now_ms: int) -> int:
        return asyncio.run(self.forwarder.forward(self.meters.by_name(meter), now_ms))

    def stripe_value(self, event_name: str) -> Decimal:
        """Stripe's aggregate of the period for CUSTOMER (the invoice's quantity)."""
        meter_id = next(m["id"] for m in self.client.list_meters() if m["event_name"] == event_name)
        summaries = self.client.event_summaries(meter_id, CUSTOMER, START // 1000, END // 1000)
        return sum((s.aggregated_value for s in summaries), Decimal(0))

    def ledger(self, meter: str) -> list[LedgerRow]:
        return ledger.for_period(self.ch, meter, PERIOD)


def test_a_last_meter_corrected_twice_for_a_closed_month_ends_at_the_corrected_value(
    ch: ClickHouse, emulator: BackgroundEmulator, clock: SimClock
) -> None:
    stack = Stack(ch, emulator, days=31)
    stack.record(("k1", END - 3 * HOUR, "10"), ("k2", END - 2 * HOUR, "4"))
    stack.forward("peak", clock.set(END - HOUR))  # the month still open
    assert stack.stripe_value("c_peak") == 10

    stack.void("k1")  # correction 1, after the month ended: the peak is 4
    stack.forward("peak", clock.set(END + 2 * HOUR))
    assert stack.stripe_value("c_peak") == 4
    stack.record(("k3", END - 2 * HOUR + 5, "6"))  # correction 2, a backfill: the peak is 6
    stack.forward("peak", clock.set(END + 3 * HOUR))

    assert stack.stripe_value("c_peak") == 6
    assert emulator.stats()["last_ties"] == 0
    assert emulator.request("GET", "/_emulator/ties")["data"] == []
    events = emulator.events(customer=CUSTOMER, event_name="c_peak")
    assert [e["value"] for e in events] == ["10", "4", "6"]
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(set(stamps)) and all(START // 1000 <= s < END // 1000 for s in stamps)
    assert [(r.value, r.status) for r in stack.ledger("peak")] == [
        (10, "sent"),
        (4, "sent"),
        (6, "sent"),
    ]


def test_a_tie_the_old_stamping_left_is_cancelled_or_past_24_hours_reported(
    ch: ClickHouse, emulator: BackgroundEmulator, clock: SimClock
) -> None:
    stack = Stack(ch, emulator, days=31)
    stack.record(("k1", END - 3 * HOUR, "10"))
    # What the old forwarder did after the month ended: value 10 stamped at the month's
    # last second, its ledger row without a timestamp.
    clock.set(END + HOUR)
    stack.client.ensure_meter(MeterSpec("peak", "c_peak", "last"))
    identifier = meter_event_identifier("peak", CUSTOMER, PERIOD, 1)
    stack.client.send_meter_event(
        build_meter_event("c_peak", identifier, CUSTOMER, 10, END // 1000 - 1)
    )
    old = LedgerRow(identifier, "peak", CUSTOMER, CUSTOMER, PERIOD, 10, Decimal(10), "pending")
    ledger.write(ch, [old.with_status("sent", at_ms=clock.ms())])

    stack.void("k1")
    stack.record(("k2", END - 2 * HOUR, "3"))
    stack.forward("peak", clock.set(END + 5 * HOUR))  # a correction: 3, within 24 hours
    assert stack.stripe_value("c_peak") == 3  # the old event cancelled: no tie
    assert emulator.stats()["last_ties"] == 0 and emulator.stats()["cancelled"] == 1
    assert [(r.value, r.status) for r in stack.ledger("peak")] == [(10, "cancelled"), (3, "sent")]

    # A second customer in the same state, corrected only after Stripe's 24 hours: the
    # tie stays at Stripe, and is reported with the value that should win.
    other = LedgerRow(
        meter_event_identifier("peak", "cus_late", PERIOD, 1),
        "peak",
        "cus_late",
        "cus_late",
        PERIOD,
        9,
        Decimal(9),
        "pending",
    )
    clock.set(END + 6 * HOUR)
    stack.client.send_meter_event(
        build_meter_event("c_peak", other.identifier, "cus_late", 9, END // 1000 - 1)
    )
    ledger.write(ch, [other.with_status("sent", at_ms=clock.ms())])
    late = UsageEvent("chat", "cus_late", "l1", END - 2 * HOUR, {"v": Decimal(2)})
    ch.insert(
        USAGE_EVENTS,
        [usage_event_row(late, END, ["peak", "tokens", "calls"])],
        column_names=list(USAGE_EVENTS_COLUMNS),
    )
    stack.forward("peak", clock.set(END + 31 * HOUR))
    rows = report.current(ch, PERIOD, "peak")
    assert [(r["customer_id"], r["reason"], r["expected"], r["stripe_value"]) for r in rows] == [
        ("cus_late", "tie", 2, None)
    ]


def test_a_sum_whose_forwarded_window_goes_down_ends_at_the_corrected_total(
    ch: ClickHouse, emulator: BackgroundEmulator, clock: SimClock
) -> None:
    stack = Stack(ch, emulator, days=31)
    stack.record(("k1", END - 3 * HOUR, "10"), ("k2", END - 2 * HOUR, "5.4"))
    for meter in ("tokens", "calls", "peak"):
        stack.forward(meter, clock.set(END - HOUR))
    assert [stack.stripe_value(m) for m in ("c_tokens", "c_calls", "c_peak")] == [15, 2, 10]

    stack.void("k1")  # the window of k1 goes from 10 to 0, after the month ended
    for meter in ("tokens", "calls", "peak"):
        stack.forward(meter, clock.set(END + 2 * HOUR))
    assert [stack.stripe_value(m) for m in ("c_tokens", "c_calls", "c_peak")] == [5, 1, 5]
    assert [r.value for r in stack.ledger("tokens")] == [15, -10]
    assert [r.value for r in stack.ledger("calls")] == [2, -1]
    assert report.current(ch) == []

    # Every event of the customer voided: no total any more, Stripe's goes to 0.
    stack.void("k2")
    for meter in ("tokens", "calls", "peak"):
        stack.forward(meter, clock.set(END + 3 * HOUR))
    assert [stack.stripe_value(m) for m in ("c_tokens", "c_calls", "c_peak")] == [0, 0, 0]
    assert [r.value for r in stack.ledger("tokens")] == [15, -10, -5]
    assert [r.value for r in stack.ledger("peak")] == [10, 5, 0]


def test_a_period_past_the_correction_horizon_lands_in_the_report(
    ch: ClickHouse, emulator: BackgroundEmulator, clock: SimClock
) -> None:
    stack = Stack(ch, emulator, days=3)
    stack.forwarder.verifier.track_changes()
    stack.record(("k1", END - 3 * HOUR, "10"), ("k2", END - 2 * HOUR, "5.4"))
    stack.forward("tokens", clock.set(END - HOUR))
    assert stack.stripe_value("c_tokens") == 15

    # Four days after the month: a void of k1 reaches a period Stripe has invoiced.
    stack.void("k1")
    window = WindowKey("tokens", CUSTOMER, "{}", END - 3 * HOUR)
    stack.forwarder.verifier.windows_changed([window])  # as the worker tells a recompute
    stack.forward("tokens", clock.set(END + 4 * DAY))
    assert stack.stripe_value("c_tokens") == 15  # nothing was sent for it
    assert [r.value for r in stack.ledger("tokens")] == [15]
    (row,) = report.current(ch, PERIOD)
    assert (row["meter"], row["customer_id"], row["period"], row["reason"]) == (
        "tokens",
        CUSTOMER,
        PERIOD,
        "past_correction_horizon",
    )
    assert (row["stripe_value"], row["expected"], row["difference"], row["to_credit"]) == (
        15,
        5,
        -10,
        10,
    )
    assert Decimal(row["exact_total"]) == Decimal("5.4")
    # told again, found the same: recorded once
    stack.forwarder.verifier.windows_changed([window])
    stack.forward("tokens", clock.set(END + 4 * DAY + HOUR))
    versions = ch.query_rows("SELECT count() FROM stripe_uncorrectable WHERE meter = 'tokens'")
    assert versions[0][0] == 1

    # The same by an explicit check (the CLI's --check), which checks every meter: the
    # two this test never forwarded are reported as under-billed (nothing to credit).
    found = asyncio.run(stack.forwarder.check_past_periods(PERIOD, END + 4 * DAY))
    assert sorted((u.meter, u.stripe, u.expected, u.to_credit) for u in found) == [
        ("calls", 0, 1, 0),
        ("peak", 0, 5, 0),
        ("tokens", 15, 5, 10),
    ]
    # A backfill puts the tokens right again: resolved, no longer listed.
    stack.record(("k1b", END - 3 * HOUR, "10"))
    found = asyncio.run(stack.forwarder.check_past_periods(PERIOD, END + 4 * DAY))
    assert "tokens" not in {u.meter for u in found}
    assert report.current(ch, PERIOD, "tokens") == []


# ------------------------------------------------------------------ on a real worker

WORKER_DAY_S = 86_400


def worker_meters(stack: StackSlice, name: str, aggregation: str, event_name: str) -> Path:
    return stack.meters_file(
        meters_yaml(
            meter_entry(
                name,
                "chat",
                aggregation,
                "properties.v",
                window="hour",
                stripe=stripe(event_name, STRIPE),
            )
        )
    )


# The previous month, still corrected (31 days) and its events still deduplicated.
LATE_ENV = {
    "METERSTREAM_STRIPE_CORRECTION_DAYS": "31",
    "METERSTREAM_DEDUP_HORIZON_SECONDS": str(40 * WORKER_DAY_S),
    "METERSTREAM_STRIPE_TRANSPORT": "v1",
}


def chat(key: str, ts: int, value: str) -> dict[str, Any]:
    return poison_chat(CUSTOMER, key, value, ts) | {"properties": {"v": value}}


def worker_ledger(worker: Worker, meter: str) -> list[tuple[int, str]]:
    rows = worker.sql(
        f"""SELECT identifier, argMax(value, version) AS value, argMax(status, version) AS status,
                  argMax(timestamp_s, version) AS ts
           FROM stripe_meter_events WHERE meter = '{meter}' GROUP BY identifier ORDER BY ts"""
    )
    return [(int(r["value"]), str(r["status"])) for r in rows]


def period_value(stack: StackSlice, event_name: str) -> Decimal:
    client = StripeMeterClient(None, stack.stripe_url, rate_limit_per_second=None)
    meter = next((m for m in client.list_meters() if m["event_name"] == event_name), None)
    if meter is None:
        return Decimal(0)
    summaries = client.event_summaries(meter["id"], CUSTOMER, START // 1000, END // 1000)
    return sum((s.aggregated_value for s in summaries), Decimal(0))


def test_worker_a_last_meter_corrected_twice_after_its_month_has_no_tie(stack: StackSlice) -> None:
    worker = stack.start_worker(worker_meters(stack, "peak", "max", "w_peak"), **LATE_ENV)
    # The previous month has ended: every send for it is a correction of a closed month.
    for i, (offset, value, sends) in enumerate([(3, "10", 1), (2, "20", 2), (1, "30", 3)]):
        stack.produce([chat(f"k{i}", END - offset * HOUR, value)])
        wait_until(
            lambda n=sends: [s for _, s in worker_ledger(worker, "peak")] == ["sent"] * n,
            timeout=60,
            what=f"{sends} send(s) of the peak",
        )
    assert period_value(stack, "w_peak") == 30
    stats = http_json(f"{stack.stripe_url}/_emulator/stats")  # (ties are found by summaries)
    assert stats["last_ties"] == 0 and stats["rejected_other"] == 0
    assert [v for v, _ in worker_ledger(worker, "peak")] == [10, 20, 30]  # by timestamp
    stamps = [e["timestamp"] for e in http_json(f"{stack.stripe_url}/_emulator/events")["data"]]
    assert len(stamps) == 3 and stamps == sorted(set(stamps))
    assert all(START // 1000 <= s < END // 1000 for s in stamps)


def operator_key(stack: StackSlice) -> str:
    return KeyStore(stack.tmp / "state" / "api_keys.json").create("operator")[1]


def void(worker: Worker, key: str, token: str) -> dict[str, Any]:
    body = {
        "kind": "void",
        "keys": [{"customer_id": CUSTOMER, "idempotency_key": key}],
        "author": "ops@example.com",
        "reason": "a bug doubled this event",
    }
    request = urllib.request.Request(
        f"{worker.web_url}/v1/corrections",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return dict(json.loads(response.read()))


def test_worker_a_voided_sum_window_ends_at_the_corrected_total(stack: StackSlice) -> None:
    token = operator_key(stack)
    worker = stack.start_worker(worker_meters(stack, "tokens", "sum", "w_tokens"), **LATE_ENV)
    stack.produce([chat("k1", END - 3 * HOUR, "10"), chat("k2", END - 2 * HOUR, "5.4")])
    wait_until(lambda: period_value(stack, "w_tokens") == 15, timeout=60, what="Stripe's 15")

    assert void(worker, "k1", token)["events_affected"] == 1  # after the month ended
    wait_until(lambda: period_value(stack, "w_tokens") == 5, timeout=60, what="Stripe's 5")
    assert worker_ledger(worker, "tokens") == [(15, "sent"), (-10, "sent")]
    assert worker.sql("SELECT count() AS n FROM stripe_uncorrectable")[0]["n"] in (0, "0")


def test_worker_a_void_past_the_correction_horizon_is_reported_with_the_credit(
    stack: StackSlice,
) -> None:
    token = operator_key(stack)
    meters_file = worker_meters(stack, "tokens", "sum", "w_tokens")
    worker = stack.start_worker(meters_file, **LATE_ENV)
    stack.produce([chat("k1", END - 3 * HOUR, "10"), chat("k2", END - 2 * HOUR, "5.4")])
    wait_until(lambda: period_value(stack, "w_tokens") == 15, timeout=60, what="Stripe's 15")
    worker.stop()

    # The same worker, its horizon now behind the month (the invoice is final): a void.
    worker = stack.start_worker(
        meters_file, **{**LATE_ENV, "METERSTREAM_STRIPE_CORRECTION_DAYS": "0"}
    )
    assert void(worker, "k1", token)["events_affected"] == 1

    def reported() -> list[dict[str, Any]]:
        return worker.sql(
            "SELECT customer_id, period, argMax(stripe_value, version) AS stripe,"
            " argMax(expected, version) AS expected, argMax(to_credit, version) AS credit,"
            " argMax(reason, version) AS reason FROM stripe_uncorrectable"
            " GROUP BY customer_id, period"
        )

    wait_until(reported, timeout=120, what="the void reported")
    (row,) = reported()
    assert (row["customer_id"], row["period"], row["reason"]) == (
        CUSTOMER,
        PERIOD,
        "past_correction_horizon",
    )
    assert [int(row[k]) for k in ("stripe", "expected", "credit")] == [15, 5, 10]
    assert period_value(stack, "w_tokens") == 15  # nothing sent for an invoiced month
    assert worker_ledger(worker, "tokens") == [(15, "sent")]

    # The command shows it (through the worker, which holds ClickHouse).
    write_endpoints(stack.tmp / "state", {"web_url": worker.web_url})
    result = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "stripe", "corrections", "--period", PERIOD],
        cwd=REPO,
        env=stack.env(meters_file),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{PERIOD} tokens customer={CUSTOMER}" in result.stdout
    assert "Stripe bills 15, meterstream 5" in result.stdout and "credit 10" in result.stdout
    assert "10 unit(s) to credit" in result.stderr
