"""Poison pills (issue #20, item 3): no event and no combination of events may stop
ingestion for anyone, before or after a restart.

Against the real stack (embedded broker, chdb, a worker process): values out of what
a column or Stripe can hold, spelled several ways, alone and as running totals; good
events after them must be counted exactly, the poison ones dead-lettered
``invalid_value`` naming the meter, and the worker must keep running. Then the worker
is killed and its tables lost (what the embedded broker's restart does), the poison
is sent again and the windows are rebuilt from the record: the totals must not move,
and ``meterstream reconcile`` must find no difference.

The expected totals are computed here, by a fold in arrival order against the
documented ranges (README, "The event"), independent of the pipeline's code.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterstream.meters.config import COLUMN_LIMITS, STRIPE_LIMITS
from tests.faults.test_crash_restart import delete_topic, metric_value, stripe_totals
from tests.harness import REPO, StackSlice, Worker, wait_until
from tests.support.meters import chat, meter_entry, meters_yaml

pytestmark = pytest.mark.integration

HOUR = 3_600_000

TOKENS = meter_entry("tokens", "chat", "sum", "properties.tokens", window="hour")
CALLS = meter_entry("calls", "chat", "count", window="hour")
METERS = meters_yaml(
    TOKENS,
    CALLS,
    meter_entry("peak", "gauge", "max", "properties.v", window="hour"),
    meter_entry("floor_v", "gauge", "min", "properties.v", window="hour"),
    meter_entry("last_v", "gauge", "latest", "properties.v", window="hour"),
)
LIMIT = COLUMN_LIMITS["hour"]  # the documented range of an hour-window meter


def window_start() -> int:
    """The start of the previous hour: closed, inside the horizon, not in the future."""
    now = time.time_ns() // 1_000_000
    return now - now % HOUR - HOUR


def raw_chat(customer: str, key: str, tokens_json: str, ts: int) -> bytes:
    """An event with the number spelled exactly as given (``6E+28``, ``6.0e28``, ...)."""
    return (
        f'{{"event_name":"chat","customer_id":"{customer}","idempotency_key":"{key}",'
        f'"timestamp":{ts},"properties":{{"tokens":{tokens_json}}}}}'
    ).encode()


def send(stack: StackSlice, records: Sequence[tuple[bytes | None, bytes]]) -> None:
    """(key, value) records to usage-events, in order, with a plain aiokafka producer."""
    stack.produce_raw(records, batch=False)


def as_record(event: dict[str, Any] | bytes, customer: str) -> tuple[bytes, bytes]:
    from meterstream.events import canonical_json

    value = event if isinstance(event, bytes) else canonical_json(event).encode()
    return customer.encode(), value


def exact(spelled: str) -> Decimal:
    """The decimal a JSON number or numeric string stands for, exactly."""
    return Decimal(json.loads(spelled, parse_float=Decimal, parse_int=Decimal))


def fold(values: list[Decimal], limit: Decimal) -> tuple[Decimal, list[int]]:
    """Reference: a running sum in arrival order that refuses any value taking it to or
    past ±limit; the total and the indexes refused."""
    total, refused = Decimal(0), []
    for i, v in enumerate(values):
        if abs(total + v) >= limit:
            refused.append(i)
        else:
            total += v
    return total, refused


def windows(worker: Worker) -> dict[tuple[str, str], tuple[Decimal, int]]:
    rows = worker.sql(
        """SELECT meter, customer_id, toString(argMax(value, version)) AS v,
                  toString(argMax(event_count, version)) AS n
           FROM meter_windows GROUP BY meter, customer_id, group_key, window_start"""
    )
    out: dict[tuple[str, str], tuple[Decimal, int]] = {}
    for r in rows:
        key = (r["meter"], r["customer_id"])
        assert key not in out, f"one window per meter and customer expected: {key}"
        out[key] = (Decimal(r["v"]), int(r["n"]))
    return out


def monthly(worker: Worker) -> dict[tuple[str, str], Decimal]:
    rows = worker.sql("SELECT meter, customer_id, toString(value) AS v FROM meter_usage_monthly")
    return {(r["meter"], r["customer_id"]): Decimal(r["v"]) for r in rows}


def rejected(worker: Worker) -> dict[str, list[tuple[str, str]]]:
    """idempotency key -> [(reason, meter)] of rejected_events."""
    out: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r in worker.sql("SELECT idempotency_key, reason, meter FROM rejected_events"):
        out[r["idempotency_key"]].append((r["reason"], r["meter"]))
    return out


def settle(read: Any, expected: Any, what: str, timeout: float = 60) -> None:
    """Wait until ``read()`` equals ``expected``; then assert it (a readable diff)."""
    deadline = time.monotonic() + timeout
    while read() != expected and time.monotonic() < deadline:
        time.sleep(0.3)
    assert read() == expected, what


def record_count(worker: Worker) -> int:
    return int(worker.sql("SELECT count() AS n FROM usage_events FINAL")[0]["n"])


def reconcile(stack: StackSlice, meters_file: Path) -> subprocess.CompletedProcess[str]:
    """`meterstream reconcile` over the last day, with the worker stopped (chdb)."""
    env = stack.env(meters_file)
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 86_400))
    return subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "reconcile", "--from", start],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def lose_tables(stack: StackSlice) -> None:
    """What a restart of the embedded broker does to the worker's tables."""
    for table in ("dedup", "windows"):
        asyncio.run(delete_topic(stack.bootstrap, f"{stack.prefix}meterstream-{table}-changelog"))


class Load:
    """Poison and good events, per customer, with the reference totals."""

    def __init__(self, ts: int) -> None:
        self.ts = ts
        self.records: list[tuple[bytes, bytes]] = []
        self.sums: dict[str, list[Decimal]] = defaultdict(list)  # tokens, arrival order
        self.keys: dict[str, list[str]] = defaultdict(list)
        self.poison_keys: dict[str, str] = {}  # key -> meter expected in the dead letter
        self.gauges: dict[str, list[Decimal]] = defaultdict(list)

    def tokens(self, customer: str, key: str, value: Decimal, spelled: str | None = None) -> None:
        event = (
            raw_chat(customer, key, spelled, self.ts)
            if spelled is not None
            else chat(customer, key, value, self.ts)
        )
        self.records.append(as_record(event, customer))
        self.sums[customer].append(value)
        self.keys[customer].append(key)

    def gauge(self, customer: str, key: str, spelled: str) -> None:
        value = (
            f'{{"event_name":"gauge","customer_id":"{customer}","idempotency_key":"{key}",'
            f'"timestamp":{self.ts},"properties":{{"v":{spelled}}}}}'
        ).encode()
        self.records.append((customer.encode(), value))
        self.gauges[customer].append(exact(spelled))
        if abs(exact(spelled)) >= LIMIT:
            self.poison_keys[key] = "peak/floor_v/last_v"

    def expected(self) -> dict[tuple[str, str], tuple[Decimal, int]]:
        out: dict[tuple[str, str], tuple[Decimal, int]] = {}
        for customer, values in self.sums.items():
            total, refused = fold(values, LIMIT)
            for i in refused:
                self.poison_keys[self.keys[customer][i]] = "tokens"
            out[("tokens", customer)] = (total, len(values) - len(refused))
            out[("calls", customer)] = (Decimal(len(values)), len(values))
        for customer, values in self.gauges.items():
            good = [v for v in values if abs(v) < LIMIT]
            out[("peak", customer)] = (max(good), len(good))
            out[("floor_v", customer)] = (min(good), len(good))
            # every gauge event has the same timestamp: latest is the greatest key's
            out[("last_v", customer)] = (good[-1], len(good))
        return out


def build_load(ts: int) -> Load:
    load = Load(ts)
    # Two well-formed 6e28 on a sum meter (the example), then good events.
    for i, spelled in enumerate(["6e28", "6E+28"]):
        load.tokens("c-two", f"two-{i}", Decimal(spelled), spelled)
    for i in range(5):
        load.tokens("c-two", f"two-good-{i}", Decimal(7 + i))
    # Many values, each within the range, whose sum would leave it. Keys sort in the
    # opposite order to arrival, so a rebuild that re-decided in record order would
    # keep different events than the live fold did.
    step = LIMIT * 4 / 10
    for i, v in enumerate([step, step, step, step, -step / 2, step, Decimal(3)]):
        load.tokens("c-many", f"many-{9 - i}", v)
    # The same, downwards: huge negative values.
    for i, v in enumerate([-step, -step, -step, step / 4, -step, Decimal(-2)]):
        load.tokens("c-neg", f"neg-{9 - i}", v)
    # Spellings of out-of-range values: exponents, numeric strings, long integers.
    spellings = [
        "6.0e28", '"6e28"', "60000000000000000000000000000", '"-6E+28"', "1e38", "-1e37",
        "99999999999999999999999999999.999999999", '"1e23"', "1E+23",
    ]  # fmt: skip
    for i, spelled in enumerate(spellings):
        load.tokens("c-spell", f"spell-{i}", exact(spelled), spelled)
    load.tokens("c-spell", "spell-good", Decimal("0.5"))
    # max / min / latest with extreme values, one good value in the middle.
    for i, spelled in enumerate(["9e28", "-9e28", "5", '"1e29"', "1e30", "-1e24"]):
        load.gauge("c-gauge", f"gauge-{i}", spelled)
    # An invalid event whose customer id is not UTF-8 text (a lone surrogate): its
    # dead letter once made the worker raise.
    load.records.append(
        (b"c-surrogate", b'{"event_name":5,"customer_id":"\\ud800","idempotency_key":"sur"}')
    )
    # Good customers, after all of it.
    for c in range(3):
        for i in range(4):
            load.tokens(f"c-good-{c}", f"good-{c}-{i}", Decimal(f"{c}.{i}5"))
    return load


def test_out_of_range_values_never_stop_the_worker(stack: StackSlice) -> None:
    ts = window_start() + 1_000
    load = build_load(ts)
    expected = load.expected()
    meters_file = stack.meters_file(METERS)
    worker = stack.start_worker(meters_file)
    send(stack, load.records)
    good_events = len(load.records) - 1  # all but the invalid one reach the record
    wait_until(lambda: record_count(worker) == good_events, timeout=120, what="record complete")
    settle(lambda: windows(worker), expected, "windows exact", timeout=60)
    assert worker.proc.poll() is None, worker.log()[-3000:]
    # out-of-range values are data, decided by the range checks: no batch ever raised
    assert metric_value(worker.metrics(), "meterstream_batch_isolations_total") == 0

    dead = rejected(worker)
    for key, meter in load.poison_keys.items():
        reasons = dead.get(key, [])
        assert reasons, f"{key} was not dead-lettered"
        assert all(reason == "invalid_value" for reason, _ in reasons), (key, reasons)
        assert {m for _, m in reasons} <= set(meter.split("/")), (key, reasons)
    assert dead["sur"] == [("invalid_event", "")]
    counted_keys = {k for ks in load.keys.values() for k in ks} - set(load.poison_keys)
    assert not counted_keys & set(dead), "a good event was dead-lettered"
    # the period views sum windows: they hold the same totals, nothing overflowed
    assert monthly(worker) == {k: v for k, (v, _) in expected.items()}

    # Kill it, lose its tables, send the poison and new good events again: the windows
    # are rebuilt from the record, which says what each meter refused.
    worker.stop(signal.SIGKILL)
    lose_tables(stack)
    worker = stack.start_worker(meters_file)
    more = Load(ts)
    for c in range(3):
        more.tokens(f"c-good-{c}", f"late-{c}", Decimal(1))
    more.tokens("c-many", "late-many", Decimal(1))
    more.tokens("c-two", "late-two", Decimal(1))
    send(stack, load.records + more.records)
    after = dict(expected)
    for customer in [f"c-good-{c}" for c in range(3)] + ["c-many", "c-two"]:
        value, n = after[("tokens", customer)]
        after[("tokens", customer)] = (value + 1, n + 1)
        calls, n = after[("calls", customer)]
        after[("calls", customer)] = (calls + 1, n + 1)
    wait_until(
        lambda: record_count(worker) == good_events + len(more.records),
        timeout=120,
        what="record complete after the restart",
    )
    settle(lambda: windows(worker), after, "windows exact after restart", timeout=60)
    assert metric_value(worker.metrics(), "meterstream_windows_recomputed_total") > 0
    assert metric_value(worker.metrics(), "meterstream_batch_isolations_total") == 0
    assert worker.proc.poll() is None, worker.log()[-3000:]
    assert monthly(worker) == {k: v for k, (v, _) in after.items()}
    worker.stop()

    result = reconcile(stack, meters_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 difference(s) found" in result.stderr


STRIPE_METERS = """
meters:
  - name: billed
    event_name: chat
    aggregation: sum
    value: properties.tokens
    group_by: [properties.model]
    window: hour
    stripe:
      {event_name: billed_tokens, interval: 1s, grace: 0s,
       customer_id_from: properties.stripe_customer_id}
"""


def test_stripe_meter_totals_stay_within_int64(stack: StackSlice) -> None:
    """A Stripe meter's period total is billed over all groups: a customer whose groups
    together would leave the range is refused there, though each group alone fits; two
    values that pass Int64 together are refused; Stripe gets exactly the good total."""
    limit = STRIPE_LIMITS["hour"]
    ts = window_start() + 2_000

    def event(customer: str, key: str, model: str, tokens: str) -> tuple[bytes, bytes]:
        value = (
            f'{{"event_name":"chat","customer_id":"{customer}","idempotency_key":"{key}",'
            f'"timestamp":{ts},"properties":{{"model":"{model}","tokens":{tokens},'
            f'"stripe_customer_id":"cus_{customer}"}}}}'
        ).encode()
        return customer.encode(), value

    big = limit * 6 / 10
    records = [
        event("groups", "g-1", "a", str(big)),
        event("groups", "g-2", "b", str(big)),  # each group fits; together they do not
        event("groups", "g-3", "b", "10"),
        event("int64", "i-1", "a", "5e18"),
        event("int64", "i-2", "a", "5E+18"),  # together past Int64
        event("int64", "i-3", "a", '"9223372036854775808"'),
        event("int64", "i-4", "a", "11"),
    ]
    meters_file = stack.meters_file(STRIPE_METERS)
    worker = stack.start_worker(meters_file)
    send(stack, records)
    wait_until(lambda: record_count(worker) == len(records), timeout=120, what="record")
    expected = {("billed_tokens", "cus_groups"): int(big) + 10, ("billed_tokens", "cus_int64"): 11}
    wait_until(
        lambda: stripe_totals(stack.stripe_url) == expected, timeout=120, what="Stripe totals"
    )
    dead = rejected(worker)
    for key in ("g-2", "i-1", "i-2", "i-3"):
        assert dead.get(key) == [("invalid_value", "billed")], (key, dead.get(key))
    assert not {"g-1", "g-3", "i-4"} & set(dead)
    assert "does not fit Stripe's ledger" not in worker.log(), "the forwarder had to hold"
    assert metric_value(worker.metrics(), "meterstream_batch_isolations_total") == 0
    assert worker.proc.poll() is None

    worker.stop(signal.SIGKILL)
    lose_tables(stack)
    worker = stack.start_worker(meters_file)
    send(stack, [*records, event("groups", "g-4", "c", "1")])
    expected[("billed_tokens", "cus_groups")] += 1
    wait_until(
        lambda: stripe_totals(stack.stripe_url) == expected,
        timeout=120,
        what="Stripe totals after the restart",
    )
    assert metric_value(worker.metrics(), "meterstream_batch_isolations_total") == 0
    assert worker.proc.poll() is None
    worker.stop()


ISOLATION_METERS = meters_yaml(TOKENS, CALLS)


def test_a_batch_that_raises_is_isolated_not_a_crash_loop(stack: StackSlice) -> None:
    """A record whose processing raises (injected after its record and meter_windows
    inserts: the worst place) is set aside ``unprocessable`` with the exception text;
    the rest of its batch, in the same window, is counted exactly; the worker never
    exits, not after a kill and a restart with its tables lost either."""
    ts = window_start() + 3_000
    goods = [chat("iso", f"iso-{i:03d}", i, ts) for i in range(120)]
    poison = chat("iso", "poison-1", 1_000_000, ts)
    others = [chat("other", f"other-{i}", 2, ts) for i in range(10)]
    records = [as_record(e, e["customer_id"]) for e in [*goods[:60], poison, *goods[60:], *others]]
    # produced before the worker starts, so that the poison shares a batch with the rest
    send(stack, records)
    meters_file = stack.meters_file(ISOLATION_METERS)
    worker = stack.start_worker(meters_file, METERSTREAM_FAULT_UNPROCESSABLE_KEY="poison-")
    expected = {
        ("tokens", "iso"): (Decimal(sum(range(120))), 120),
        ("calls", "iso"): (Decimal(120), 120),
        ("tokens", "other"): (Decimal(20), 10),
        ("calls", "other"): (Decimal(10), 10),
    }
    settle(lambda: windows(worker), expected, "windows exact", timeout=120)
    wait_until(lambda: "poison-1" in rejected(worker), timeout=30, what="dead letter")
    assert worker.proc.poll() is None, worker.log()[-3000:]
    metrics = worker.metrics()
    assert metric_value(metrics, "meterstream_batch_isolations_total") >= 1, "no isolation"
    assert "isolating the record(s)" in worker.log()
    assert rejected(worker)["poison-1"] == [("unprocessable", "")]
    detail = worker.sql("SELECT detail FROM rejected_events WHERE idempotency_key = 'poison-1'")
    assert "injected fault" in detail[0]["detail"]
    # the record remembers it: counted by no meter
    marks = worker.sql("SELECT refused_meters FROM usage_events WHERE idempotency_key = 'poison-1'")
    assert ["*"] in [r["refused_meters"] for r in marks]
    assert set(rejected(worker)) == {"poison-1"}, "only the poison was set aside"

    # Kill, lose the tables, restart with the fault still armed; the poison comes again
    # and new events land in the same window: nothing crashes, nothing moves.
    worker.stop(signal.SIGKILL)
    lose_tables(stack)
    worker = stack.start_worker(meters_file, METERSTREAM_FAULT_UNPROCESSABLE_KEY="poison-")
    send(stack, [as_record(poison, "iso"), as_record(chat("iso", "iso-late", 5, ts), "iso")])
    expected[("tokens", "iso")] = (Decimal(sum(range(120)) + 5), 121)
    expected[("calls", "iso")] = (Decimal(121), 121)
    settle(lambda: windows(worker), expected, "windows after restart", timeout=120)
    assert worker.proc.poll() is None, worker.log()[-3000:]
    assert ("duplicate", "") in rejected(worker)["poison-1"], "a resend is a duplicate"
    worker.stop()
    result = reconcile(stack, meters_file)
    assert result.returncode == 0, result.stdout + result.stderr
