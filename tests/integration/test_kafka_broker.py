"""The embedded Apache Kafka (pipeline/embedded/kafka.py), really started from Kafka's jars:
its log survives a restart, it has transactions and compaction, it dies with its parent,
``auto`` picks it where Java 17+ and the jars are found, and ``meterstream run --broker
kafka`` runs the whole stack on it with exactly_once.

Every test here needs Java 17+ and the jars (`make kafka-jars`); without them they skip
with the reason (the ``kafka_broker`` fixture, or ``needs_kafka``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from meterstream.embedded.kafka import (
    KafkaBroker,
    choose_broker,
    jars_dir,
    java_command,
    kafka_unavailable,
)
from meterstream.errors import ConfigError
from meterstream.settings import Settings
from meterstream.worker.guarantee import broker_supports_transactions
from tests.harness import REPO, wait_until
from tests.support.kafka import group_offsets

pytestmark = pytest.mark.integration

Record = tuple[int, int, bytes, bytes]  # partition, offset, key, value


@pytest.fixture
def kafka_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with no METERSTREAM_* from the caller; skips where Kafka cannot run."""
    for key in os.environ:
        if key.startswith("METERSTREAM_"):
            monkeypatch.delenv(key)
    settings = Settings()
    problem = kafka_unavailable(settings)
    if problem is not None:
        pytest.skip(f"the embedded Apache Kafka cannot run here: {problem}")
    return settings


def _broker(state: Path, settings: Settings) -> KafkaBroker:
    return KafkaBroker(state, java=java_command(settings), jars=jars_dir(settings))


async def _create(bootstrap: str, topic: str, partitions: int, **config: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1, topic_configs=config)]
        )
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent = [await producer.send(topic, key=k, value=v) for k, v in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def _read_all(
    bootstrap: str,
    topic: str,
    partitions: int = 1,
    *,
    group: str | None = None,
    commit: bool = False,
    **options: str,
) -> list[Record]:
    """Every record from the start up to the end offsets at the time of asking."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **options,  # type: ignore[arg-type]
    )
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        out: list[Record] = []
        async with asyncio.timeout(60):
            while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
                batches = await consumer.getmany(timeout_ms=500)
                for tp, msgs in batches.items():
                    out += [(tp.partition, m.offset, m.key or b"", m.value or b"") for m in msgs]
        if commit:
            await consumer.commit()
        return sorted(out)
    finally:
        await consumer.stop()


def test_the_log_survives_a_restart(kafka_settings: Settings, tmp_path: Path) -> None:
    """Records, end offsets and a group's committed offsets are on disk under the state
    dir: a second start on it (new ports, no format) serves them all again."""
    state = tmp_path / "state"
    records = [(f"cus_{i % 7}".encode(), f"event-{i}".encode()) for i in range(60)]
    with _broker(state, kafka_settings) as first:
        assert first.formatted
        cluster = first.cluster_id
        asyncio.run(_create(first.bootstrap, "survive", 3))
        asyncio.run(_produce(first.bootstrap, "survive", records))
        before = asyncio.run(_read_all(first.bootstrap, "survive", 3, group="g1", commit=True))
        first_bootstrap = first.bootstrap
    assert sorted((k, v) for _, _, k, v in before) == sorted(records)
    # Kafka's end offset is the next offset to be written: the count per partition.
    per_partition = {p: sum(1 for q, *_ in before if q == p) for p in range(3)}
    assert (state / "kafka" / "data" / "survive-0").is_dir()

    with _broker(state, kafka_settings) as second:
        assert not second.formatted
        assert second.cluster_id == cluster
        after = asyncio.run(_read_all(second.bootstrap, "survive", 3))
        ends, committed = group_offsets(second.bootstrap, "survive", 3, "g1")
    assert after == before  # same partitions, offsets, keys and values
    assert ends == per_partition
    assert committed == per_partition
    print(
        f"bootstraps {first_bootstrap} then {second.bootstrap}; warm start {second.started_in:.1f}s"
    )


async def _transactions(bootstrap: str, topic: str) -> list[bytes]:
    await _create(bootstrap, topic, 1)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"t-{uuid.uuid4().hex[:8]}"
    )
    await producer.start()
    try:
        async with producer.transaction():
            for v in (b"c1", b"c2", b"c3"):
                await producer.send_and_wait(topic, v)
        await producer.begin_transaction()
        for v in (b"a1", b"a2"):
            await producer.send_and_wait(topic, v)
        await producer.abort_transaction()
    finally:
        await producer.stop()
    committed = await _read_all(bootstrap, topic, isolation_level="read_committed")
    return [value for *_, value in committed]


def test_transactions_are_supported(kafka_broker: KafkaBroker) -> None:
    """The worker's probe says yes (so ``auto`` runs exactly_once), and a real
    transaction commits and aborts: a read_committed reader sees the committed only."""
    assert asyncio.run(broker_supports_transactions(kafka_broker.bootstrap)) is True
    topic = f"tx-{uuid.uuid4().hex[:8]}"
    assert asyncio.run(_transactions(kafka_broker.bootstrap, topic)) == [b"c1", b"c2", b"c3"]


def test_compacted_topics_are_compacted(kafka_broker: KafkaBroker) -> None:
    """A compacted topic (as the Faust changelogs and ``customers`` are) keeps the latest
    value per key once a segment has rolled (Tansu never compacts)."""
    topic = f"compact-{uuid.uuid4().hex[:8]}"
    bootstrap = kafka_broker.bootstrap
    config = {
        "cleanup.policy": "compact",
        "segment.ms": "100",
        "min.cleanable.dirty.ratio": "0.01",
        "delete.retention.ms": "100",
    }
    asyncio.run(_create(bootstrap, topic, 1, **config))
    for round_ in range(3):  # each round after segment.ms rolls the segment before it
        asyncio.run(
            _produce(bootstrap, topic, [(b"k", f"{round_}-{i}".encode()) for i in range(50)])
        )
        time.sleep(0.5)
    asyncio.run(_produce(bootstrap, topic, [(b"other", b"last")]))

    def compacted() -> bool:
        return len(asyncio.run(_read_all(bootstrap, topic))) < 100

    wait_until(compacted, timeout=120, interval=2, what="the log cleaner")
    values = [(k, v) for *_, k, v in asyncio.run(_read_all(bootstrap, topic))]
    assert values[-2:] == [(b"k", b"2-49"), (b"other", b"last")]


PARENT = """
import sys, time
from pathlib import Path
from meterstream.embedded.kafka import KafkaBroker
broker = KafkaBroker(Path(sys.argv[1])).start()
print(broker.proc.pid, broker.bootstrap, flush=True)
time.sleep(600)
"""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return True
    return False


def test_the_broker_dies_with_its_parent(kafka_settings: Settings, tmp_path: Path) -> None:
    """SIGKILL of the process that started Kafka (no chance to stop it) leaves no java
    process: the kernel sends it SIGTERM (PR_SET_PDEATHSIG) and it shuts down."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "state")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")},
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        pid_text, bootstrap = line.split()
        pid = int(pid_text)
        assert "kafka.Kafka" in _cmdline(pid) and _port_open(bootstrap)  # the fault lands
        parent.kill()
        parent.wait(10)
        t0 = time.monotonic()
        wait_until(lambda: not _alive(pid), timeout=20, interval=0.1, what="java to exit")
        print(f"java gone {time.monotonic() - t0:.1f}s after its parent's SIGKILL")
        assert not _port_open(bootstrap)
    finally:
        with contextlib.suppress(ProcessLookupError):
            parent.kill()
        parent.wait(10)
        for pid in _kafka_pids(tmp_path / "state"):  # only if the test failed
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------ the choice


def test_auto_is_kafka_where_java_and_the_jars_are_found(kafka_settings: Settings) -> None:
    choice = choose_broker(kafka_settings)
    assert choice.name == "kafka"
    assert choose_broker(Settings(embedded_broker="kafka")).name == "kafka"
    assert choose_broker(Settings(embedded_broker="tansu")).name == "tansu"


def test_auto_is_tansu_without_java_and_kafka_is_then_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-jdk" / "bin" / "java"
    monkeypatch.setenv("METERSTREAM_KAFKA_JAVA", str(missing))
    monkeypatch.delenv("METERSTREAM_EMBEDDED_BROKER", raising=False)
    choice = choose_broker(Settings())
    assert choice.name == "tansu"
    assert "no Java found" in choice.reason and str(missing) in choice.reason
    with pytest.raises(ConfigError, match="METERSTREAM_EMBEDDED_BROKER=kafka"):
        choose_broker(Settings(embedded_broker="kafka"))


def test_auto_is_tansu_with_an_old_java(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    old = tmp_path / "java"
    old.write_text("#!/bin/sh\necho 'openjdk version \"11.0.2\" 2019-01-15' >&2\n")
    old.chmod(0o755)
    monkeypatch.setenv("METERSTREAM_KAFKA_JAVA", str(old))
    monkeypatch.delenv("METERSTREAM_EMBEDDED_BROKER", raising=False)
    choice = choose_broker(Settings())
    assert choice.name == "tansu"
    assert "Java 11" in choice.reason and "Java 17 or later" in choice.reason


def test_auto_is_tansu_without_the_jars(kafka_settings: Settings, tmp_path: Path) -> None:
    empty = tmp_path / "jars"
    empty.mkdir()
    choice = choose_broker(Settings(kafka_jars_dir=empty))
    assert choice.name == "tansu"
    assert "no Kafka jars" in choice.reason and "make kafka-jars" in choice.reason


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    return {**env, **extra}


def test_asking_for_kafka_where_it_cannot_run_is_a_clear_error(tmp_path: Path) -> None:
    env = _clean_env(METERSTREAM_KAFKA_JAVA=str(tmp_path / "missing-java"))
    for command in (["broker", "--port", "0"], ["run", "--meters", "meters.example.yaml"]):
        done = subprocess.run(
            [sys.executable, "-m", "meterstream.cli", *command, "--broker", "kafka",
             "--state-dir", str(tmp_path / "state")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "METERSTREAM_EMBEDDED_BROKER=kafka (or --broker kafka): no Java found" in (
            done.stderr
        )
        assert not (tmp_path / "state" / "endpoints.json").exists()


# ------------------------------------------------------------------ the whole stack


def _kafka_pids(state: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            line = _cmdline(int(entry.name))
            if "kafka.Kafka" in line and str(state.resolve()) in line:
                pids.append(int(entry.name))
    return pids


async def _send_events(bootstrap: str, events: list[dict[str, object]]) -> None:
    await _produce(
        bootstrap,
        "usage-events",
        [(str(e["customer_id"]).encode(), json.dumps(e).encode()) for e in events],
    )


@pytest.fixture
def run_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    yield state
    for pid in _kafka_pids(state):  # only if the test failed half-way
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_meterstream_run_on_kafka_runs_exactly_once(
    kafka_settings: Settings, run_state: Path
) -> None:
    """``meterstream run --broker kafka``: the stack starts on Apache Kafka, says so in
    endpoints.json, the worker chooses exactly_once, events reach the record and the
    windows, and when the run ends no java process is left."""
    from tests.harness import http_json

    proc = subprocess.Popen(
        [sys.executable, "-m", "meterstream.cli", "run", "--broker", "kafka", "--meters",
         "meters.example.yaml", "--duration", "40", "--state-dir", str(run_state)],
        cwd=REPO, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        endpoints_file = run_state / "endpoints.json"

        def started() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            return endpoints_file.exists()

        wait_until(started, timeout=180, what="endpoints.json")
        endpoints = json.loads(endpoints_file.read_text())
        assert endpoints["broker"] == "kafka"
        assert _kafka_pids(run_state)
        now = int(time.time() * 1000)
        events = [
            {"event_name": "api_request", "customer_id": f"kafka-{i}",
             "idempotency_key": f"k-{i}", "timestamp": now}
            for i in range(3)
        ]  # fmt: skip
        asyncio.run(_send_events(endpoints["kafka_bootstrap"], events))
        sql = f"{endpoints['web_url']}/v1/sql"

        def windows() -> list[list[object]]:
            query = "SELECT customer_id, value FROM meter_windows WHERE meter = 'api_requests'"
            rows = http_json(sql, {"sql": query})["rows"]
            return sorted(rows) if len(rows) == 3 else []

        got = wait_until(windows, timeout=60, what="three windows")
        assert [(c, str(v).rstrip("0").rstrip(".")) for c, v in got] == [
            (f"kafka-{i}", "1") for i in range(3)
        ]
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0, out
    log = (run_state / "worker.log").read_text(errors="replace")
    assert "processing guarantee: exactly_once" in log
    # The broker was ready for it: no group join or transaction failed on the way.
    assert '"level":"error"' not in log, log
    assert (run_state / "kafka" / "data" / "usage-events-0").is_dir()
    wait_until(lambda: not _kafka_pids(run_state), timeout=15, what="no java left")
    assert not _port_open(endpoints["kafka_bootstrap"])
