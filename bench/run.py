"""The benchmark (issue 7): the pipeline against this machine's physical limit.

``python -m bench.run [--events N] [--customers N] [--quick] [--soak SECONDS]``

One embedded broker, one fresh topic prefix, one load produced once; then, in
order, on that same topic:

a. raw aiokafka consume (``getmany`` + orjson decode): the physical limit;
   the bare-Faust ceiling: a subprocess with the pipeline's own faust.App
   arguments whose agent only reads and decodes in batches (``take_batches``);
b. the pipeline: a real worker (``python -m meterstream.cli worker``) with a plans
   file and credit grants for a sample of customers (so the credit burn runs), from its
   first consumed batch to the last window visible in ClickHouse; then the
   self-check (ClickHouse totals == the generator's totals, per meter and
   customer) - a mismatch exits 1 without ratio lines;
c. latency at a fixed produce rate of half the pipeline's measured rate: event to
   record, and event to the first credit balance that includes it (issue 25, <= 2 s);
d. Stripe requests (emulator stats); e. the worker's peak RSS;
optionally a soak at half load sampling RSS every 10 s.

Prints a table, writes bench/results.json; the last two lines are
``pipeline/raw ratio: X.XXX`` and ``pipeline/faust ratio: X.XXX``.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from bench.credit_latency import (
    PRICED_METER,
    SAMPLE,
    UNIT_PRICE,
    BalanceWatch,
    Credits,
    balance_latencies,
    wait_all_included,
)
from bench.load import HOUR_MS, METERS, EventMaker, Load, closed_end_ms, customer_ids, generate
from bench.stack import REPO, BenchError, StackEnv, Worker, wait_until
from meterstream.cli.progress import progress
from meterstream.embedded.processes import stop_process
from meterstream.settings import Settings
from meterstream.sinks.stripe.emulator.server import BackgroundEmulator
from meterstream.topics.admin import ensure_topics

HERE = Path(__file__).resolve().parent
DEFAULT_EVENTS = 300_000
QUICK_EVENTS = 30_000
STRIPE_METERS = ("ai_tokens", "api_requests", "peak_servers")  # as in bench/meters.yaml
STRIPE_INTERVAL_S = 30
BALANCE_TARGET_S = 2.0  # issue 25 item 3: p99 event -> updated balance at half load
# How often (b) reads the worker's /metrics. Serving it is work for the worker's main
# thread (1.9% of its samples at 10 reads a second, py-spy) that the bare agent is not
# asked to do; the end of (b) is the worker's own meterstream_last_batch_seconds, so a
# slower poll does not blur it.
POLL_SECONDS = 1.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- Kafka


async def produce_all(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    """Send every record (batched producer); returns records/s."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024, acks=1
    )
    await producer.start()
    try:
        started = time.perf_counter()
        pending = []
        for key, value in records:
            pending.append(await producer.send(topic, key=key, value=value))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        await producer.flush()
        return len(records) / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def raw_consume(bootstrap: str, topic: str, partitions: int, expected: int) -> dict[str, Any]:
    """aiokafka getmany + orjson.loads of every value, no group: the physical limit."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        await consumer.seek_to_beginning()
        n, first, last = 0, 0.0, 0.0
        deadline = time.monotonic() + 120
        loads = orjson.loads
        while n < expected:
            if time.monotonic() > deadline:
                raise BenchError(f"raw consume read {n} of {expected} records in 120 s")
            asked = time.perf_counter()
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if batches and not first:
                first = asked  # the wait for the first data counts
            for messages in batches.values():
                for message in messages:
                    loads(message.value)
                n += len(messages)
            last = time.perf_counter()
        return {"records": n, "seconds": last - first, "rate": n / (last - first)}
    finally:
        await consumer.stop()


async def produce_at_rate(
    bootstrap: str,
    topic: str,
    rate: float,
    seconds: float,
    tag: str,
    customers: list[str],
    sent: dict[str, int] | None = None,
    payloads: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Live events (timestamp = send time, key ``tag + seq``) at a fixed rate; ``sent``
    gets each key's timestamp, ``payloads`` its value."""
    from aiokafka import AIOKafkaProducer

    maker = EventMaker(random.Random(tag), customers, None)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
    await producer.start()
    try:
        started = time.perf_counter()
        i = 0
        while (elapsed := time.perf_counter() - started) < seconds:
            target = int(rate * elapsed)
            while i < target:
                key = f"{tag}{i:09d}"
                ts = time.time_ns() // 1_000_000
                k, v = maker.make(key, ts)
                if sent is not None:
                    sent[key] = ts
                if payloads is not None:
                    payloads[key] = v
                await producer.send(topic, key=k, value=v)
                i += 1
            await asyncio.sleep(0.005)
        await producer.flush()
        return {"records": i, "rate": i / (time.perf_counter() - started)}
    finally:
        await producer.stop()


# ----------------------------------------------------------------------------- phases


def run_bare_faust(
    stack: StackEnv, expected: int, name: str = "bare-faust", **extra_env: str
) -> dict[str, Any]:
    result = stack.tmp / f"{name}-result.json"
    log_path = stack.tmp / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_faust", str(result), str(expected)],
        cwd=REPO,
        env=stack.worker_env(name, **extra_env),
        stdout=open(log_path, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:

        def finished() -> bool:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise BenchError(f"bare Faust agent exited {proc.returncode}:\n{tail}")
            return result.exists()

        wait_until(finished, timeout=300, what="bare Faust agent to read every record")
    finally:
        stop_process(proc, signal.SIGTERM, 30)
    data = json.loads(result.read_text())
    seconds = data["last_batch_at"] - data["first_batch_at"]
    data.update(seconds=seconds, rate=data["records"] / seconds)
    data["cpu_us_per_record"] = 1e6 * data["cpu_seconds"] / data["records"]
    return data


class Spy:
    """py-spy record on a pid until stopped (SIGINT makes it write the profile)."""

    def __init__(self, pid: int, out: Path) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise BenchError("--profile needs py-spy (.venv/bin/pip install py-spy)")
        fmt = "flamegraph" if out.suffix == ".svg" else "raw"
        self.out = out
        self.proc = subprocess.Popen(
            [
                *(exe, "record", "--pid", str(pid), "--threads", "-r", "100"),
                "-f",
                fmt,
                "-o",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(out.with_suffix(out.suffix + ".log"), "wb"),  # noqa: SIM115
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_pipeline(worker: Worker, load: Load, profile: Path | None) -> dict[str, Any]:
    """Wait until the worker has processed every record; events/s first batch -> last window."""
    healthy_at = time.time()
    spy = Spy(worker.proc.pid, profile) if profile else None
    first_done = done = cpu_first = cpu_done = 0.0
    last_n, last_change = -1.0, time.monotonic()
    rss_peak_seen = 0
    shown = 0.0
    try:
        with progress("pipeline: events processed", load.events) as advance:
            while True:
                worker.alive()
                totals = worker.metric_totals()
                n = totals.get("meterstream_events_in_total", 0.0)
                advance(n - shown)
                shown = n
                now = time.time()
                if n and not first_done:
                    first_done, cpu_first = now, process_cpu_seconds(worker.proc.pid)
                if n >= load.events:
                    # the end of the batch that completed the count, from the worker
                    # (``now`` is up to a poll period later)
                    done = totals.get("meterstream_last_batch_seconds") or now
                    cpu_done = process_cpu_seconds(worker.proc.pid)
                    break
                if n != last_n:
                    last_n, last_change = n, time.monotonic()
                elif time.monotonic() - last_change > 180:
                    raise BenchError(f"pipeline stuck at {n:.0f} of {load.events} records")
                rss_peak_seen = max(rss_peak_seen, worker.memory_kb().get("VmRSS", 0))
                time.sleep(POLL_SECONDS)
    finally:
        if spy:
            spy.stop()
    first_ms = worker.sql("SELECT toUnixTimestamp64Milli(min(ingested_at)) AS t FROM usage_events")[
        0
    ]["t"]
    first = int(first_ms) / 1000
    # ingested_at is the batch's receive time (pipeline/worker/batch.py); if that ever
    # changes meaning, fall back to the first completed batch (an underestimate
    # of the span, so an overestimate of the rate: flagged in the results).
    source = "min(usage_events.ingested_at) = first batch received"
    if not healthy_at - 30 <= first <= done:
        first, source = first_done, "first batch completed (/metrics), fallback"
    metrics = worker.metric_totals()
    return {
        "records": load.events,
        "seconds": done - first,
        "rate": load.events / (done - first),
        "first_consumed_source": source,
        # every thread of the worker, chdb's included, from the first batch counted
        "cpu_seconds": cpu_done - cpu_first,
        "cpu_us_per_record": 1e6 * (cpu_done - cpu_first) / load.events,
        "worker_metrics": {k: v for k, v in metrics.items() if k.startswith("meterstream_")},
    }


CHECK_SQL = """
SELECT meter, customer_id,
       toString(sum(v)) AS sum_v, toString(max(v)) AS max_v, toString(min(v)) AS min_v,
       length(groupUniqArrayArray(dv)) AS uniq_v, toString(argMax(v, (lts, lk))) AS latest_v,
       sum(c) AS n
FROM (
    SELECT meter, customer_id, group_key, window_start,
           argMax(value, version) AS v, argMax(event_count, version) AS c,
           argMax(distinct_values, version) AS dv, argMax(latest_ts, version) AS lts,
           argMax(latest_key, version) AS lk
    FROM meter_windows
    GROUP BY meter, customer_id, group_key, window_start
)
GROUP BY meter, customer_id
"""
COLUMN = {
    "sum": "sum_v",
    "count": "sum_v",
    "max": "max_v",
    "min": "min_v",
    "unique_count": "uniq_v",
    "latest": "latest_v",
}


def self_check(worker: Worker, load: Load) -> dict[str, Any]:
    """ClickHouse totals == the generator's totals for every meter and customer."""
    got = {(r["meter"], r["customer_id"]): r for r in worker.sql(CHECK_SQL)}
    problems: list[str] = []
    compared = 0
    for meter, per_customer in load.expected.totals().items():
        column = COLUMN[METERS[meter]]
        for customer, (value, count) in sorted(per_customer.items()):
            row = got.pop((meter, customer), None)
            compared += 1
            if row is None:
                problems.append(f"{meter}/{customer}: missing (expected {value}, {count} events)")
                continue
            actual, n = Decimal(str(row[column])), int(row["n"])
            if actual != value or n != count:
                problems.append(
                    f"{meter}/{customer}: got {actual} ({n} events), expected {value} ({count})"
                )
    problems += [f"{m}/{c}: unexpected window row {r}" for (m, c), r in sorted(got.items())]
    unique = int(
        worker.sql(
            "SELECT count() AS n FROM (SELECT 1 FROM usage_events GROUP BY customer_id,"
            " idempotency_key)"
        )[0]["n"]
    )
    if unique != load.unique:
        problems.append(f"usage_events holds {unique} distinct events, expected {load.unique}")
    dups = worker.metric_totals().get("meterstream_events_duplicate_total", 0.0)
    if int(dups) != load.duplicates:
        problems.append(f"worker counted {dups:.0f} duplicates, generator sent {load.duplicates}")
    if problems:
        raise BenchError(
            f"SELF-CHECK FAILED: {len(problems)} of {compared} meter/customer totals "
            "(and counts) differ from the generator's:\n  " + "\n  ".join(problems[:30])
        )
    return {
        "meter_customer_totals": compared,
        "distinct_events": unique,
        "duplicates": load.duplicates,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def measure_latency(
    worker: Worker,
    stack: StackEnv,
    rate: float,
    seconds: float,
    customers: list[str],
    credits: Credits | None = None,
) -> dict[str, Any]:
    """Events stamped with their send time; a poller sees them appear in usage_events.

    visible latency = the time the poll that first returned the event came back
    minus its timestamp (an upper bound: poll period 0.1 s plus the query);
    pickup latency = ClickHouse ingested_at (the batch's receive time) minus its
    timestamp (a lower bound: before the batch was processed);
    with ``credits``, balance latency = the time the first balance that includes a
    priced event of a sampled customer was read off the ``entitlements`` topic minus
    its timestamp (bench/credit_latency.py).
    """
    tag = f"lat{uuid.uuid4().hex[:6]}-"
    sent: dict[str, int] = {}
    seen: dict[str, tuple[float, int]] = {}
    stop = threading.Event()
    poll_errors: list[str] = []
    started_ms = time.time_ns() // 1_000_000

    def poll() -> None:
        cursor = started_ms - 1000
        while not stop.is_set():
            t0 = time.time()
            try:
                rows = worker.sql(
                    "SELECT idempotency_key AS k, toUnixTimestamp64Milli(ingested_at) AS i"
                    " FROM usage_events"
                    f" WHERE ingested_at >= fromUnixTimestamp64Milli(toInt64({cursor}), 'UTC')"
                    f" AND startsWith(idempotency_key, '{tag}')"
                )
            except Exception as exc:  # reported with the result
                poll_errors.append(repr(exc))
                time.sleep(0.5)
                continue
            back_ms = time.time() * 1000
            for row in rows:
                if row["k"] not in seen:
                    seen[row["k"]] = (back_ms, int(row["i"]))
                    cursor = max(cursor, int(row["i"]))
            time.sleep(max(0.0, 0.1 - (time.time() - t0)))

    payloads: dict[str, bytes] = {}
    watch: BalanceWatch | None = None
    start_balances: dict[str, Decimal] = {}
    if credits is not None:
        watch = BalanceWatch(
            stack.bootstrap, f"{stack.prefix}entitlements", stack.partitions, set(credits.sample)
        )
        watch.start()  # at the topic's end, before the balances are read
        start_balances = credits.balances(worker.web_url)
    poller = threading.Thread(target=poll, name="latency-poll", daemon=True)
    poller.start()
    try:
        produced = asyncio.run(
            produce_at_rate(
                stack.bootstrap, stack.topic, rate, seconds, tag, customers, sent, payloads
            )
        )
        deadline = time.monotonic() + 60
        while len(seen) < len(sent) and time.monotonic() < deadline:
            worker.alive()
            time.sleep(0.2)
        if watch is not None:
            wait_all_included(sent, payloads, start_balances, watch, timeout=60)
    finally:
        stop.set()
        poller.join(10)
        if watch is not None:
            watch.stop()
    missing = len(sent) - len(seen)
    if missing:
        raise BenchError(f"{missing} of {len(sent)} latency events never reached ClickHouse")
    balance: dict[str, Any] = {}
    if watch is not None:
        waits, unmatched, problems = balance_latencies(
            sent, payloads, start_balances, watch.snapshot()
        )
        if unmatched or problems or watch.errors:
            raise BenchError(
                f"credit balances: {unmatched} priced event(s) of the sampled customers never "
                f"in a balance on the entitlements topic; {problems[:10]}; {watch.errors[:3]}"
            )
        balance = {
            "balance_customers": len(start_balances),
            "balance_events": len(waits),
            "balance_p50_s": percentile(waits, 0.50),
            "balance_p99_s": percentile(waits, 0.99),
            "balance_max_s": max(waits, default=float("nan")),
            # how far into a burn tick (woken by the batch that marks the customer) each
            # sampled balance was read
            "balance_into_tick_p50_s": percentile(watch.into_tick, 0.50),
            "balance_into_tick_p99_s": percentile(watch.into_tick, 0.99),
        }
    visible = [(seen[k][0] - ts) / 1000 for k, ts in sent.items()]
    pickup = [(seen[k][1] - ts) / 1000 for k, ts in sent.items()]
    return {
        "target_rate": rate,
        "produced": produced,
        "events": len(sent),
        "visible_p50_s": percentile(visible, 0.50),
        "visible_p99_s": percentile(visible, 0.99),
        "visible_max_s": max(visible),
        "pickup_p50_s": percentile(pickup, 0.50),
        "pickup_p99_s": percentile(pickup, 0.99),
        "poll_errors": poll_errors[:5],
        **balance,
    }


def soak(
    worker: Worker, stack: StackEnv, rate: float, seconds: float, customers: list[str]
) -> dict[str, Any]:
    """Half load for ``seconds``; worker RSS every 10 s."""
    result: dict[str, Any] = {}

    def producer() -> None:
        result["produced"] = asyncio.run(
            produce_at_rate(stack.bootstrap, stack.topic, rate, seconds, "soak-", customers)
        )

    thread = threading.Thread(target=producer, name="soak-producer", daemon=True)
    started = time.monotonic()
    thread.start()
    samples: list[dict[str, Any]] = []
    while thread.is_alive():
        thread.join(max(0.0, 10 - (time.monotonic() - started) % 10))
        worker.alive()
        mem = worker.memory_kb()
        # the embedded engine's allocator, once a minute and at the end (its statistics
        # are a long text: sampled every 10 s, producing them moves what they measure)
        last = not thread.is_alive()
        resident = clickhouse_resident_mb(worker) if last or len(samples) % 6 == 5 else None
        samples.append(
            {
                "t_s": round(time.monotonic() - started, 1),
                "rss_mb": round(mem["VmRSS"] / 1024, 1),
                "anon_mb": round(mem.get("RssAnon", 0) / 1024, 1),
                "file_mb": round(mem.get("RssFile", 0) / 1024, 1),
                # the embedded ClickHouse engine's tracked memory, in the same process
                "clickhouse_mb": round(clickhouse_memory_mb(worker), 1),
                "clickhouse_resident_mb": resident,
                "events_in": worker.metric_totals().get("meterstream_events_in_total", 0.0),
            }
        )
        log(
            f"soak t={samples[-1]['t_s']:.0f}s rss={samples[-1]['rss_mb']} MB"
            f" (chdb tracked {samples[-1]['clickhouse_mb']} MB"
            + (f", resident {resident:.1f} MB)" if resident is not None else ")")
        )
    rss = [s["rss_mb"] for s in samples]
    # drift: last sample against the first after one minute of warm-up (or the first)
    base_sample = next((s for s in samples if s["t_s"] >= 60), samples[0])
    base = base_sample["rss_mb"]
    # the worker without the embedded engine: RSS less what the engine's allocator holds
    # (its tracked memory where that is not known), from its first measure after 1 min
    engine = "clickhouse_resident_mb" if samples[-1]["clickhouse_resident_mb"] else "clickhouse_mb"
    own_from = next((s for s in samples if s["t_s"] >= 60 and s[engine] is not None), samples[0])
    own_base = own_from["rss_mb"] - (own_from[engine] or 0.0)
    own_last = rss[-1] - (samples[-1][engine] or 0.0)
    # a bounded store (RocksDB) fills its buffers and caches first, then stays put
    second_half = [s["rss_mb"] for s in samples if s["t_s"] >= seconds / 2] or [base]
    half = second_half[0]
    return {
        "seconds": seconds,
        "rate": rate,
        "produced": result.get("produced"),
        "samples": samples,
        "rss_first_mb": rss[0],
        "rss_base_mb": base,
        "rss_last_mb": rss[-1],
        "rss_max_mb": max(rss),
        "rss_drift_pct": 100 * (rss[-1] - base) / base,
        "rss_half_mb": half,
        "rss_second_half_drift_pct": 100 * (rss[-1] - half) / half,
        "rss_second_half_range_mb": [min(second_half), max(second_half)],
        "clickhouse_measure": engine,
        "clickhouse_base_t_s": own_from["t_s"],
        "clickhouse_base_mb": own_from[engine],
        "clickhouse_last_mb": samples[-1][engine],
        "own_base_mb": own_base,
        "own_last_mb": own_last,
        "own_drift_pct": 100 * (own_last - own_base) / own_base,
        # one sample is noisy (a Stripe verification round holds rows for a moment):
        # the median of the second minute against the median of the last minute
        "minute_medians": {
            key: [_median(samples, key, 60, 120), _median(samples, key, seconds - 60, seconds + 10)]
            for key in ("rss_mb", "anon_mb", "file_mb")
        },
    }


def _median(samples: list[dict[str, Any]], key: str, start: float, end: float) -> float:
    values = sorted(s[key] for s in samples if start <= s["t_s"] < end) or [0.0]
    return values[len(values) // 2]


def clickhouse_resident_mb(worker: Worker) -> float | None:
    """What the embedded engine's jemalloc holds resident (its caches, its threads' caches,
    freed pages not yet returned), or None where it cannot say. Its tracked memory
    (``MemoryTracking``) counts only part of that: measured 10-20 MB tracked while
    jemalloc held 110-175 MB resident."""
    try:
        rows = worker.sql("SELECT * FROM system.jemalloc_stats")
    except BenchError:
        return None
    text = str(next(iter(rows[0].values()))) if rows else ""
    found = re.search(r"^Allocated: \d+, active: \d+, .*?resident: (\d+)", text, re.MULTILINE)
    return round(int(found.group(1)) / 2**20, 1) if found else None


def clickhouse_memory_mb(worker: Worker) -> float:
    rows = worker.sql("SELECT value FROM system.metrics WHERE metric = 'MemoryTracking'")
    return int(rows[0]["value"]) / 2**20 if rows else 0.0


# ----------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def credit_rows(results: dict[str, Any], phase: str) -> list[tuple[str, str]]:
    """The table's credit lines of phase (b) or (c); none with ``--credit-customers 0``."""
    credits, lat = results.get("credits"), results["latency"]
    if not credits:
        return []
    if phase == "b":
        return [
            (
                "    credit grants, before (b)",
                f"{credits['sampled_customers']} customers, recorded in "
                f"{results['rows'][0]['runs'][-1]['credit_grants']['seconds']:.1f} s before the "
                "worker starts, resumed by it "
                f"(plans file: {credits['priced_meter']} at "
                f"{credits['unit_price_usd']} usd a unit)",
            )
        ]
    met = "met" if lat["balance_p99_s"] <= BALANCE_TARGET_S else "NOT met"
    return [
        (
            "    event -> credit balance",
            f"p50 {lat['balance_p50_s']:.2f} s, p99 {lat['balance_p99_s']:.2f} s "
            f"(target <= {BALANCE_TARGET_S:.0f} s: {met}), max "
            f"{lat['balance_max_s']:.2f} s; {lat['balance_events']:,} priced events of "
            f"{lat['balance_customers']} customers with credits, via the entitlements topic",
        ),
        (
            "    burn tick start -> balance read",
            f"p50 {lat['balance_into_tick_p50_s']:.2f} s, "
            f"p99 {lat['balance_into_tick_p99_s']:.2f} s (the rest: the batch, the burn's wait)",
        ),
    ]


def table(results: dict[str, Any]) -> list[str]:
    raw, bare, pipe = results["raw"], results["bare_faust"], results["pipeline"]
    lat, stripe, mem = results["latency"], results["stripe"], results["worker_memory"]
    rows = [
        (
            "load",
            f"{results['config']['events']:,} records, "
            f"{results['config']['customers']:,} customers, "
            f"{results['load']['duplicates']:,} duplicates, 6 meters",
        ),
        ("produce (aiokafka, batched)", f"{results['produce_rate']:,.0f} records/s"),
        ("(a) raw consume getmany+orjson", f"{raw['rate']:,.0f} records/s"),
        (
            "(a) bare Faust ceiling",
            f"{bare['rate']:,.0f} records/s "
            f"(take_batches {bare['batch_size']}, within {bare['within']} s; "
            f"CPU {bare['cpu_us_per_record']:.0f} us/record)",
        ),
        (
            "(b) pipeline first batch->last window",
            f"{pipe['rate']:,.0f} records/s ({pipe['seconds']:.1f} s; "
            f"CPU {pipe['cpu_us_per_record']:.0f} us/record, all threads)",
        ),
        *credit_rows(results, "b"),
        (
            "    self-check",
            f"OK: {results['check']['meter_customer_totals']:,} "
            f"meter/customer totals, {results['check']['distinct_events']:,} distinct events",
        ),
        (
            "(c) latency @ half load",
            f"{lat['produced']['rate']:,.0f} records/s for "
            f"{results['config']['latency_seconds']} s: visible p50 {lat['visible_p50_s']:.2f} s, "
            f"p99 {lat['visible_p99_s']:.2f} s (pickup p50 {lat['pickup_p50_s']:.2f} s, "
            f"p99 {lat['pickup_p99_s']:.2f} s)",
        ),
        *credit_rows(results, "c"),
        (
            f"(d) Stripe requests ({results['config']['stripe_transport']})",
            f"{stripe['requests_after_pipeline']:,} by end of (b), "
            f"{stripe['requests']:,} in all ({stripe['accepted']:,} meter events accepted; "
            f"bound {stripe['bound_per_interval']:,} per {STRIPE_INTERVAL_S} s interval)",
        ),
        (
            "(e) worker peak RSS (VmHWM)",
            f"{mem['peak_after_pipeline_mb']:.0f} MB after (b), {mem['peak_mb']:.0f} MB at end",
        ),
    ]
    if results.get("soak"):
        s = results["soak"]
        rows.append(
            (
                "soak RSS drift",
                f"{s['rss_drift_pct']:+.1f}% over {s['seconds']:.0f} s "
                f"({s['rss_base_mb']:.0f} -> {s['rss_last_mb']:.0f} MB, max "
                f"{s['rss_max_mb']:.0f} MB)",
            )
        )
        low, high = s["rss_second_half_range_mb"]
        rows.append(
            (
                "    second half",
                f"{s['rss_second_half_drift_pct']:+.1f}% ({s['rss_half_mb']:.0f} -> "
                f"{s['rss_last_mb']:.0f} MB, range {low:.0f}-{high:.0f} MB)",
            )
        )
        medians = s["minute_medians"]
        rows.append(
            (
                "    minute 2 -> last minute",
                ", ".join(
                    f"{label} {a:.0f} -> {b:.0f} MB ({100 * (b - a) / a if a else 0:+.1f}%)"
                    for label, (a, b) in (
                        ("RSS", medians["rss_mb"]),
                        ("heap (RssAnon)", medians["anon_mb"]),
                        ("files (RssFile)", medians["file_mb"]),
                    )
                ),
            )
        )
        resident = s["clickhouse_measure"] == "clickhouse_resident_mb"
        held = "jemalloc resident" if resident else "tracked"
        rows.append(
            (
                f"    embedded ClickHouse ({held})",
                f"{s['clickhouse_base_mb']:.0f} -> {s['clickhouse_last_mb']:.0f} MB from "
                f"{s['clickhouse_base_t_s']:.0f} s; the worker without it "
                f"{s['own_base_mb']:.0f} -> {s['own_last_mb']:.0f} MB ({s['own_drift_pct']:+.1f}%)",
            )
        )
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows]


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=None, help=f"records (default {DEFAULT_EVENTS:,})")
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--duplicates", type=float, default=0.05, help="fraction resent (0.05)")
    p.add_argument("--partitions", type=int, default=None, help="default: the pipeline's")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_EVENTS:,} records")
    p.add_argument("--latency-seconds", type=float, default=None, help="default 30 (quick 10)")
    p.add_argument(
        "--credit-customers",
        type=int,
        default=SAMPLE,
        metavar="N",
        help=f"customers granted credits during (b) and (c), whose event -> balance latency "
        f"(c) measures (default {SAMPLE}; 0: no plans file, no grants, as before issue 25)",
    )
    p.add_argument("--soak", type=float, default=0, metavar="SECONDS", help="half-load RSS soak")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy the worker during (b): .svg flamegraph, else raw collapsed stacks",
    )
    # The configuration's choices: flag -> (choices, default, help).
    choices: dict[str, tuple[list[str], str | None, str]] = {
        "--broker": (
            ["kafka", "tansu"],
            "tansu",
            "the headline's broker (make bench BROKER=kafka): kafka = the production "
            "configuration, RocksDB and exactly_once unless --store/--guarantee say otherwise",
        ),
        "--store": (
            ["memory", "rocksdb"],
            None,
            "the worker's table store (default: rocksdb on kafka, memory on tansu; "
            "rocksdb needs: .venv/bin/pip install -e '.[rocksdb]')",
        ),
        "--guarantee": (
            ["exactly_once", "at_least_once"],
            None,
            "the worker's processing guarantee (default: the worker's auto, exactly_once "
            "on kafka, at_least_once on tansu, which has no transactions)",
        ),
        "--stripe-transport": (
            ["v1", "v2"],
            "v2",
            "v2 (default): what a live key uses, 100 meter events per request; "
            "v1: test mode's default, one request per meter event",
        ),
    }
    for flag, (values, default, text) in choices.items():
        p.add_argument(flag, choices=values, default=default, help=text)
    p.add_argument(
        "--extra-rows",
        default=None,
        help="comma-separated extra configurations: memory (the headline's broker, memory "
        "store), at_least_once (the headline without transactions), tansu, kafka (that "
        "broker, the headline's store); default with --broker kafka: memory,tansu; none "
        "otherwise",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs of each configuration (default 3, quick 1): ratios print as median and min-max",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, chdb)")
    p.add_argument("--results", type=Path, default=HERE / "results.json")
    args = p.parse_args(argv)
    if args.events is None:
        args.events = QUICK_EVENTS if args.quick else DEFAULT_EVENTS
    if args.latency_seconds is None:
        args.latency_seconds = 10.0 if args.quick else 30.0
    if args.store is None:
        args.store = "rocksdb" if args.broker == "kafka" else "memory"
    if args.guarantee is None:
        args.guarantee = default_guarantee(args.broker)
    if args.guarantee == "exactly_once" and args.broker == "tansu":
        p.error("--guarantee exactly_once needs --broker kafka (Tansu has no transactions)")
    if args.extra_rows is None:
        args.extra_rows = "memory,tansu" if args.broker == "kafka" else ""
    args.extra_rows = [x for x in args.extra_rows.split(",") if x]
    known = ("memory", "at_least_once", "tansu", "kafka")
    if bad := [x for x in args.extra_rows if x not in known]:
        p.error(f"--extra-rows: unknown {bad} ({', '.join(known)})")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.credit_customers < 0:
        p.error("--credit-customers must be 0 or more")
    return args


@dataclass(frozen=True)
class Row:
    """One configuration the bench measures ``--repeat`` times."""

    broker: str  # kafka | tansu
    store: str  # memory | rocksdb
    guarantee: str  # exactly_once | at_least_once
    headline: bool = False

    @property
    def label(self) -> str:
        return f"{BROKER_LABEL[self.broker]}, {self.store}, {self.guarantee}"


BROKER_LABEL = {"kafka": "Apache Kafka", "tansu": "Tansu"}


def default_guarantee(broker: str) -> str:
    """The worker's ``auto`` on each broker: transactions on Apache Kafka, none on Tansu."""
    return "exactly_once" if broker == "kafka" else "at_least_once"


def rows_for(args: argparse.Namespace) -> list[Row]:
    """The headline (``--broker``, ``--store``, ``--guarantee``), then ``--extra-rows``:
    ``memory`` (the headline's broker with the memory store), ``at_least_once`` (the
    headline without transactions), ``tansu`` (Tansu with the headline's store) or
    ``kafka``."""
    headline = Row(args.broker, args.store, args.guarantee, headline=True)
    rows = [headline]
    for extra in args.extra_rows:
        if extra == "memory":
            row = Row(args.broker, "memory", args.guarantee)
        elif extra == "at_least_once":
            row = Row(args.broker, args.store, "at_least_once")
        else:
            row = Row(extra, args.store, default_guarantee(extra))
        if row != Row(headline.broker, headline.store, headline.guarantee):
            rows.append(row)
    return rows


def start_broker(name: str, tmp: Path) -> Any:
    from meterstream.embedded.kafka import BrokerChoice, kafka_unavailable, new_broker
    from meterstream.settings import Settings

    settings = Settings()
    if name == "kafka" and (problem := kafka_unavailable(settings)):
        raise BenchError(f"--broker kafka: {problem}")
    broker = new_broker(
        BrokerChoice("kafka" if name == "kafka" else "tansu", "the bench"),
        settings,
        state_dir=tmp / f"{name}-state",
        log_path=tmp / f"{name}-broker.log",
    )
    return broker.start()


def stripe_check(
    worker: Worker, emulator_url: str, load: Load, customers: list[str], since: float
) -> dict[str, Any]:
    """Once a forward round of every Stripe meter started after ``since`` (every window
    was in ClickHouse then, and closed more than its grace before), the emulator's
    totals per meter and customer must equal the generator's (whole numbers: no
    rounding to carry)."""
    from meterstream.embedded.demo.runner import forward_gauges
    from meterstream.embedded.demo.totals import stripe_totals
    from meterstream.meters.config import load_meters

    wait_until(
        lambda: (
            (g := forward_gauges(worker.web_url))
            and all(g.get(m, 0.0) >= since for m in STRIPE_METERS)
        ),
        timeout=3 * STRIPE_INTERVAL_S + 60,
        what="a Stripe forward round of every meter after the last window",
        interval=0.5,
    )
    waited = time.time() - since
    got = stripe_totals(
        emulator_url, load_meters(HERE / "meters.yaml"), None, {c: f"cus_{c}" for c in customers}
    )
    totals = load.expected.totals()
    want = {(m, c): value for m in STRIPE_METERS for c, (value, _) in totals[m].items()}
    problems = [
        f"{m}/{c}: Stripe has {got.get((m, c), 0)}, expected {want.get((m, c), 0)}"
        for m, c in sorted(set(got) | set(want))
        if got.get((m, c), Decimal(0)) != want.get((m, c), Decimal(0))
    ]
    if problems:
        raise BenchError(
            f"SELF-CHECK FAILED (Stripe): {len(problems)} of {len(want)} meter/customer "
            "totals in the emulator differ from the generator's:\n  " + "\n  ".join(problems[:30])
        )
    return {"stripe_totals": len(want), "waited_s": waited}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def measure_row(
    row: Row,
    index: int,
    rep: int,
    stack: StackEnv,
    load: Load,
    emulator: Any,
    args: argparse.Namespace,
    keep: bool,
    credits: Credits | None,
) -> tuple[dict[str, Any], Worker | None]:
    """One run of one row on the produced topic: raw, bare Faust, the pipeline (with the
    plans and credit grants of ``credits``: the burn runs during it), the self-check
    (ClickHouse, then Stripe); a fresh consumer group, ClickHouse database and state
    dir. Returns the figures and, with ``keep``, the running worker."""
    load_avg = os.getloadavg()
    run_stack = replace(stack, database=f"bench_{index}_{rep}")
    guarantee = {"METERSTREAM_PROCESSING_GUARANTEE": row.guarantee}
    out: dict[str, Any] = {"load_avg": [round(x, 2) for x in load_avg]}
    out["raw"] = asyncio.run(
        raw_consume(stack.bootstrap, stack.topic, stack.partitions, load.events)
    )
    out["bare_faust"] = run_bare_faust(run_stack, load.events, f"bare-{index}-{rep}", **guarantee)
    emulator.reset()
    env = {
        "METERSTREAM_STORE": row.store,
        "METERSTREAM_STRIPE_TRANSPORT": args.stripe_transport,
        **guarantee,
        **(credits.env() if credits is not None else {}),
    }
    name = f"meterstream-{index}-{rep}"
    granted: dict[str, Any] = {"customers": 0, "seconds": 0.0}
    if credits is not None:
        # recorded before the worker starts, effective from the load's first window: the
        # worker resumes the books at start and (b) burns with credits present
        started = time.perf_counter()
        credits.record_grants(run_stack.worker_env(name, **env), load.end_ms - 2 * HOUR_MS)
        granted = {"customers": len(credits.sample), "seconds": time.perf_counter() - started}
    worker = Worker.start(run_stack, name, **env)
    try:
        out["pipeline"] = measure_pipeline(worker, load, args.profile if keep else None)
        out["credit_grants"] = granted
        done = time.time()
        out["worker_memory"] = {"peak_after_pipeline_mb": worker.memory_kb()["VmHWM"] / 1024}
        out["stripe_after_pipeline"] = emulator.stats()
        out["check"] = self_check(worker, load)
        out["check"].update(
            stripe_check(worker, emulator.url, load, customer_ids(args.customers), done)
        )
    except BaseException:
        print(f"--- worker log tail ({worker.log_path}) ---\n{worker.log_tail()}", file=sys.stderr)
        worker.stop()
        raise
    out["ratios"] = {
        "pipeline_raw": out["pipeline"]["rate"] / out["raw"]["rate"],
        "pipeline_faust": out["pipeline"]["rate"] / out["bare_faust"]["rate"],
    }
    log(
        f"{row.label} run {rep + 1}: bare {out['bare_faust']['rate']:,.0f}/s, pipeline "
        f"{out['pipeline']['rate']:,.0f}/s, pipeline/faust {out['ratios']['pipeline_faust']:.3f}"
        f" (load {load_avg[0]:.2f}); ClickHouse and Stripe checked"
    )
    if keep:
        return out, worker
    worker.stop()
    return out, None


def summarise(row: Row, runs: list[dict[str, Any]]) -> dict[str, Any]:
    spread = {}
    for key in ("pipeline_faust", "pipeline_raw"):
        values = [r["ratios"][key] for r in runs]
        spread[key] = {"median": median(values), "min": min(values), "max": max(values),
                       "runs": values}  # fmt: skip
    for key in ("raw", "bare_faust", "pipeline"):
        values = [r[key]["rate"] for r in runs]
        spread[key] = {"median": median(values), "min": min(values), "max": max(values)}
    return {
        "broker": row.broker,
        "store": row.store,
        "guarantee": row.guarantee,
        "headline": row.headline,
        "label": row.label,
        "spread": spread,
        "load_avg": [r["load_avg"] for r in runs],
        "runs": runs,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    partitions = args.partitions or Settings.model_fields["partitions"].default
    rows = rows_for(args)
    if any(r.store == "rocksdb" for r in rows) and importlib.util.find_spec("rocksdict") is None:
        raise BenchError("the rocksdb store needs: .venv/bin/pip install -e '.[rocksdb]'")
    tmp = Path(tempfile.mkdtemp(prefix="meterstream-bench-"))
    prefix = f"bench{uuid.uuid4().hex[:6]}-"
    results: dict[str, Any] = {
        "machine": machine(),
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {
            "events": args.events,
            "customers": args.customers,
            "duplicate_rate": args.duplicates,
            "partitions": partitions,
            "latency_seconds": args.latency_seconds,
            "topic_prefix": prefix,
            "broker": args.broker,
            "store": args.store,
            "guarantee": args.guarantee,
            "repeat": args.repeat,
            "stripe_transport": args.stripe_transport,
            "credit_customers": args.credit_customers,
        },
        "rows": [],
    }
    emulator = BackgroundEmulator().start()
    worker: Worker | None = None
    try:
        log(f"generating {args.events:,} records for {args.customers:,} customers")
        load = generate(
            args.events,
            args.customers,
            end_ms=closed_end_ms(time.time_ns() // 1_000_000),
            dup_rate=args.duplicates,
        )
        results["load"] = {
            "records": load.events,
            "duplicates": load.duplicates,
            "distinct": load.unique,
            "end_ms": load.end_ms,
        }
        customers = customer_ids(args.customers)
        credits = None
        if args.credit_customers:
            credits = Credits.create(tmp, customers, args.credit_customers)
            results["credits"] = {
                "sampled_customers": len(credits.sample),
                "priced_meter": PRICED_METER,
                "unit_price_usd": str(UNIT_PRICE),
                "balance_target_p99_s": BALANCE_TARGET_S,
            }
        for broker_name in dict.fromkeys(r.broker for r in rows):  # the headline's first
            broker = start_broker(broker_name, tmp)
            try:
                stack = StackEnv(broker.bootstrap, tmp / "clickhouse", emulator.url, tmp, prefix,
                                 partitions, HERE / "meters.yaml")  # fmt: skip
                asyncio.run(ensure_topics(broker.bootstrap, prefix=prefix, partitions=partitions))
                produce_rate = asyncio.run(produce_all(broker.bootstrap, stack.topic, load.records))
                log(f"{BROKER_LABEL[broker_name]}: produced at {produce_rate:,.0f}/s")
                # The headline last on its broker: its latency phase (and soak) add live
                # events to the topic, which a later row would count.
                mine = [(i, r) for i, r in enumerate(rows) if r.broker == broker_name]
                for index, row in sorted(mine, key=lambda ir: ir[1].headline):
                    runs = []
                    for rep in range(args.repeat):
                        keep = row.headline and rep == args.repeat - 1
                        figures, kept = measure_row(
                            row, index, rep, stack, load, emulator, args, keep, credits
                        )
                        runs.append(figures)
                        if kept is not None:
                            worker = kept
                    summary = summarise(row, runs)
                    summary["produce_rate"] = produce_rate
                    results["rows"].insert(0 if row.headline else len(results["rows"]), summary)
                    if not row.headline:
                        continue
                    # the headline's last run: latency, soak, Stripe requests, memory
                    last = runs[-1]
                    results.update(
                        produce_rate=produce_rate,
                        raw=last["raw"],
                        bare_faust=last["bare_faust"],
                        pipeline=last["pipeline"],
                        check=last["check"],
                        worker_memory=last["worker_memory"],
                    )
                    assert worker is not None
                    log("latency at half load")
                    half = last["pipeline"]["rate"] / 2
                    results["latency"] = measure_latency(
                        worker, stack, half, args.latency_seconds, customers, credits
                    )
                    if args.soak:
                        log(f"soak: {args.soak:.0f} s at {half:,.0f} records/s")
                        results["soak"] = soak(worker, stack, half, args.soak, customers)
                    stats = emulator.stats()
                    results["stripe"] = {
                        **stats,
                        "requests_after_pipeline": last["stripe_after_pipeline"]["requests"],
                        "stripe_meters": len(STRIPE_METERS),
                        "bound_per_interval": args.customers * len(STRIPE_METERS),
                    }
                    mem = worker.memory_kb()
                    results["worker_memory"].update(
                        peak_mb=mem["VmHWM"] / 1024, rss_mb=mem["VmRSS"] / 1024
                    )
                    worker.stop()
                    worker = None
            finally:
                if worker is not None:
                    worker.stop()
                    worker = None
                broker.stop()
        headline = results["rows"][0]["spread"]
        results["ratios"] = {
            "pipeline_raw": headline["pipeline_raw"]["median"],
            "pipeline_faust": headline["pipeline_faust"]["median"],
        }
        return results
    finally:
        emulator.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def spread_text(spread: dict[str, float], n: int) -> str:
    if n == 1:
        return f"{spread['median']:.3f} (one run)"
    return (
        f"{spread['median']:.3f} (median of {n}, min-max {spread['min']:.3f}-{spread['max']:.3f})"
    )


def rows_table(results: dict[str, Any]) -> list[str]:
    """One line per configuration: pipeline/faust median and spread, rates, machine load."""
    lines = ["pipeline/faust per configuration (each run: its own bare-Faust ceiling):"]
    for row in results["rows"]:
        sp, n = row["spread"], len(row["runs"])
        loads = ", ".join(f"{la[0]:.2f}" for la in row["load_avg"])
        tag = " (headline)" if row["headline"] else ""
        lines.append(
            f"  {row['label']}{tag}: {spread_text(sp['pipeline_faust'], n)}; runs "
            + " ".join(f"{v:.3f}" for v in sp["pipeline_faust"]["runs"])
            + f"; pipeline {sp['pipeline']['median']:,.0f}/s "
            f"({sp['pipeline']['min']:,.0f}-{sp['pipeline']['max']:,.0f}), bare Faust "
            f"{sp['bare_faust']['median']:,.0f}/s; load average at each run's start: {loads}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    args.results.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    for line in table(results):
        print(line)
    print()
    for line in rows_table(results):
        print(line)
    print(f"results: {args.results}")
    headline = results["rows"][0]
    n = len(headline["runs"])
    print(f"[{headline['label']}]")
    print(f"pipeline/raw ratio: {spread_text(headline['spread']['pipeline_raw'], n)}")
    print(f"pipeline/faust ratio: {spread_text(headline['spread']['pipeline_faust'], n)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
