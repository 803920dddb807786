"""The producer SDK's own logic: keys, validation, batching, retries, permanent failures,
flush/close and the buffer bound, against a small scripted HTTP server (no broker).

The server speaks the events API's answers (202 with the keys, 422 with per-event
errors, 503 with Retry-After, 401); the pipeline side is checked in
tests/integration/test_client_sdk.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web

from meterstream.client.sdk import (
    Abandoned,
    BufferFull,
    ClientClosed,
    DeliveryError,
    HttpUsageClient,
    InvalidEvent,
    UsageClient,
    backoff_delay,
    uuid7,
)
from meterstream.embedded.processes import free_port
from meterstream.events import loads_exact
from tests.sdk_support import BackgroundApp, record_from_threads

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TIMEOUT = 30.0


class EventsServer(BackgroundApp):
    """``POST /v1/events`` answering from a script of statuses (then 202)."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.script: list[int] = []
        self.reject_index: int | None = None  # with a 422: the index to blame
        self.requests: list[dict[str, Any]] = []  # {"status", "raw", "events", "auth"}
        self.app.router.add_post("/v1/events", self._handle)

    def accepted(self) -> list[dict[str, Any]]:
        return [e for r in self.requests if r["status"] == 202 for e in r["events"]]

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        events = loads_exact(raw)["events"]
        status = self.script.pop(0) if self.script else 202
        auth = request.headers.get("Authorization")
        self.requests.append({"status": status, "raw": raw, "events": events, "auth": auth})
        if status == 202:
            keys = [{"idempotency_key": e["idempotency_key"], "generated": False} for e in events]
            return web.json_response({"accepted": len(events), "events": keys}, status=202)
        if status == 422:
            errors = [{"index": self.reject_index or 0, "problems": ["timestamp: too late"]}]
            return web.json_response({"error": "1 event(s) invalid", "errors": errors}, status=422)
        headers = {"Retry-After": "0"} if status == 503 else {}
        return web.json_response({"error": f"status {status}"}, status=status, headers=headers)


@pytest.fixture
def server() -> Iterator[EventsServer]:
    running = EventsServer().start()
    try:
        yield running
    finally:
        running.stop()


class Errors:
    """An ``on_error`` callback that keeps what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, Any]], DeliveryError]] = []

    def __call__(self, events: list[dict[str, Any]], error: DeliveryError) -> None:
        self.calls.append((events, error))

    @property
    def keys(self) -> list[str]:
        return [e["idempotency_key"] for events, _ in self.calls for e in events]


def http_client(url: str, **options: Any) -> HttpUsageClient:
    options = {"linger": 0.05, "backoff_max": 0.2, "flush_at_exit": None, **options}
    return HttpUsageClient(url, "mk_test_secret", **options)


# --- UUIDv7 ------------------------------------------------------------------------------


def test_uuid7_layout_and_time() -> None:
    before = time.time_ns() // 1_000_000
    key = uuid7()
    after = time.time_ns() // 1_000_000
    assert UUID7.match(key), key
    parsed = uuid.UUID(key)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert before <= parsed.int >> 80 <= after


def test_uuid7_is_unique_and_sorts_in_issue_order() -> None:
    keys = [uuid7() for _ in range(20_000)]
    assert len(set(keys)) == len(keys)
    assert keys == sorted(keys)


def test_uuid7_stays_monotonic_when_the_clock_stands_still_or_steps_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([2_000_000_000_000_000_000] * 500 + [1_999_999_000_000_000_000] * 500)
    monkeypatch.setattr(time, "time_ns", lambda: next(clock))
    keys = [uuid7() for _ in range(1_000)]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    assert all(UUID7.match(k) for k in keys)


def test_backoff_is_capped_and_jittered() -> None:
    delays = [backoff_delay(n, 0.1, 5.0) for n in range(40)]
    assert all(0 < d <= 5.0 for d in delays)
    assert 0.05 <= delays[0] <= 0.1
    assert min(delays[-10:]) >= 2.5


# --- record(): checked on the caller's thread, never blocked ----------------------------


def test_record_raises_every_problem_and_buffers_nothing() -> None:
    with http_client(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(InvalidEvent) as caught:
            client.record(
                "",
                "c" * 201,
                properties=[1, 2],  # type: ignore[arg-type]
                idempotency_key="",
                timestamp=datetime(2026, 1, 1),  # naive
            )
        assert isinstance(caught.value, ValueError)
        problems = " | ".join(caught.value.problems)
        for field in ("event_name", "customer_id", "properties", "idempotency_key", "timestamp"):
            assert field in problems, problems
        assert len(caught.value.problems) == 5
        with pytest.raises(InvalidEvent, match="5 minutes in the future"):
            client.record("api", "c1", timestamp=datetime.now(UTC) + timedelta(hours=1))
        with pytest.raises(InvalidEvent, match="bytes > limit"):
            client.record("api", "c1", {"blob": "x" * 70_000})
        with pytest.raises(InvalidEvent, match="not JSON-serializable"):
            client.record("api", "c1", {"when": object()})
        assert client.pending == 0


def test_record_returns_at_once_while_nothing_listens_and_close_hands_back_the_rest() -> None:
    errors = Errors()
    client = http_client(f"http://127.0.0.1:{free_port()}", on_error=errors)
    keys = [client.record("api_call", "c1", {"n": i}) for i in range(5)]
    assert client.pending == 5 and client.sent == 0
    assert client.flush(timeout=0.5) is False
    assert client.close(timeout=0.5) is False
    assert errors.keys == keys, "unsent events are handed back, never dropped silently"
    assert isinstance(errors.calls[0][1], Abandoned)
    assert client.pending == 0 and client.failed == 5
    with pytest.raises(ClientClosed):
        client.record("api_call", "c1")


def test_kafka_client_record_does_not_wait_for_an_absent_broker() -> None:
    errors = Errors()
    client = UsageClient(
        f"127.0.0.1:{free_port()}", on_error=errors, flush_at_exit=None, request_timeout_ms=2000
    )
    key = client.record("api_call", "c1", {"n": 1})
    assert UUID7.match(key)
    assert client.pending == 1 and client.sent == 0
    assert client.close(timeout=0.5) is False
    assert errors.keys == [key]


def test_buffer_full_raises_at_once_and_keeps_what_it_has() -> None:
    client = http_client(f"http://127.0.0.1:{free_port()}", max_buffer=3)
    try:
        for i in range(3):
            client.record("api_call", "c1", {"n": i})
        with pytest.raises(BufferFull):
            client.record("api_call", "c1", {"n": 3})
        assert client.pending == 3
    finally:
        client.close(timeout=0.2)


def test_event_is_stamped_once_with_a_uuid7_and_exact_numbers(server: EventsServer) -> None:
    with http_client(server.url) as client:
        key = client.record("api_call", "c1", {"cost": Decimal("0.10"), "n": 3})
        explicit = client.record(
            "api_call", "c2", idempotency_key="mine-1", timestamp=1_790_000_000_000
        )
        aware = client.record(
            "api_call", "c3", timestamp=datetime(2026, 1, 1, 12, tzinfo=UTC) + timedelta(0, 0, 5)
        )
        assert client.flush(TIMEOUT)
    first, second, third = server.accepted()
    assert UUID7.match(key) and first["idempotency_key"] == key
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["timestamp"])
    assert b'"cost":0.10' in server.requests[0]["raw"], "the decimal is sent exactly"
    assert (explicit, second["timestamp"]) == ("mine-1", 1_790_000_000_000)
    assert third["timestamp"] == "2026-01-01T12:00:00.000+00:00"
    assert aware == third["idempotency_key"]
    assert server.requests[0]["auth"] == "Bearer mk_test_secret"


# --- delivery --------------------------------------------------------------------------


def test_transient_failures_resend_the_same_bytes_and_lose_nothing(server: EventsServer) -> None:
    server.script = [503, 500, 429]
    with http_client(server.url, linger=0.3) as client:
        keys = [client.record("api_call", "c1", {"n": i}) for i in range(5)]
        assert client.flush(TIMEOUT)
        assert (client.sent, client.failed, client.pending) == (5, 0, 0)
    assert [r["status"] for r in server.requests] == [503, 500, 429, 202]
    assert len({r["raw"] for r in server.requests}) == 1, "a retry re-sends the identical batch"
    assert [e["idempotency_key"] for e in server.accepted()] == keys


def test_connection_refused_is_retried_until_the_server_comes(server: EventsServer) -> None:
    port = free_port()
    with http_client(f"http://127.0.0.1:{port}") as client:
        keys = [client.record("api_call", "c1", {"n": i}) for i in range(3)]
        assert client.flush(timeout=1.0) is False
        late = EventsServer(port).start()
        try:
            assert client.flush(TIMEOUT)
        finally:
            late.stop()
    assert [e["idempotency_key"] for e in late.accepted()] == keys


def test_a_422_fails_only_the_blamed_event_and_resends_the_rest(server: EventsServer) -> None:
    server.script = [422]
    server.reject_index = 1
    errors = Errors()
    with http_client(server.url, linger=0.3, on_error=errors) as client:
        keys = [client.record("api_call", "c1", {"n": i}) for i in range(3)]
        assert client.flush(TIMEOUT)
        assert (client.sent, client.failed, client.pending) == (2, 1, 0)
    assert errors.keys == [keys[1]]
    error = errors.calls[0][1]
    assert error.status == 422 and "too late" in str(error.body)
    assert [r["status"] for r in server.requests] == [422, 202]
    assert [e["idempotency_key"] for e in server.accepted()] == [keys[0], keys[2]]


def test_a_401_is_not_retried(server: EventsServer) -> None:
    server.script = [401]
    errors = Errors()
    with http_client(server.url, linger=0.3, on_error=errors) as client:
        keys = [client.record("api_call", "c1", {"n": i}) for i in range(4)]
        assert client.flush(TIMEOUT)
        assert (client.sent, client.failed) == (0, 4)
        later = client.record("api_call", "c1")  # the client keeps working
        assert client.flush(TIMEOUT)
    assert errors.keys == keys and errors.calls[0][1].status == 401
    assert [r["status"] for r in server.requests] == [401, 202]
    assert [e["idempotency_key"] for e in server.accepted()] == [later]


def test_batches_hold_at_most_100_events_in_record_order(server: EventsServer) -> None:
    with http_client(server.url, linger=0.5) as client:
        keys = [client.record("api_call", f"c{i % 7}", {"n": i}) for i in range(250)]
        assert client.flush(TIMEOUT)
    sizes = [len(r["events"]) for r in server.requests]
    assert max(sizes) <= 100 and len(sizes) >= 3
    assert [e["idempotency_key"] for e in server.accepted()] == keys


def test_batches_respect_the_body_byte_limit(server: EventsServer) -> None:
    with http_client(server.url, linger=0.5, max_body_bytes=128 * 1024) as client:
        for i in range(10):
            client.record("api_call", "c1", {"blob": "x" * 30_000, "n": i})
        assert client.flush(TIMEOUT)
    assert all(len(r["raw"]) <= 128 * 1024 for r in server.requests)
    assert len(server.accepted()) == 10


def test_record_from_many_threads_delivers_each_event_once(server: EventsServer) -> None:
    with http_client(server.url) as client:
        keys = record_from_threads(client, threads=8, each=200)
        assert client.flush(TIMEOUT)
        assert client.sent == 1600
        assert len(client._unsettled) == len(client._settled) == 0, "the bookkeeping leaks"
    accepted = [e["idempotency_key"] for e in server.accepted()]
    assert sorted(accepted) == sorted(keys) and len(set(accepted)) == 1600


def test_close_flushes_what_was_recorded(server: EventsServer) -> None:
    client = http_client(server.url, linger=5.0)  # only close() makes it send now
    keys = [client.record("api_call", "c1", {"n": i}) for i in range(3)]
    assert client.close(TIMEOUT) is True
    assert not client._thread.is_alive(), "close() stops the background thread"
    assert [e["idempotency_key"] for e in server.accepted()] == keys
    assert client.close() is True  # a second close is harmless


def test_a_413_shrinks_the_batches_until_they_fit(server: EventsServer) -> None:
    server.script = [413, 413]
    errors = Errors()
    with http_client(server.url, linger=0.3, max_body_bytes=2048, on_error=errors) as client:
        keys = [client.record("api_call", "c1", {"blob": "x" * 300, "n": i}) for i in range(5)]
        assert client.flush(TIMEOUT)
        assert (client.sent, client.failed) == (5, 0)
        assert client.max_batch_bytes < 1024
    sizes = [len(r["events"]) for r in server.requests]
    assert sizes[0] > sizes[1] > sizes[2], sizes  # each 413 halves the byte limit
    assert [r["status"] for r in server.requests][:3] == [413, 413, 202]
    assert [e["idempotency_key"] for e in server.accepted()] == keys
    assert errors.calls == []


def test_a_413_for_a_single_event_is_permanent(server: EventsServer) -> None:
    server.script = [413]
    errors = Errors()
    with http_client(server.url, on_error=errors) as client:
        key = client.record("api_call", "c1")
        assert client.flush(TIMEOUT)
    assert errors.keys == [key] and errors.calls[0][1].status == 413
    assert len(server.requests) == 1


def test_kafka_client_from_settings_splits_its_options() -> None:
    from meterstream.settings import Settings

    settings = Settings(kafka_bootstrap_servers="127.0.0.1:1", topic_prefix="acme-")
    client = UsageClient.from_settings(settings, max_buffer=7, request_timeout_ms=1500)
    try:
        assert (client.bootstrap, client.topic) == ("127.0.0.1:1", "acme-usage-events")
        assert client.max_buffer == 7
        options = client.kafka_options
        assert options["request_timeout_ms"] == 1500 and options["security_protocol"] == "PLAINTEXT"
        assert (options["acks"], options["enable_idempotence"]) == ("all", False)
        assert "max_buffer" not in options
    finally:
        client.close(timeout=0)


def test_events_recorded_before_exit_are_sent_at_exit(server: EventsServer) -> None:
    """No close() at all: the atexit hook flushes before the interpreter goes."""
    script = (
        "from meterstream.client.sdk import HttpUsageClient\n"
        f"c = HttpUsageClient({server.url!r}, 'k', linger=5.0)\n"
        "print(c.record('api_call', 'c1'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert [e["idempotency_key"] for e in server.accepted()] == [done.stdout.strip()]
