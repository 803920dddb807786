"""Test harness for the real stack: the embedded broker, the Stripe emulator, and
worker processes (each holds the session's chdb path in turn; tests query it
through the worker's read-only SQL endpoint while it runs).

Isolation: each test gets its own topic prefix, consumer group (app id) and
ClickHouse database. The processes are pipeline/embedded/harness.py's (the one
harness, shared with ``meterstream run`` and the benchmark); a test's wait that
runs out is an AssertionError.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer

from meterstream.embedded import harness
from meterstream.embedded.harness import WorkerProcess, WorkerSlice, http_json
from meterstream.embedded.processes import free_port
from meterstream.events import canonical_json
from meterstream.settings import Settings
from meterstream.topics.admin import ensure_topics

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
Worker = WorkerProcess

__all__ = ["AFTER_SIGKILL", "REPO", "StackSlice", "Worker", "http_json", "wait_until"]

# How long a test waits for a worker restarted after a SIGKILL to catch up. The killed
# member cannot leave its consumer group, so the broker hands the new one the partitions
# only once it drops the old (Tansu: after up to the rebalance timeout, 60 s); then the
# tables recover from their changelogs. 19 s on an idle machine, over 60 s in a loaded
# full run (CI, stop 34).
AFTER_SIGKILL = 180.0


def wait_until(
    fn: Callable[[], T], timeout: float = 60, interval: float = 0.3, what: str = ""
) -> T:
    return harness.wait_until(fn, timeout, interval, what, failure=AssertionError)


@dataclass
class StackSlice(WorkerSlice):
    """One test's slice of the session stack."""

    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}-")
    database: str = field(default_factory=lambda: f"t_{uuid.uuid4().hex[:8]}", kw_only=True)
    workers: list[Worker] = field(default_factory=list)
    broker_name: str = "tansu"  # "kafka": Apache Kafka (durable, transactions)
    # every worker's settings unless the test sets them (conftest: --guarantee, --store)
    worker_defaults: dict[str, str] = field(default_factory=dict)
    topics_on: set[str] = field(default_factory=set)  # bootstraps holding the slice's topics

    def env(self, meters_file: Path, **extra: str) -> dict[str, str]:
        defaults = {"METERSTREAM_CLICKHOUSE_FLUSH_SECONDS": "0.2", **self.worker_defaults}
        return super().env(meters_file, **{**defaults, **extra})

    def meters_file(self, text: str) -> Path:
        path = self.tmp / f"meters-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(text)
        return path

    def start_worker(self, meters_file: Path, **extra_env: str) -> Worker:
        port = {"METERSTREAM_WEB_PORT": str(free_port())}  # unless the test chose one
        env = self.env(meters_file, **{**port, **extra_env})
        log_path = self.tmp / f"worker-{len(self.workers)}.log"
        worker = Worker.spawn(env, log_path, cwd=REPO)
        self.workers.append(worker)
        worker.wait_healthy(90, failure=AssertionError)
        return worker

    def produce(
        self,
        records: Iterable[bytes | dict[str, Any]],
        *,
        batch: bool = True,
        positions: list[tuple[int, int]] | None = None,
    ) -> int:
        """Send records keyed by customer_id with a plain aiokafka producer; with
        ``positions``, append each record's (partition, offset) to it, in order."""
        encoded: list[tuple[bytes, bytes]] = []
        for rec in records:
            if isinstance(rec, dict):
                key = str(rec.get("customer_id", "")).encode()
                encoded.append((key, canonical_json(rec).encode()))
            else:
                try:
                    key = str(json.loads(rec).get("customer_id", "")).encode()
                except (ValueError, AttributeError):
                    key = b""
                encoded.append((key, rec))
        return self.produce_raw(encoded, batch=batch, positions=positions)

    def produce_raw(
        self,
        records: Sequence[tuple[bytes | None, bytes]],
        *,
        batch: bool = True,
        positions: list[tuple[int, int]] | None = None,
    ) -> int:
        """Send (key, value) records as given, in order, with a plain aiokafka producer;
        with ``positions``, append each record's (partition, offset) to it, in order."""

        async def send() -> None:
            if self.bootstrap not in self.topics_on:
                await self.create_topics()
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, acks="all", linger_ms=5 if batch else 0
            )
            await producer.start()
            try:
                sent = [
                    await producer.send(self.topic, key=key, value=value) for key, value in records
                ]
                await producer.flush()
                if positions is not None:
                    for metadata in await asyncio.gather(*sent):
                        positions.append((metadata.partition, metadata.offset))
            finally:
                await producer.stop()

        asyncio.run(send())
        return len(records)

    async def create_topics(self) -> None:
        """The slice's topics, as a worker creates them (a test may produce before any
        worker starts; Apache Kafka, unlike Tansu, does not create topics on use)."""
        default = Settings.model_fields["partitions"].default
        partitions = int(self.worker_defaults.get("METERSTREAM_PARTITIONS", default))
        await ensure_topics(self.bootstrap, prefix=self.prefix, partitions=partitions)
        self.topics_on.add(self.bootstrap)

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.stop()
