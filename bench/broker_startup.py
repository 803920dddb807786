"""Start-up time and memory of the embedded brokers: ``python -m bench.broker_startup``.

Apache Kafka (pipeline/embedded/kafka.py): ``--runs`` cold starts (a new state dir, so
the first start formats the log) and as many warm starts (a restart on the data of
the previous start), each from ``start()`` to ready (metadata, group and transaction
coordinators answering); then the JVM's RSS when idle and after ``--records``
records (acks=all, 200 bytes each) were produced and read back. Tansu: ``--runs``
starts to an open port, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from meterstream.embedded.kafka import KafkaBroker, jars_dir, java_command, kafka_unavailable
from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.settings import Settings


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


async def load(bootstrap: str, records: int) -> float:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("load", num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    t0 = time.monotonic()
    try:
        value = b"x" * 200
        batch = []
        for i in range(records):
            batch.append(await producer.send("load", key=f"cus_{i % 1000}".encode(), value=value))
            if len(batch) >= 10_000:
                await asyncio.gather(*batch)
                batch = []
        await asyncio.gather(*batch)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        "load", bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id="bench"
    )
    await consumer.start()
    try:
        seen = 0
        while seen < records:
            for msgs in (await consumer.getmany(timeout_ms=1000)).values():
                seen += len(msgs)
    finally:
        await consumer.stop()
    return time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--records", type=int, default=300_000)
    args = parser.parse_args()
    settings = Settings()
    problem = kafka_unavailable(settings)
    if problem:
        print(f"Apache Kafka cannot run here: {problem}")
        return 1
    java, jars = java_command(settings), jars_dir(settings)
    cold: list[float] = []
    warm: list[float] = []
    with tempfile.TemporaryDirectory(prefix="broker-startup-") as tmp:
        for run in range(args.runs):
            state = Path(tmp) / f"state-{run}"
            for phase in (cold, warm):
                broker = KafkaBroker(state, java=java, jars=jars).start()
                assert broker.started_in is not None
                phase.append(broker.started_in)
                broker.stop()
            print(f"run {run + 1}: cold {cold[-1]:.2f} s, warm {warm[-1]:.2f} s", flush=True)
        with KafkaBroker(Path(tmp) / "state-rss", java=java, jars=jars) as broker:
            assert broker.proc is not None
            time.sleep(5)
            idle, _ = rss_mb(broker.proc.pid)
            took = asyncio.run(load(broker.bootstrap, args.records))
            after, peak = rss_mb(broker.proc.pid)
        tansu: list[float] = []
        for _ in range(args.runs):
            t0 = time.monotonic()
            with EmbeddedBroker():
                tansu.append(time.monotonic() - t0)

    def summary(xs: list[float]) -> str:
        return f"median {statistics.median(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f})"

    print(f"Apache Kafka cold start (formats the log): {summary(cold)}")
    print(f"Apache Kafka warm start (existing log):    {summary(warm)}")
    print(
        f"Apache Kafka RSS: idle {idle:.0f} MB; after {args.records:,} records in and out "
        f"({took:.1f} s) {after:.0f} MB, peak {peak:.0f} MB"
    )
    print(f"Tansu start: {summary(tansu)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
