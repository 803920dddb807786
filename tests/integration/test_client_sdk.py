"""The producer SDK against the real embedded stack: Tansu, the worker, embedded ClickHouse.

Each event the SDK records must land in ClickHouse ``usage_events`` exactly once
and be counted once by a count meter: across a broker restart (UsageClient) and
across a retry of a batch that was written but whose answer was lost
(HttpUsageClient).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient

from meterstream.client.sdk import DeliveryError, HttpUsageClient, UsageClient
from meterstream.embedded.processes import free_port
from meterstream.embedded.tansu import EmbeddedBroker
from tests.harness import REPO, StackSlice, Worker, wait_until
from tests.sdk_support import BackgroundApp, record_from_threads

pytestmark = pytest.mark.integration

METERS = """
meters:
  - name: calls
    event_name: sdk_call
    aggregation: count
    window: hour
"""
PARTITIONS = 3  # not Tansu's auto-create default (4): an auto-created topic would show


def recorded_keys(worker: Worker) -> list[str]:
    rows = worker.sql("SELECT idempotency_key FROM usage_events FINAL")
    return [r["idempotency_key"] for r in rows]


def calls_total(worker: Worker) -> int:
    rows = worker.sql(
        """SELECT toInt64(sum(v)) AS n FROM (
               SELECT argMax(value, version) AS v FROM meter_windows WHERE meter = 'calls'
               GROUP BY meter, customer_id, group_key, window_start)"""
    )
    return int(rows[0]["n"] or 0)


def exactly(worker: Worker, keys: list[str]) -> bool:
    """ClickHouse holds each of ``keys`` once, nothing else, and the meter counts each once."""
    return sorted(recorded_keys(worker)) == sorted(keys) and calls_total(worker) == len(keys)


async def topic_partitions(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = await admin.list_topics()
        described = await admin.describe_topics(names) if names else []
        return {t["topic"]: len(t["partitions"]) for t in described}
    finally:
        await admin.close()


class Errors:
    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, Any]], DeliveryError]] = []

    def __call__(self, events: list[dict[str, Any]], error: DeliveryError) -> None:
        self.calls.append((events, error))


def test_usage_client_loses_nothing_across_a_broker_restart(
    stack: StackSlice, tmp_path: Path
) -> None:
    """Record N events, see all N in ClickHouse, SIGKILL the broker, record M more while
    it is down, bring a new (empty: memory storage) broker up on the same port: all
    N + M are in ClickHouse exactly once, and counted once.

    What is not an SDK loss, and how the test keeps it apart: Tansu with memory
    storage forgets everything when it dies, including records it acknowledged that
    the worker had not consumed yet. The first N are therefore flushed *and* seen in
    ClickHouse before the broker is killed, so none of them can be lost by the
    broker; the M are recorded while no broker runs, so only the SDK holds them. Any
    missing key is the SDK's loss.

    The worker is stopped before the kill and started after the new broker is up,
    so its start-up creates the topics (with PARTITIONS partitions) on the empty
    broker. The SDK reconnects first and must not auto-create the topic (Tansu
    would, with 4 partitions and default settings): the test checks the topic is
    absent until the worker comes, and has PARTITIONS partitions after.
    """
    n, m = 300, 200
    port = free_port()
    meters = stack.meters_file(METERS)
    errors = Errors()
    broker = EmbeddedBroker(port=port, log=tmp_path / "broker1.log").start()
    stack.bootstrap = broker.bootstrap
    client = UsageClient(
        broker.bootstrap,
        topic=stack.topic,
        on_error=errors,
        flush_at_exit=None,
        backoff_max=1.0,
        request_timeout_ms=3000,
    )
    try:
        worker = stack.start_worker(meters, METERSTREAM_PARTITIONS=str(PARTITIONS))
        first = [client.record("sdk_call", f"cust-{i % 7}", {"n": i}) for i in range(n)]
        assert client.flush(timeout=60), "the first events were not acknowledged"
        wait_until(lambda: exactly(worker, first), timeout=90, what="first events recorded")
        worker.stop()
        assert broker.proc is not None
        broker.proc.kill()
        broker.proc.wait(10)

        second = [client.record("sdk_call", f"cust-{i % 7}", {"n": n + i}) for i in range(m)]
        assert client.pending == m and client.sent == n
        assert client.flush(timeout=2) is False, "acknowledged with no broker running?"

        broker = EmbeddedBroker(port=port, log=tmp_path / "broker2.log").start()
        assert not client.flush(timeout=5)  # the client retries against the empty broker...
        topics = asyncio.run(topic_partitions(broker.bootstrap))
        assert stack.topic not in topics, f"the SDK auto-created its topic: {topics}"
        worker = stack.start_worker(meters, METERSTREAM_PARTITIONS=str(PARTITIONS))
        assert client.flush(timeout=90), "events recorded while the broker was down are stuck"
        assert (client.sent, client.failed, client.pending) == (n + m, 0, 0)
        assert errors.calls == []
        wait_until(lambda: exactly(worker, first + second), timeout=90, what="all events once")
        assert asyncio.run(topic_partitions(broker.bootstrap))[stack.topic] == PARTITIONS
    finally:
        client.close(timeout=5)
        stack.stop_all()
        broker.stop()


class LostAnswerProxy(BackgroundApp):
    """Forwards ``/v1/events`` to the worker; the first ``lose`` answers are replaced by
    a 503 *after* the worker accepted the batch: a write whose acknowledgement was lost."""

    def __init__(self, target: str, lose: int) -> None:
        super().__init__()
        self.target = target
        self.lose = lose
        self.forwarded: list[tuple[bytes, int]] = []  # (body, the worker's status)
        self.app.router.add_post("/v1/events", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: request.headers[k] for k in ("Authorization", "Content-Type")}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.target}/v1/events", data=body, headers=headers) as resp,
        ):
            status, answer = resp.status, await resp.read()
        self.forwarded.append((body, status))
        if status == 202 and self.lose > 0:
            self.lose -= 1
            return web.json_response({"error": "answer lost"}, status=503)
        return web.Response(body=answer, status=status, content_type="application/json")


def create_key(stack: StackSlice, name: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "keys", "create", name,
         "--state-dir", str(stack.tmp / "state")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_http_client_counts_a_retried_batch_once(stack: StackSlice) -> None:
    """Events sent through the events API land once; a batch the worker wrote but whose
    202 was lost (the client saw a 503 and resent it with the same keys) counts once."""
    worker = stack.start_worker(stack.meters_file(METERS))
    key = create_key(stack, "sdk-test")
    proxy = LostAnswerProxy(worker.web_url, lose=2).start()
    errors = Errors()
    try:
        with HttpUsageClient(
            proxy.url, key, on_error=errors, flush_at_exit=None, backoff_max=0.5
        ) as client:
            keys = record_from_threads(client, threads=4, each=60)
            assert client.flush(timeout=60)
            assert (client.sent, client.failed) == (240, 0)
        assert errors.calls == []
        bodies = [body for body, status in proxy.forwarded if status == 202]
        assert len(bodies) > len(set(bodies)), "no batch was written twice: nothing was tested"
        wait_until(lambda: exactly(worker, keys), timeout=90, what="each event once")
    finally:
        proxy.stop()


def test_http_client_hands_a_rejected_key_to_on_error(stack: StackSlice) -> None:
    """A bad key is a permanent failure: on_error gets the events, nothing is written."""
    worker = stack.start_worker(stack.meters_file(METERS))
    errors = Errors()
    with HttpUsageClient(
        worker.web_url, "msk_nope_nope", on_error=errors, flush_at_exit=None
    ) as client:
        keys = [client.record("sdk_call", "cust-1", {"n": i}) for i in range(3)]
        assert client.flush(timeout=60)
        assert (client.sent, client.failed) == (0, 3)
    assert [e["idempotency_key"] for events, _ in errors.calls for e in events] == keys
    assert {error.status for _, error in errors.calls} == {401}
    assert recorded_keys(worker) == []
