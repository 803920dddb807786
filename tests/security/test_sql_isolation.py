"""Analyst SQL cannot stall ingestion, and stops at the operator's limits (issue 20, item 2).

On the real embedded stack: while a CPU-heavy analyst query runs (tens of seconds
on one core, inside every default limit), events produced after it started reach
``usage_events`` and ``/readyz`` answers, both in a few seconds, and the heavy query
is still running at that moment (the fault was really in flight). Each limit gives
a clear 400 naming its METERSTREAM_ setting; ``sleep`` is refused; a query whose
client hangs up is stopped, which frees its thread at once.

Measured on the old code (analyst SQL on the record inserts' one ClickHouse thread):
the heavy query of ``python -m bench.analyst`` held ingestion for up to 17 s
(p99 event-to-record 17.0 s vs 0.38 s quiet) and ``/readyz`` for 12.8 s.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from meterstream.embedded.tansu import EmbeddedBroker
from tests.harness import StackSlice, Worker
from tests.support.meters import meter_entry, meters_yaml

pytestmark = pytest.mark.integration

METERS = meters_yaml(meter_entry("calls", "api_call", "count"))
# CPU-bound, 20M rows read, one row out: about a minute on one core here.
HEAVY = "SELECT sum(arraySum(range(number % 3 + 3000))) AS s FROM numbers(20000000)"


def post_sql(worker: Worker, sql: str, timeout: float = 60) -> requests.Response:
    return requests.post(f"{worker.web_url}/v1/sql", json={"sql": sql}, timeout=timeout)


class HangingQuery:
    """A /v1/sql request on a raw connection, answered in a thread; ``hang_up`` closes it."""

    def __init__(self, worker: Worker, sql: str) -> None:
        url = urllib.parse.urlsplit(worker.web_url)
        self.conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=300)
        self.conn.request(
            "POST", "/v1/sql", json.dumps({"sql": sql}), {"Content-Type": "application/json"}
        )
        self.answer: tuple[int, str] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        try:
            response = self.conn.getresponse()
            self.answer = (response.status, response.read().decode(errors="replace"))
        except (OSError, http.client.HTTPException) as exc:
            self.error = exc

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def hang_up(self) -> None:
        sock = self.conn.sock
        if sock is not None:  # shutdown: close() waits for the reader's file object
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()
        self.thread.join(10)


def start(
    broker: EmbeddedBroker,
    stripe_emulator: str,
    chdb_path: Path,
    tmp: Path,
    **env: str,
) -> tuple[StackSlice, Worker]:
    stack = StackSlice(broker.bootstrap, chdb_path, stripe_emulator, tmp)
    return stack, stack.start_worker(stack.meters_file(METERS), **env)


@pytest.fixture
def isolated(
    broker: EmbeddedBroker, stripe_emulator: str, worker_chdb_path: Path, tmp_path: Path
) -> Iterator[tuple[StackSlice, Worker]]:
    stack, worker = start(
        broker, stripe_emulator, worker_chdb_path, tmp_path, METERSTREAM_SQL_MAX_SECONDS="300"
    )
    try:
        yield stack, worker
    finally:
        stack.stop_all()


def count_tagged(worker: Worker, tag: str) -> int:
    response = post_sql(
        worker,
        f"SELECT count() AS n FROM usage_events WHERE startsWith(idempotency_key, '{tag}')",
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return int(response.json()["rows"][0][0])


def running_heavy(worker: Worker) -> int:
    """How many copies of HEAVY ClickHouse is running (this query excluded)."""
    response = post_sql(
        worker,
        "SELECT count() AS n FROM system.processes"
        " WHERE position(query, 'range(number % 3 + 3000)') > 0"
        " AND position(query, 'system.processes') = 0",
    )
    assert response.status_code == 200, response.text
    return int(response.json()["rows"][0][0])


def test_a_heavy_analyst_query_does_not_stall_ingestion(
    isolated: tuple[StackSlice, Worker],
) -> None:
    stack, worker = isolated
    stack.produce([{"event_name": "api_call", "customer_id": "warm", "idempotency_key": "w"}])
    deadline = time.monotonic() + 60
    while count_tagged(worker, "w") < 1:  # the worker is consuming
        assert time.monotonic() < deadline, "the warm-up event never arrived"
        time.sleep(0.3)

    heavy = HangingQuery(worker, HEAVY)
    try:
        time.sleep(2)  # the heavy query is running on the engine
        assert heavy.running, (heavy.answer, heavy.error)
        tag = f"iso{uuid.uuid4().hex[:6]}-"
        now = time.time_ns() // 1_000_000
        events = [
            {"event_name": "api_call", "customer_id": f"c{i % 7}",
             "idempotency_key": f"{tag}{i}", "timestamp": now}
            for i in range(200)
        ]  # fmt: skip
        sent = time.monotonic()
        stack.produce(events)
        while count_tagged(worker, tag) < len(events):
            assert time.monotonic() - sent < 20, "events stalled behind the analyst query"
            time.sleep(0.2)
        recorded_after = time.monotonic() - sent

        t0 = time.monotonic()
        ready = requests.get(f"{worker.web_url}/readyz", timeout=30)
        ready_after = time.monotonic() - t0
        assert heavy.running, "the heavy query ended early: the check proves nothing"
        assert running_heavy(worker) == 1
    finally:
        heavy.hang_up()
    deadline = time.monotonic() + 10
    while running_heavy(worker):  # hung up: stopped, gone from system.processes
        assert time.monotonic() < deadline, "the heavy query outlived its client"
        time.sleep(0.2)
    assert ready.status_code == 200 and ready_after < 3, (ready.text, ready_after)
    assert recorded_after < 20
    print(f"recorded in {recorded_after:.2f} s, /readyz in {ready_after:.3f} s")


def test_a_query_whose_client_hangs_up_is_stopped(
    broker: EmbeddedBroker, stripe_emulator: str, worker_chdb_path: Path, tmp_path: Path
) -> None:
    """With one analyst thread, a second query can only run once the first is stopped."""
    stack, worker = start(
        broker,
        stripe_emulator,
        worker_chdb_path,
        tmp_path,
        METERSTREAM_SQL_MAX_SECONDS="300",
        METERSTREAM_SQL_MAX_CONCURRENT="1",
    )
    try:
        heavy = HangingQuery(worker, HEAVY)
        time.sleep(2)
        assert heavy.running
        heavy.hang_up()
        t0 = time.monotonic()
        response = post_sql(worker, "SELECT 42 AS answer", timeout=60)
        freed_after = time.monotonic() - t0
        assert response.status_code == 200, response.text
        assert response.json()["rows"] == [[42]]
        assert freed_after < 10, f"the thread was busy {freed_after:.1f} s after the hang-up"
        print(f"a new query ran {freed_after:.2f} s after the hang-up")
        assert running_heavy(worker) == 0  # ...and gone from system.processes
        metrics = worker.metrics()
        assert 'meterstream_sql_queries_total{outcome="cancelled"} 1' in metrics
        assert "stopping analyst query" in worker.log() and "client went away" in worker.log()
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def limited(
    broker: EmbeddedBroker,
    stripe_emulator: str,
    worker_chdb_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Worker]:
    stack, worker = start(
        broker,
        stripe_emulator,
        worker_chdb_path,
        tmp_path_factory.mktemp("limits"),
        METERSTREAM_SQL_MAX_SECONDS="2",
        METERSTREAM_SQL_MAX_RESULT_ROWS="1000",
        METERSTREAM_SQL_MAX_RESULT_BYTES="65536",
        METERSTREAM_SQL_MAX_ROWS_READ="50000000",
        METERSTREAM_SQL_MAX_MEMORY_MB="64",
    )
    try:
        yield worker
    finally:
        stack.stop_all()


@pytest.mark.parametrize(
    ("sql", "setting"),
    [
        ("SELECT number FROM numbers(5000)", "METERSTREAM_SQL_MAX_RESULT_ROWS=1000"),
        ("SELECT * FROM numbers(1000) UNION ALL SELECT * FROM numbers(1000)",
         "METERSTREAM_SQL_MAX_RESULT_ROWS=1000"),
        ("SELECT repeat(toString(number % 10), 1000) FROM numbers(500)",
         "METERSTREAM_SQL_MAX_RESULT_BYTES=65536"),
        # a constant column: ClickHouse counts it once, the worker would hold it 500 times
        ("SELECT repeat('x', 1000) FROM numbers(500)", "METERSTREAM_SQL_MAX_RESULT_BYTES=65536"),
        ("SELECT count() FROM numbers(100000000)", "METERSTREAM_SQL_MAX_ROWS_READ=50000000"),
        ("SELECT count() FROM numbers(60000000) WHERE number % 7 = 1",
         "METERSTREAM_SQL_MAX_ROWS_READ=50000000"),
        ("SELECT sum(arraySum(arrayMap(x -> cityHash64(x, number), range(200))))"
         " FROM numbers(40000000)", "METERSTREAM_SQL_MAX_SECONDS=2"),
        ("SELECT length(groupArray(repeat(toString(number), 20))) FROM numbers(4000000)",
         "METERSTREAM_SQL_MAX_MEMORY_MB=64"),
    ],
)  # fmt: skip
def test_each_limit_is_a_clear_error(limited: Worker, sql: str, setting: str) -> None:
    t0 = time.monotonic()
    response = post_sql(limited, sql)
    took = time.monotonic() - t0
    body: dict[str, Any] = response.json()
    assert response.status_code == 400, body
    assert body["limit"] == setting and setting in body["error"], body
    assert took < 15, took


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT sum(sleep(3)) FROM numbers(600000)",
        "SELECT sleepEachRow(1) FROM numbers(100)",
        "SELECT SLEEP(3)",
        "SELECT arrayMap(x -> sleep(x), [3, 3, 3])",
    ],
)
def test_sleep_is_refused_at_once(limited: Worker, sql: str) -> None:
    t0 = time.monotonic()
    response = post_sql(limited, sql)
    assert response.status_code == 400 and "sleep" in response.json()["error"].lower()
    assert time.monotonic() - t0 < 5


def test_within_the_limits_a_query_answers(limited: Worker) -> None:
    response = post_sql(limited, "SELECT number FROM numbers(1000) ORDER BY number DESC LIMIT 3")
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == [[999], [998], [997]]
