"""Dedup memory with a short horizon: does the worker stay bounded, also across a restart?

    python -m bench.dedup_memory [--events 1000000] [--horizon 120] [--rate 2500]
        [--broker tansu|kafka] [--guarantee auto|at_least_once|exactly_once]
        [--store memory|rocksdb [--wipe-store]]

Produces ``--events`` unique events stamped with the time they are sent, at a rate
the pipeline keeps up with (so none is older than the horizon when processed),
samples the worker's RSS and dedup table size every 10 s, then restarts the
worker (SIGTERM, same consumer group) and samples again after recovery. Expired
keys are deleted with changelog tombstones, so recovery replays only live ones.

The restart is timed three ways: the worker answering /healthz, a probe event sent
at the restart reaching the record (the worker is processing again: its tables are
recovered), and the dedup table settling (memory store: the table's size stops
changing). Beside them: how many records the dedup changelog holds and how long a
plain consumer takes to read them (``--broker kafka`` compacts changelogs; Tansu
keeps every write), and the worker's own recovery steps from Faust's log.
``--wipe-store`` (RocksDB) removes the local tables before the restart, so they are
restored from the changelog as on a new machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.stack import StackEnv, Worker
from meterstream.embedded.kafka import KafkaBroker, jars_dir, java_command
from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.settings import Settings
from meterstream.sinks.stripe.emulator.server import BackgroundEmulator

METERS = "meters:\n  - {name: calls, event_name: call, aggregation: count, window: minute}\n"


def sample(worker: Worker, label: str, started: float) -> dict[str, float]:
    metrics = worker.metric_totals()
    memory = worker.memory_kb()
    row = {
        "t": round(time.monotonic() - started),
        "phase": label,
        "events_in": metrics.get("meterstream_events_in_total", 0),
        "dedup_keys": metrics.get("meterstream_table_keys", 0),
        "rss_mb": round(memory.get("VmRSS", 0) / 1024, 1),
    }
    print(json.dumps(row), flush=True)
    return row


async def produce(
    stack: StackEnv, events: int, rate: float, worker: Worker, started: float
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=20)
    await producer.start()
    try:
        sent = 0
        next_sample = time.monotonic()
        t0 = time.monotonic()
        while sent < events:
            now_ms = time.time_ns() // 1_000_000
            for _ in range(min(500, events - sent)):
                customer = f"c{sent % 997}"
                value = json.dumps(
                    {"event_name": "call", "customer_id": customer,
                     "idempotency_key": f"k{sent:08d}", "timestamp": now_ms}
                ).encode()  # fmt: skip
                await producer.send(stack.topic, key=customer.encode(), value=value)
                sent += 1
            await producer.flush()
            ahead = sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                await asyncio.sleep(ahead)
            if time.monotonic() >= next_sample:
                await asyncio.get_running_loop().run_in_executor(
                    None, sample, worker, "load", started
                )
                next_sample = time.monotonic() + 10
    finally:
        await producer.stop()


async def changelog_records(bootstrap: str, topic: str) -> dict[str, float]:
    """Records and tombstones a plain consumer reads from ``topic`` (every partition, start
    to end, read_committed), and how long that takes: what a table recovery must apply
    at least, and the broker's share of its time."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=8 * 2**20,
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            partitions = [TopicPartition(topic, p) for p in range(4)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        starts = {tp: await consumer.position(tp) for tp in partitions}
        t0 = time.monotonic()
        records = tombstones = 0
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            batch = await consumer.getmany(timeout_ms=1000, max_records=50_000)
            for messages in batch.values():
                records += len(messages)
                tombstones += sum(1 for m in messages if m.value is None)
        return {
            "offsets": sum(ends[tp] - starts[tp] for tp in partitions),
            "records": records,
            "tombstones": tombstones,
            "read_s": round(time.monotonic() - t0, 2),
        }
    finally:
        await consumer.stop()


async def send_probe(bootstrap: str, topic: str) -> str:
    """One new event; its idempotency key."""
    key = f"probe-{time.time_ns()}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        value = json.dumps(
            {"event_name": "call", "customer_id": "probe", "idempotency_key": key,
             "timestamp": time.time_ns() // 1_000_000}
        ).encode()  # fmt: skip
        await producer.send_and_wait(topic, key=b"probe", value=value)
    finally:
        await producer.stop()
    return key


# Faust's recovery steps (logged at INFO with METERSTREAM_DEBUG=1), and when each came.
STEPS = {
    "assigned": "Executing _on_partitions_assigned",
    "highwaters": "Highwater for active changelog partitions",
    "restoring": "Restoring state from changelog topics",
    "aborted tx": "Aborted tx until highwater",
    "restore complete": "Restore complete!",
    "ready": "Worker ready",
}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def recovery_steps(log: str, since: float) -> dict[str, float]:
    """Seconds after ``since`` (epoch) of each step's first line in the worker's log."""
    out: dict[str, float] = {}
    for line in log.splitlines():
        match = _STAMP.match(line)
        if match is None:
            continue
        stamp = time.mktime(time.strptime(match.group(1)[:19], "%Y-%m-%d %H:%M:%S"))
        stamp += int(match.group(1)[20:]) / 1000
        for name, text in STEPS.items():
            if name not in out and text in line and stamp >= since:
                out[name] = round(stamp - since, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--horizon", type=int, default=120)
    parser.add_argument("--rate", type=float, default=2500)
    parser.add_argument("--broker", choices=("tansu", "kafka"), default="tansu")
    parser.add_argument("--guarantee", default="auto")
    parser.add_argument("--store", choices=("memory", "rocksdb"), default="memory")
    parser.add_argument("--wipe-store", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dedup-memory-"))
    meters = tmp / "meters.yaml"
    meters.write_text(METERS)
    extra = {
        "METERSTREAM_DEDUP_HORIZON_SECONDS": str(args.horizon),
        "METERSTREAM_PROCESSING_GUARANTEE": args.guarantee,
        "METERSTREAM_STORE": args.store,
        "METERSTREAM_DEBUG": "1",  # Faust's INFO lines: its recovery steps
    }
    settings = Settings()
    broker: Any = (
        KafkaBroker(tmp, java=java_command(settings), jars=jars_dir(settings))
        if args.broker == "kafka"
        else EmbeddedBroker(log=tmp / "broker.log")
    )
    with broker:
        emulator = BackgroundEmulator().start()
        stack = StackEnv(broker.bootstrap, tmp / "ch", emulator.url, tmp, "dm-", 4, meters)
        started = time.monotonic()
        worker = Worker.start(stack, **extra)
        asyncio.run(produce(stack, args.events, args.rate, worker, started))
        while worker.metric_totals().get("meterstream_events_in_total", 0) < args.events:
            time.sleep(5)
        for _ in range(3):  # let sweeps run past the horizon
            sample(worker, "drained", started)
            time.sleep(30)
        before = sample(worker, "before restart", started)
        worker.stop()
        changelog = asyncio.run(
            changelog_records(stack.bootstrap, "dm-meterstream-dedup-changelog")
        )
        print(f"dedup changelog: {json.dumps(changelog)}", flush=True)
        if args.wipe_store:
            for store in (tmp / "state-meterstream").rglob("*.db"):
                shutil.rmtree(store)
        restarted_wall, restarted = time.time(), time.monotonic()
        worker = Worker.start(stack, **extra)
        healthy_s = time.monotonic() - restarted
        probe = asyncio.run(send_probe(stack.bootstrap, stack.topic))
        processing_s = None
        previous = -1.0
        settled_s = None
        while time.monotonic() - restarted < 900:
            time.sleep(2)
            if (
                processing_s is None
                and worker.sql(
                    f"SELECT count() AS n FROM usage_events WHERE idempotency_key = '{probe}'"
                )[0]["n"]
            ):
                processing_s = time.monotonic() - restarted
            after = sample(worker, "recovering", started)
            if settled_s is None and after["dedup_keys"] and after["dedup_keys"] == previous:
                settled_s = time.monotonic() - restarted - 2
            previous = after["dedup_keys"]
            if processing_s is not None and (settled_s is not None or args.store != "memory"):
                break
        after = sample(worker, "after restart", started)
        log = worker.log_path.read_text(errors="replace")  # this start's (rewritten)
        result = {
            "broker": args.broker,
            "guarantee": args.guarantee,
            "store": args.store + (" (wiped)" if args.wipe_store else ""),
            "healthy_s": round(healthy_s, 1),
            "processing_s": None if processing_s is None else round(processing_s, 1),
            "table_settled_s": None if settled_s is None else round(settled_s, 1),
            "steps_s": recovery_steps(log, restarted_wall),
            "changelog": changelog,
        }
        print(f"restart: {json.dumps(result)}", flush=True)
        worker.stop()
        emulator.stop()
    print(
        f"dedup keys {before['dedup_keys']:.0f} -> {after['dedup_keys']:.0f} across a restart; "
        f"RSS {before['rss_mb']} MB -> {after['rss_mb']} MB after {args.events} unique keys"
    )


if __name__ == "__main__":
    main()
