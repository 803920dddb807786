"""Event-to-record latency with and without a heavy analyst query (issue 20, item 2).

``python -m bench.analyst [--rate 300] [--seconds 30] [--query SQL]``

One embedded broker, the Stripe emulator and one worker on a fresh chdb path.
Two phases at the same fixed produce rate, each with its own key prefix:

1. **quiet**: events only;
2. **heavy**: the same, while a thread sends the heavy analyst query to
   ``POST /v1/sql`` back to back (each answer, success or error, is counted)
   and another probes ``GET /readyz`` every 0.5 s.

Latency per event = ``ingested_at`` (the time the worker received the batch)
minus the event's timestamp (its send time), read from ``usage_events`` once
every event of the phase is there. A batch waiting on a busy ClickHouse
thread delays the batches behind it, so a stall shows up in the events sent
during it. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import threading
import time
import urllib.error
import uuid
from pathlib import Path
from typing import Any

from bench.load import customer_ids
from bench.run import produce_at_rate
from bench.stack import BenchError, StackEnv, Worker, http_json, wait_until
from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.sinks.stripe.emulator.server import BackgroundEmulator
from meterstream.topics.admin import ensure_topics

HERE = Path(__file__).resolve().parent
# CPU-bound and within every default limit of the read-only SQL (3M rows read,
# one row out): about 5-10 s on one core of the 2-core machine.
HEAVY_SQL = "SELECT sum(arraySum(range(number % 3 + 3000))) AS s FROM numbers(3000000)"


def latencies(worker: Worker, tag: str) -> dict[str, Any]:
    rows = worker.sql(
        "SELECT count() AS n,"
        " quantileExact(0.5)(d) AS p50, quantileExact(0.99)(d) AS p99, max(d) AS worst"
        " FROM (SELECT toUnixTimestamp64Milli(ingested_at) - toUnixTimestamp64Milli(timestamp)"
        f" AS d FROM usage_events WHERE startsWith(idempotency_key, '{tag}'))"
    )[0]
    return {
        "events": int(rows["n"]),
        "p50_s": int(rows["p50"]) / 1000,
        "p99_s": int(rows["p99"]) / 1000,
        "max_s": int(rows["worst"]) / 1000,
    }


def phase(
    worker: Worker, stack: StackEnv, rate: float, seconds: float, heavy_sql: str | None
) -> dict[str, Any]:
    tag = f"an{uuid.uuid4().hex[:6]}-"
    stop = threading.Event()
    queries: list[dict[str, Any]] = []
    ready: list[float] = []

    def analyst() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                http_json(f"{worker.web_url}/v1/sql", {"sql": heavy_sql}, timeout=120)
                outcome = "ok"
            except urllib.error.HTTPError as exc:
                outcome = f"{exc.code}: {exc.read()[:160].decode(errors='replace')}"
            except OSError as exc:
                outcome = repr(exc)
            queries.append({"seconds": round(time.monotonic() - t0, 2), "outcome": outcome})

    def probe() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            with contextlib.suppress(OSError):  # 503 too: only the wait counts
                http_json(f"{worker.web_url}/readyz", timeout=60)
            ready.append(time.monotonic() - t0)
            stop.wait(0.5)

    threads = [threading.Thread(target=probe, daemon=True)]
    if heavy_sql:
        threads.append(threading.Thread(target=analyst, daemon=True))
    for thread in threads:
        thread.start()
    try:
        sent: dict[str, int] = {}
        produced = asyncio.run(
            produce_at_rate(
                stack.bootstrap, stack.topic, rate, seconds, tag, customer_ids(50), sent
            )
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(150)
    wait_until(
        lambda: latencies(worker, tag)["events"] >= len(sent),
        timeout=120,
        what="every event of the phase in usage_events",
    )
    return {
        "produced": produced,
        "latency": latencies(worker, tag),
        "readyz_max_s": round(max(ready, default=0.0), 3),
        "analyst_queries": queries,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=300.0, help="events/s (default 300)")
    p.add_argument("--seconds", type=float, default=30.0, help="per phase (default 30)")
    p.add_argument("--query", default=HEAVY_SQL, help="the heavy analyst query")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="meterstream-analyst-"))
    prefix = f"an{uuid.uuid4().hex[:6]}-"
    broker = EmbeddedBroker(log=tmp / "broker.log").start()
    emulator = BackgroundEmulator().start()
    stack = StackEnv(
        broker.bootstrap, tmp / "clickhouse", emulator.url, tmp, prefix, 4, HERE / "meters.yaml"
    )
    worker: Worker | None = None
    try:
        asyncio.run(ensure_topics(broker.bootstrap, prefix=prefix, partitions=4))
        worker = Worker.start(stack)
        phase(worker, stack, args.rate, 5, None)  # warm-up: group joined, tables open
        result = {
            "command": "python -m bench.analyst " + " ".join(sys.argv[1:]),
            "rate": args.rate,
            "seconds": args.seconds,
            "heavy_sql": args.query,
            "quiet": phase(worker, stack, args.rate, args.seconds, None),
            "heavy": phase(worker, stack, args.rate, args.seconds, args.query),
        }
        print(json.dumps(result, indent=2))
        return 0
    except BenchError as exc:
        print(f"bench.analyst: {exc}", file=sys.stderr)
        return 1
    finally:
        if worker is not None:
            worker.stop()
        emulator.stop()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
