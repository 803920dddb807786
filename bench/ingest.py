"""Ingest benchmark (issue 9): the producer SDK and the events API against raw
aiokafka, on one embedded broker, in one run.

    .venv/bin/python -m bench.ingest [--events N]      # make bench-ingest

(a) raw: a batched aiokafka producer (acks=all), the ceiling for any producer;
(b) UsageClient (Kafka) and (c) HttpUsageClient (the events API of a real worker):
N events each through record() then flush(). Reports events/s from the first
record() to the flush's return, the caller's cost per record() call, and the
ratios to (a). The clients' buffers hold all N (``max_buffer=N``: the default 10,000
would raise BufferFull in a loop this tight, by design). Self-check: the worker's
record holds every SDK event exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.stack import REPO, BenchError, StackEnv, Worker, wait_until
from meterstream.client.sdk import HttpUsageClient, UsageClient
from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.events import canonical_json
from meterstream.sinks.stripe.emulator.server import BackgroundEmulator

METERS = """
meters:
  - name: calls
    event_name: bench_call
    aggregation: count
    window: hour
"""


def events(n: int, run: str) -> list[dict[str, Any]]:
    now = time.time_ns() // 1_000_000
    return [
        {
            "event_name": "bench_call",
            "customer_id": f"cust-{i % 500}",
            "idempotency_key": f"{run}-{i}",
            "timestamp": now - 60_000,
            "properties": {"route": "/v1/chat", "tokens": i % 997},
        }
        for i in range(n)
    ]


async def raw_produce(bootstrap: str, topic: str, docs: list[dict[str, Any]]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        start = time.perf_counter()
        futures = []
        for d in docs:
            value = canonical_json(d).encode()
            futures.append(await producer.send(topic, key=d["customer_id"].encode(), value=value))
        await asyncio.gather(*futures)
        return time.perf_counter() - start
    finally:
        await producer.stop()


def through_client(
    client: UsageClient | HttpUsageClient, docs: list[dict[str, Any]]
) -> tuple[float, float]:
    """(seconds from first record() to flush() returning, seconds spent inside record())."""
    inside = 0.0
    start = time.perf_counter()
    for d in docs:
        t = time.perf_counter()
        client.record(
            d["event_name"],
            d["customer_id"],
            d["properties"],
            idempotency_key=d["idempotency_key"],
            timestamp=d["timestamp"],
        )
        inside += time.perf_counter() - t
    if not client.flush(timeout=600):
        raise BenchError(f"{type(client).__name__} did not flush within 600 s")
    elapsed = time.perf_counter() - start
    client.close(30)
    if client.failed:
        raise BenchError(f"{type(client).__name__}: {client.failed} events failed")
    return elapsed, inside


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ingest")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--results", default=str(REPO / "bench" / "ingest_results.json"))
    args = parser.parse_args(argv)
    n = args.events
    run = uuid.uuid4().hex[:8]
    with (
        tempfile.TemporaryDirectory(prefix="ms-ingest-") as tmp_dir,
        EmbeddedBroker(log=Path(tmp_dir) / "broker.log") as broker,
    ):
        tmp = Path(tmp_dir)
        emulator = BackgroundEmulator().start()
        meters_file = tmp / "meters.yaml"
        meters_file.write_text(METERS)
        stack = StackEnv(
            broker.bootstrap, tmp / "ch", emulator.url, tmp, f"i{run}-", 4, meters_file
        )
        worker = Worker.start(stack)
        try:
            key = subprocess.run(
                [sys.executable, "-m", "meterstream.cli", "keys", "create", "bench",
                 "--state-dir", str(tmp / "state-meterstream")],
                cwd=REPO, capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            raw_s = asyncio.run(raw_produce(broker.bootstrap, f"i{run}-raw", events(n, "raw")))
            kafka_docs, http_docs = events(n, f"{run}k"), events(n, f"{run}h")
            kafka_s, kafka_in = through_client(
                UsageClient(broker.bootstrap, topic=stack.topic, max_buffer=n), kafka_docs
            )
            http_s, http_in = through_client(
                HttpUsageClient(worker.web_url, key, max_buffer=n), http_docs
            )

            def recorded() -> bool:
                rows = worker.sql(
                    "SELECT count() AS n, uniqExact(idempotency_key) AS u FROM usage_events"
                )
                return int(rows[0]["n"]) >= 2 * n

            wait_until(recorded, timeout=600, what=f"{2 * n} events recorded")
            rows = worker.sql(
                "SELECT count() AS n, uniqExact(idempotency_key) AS u, "
                f"countIf(startsWith(idempotency_key, '{run}k-')) AS k, "
                f"countIf(startsWith(idempotency_key, '{run}h-')) AS h "
                "FROM usage_events FINAL"
            )[0]
            if [int(rows[c]) for c in ("n", "u", "k", "h")] != [2 * n, 2 * n, n, n]:
                raise BenchError(f"SELF-CHECK FAILED: record holds {rows}, expected {n} + {n}")
        finally:
            worker.stop()
            emulator.stop()

    results = {
        "events": n,
        "raw_aiokafka_per_s": round(n / raw_s),
        "usage_client_per_s": round(n / kafka_s),
        "http_usage_client_per_s": round(n / http_s),
        "usage_client_record_us": round(kafka_in / n * 1e6, 1),
        "http_usage_client_record_us": round(http_in / n * 1e6, 1),
        "self_check": "OK: every SDK event recorded exactly once",
    }
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(f"events per path                       {n:,}")
    print(f"(a) raw aiokafka produce (acks=all)   {results['raw_aiokafka_per_s']:,}/s")
    print(
        f"(b) UsageClient (Kafka)               {results['usage_client_per_s']:,}/s  "
        f"record() {results['usage_client_record_us']} us/call"
    )
    print(
        f"(c) HttpUsageClient (events API)      {results['http_usage_client_per_s']:,}/s  "
        f"record() {results['http_usage_client_record_us']} us/call"
    )
    print(f"self-check: {results['self_check']}")
    print(f"usage_client/raw ratio: {raw_s / kafka_s:.3f}")
    print(f"http_usage_client/raw ratio: {raw_s / http_s:.3f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench.ingest: {exc}", file=sys.stderr)
        sys.exit(1)
