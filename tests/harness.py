"""Test harness for the real stack: the embedded broker, the Stripe emulator, and
worker processes (each holds the session's chdb path in turn; tests query it
through the worker's read-only SQL endpoint while it runs).

Isolation: each test gets its own topic prefix, consumer group (app id) and
ClickHouse database.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from meterstream.embedded.processes import free_port, isolated_worker_env, stop_process

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


def wait_until(
    fn: Callable[[], T], timeout: float = 60, interval: float = 0.3, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (OSError, urllib.error.URLError, ConnectionError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}: last={last!r}")


def http_json(url: str, body: Any = None, timeout: float = 30) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read(), parse_float=Decimal)


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    web_url: str
    log_path: Path

    def sql(self, query: str) -> list[dict[str, Any]]:
        result = http_json(f"{self.web_url}/v1/sql", {"sql": query})
        return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]

    def get(self, path: str) -> Any:
        return http_json(f"{self.web_url}{path}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.web_url}/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        stop_process(self.proc, sig, timeout)
        return int(self.proc.returncode)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@dataclass
class StackSlice:
    """One test's slice of the session stack."""

    bootstrap: str
    chdb_path: Path
    stripe_url: str
    tmp: Path
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}-")
    database: str = field(default_factory=lambda: f"t_{uuid.uuid4().hex[:8]}")
    workers: list[Worker] = field(default_factory=list)
    broker_name: str = "tansu"  # "kafka": Apache Kafka (durable, transactions)
    # every worker's settings unless the test sets them (conftest: --guarantee, --store)
    worker_defaults: dict[str, str] = field(default_factory=dict)
    topics_on: set[str] = field(default_factory=set)  # bootstraps holding the slice's topics

    @property
    def topic(self) -> str:
        return f"{self.prefix}usage-events"

    def env(self, meters_file: Path, **extra: str) -> dict[str, str]:
        return isolated_worker_env(
            bootstrap=self.bootstrap,
            clickhouse_dsn=f"chdb://{self.chdb_path}",
            database=self.database,
            prefix=self.prefix,
            app_id=f"{self.prefix}meterstream",
            stripe_url=self.stripe_url,
            meters_file=meters_file,
            state_dir=self.tmp / "state",
            **{"METERSTREAM_CLICKHOUSE_FLUSH_SECONDS": "0.2", **self.worker_defaults, **extra},
        )

    def meters_file(self, text: str) -> Path:
        path = self.tmp / f"meters-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(text)
        return path

    def start_worker(self, meters_file: Path, **extra_env: str) -> Worker:
        port = free_port()
        log_path = self.tmp / f"worker-{len(self.workers)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "meterstream.cli", "worker"],
            cwd=REPO,
            env=self.env(meters_file, METERSTREAM_WEB_PORT=str(port), **extra_env),
            stdout=open(log_path, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        worker = Worker(proc, f"http://127.0.0.1:{port}", log_path)
        self.workers.append(worker)

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited {proc.returncode}:\n{worker.log()[-4000:]}")
            http_json(f"{worker.web_url}/healthz", timeout=2)
            return True

        wait_until(healthy, timeout=90, what="worker /healthz")
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
        import asyncio

        from aiokafka import AIOKafkaProducer

        from meterstream.events import canonical_json

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

        async def send() -> None:
            if self.bootstrap not in self.topics_on:
                await self.create_topics()
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap, acks="all", linger_ms=5 if batch else 0
            )
            await producer.start()
            try:
                sent = [
                    await producer.send(self.topic, key=key, value=value) for key, value in encoded
                ]
                await producer.flush()
                if positions is not None:
                    for metadata in await asyncio.gather(*sent):
                        positions.append((metadata.partition, metadata.offset))
            finally:
                await producer.stop()

        asyncio.run(send())
        return len(encoded)

    async def create_topics(self) -> None:
        """The slice's topics, as a worker creates them (a test may produce before any
        worker starts; Apache Kafka, unlike Tansu, does not create topics on use)."""
        from meterstream.settings import Settings
        from meterstream.topics.admin import ensure_topics

        default = Settings.model_fields["partitions"].default
        partitions = int(self.worker_defaults.get("METERSTREAM_PARTITIONS", default))
        await ensure_topics(self.bootstrap, prefix=self.prefix, partitions=partitions)
        self.topics_on.add(self.bootstrap)

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.stop()
