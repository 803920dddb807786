"""Dedup memory with a short horizon: does the worker stay bounded, also across a restart?

    python -m bench.dedup_memory [--events 1000000] [--horizon 120] [--rate 2500]

Produces ``--events`` unique events stamped with the time they are sent, at a rate
the pipeline keeps up with (so none is older than the horizon when processed),
samples the worker's RSS and dedup table size every 10 s, then restarts the
worker (SIGTERM, same consumer group) and samples again after recovery. Expired
keys are deleted with changelog tombstones, so recovery replays only live ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer

from bench.stack import StackEnv, Worker
from meterstream.embedded.tansu import EmbeddedBroker
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--horizon", type=int, default=120)
    parser.add_argument("--rate", type=float, default=2500)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dedup-memory-"))
    meters = tmp / "meters.yaml"
    meters.write_text(METERS)
    extra = {"METERSTREAM_DEDUP_HORIZON_SECONDS": str(args.horizon)}
    with EmbeddedBroker(log=tmp / "broker.log") as broker:
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
        worker = Worker.start(stack, **extra)
        recovered_at = time.monotonic()
        previous = -1.0
        while time.monotonic() - recovered_at < 300:  # until table recovery settles
            time.sleep(10)
            after = sample(worker, "recovering", started)
            if after["dedup_keys"] and after["dedup_keys"] == previous:
                break
            previous = after["dedup_keys"]
        after = sample(worker, "after restart", started)
        print(f"recovery took about {time.monotonic() - recovered_at:.0f} s", flush=True)
        worker.stop()
        emulator.stop()
    print(
        f"dedup keys {before['dedup_keys']:.0f} -> {after['dedup_keys']:.0f} across a restart; "
        f"RSS {before['rss_mb']} MB -> {after['rss_mb']} MB after {args.events} unique keys"
    )


if __name__ == "__main__":
    main()
