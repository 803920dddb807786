"""No event lost, none counted twice: worker crashes, restarts, a ClickHouse outage,
and the embedded stack restarting with nothing but ClickHouse kept."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterstream.embedded.kafka import KafkaBroker, jars_dir, java_command
from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.settings import Settings
from meterstream.worker.batch import END_MARKER
from tests.faults.fault_load import (
    HOUR,
    METERS,
    first_copies,
    make_load,
    reference,
    stripe_reference,
)
from tests.harness import REPO, StackSlice, Worker, http_json, wait_until

pytestmark = pytest.mark.faults


def record_count(worker: Worker) -> int:
    return int(worker.sql("SELECT count() AS n FROM usage_events FINAL")[0]["n"])


def window_totals(worker: Worker) -> dict[tuple[str, str, int], Decimal]:
    rows = worker.sql(
        """SELECT meter, customer_id, toUnixTimestamp64Milli(window_start) AS ws,
                  argMax(value, version) AS v
           FROM meter_windows GROUP BY meter, customer_id, group_key, window_start"""
    )
    return {(r["meter"], r["customer_id"], int(r["ws"])): Decimal(str(r["v"])) for r in rows}


def record_totals(worker: Worker) -> dict[tuple[str, str, int], Decimal]:
    rows = worker.sql(
        """SELECT customer_id, toUnixTimestamp(toStartOfHour(timestamp)) * 1000 AS ws,
                  sum(toDecimal128(JSONExtractString(properties, 'cost'), 9)) AS spend,
                  count() AS calls
           FROM (SELECT * FROM usage_events LIMIT 1 BY customer_id, idempotency_key)
           GROUP BY customer_id, ws"""
    )
    out: dict[tuple[str, str, int], Decimal] = {}
    for r in rows:
        out[("spend", r["customer_id"], int(r["ws"]))] = Decimal(str(r["spend"]))
        out[("calls", r["customer_id"], int(r["ws"]))] = Decimal(str(r["calls"]))
    return out


def stripe_totals(stripe_url: str) -> dict[tuple[str, str], int]:
    events = http_json(f"{stripe_url}/_emulator/events")
    events = events["data"] if isinstance(events, dict) else events
    identifiers = [e["identifier"] for e in events]
    assert len(identifiers) == len(set(identifiers)), "an identifier was accepted twice"
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for e in events:
        totals[(e["event_name"], e["payload"]["stripe_customer_id"])] += int(e["payload"]["value"])
    return {k: v for k, v in totals.items() if v}


def produce_in_background(
    stack: StackSlice, records: list[dict[str, Any]], chunk: int
) -> threading.Thread:
    def run() -> None:
        for i in range(0, len(records), chunk):
            stack.produce(records[i : i + chunk])
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def reconcile_and_read(stack: StackSlice, meters_file: Path) -> dict[tuple[str, str, int], Decimal]:
    """`meterstream reconcile --repair` with the worker stopped, then the windows."""
    env = stack.env(meters_file)
    env.pop("METERSTREAM_WEB_PORT", None)
    result = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "reconcile", "--repair", "--from",
         "2000-01-01T00:00:00Z"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sql = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "sql", "--format", "json",
         "SELECT meter, customer_id, toUnixTimestamp64Milli(window_start) AS ws,"
         " toString(argMax(value, version)) AS v FROM meter_windows"
         " GROUP BY meter, customer_id, group_key, window_start"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sql.returncode == 0, sql.stderr
    return {
        (r["meter"], r["customer_id"], int(r["ws"])): Decimal(r["v"])
        for r in json.loads(sql.stdout)
    }


@dataclass
class Landing:
    """Where one stop of a worker landed, as the test proves it (see
    :func:`test_three_crashes_mid_stream`)."""

    worker: int  # index in stack.workers
    started_ms: int  # wall clock before the worker was started
    signalled_ms: int  # wall clock just before the signal
    rows_before: int  # the worker's own usage_events rows (when the signal was decided; then
    # all it inserted, read after it was gone)
    in_flight: int = -1  # of those, rows whose offsets were not committed once it was gone
    rows_after: int = -1  # rows the workers after it inserted (ingested_at after the signal)
    metrics: str = ""  # its /metrics just before the signal


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def own_rows(worker: Worker, since_ms: int) -> int:
    """usage_events rows inserted by batches this worker received (``ingested_at`` is the
    batch's receive time; the workers of a test run one after another)."""
    return int(
        worker.sql(
            "SELECT count() AS n FROM usage_events"
            f" WHERE toUnixTimestamp64Milli(ingested_at) >= {since_ms}"
        )[0]["n"]
    )


def wait_until_processing(worker: Worker, since_ms: int, timeout: float = 240) -> int:
    """Block until the worker's own rows grew between two polls (it has partitions and is
    inserting right now); returns its row count then."""
    seen: list[int] = []

    def growing() -> bool:
        assert worker.proc.poll() is None, f"worker exited {worker.proc.returncode}"
        seen.append(own_rows(worker, since_ms))
        return len(seen) > 1 and seen[-1] > seen[-2]

    wait_until(growing, timeout=timeout, interval=0.25, what="the worker inserting")
    return seen[-1]


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets per partition of ``topic`` (0 where none), read with
    OffsetFetch only: the reader never joins the group."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = await consumer._client._wait_on_metadata(topic)
        out = {}
        for partition in sorted(partitions):
            committed = await consumer.committed(TopicPartition(topic, partition))
            out[partition] = committed or 0
        return out
    finally:
        await consumer.stop()


def produce_paced(
    stack: StackSlice,
    records: list[dict[str, Any]],
    positions: list[tuple[int, int]],
    until: threading.Event,
) -> threading.Thread:
    """Send ``records`` in order, ~500 every 0.5 s (the last 10% 50 at a time) until
    ``until`` is set, then the rest at once: the stream is still flowing when each
    restarted worker starts processing, however long its start takes."""
    reserve = len(records) // 10

    def run() -> None:
        i = 0
        while i < len(records):
            left = len(records) - i
            n = 2_500 if until.is_set() else 500 if left > reserve else 50
            stack.produce(records[i : i + n], positions=positions)
            i += n
            if not until.is_set():
                until.wait(0.5)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# Two SIGKILLs, then a SIGTERM: each store sees both kinds of stop, the second and third
# on a worker that recovered from the stop before (one run per store instead of one per
# signal and store: a run is ~100 s, its time in the workers' starts and recoveries).
# The SIGTERM comes last: a worker started after one first replays what it left
# uncommitted (duplicates, no rows of its own), and a SIGKILL then seldom landed between
# an insert and its commit: SIGKILL, SIGTERM, SIGKILL needed a fourth stop in both runs
# (+15-30 s each).
KILL_KILL_TERM = (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM)


@pytest.mark.parametrize(
    "store", [None, "rocksdb"], ids=["kill-kill-term", "kill-kill-term-rocksdb"]
)
def test_three_crashes_mid_stream(stack: StackSlice, store: str | None) -> None:
    three_crashes_mid_stream(stack, KILL_KILL_TERM, store)


@pytest.mark.brokers("kafka")
def test_three_sigkills_on_the_production_configuration(stack: StackSlice) -> None:
    """The configuration of docker-compose.yml and deploy/k8s: Apache Kafka, exactly_once
    and RocksDB (the ``stack`` defaults on Apache Kafka), each SIGKILL mid-batch."""
    three_crashes_mid_stream(stack, (signal.SIGKILL,) * 3, None)


def three_crashes_mid_stream(
    stack: StackSlice, signals: tuple[signal.Signals, ...], store: str | None
) -> None:
    """Workers in turn are stopped with ``signals``, in order (SIGKILL, or SIGTERM),
    while they process the stream; every total stays exact.

    Each stop is proved to land on a worker in the middle of its work:

    - it is sent only once the worker's own rows in the record (``ingested_at`` at or
      after its start) grew between two polls: it holds partitions and is inserting;
    - after a SIGKILL, some of the rows it inserted belong to offsets its group had not
      committed (read from the group once it is gone): the kill landed between a
      batch's insert and its commit, and the next worker must process those records
      again. A kill that landed between batches is not counted (another SIGKILL
      follows, before the next signal of ``signals``);
    - after a SIGTERM (a clean stop: the batch in flight finishes) it exits 0;
    - the workers after it insert rows too: the stream went on after the stop.

    ``store`` None is the session's (``--store``, default memory). With RocksDB (what
    the deployment files use) the tables survive a kill on disk, and the worker
    recovers only the changelog records past the offset it persisted with them
    (pipeline/worker/tables.py advances it per batch)."""
    store = store or stack.worker_defaults.get("METERSTREAM_STORE", "memory")
    if store == "rocksdb":
        pytest.importorskip("rocksdict", reason="the rocksdb extra is not installed")
    seed = int(signals[0])
    records, counted = make_load(unique=45_000, duplicates=5_000, seed=seed)
    ref = reference(counted)
    meters_file = stack.meters_file(METERS)
    env = {"METERSTREAM_STORE": store}
    positions: list[tuple[int, int]] = []
    kills_done = threading.Event()
    started = now_ms()
    worker = stack.start_worker(meters_file, **env)
    producer = produce_paced(stack, records, positions, kills_done)
    rng = random.Random(seed)
    landings: list[Landing] = []
    sent: list[signal.Signals] = []  # the signal of each landing, in order
    attempts = 0
    try:
        while len(landed_stops(landings, sent)) < len(signals):
            attempts += 1
            assert attempts <= 2 * len(signals), f"kills that landed between batches: {landings}"
            sig = signals[len(landed_stops(landings, sent))]
            delay = rng.uniform(0.5, 4)  # after its first insert; a commit may come first
            worker, started = stop_mid_batch(
                stack, worker, started, sig, delay, (records, positions), meters_file, env, landings
            )
            sent.append(sig)
    finally:
        kills_done.set()
    producer.join()
    wait_until(lambda: record_count(worker) == len(counted), timeout=300, what="record complete")
    assert record_totals(worker) == ref
    wait_until(lambda: window_totals(worker) == ref, timeout=60, what="windows exact")
    expected_stripe = stripe_reference(ref)
    wait_until(lambda: stripe_totals(stack.stripe_url) == expected_stripe, timeout=120,
               what="Stripe totals")  # fmt: skip
    inserted = [int(r["ms"]) for r in worker.sql(
        "SELECT toUnixTimestamp64Milli(ingested_at) AS ms FROM usage_events")]  # fmt: skip
    for landing in landings:
        landing.rows_after = sum(1 for ms in inserted if ms > landing.signalled_ms)
        assert landing.rows_before > 0 and landing.rows_after > 0, landing
        # After a SIGTERM the worker exited 0 (stop_mid_batch); its rows left uncommitted
        # (``in_flight``) are printed, not asserted: under at_least_once a clean stop was
        # seen to leave a batch's offsets uncommitted on a loaded machine (the rows are
        # replayed and deduplicated: the totals above stay exact). Open, see the note.
        assert landing.in_flight >= 0, landing
    assert landed_stops(landings, sent) == list(signals), (sent, landings)
    report_counters(landings, worker)
    if store == "rocksdb":  # one cache for the worker, every partition's memtables in it
        capacity = Settings().rocksdb_block_cache_mb * 2**20
        memory = 'meterstream_rocksdb_memory_bytes{kind="%s"}'
        wait_until(lambda: metric_value(worker.metrics(), memory % "capacity") == capacity,
                   timeout=30, what="RocksDB memory gauge")  # fmt: skip
        assert 0 < metric_value(worker.metrics(), memory % "used") <= 1.25 * capacity  # soft
    worker.stop()
    assert reconcile_and_read(stack, meters_file) == ref
    databases = {p.parent.name for p in (stack.tmp / "state").rglob("CURRENT")}  # RocksDB's
    if store == "rocksdb":
        assert {"dedup-0.db", "windows-0.db"} <= databases, databases
        # the worker's memory bounds (pipeline/worker/tables.py), as RocksDB recorded them
        options = next((stack.tmp / "state").rglob("dedup-0.db/OPTIONS-*")).read_text()
        assert f"write_buffer_size={Settings().rocksdb_write_buffer_mb * 2**20}" in options
        assert "max_write_buffer_number=2" in options
    else:
        assert not databases


def landed_stops(landings: list[Landing], sent: list[signal.Signals]) -> list[signal.Signals]:
    """The signals of the stops that count, in order: every SIGTERM, and the SIGKILLs
    that landed between a batch's insert and its commit (some of the killed worker's
    rows uncommitted)."""
    counted = zip(landings, sent, strict=True)
    return [sig for x, sig in counted if sig != signal.SIGKILL or x.in_flight != 0]


def stop_mid_batch(
    stack: StackSlice,
    worker: Worker,
    started: int,
    sig: signal.Signals,
    delay: float,
    sent: tuple[list[dict[str, Any]], list[tuple[int, int]]],
    meters_file: Path,
    env: dict[str, str],
    landings: list[Landing],
) -> tuple[Worker, int]:
    """Once ``worker`` (started at ``started``) is inserting, wait ``delay`` seconds and
    stop it with ``sig`` (its /metrics kept first), start the next worker on the same
    meters file and settings, and append where the stop landed to ``landings``.
    ``sent``: the records produced and their (partition, offset), in order. Returns the
    next worker and the wall clock just before its start."""
    rows = wait_until_processing(worker, started)
    time.sleep(delay)
    landing = Landing(stack.workers.index(worker), started, now_ms(), rows)
    landing.metrics = worker.metrics()
    landing.signalled_ms = now_ms()
    if sig == signal.SIGKILL:
        worker.kill()
    else:
        assert worker.stop(sig) == 0, worker.log()[-3000:]
    time.sleep(0.5)  # a commit the broker was completing when it died
    committed = asyncio.run(
        committed_offsets(stack.bootstrap, f"{stack.prefix}meterstream", stack.topic)
    )
    next_started = now_ms()
    replacement = stack.start_worker(meters_file, **env)
    landing.in_flight = uncommitted_rows(replacement, landing, *sent, committed)
    landings.append(landing)
    print(f"stop {len(landings)} ({sig.name}): {landing}".split(", metrics=")[0])
    return replacement, next_started


def wait_windows_exact(
    worker: Worker, ref: dict[tuple[str, str, int], Decimal], timeout: float = 60
) -> None:
    """Wait until every window equals ``ref``; on a timeout, print how many differ."""
    got: dict[tuple[str, str, int], Decimal] = {}

    def exact() -> bool:
        got.clear()
        got.update(window_totals(worker))
        return got == ref

    try:
        wait_until(exact, timeout=timeout, what="windows exact")
    finally:
        wrong = {k: (got.get(k), v) for k, v in ref.items() if got.get(k) != v}
        print(f"windows differing from the reference: {len(wrong)} {sorted(wrong.items())[:6]}")


def uncommitted_rows(
    worker: Worker,
    landing: Landing,
    records: list[dict[str, Any]],
    positions: list[tuple[int, int]],
    committed: dict[int, int],
) -> int:
    """The rows the stopped worker inserted whose records lie at or past its group's
    committed offsets (asked of ``worker``, the next one)."""
    position: dict[tuple[str, str], tuple[int, int]] = {}
    for record, at in zip(records, list(positions), strict=False):
        position.setdefault((record["customer_id"], record["idempotency_key"]), at)
    rows = worker.sql(
        "SELECT customer_id, idempotency_key FROM usage_events WHERE"
        f" toUnixTimestamp64Milli(ingested_at) BETWEEN {landing.started_ms}"
        f" AND {landing.signalled_ms}"
    )
    assert len(rows) >= landing.rows_before, (len(rows), landing)
    landing.rows_before = len(rows)
    beyond = 0
    for row in rows:
        partition, offset = position[(row["customer_id"], row["idempotency_key"])]
        beyond += offset >= committed.get(partition, 0)
    return beyond


COUNTERS = (
    "meterstream_gap_records_total",
    "meterstream_changelog_end_markers_total",
    "meterstream_windows_recomputed_total",
    "meterstream_window_rebuilds_total",
    "meterstream_record_lookups_total",
    "meterstream_events_duplicate_total",
)


def report_counters(landings: list[Landing], last: Worker) -> None:
    """Print what the workers' counters said (each stopped worker just before its stop,
    the last one now): whether the gap reader, the end markers and the rebuilds from
    the record fired."""
    readings = [x.metrics for x in landings] + [last.metrics()]
    for name in COUNTERS:
        series = sorted(
            {
                line.rsplit(" ", 1)[0]
                for text in readings
                for line in text.splitlines()
                if line.startswith(name) and not line.startswith("#")
            }
        ) or [name]
        for line in series:
            values = [metric_value(text, line) for text in readings]
            print(f"{line}: {sum(values):g} (per worker {[f'{v:g}' for v in values]})")


def test_clickhouse_outage_of_30_seconds(stack: StackSlice) -> None:
    records, counted = make_load(unique=15_000, duplicates=1_500, seed=30)
    ref = reference(counted)
    down = stack.tmp / "clickhouse-down"
    worker = stack.start_worker(
        stack.meters_file(METERS), METERSTREAM_FAULT_CLICKHOUSE_DOWN_FILE=str(down)
    )
    producer = produce_in_background(stack, records, chunk=1_000)
    time.sleep(3)
    down.touch()
    time.sleep(30)
    down.unlink()
    producer.join()
    wait_until(lambda: record_count(worker) == len(counted), timeout=240, what="record complete")
    raw_rows = int(worker.sql("SELECT count() AS n FROM usage_events")[0]["n"])
    assert raw_rows == len(counted), "a retried insert left duplicate rows"
    assert record_totals(worker) == ref
    wait_until(lambda: window_totals(worker) == ref, timeout=60, what="windows exact")
    retries = [
        ln for ln in worker.metrics().splitlines() if ln.startswith("meterstream_sink_retries")
    ]
    assert retries and float(retries[0].split()[-1]) > 0, "the outage was never hit"


def own_broker(stack: StackSlice, state: Path, port: int | None = None) -> Any:
    """A broker of this test's own, of the session's kind, not started: Tansu (memory only)
    or Apache Kafka with its log in ``state`` (kept across its restarts)."""
    state.mkdir(parents=True, exist_ok=True)
    if stack.broker_name == "kafka":
        settings = Settings()
        return KafkaBroker(state, port=port, java=java_command(settings), jars=jars_dir(settings))
    return EmbeddedBroker(port=port, log=state / "tansu.log")


def test_embedded_stack_restart_keeps_totals_exact(stack: StackSlice, tmp_path: Path) -> None:
    """The broker comes back with nothing kept; ClickHouse keeps the record. Duplicates of
    earlier events and new events for the same windows must not make any total regress
    or double.

    On Tansu that is every restart (it keeps everything in memory). Apache Kafka keeps
    its log across a restart (``test_durable_broker_restart_under_a_running_worker``),
    so here it is a new, empty cluster: the log lost, as in a disaster recovery. The
    worker's state dir is kept either way (with RocksDB, its tables are ahead of the
    new changelogs)."""
    first_records, _ = make_load(unique=4_000, duplicates=400, seed=41)
    later_new, _ = make_load(unique=2_000, duplicates=0, seed=42)
    rng = random.Random(43)
    resent = rng.sample(first_records, 600)
    resent_changed = [
        {**r, "properties": {**r["properties"], "cost": "12345"}}
        for r in rng.sample(first_records, 200)
    ]
    all_records = first_records + resent + resent_changed + later_new
    ref = reference(first_copies(all_records))
    meters_file = stack.meters_file(METERS)

    with own_broker(stack, tmp_path / "broker1") as broker1:
        stack.bootstrap = broker1.bootstrap
        worker = stack.start_worker(meters_file)
        stack.produce(first_records)
        before_ref = reference(first_copies(first_records))
        wait_until(lambda: window_totals(worker) == before_ref, timeout=120, what="first windows")
        before = window_totals(worker)
        worker.stop()
    with own_broker(stack, tmp_path / "broker2") as broker2:
        stack.bootstrap = broker2.bootstrap
        worker = stack.start_worker(meters_file)
        stack.produce(resent + resent_changed + later_new)
        wait_until(lambda: window_totals(worker) == ref, timeout=120, what="windows exact")
        after = window_totals(worker)
        assert all(after[k] >= v for k, v in before.items()), "a window regressed"
        assert record_count(worker) == len(first_copies(all_records))
        expected_stripe = stripe_reference(ref)
        wait_until(lambda: stripe_totals(stack.stripe_url) == expected_stripe, timeout=120,
                   what="Stripe totals")  # fmt: skip
        report_counters([], worker)
        worker.stop()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_durable_broker_restart_under_a_running_worker(
    stack: StackSlice, tmp_path: Path, how: str
) -> None:
    """What a broker restart means on Apache Kafka, which keeps its log: the broker is
    stopped (SIGTERM, its clean shutdown, or SIGKILL) while the worker is processing and
    comes back on the same port with the same log. The worker rides it out (no exit, no
    restart) and every total stays exact; nothing is rebuilt from the record.

    Runs with ``--broker kafka`` or ``both`` (not in ``make test``'s default set: it
    adds ~100 s, and the production SIGKILL test covers Kafka's log across kills)."""
    if stack.broker_name != "kafka":
        pytest.skip("Tansu keeps nothing across a restart: see the test above")
    records, counted = make_load(unique=20_000, duplicates=2_000, seed=61)
    half = len(records) // 2
    ref = reference(counted)
    meters_file = stack.meters_file(METERS)
    with own_broker(stack, tmp_path / "broker") as broker:
        stack.bootstrap = broker.bootstrap
        started = now_ms()
        worker = stack.start_worker(meters_file)
        stack.produce(records[:half])
        rows = wait_until_processing(worker, started)
        assert rows < len(first_copies(records[:half])), "the worker had caught up already"
        down = time.monotonic()
        if how == "sigkill":
            assert broker.proc is not None
            broker.proc.kill()
            broker.proc.wait(10)
        else:
            broker.stop()
        broker.requested_port = broker.port
        broker.start(timeout=120)
        print(f"broker {how}: back in {time.monotonic() - down:.1f} s")
        stack.produce(records[half:])
        wait_until(lambda: record_count(worker) == len(counted), timeout=300,
                   what="record complete")  # fmt: skip
        assert record_totals(worker) == ref
        wait_until(lambda: window_totals(worker) == ref, timeout=60, what="windows exact")
        expected_stripe = stripe_reference(ref)
        wait_until(lambda: stripe_totals(stack.stripe_url) == expected_stripe, timeout=120,
                   what="Stripe totals")  # fmt: skip
        assert worker.proc.poll() is None, f"the worker exited:\n{worker.log()[-3000:]}"
        assert len(stack.workers) == 1
        report_counters([], worker)
        worker.stop()


def test_lost_windows_table_with_dedup_table_kept_is_rebuilt(stack: StackSlice) -> None:
    """The windows changelog is gone while the dedup table and ClickHouse are kept: new
    events for windows the table no longer holds must add to the record's totals, not
    start them from zero (the window coverage must see ``meter_windows`` ahead of the
    table, even though the dedup table covers every record key)."""
    first, _ = make_load(unique=1_500, duplicates=0, seed=51, customers=20)
    later, _ = make_load(unique=1_500, duplicates=0, seed=52, customers=20)
    meters_file = stack.meters_file(METERS)
    worker = stack.start_worker(meters_file)
    stack.produce(first)
    first_ref = reference(first)
    wait_until(lambda: window_totals(worker) == first_ref, timeout=120, what="first windows")
    worker.stop()

    changelog = f"{stack.prefix}meterstream-windows-changelog"
    asyncio.run(delete_topic(stack.bootstrap, changelog))
    for local in (stack.tmp / "state").rglob("windows-*.db"):  # RocksDB's copy of it
        shutil.rmtree(local)

    worker = stack.start_worker(meters_file)
    stack.produce(later)
    ref = reference(first + later)
    wait_until(lambda: window_totals(worker) == ref, timeout=120, what="windows exact")
    metrics = worker.metrics()
    rebuilt = metric_value(metrics, "meterstream_windows_recomputed_total")
    assert rebuilt >= len(first_ref), "windows the table lost were not rebuilt from the record"
    assert metric_value(metrics, "meterstream_record_lookups_total") == 0, (
        "the dedup table was kept: no key should have needed the record"
    )
    worker.stop()


def time_ordered_load(
    unique: int, seed: int, hours: int, customers: int = 20
) -> list[dict[str, Any]]:
    """Events in time order over ``hours`` closed hours: each hourly window is written
    during a short stretch of the stream only, never again after it."""
    rng = random.Random(seed)
    base = (now_ms() // HOUR - hours - 1) * HOUR
    stamps = sorted(base + rng.randrange(hours * HOUR) for _ in range(unique))
    out = []
    for i, stamp in enumerate(stamps):
        customer = f"cust-{rng.randrange(customers):03d}"
        cost = str(Decimal(rng.randrange(1, 100_000)) / 1000)
        properties = {"cost": cost, "stripe_customer_id": f"cus_{customer}"}
        out.append({"event_name": "api_call", "customer_id": customer,
                    "idempotency_key": f"{seed}-{i:06d}", "timestamp": stamp,
                    "properties": properties})  # fmt: skip
    return out


@pytest.mark.brokers("session", "kafka")
def test_tables_restored_from_their_changelogs_after_a_kill_are_exact(
    stack: StackSlice,
) -> None:
    """A worker is killed mid-batch and restarted on the same state dir; later its tables
    are restored from their changelogs alone (a new pod without the old volume, another
    machine taking the partitions: the local store is gone). New events for the same
    windows must add to exact totals.

    With exactly_once and RocksDB, Faust writes the store at once and the changelog in a
    transaction: a kill aborts the transaction but leaves its writes in RocksDB. The
    restarted worker then found the replayed records counted (its store said so) and
    never wrote them to a changelog again: 1,000 of 20,000 dedup keys were missing
    from the committed changelog before the worker removed its local stores at start
    under exactly_once (meterstream.worker.tables.drop_local_stores). The load is in
    time order so that windows are not written again after the kill."""
    first = time_ordered_load(20_000, seed=71, hours=48)
    later = time_ordered_load(4_000, seed=72, hours=48)
    meters_file = stack.meters_file(METERS)
    positions: list[tuple[int, int]] = []
    kills_done = threading.Event()
    started = now_ms()
    worker = stack.start_worker(meters_file)
    producer = produce_paced(stack, first, positions, kills_done)
    landings: list[Landing] = []
    try:
        while not any(x.in_flight > 0 for x in landings):
            assert len(landings) < 4, f"no kill landed between an insert and its commit: {landings}"
            worker, started = stop_mid_batch(
                stack, worker, started, signal.SIGKILL, 1.5, (first, positions), meters_file, {},
                landings,
            )  # fmt: skip
    finally:
        kills_done.set()
    producer.join()
    wait_until(lambda: record_count(worker) == len(first), timeout=300, what="record complete")
    first_ref = reference(first)
    wait_until(lambda: window_totals(worker) == first_ref, timeout=60, what="first windows")
    report_counters(landings, worker)
    worker.stop()
    # What a new pod restores: every counted event's dedup key is in the changelog's
    # committed records (with exactly_once on RocksDB, the killed batch's keys were
    # once only in the aborted transaction and the local store; see
    # meterstream.worker.tables.drop_local_stores).
    dedup_keys = asyncio.run(
        changelog_keys(stack.bootstrap, f"{stack.prefix}meterstream-dedup-changelog")
    )
    assert len(dedup_keys) == len(first), (
        f"{len(first) - len(dedup_keys)} counted event(s) missing from the dedup changelog"
    )
    stores = list((stack.tmp / "state").rglob("*.db"))  # RocksDB's (none on the memory store)
    for store in stores:
        shutil.rmtree(store)
    print(f"removed {len(stores)} local table stores")

    worker = stack.start_worker(meters_file)
    stack.produce(later)
    wait_until(lambda: record_count(worker) == len(first) + len(later), timeout=300,
               what="record complete")  # fmt: skip
    try:
        wait_windows_exact(worker, reference(first + later))
    finally:
        report_counters([], worker)
    worker.stop()


async def changelog_keys(bootstrap: str, topic: str) -> set[bytes]:
    """The keys a table restored from ``topic`` holds: its committed records
    (read_committed, as Faust's recovery reads under exactly_once) up to the end,
    the last value per key not a tombstone, the end marker excluded."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = await consumer._client._wait_on_metadata(topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)  # the last stable offset, read_committed
        live: dict[bytes, bool] = {}

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in tps])

        while await behind():
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    if record.key is not None and record.key != END_MARKER:
                        live[record.key] = record.value is not None
        return {key for key, alive in live.items() if alive}
    finally:
        await consumer.stop()


async def delete_topic(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert topic in await admin.list_topics(), f"no topic {topic}"
        await admin.delete_topics([topic])
        for _ in range(50):
            if topic not in await admin.list_topics():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{topic} was not deleted")
    finally:
        await admin.close()


def metric_value(metrics: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )
