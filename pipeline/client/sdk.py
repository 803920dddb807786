"""The producer SDK: record usage events from any Python program without blocking it.

Two clients with one behaviour:

- :class:`UsageClient` writes straight to Kafka (``usage-events``, key =
  customer_id, acks from all in-sync replicas);
- :class:`HttpUsageClient` posts batches to the worker's ``POST /v1/events``.

``record()`` checks the event against the event contract on the caller's
thread (a bad event raises :class:`InvalidEvent` and never enters the buffer),
fixes its idempotency key (a UUIDv7, unless given) and its timestamp (now,
unless given), serializes it once, and appends it to a bounded buffer. It
never waits for the network. A background thread, with its own asyncio loop,
drains the buffer in batches.

Order of side effects for each batch, and what each step guarantees:

1. Send the batch (Kafka: every record acknowledged by all in-sync replicas;
   HTTP: a 202, which the server sends only after the same acknowledgement).
2. Only then count its events as ``sent``. A transient failure (network,
   timeout, broker moving, HTTP 429/5xx) resends the *same bytes* with the
   *same idempotency keys* after a capped exponential backoff with jitter,
   forever: a batch that was written but whose acknowledgement was lost is
   written twice, and the pipeline counts it once (dedup by key).
3. A permanent failure (HTTP 400/401/403/413/415/422, a Kafka record the
   broker refuses for good) is not retried: it is logged, counted as
   ``failed`` and handed to ``on_error(events, error)``. Nothing is dropped
   silently.

A full buffer raises :class:`BufferFull` at once: the caller decides (retry
later, spill to disk, shed load); the client never blocks and never drops.

:class:`UsageClient` never creates topics. Its metadata requests ask the
broker not to auto-create (a broker that auto-creates would make the topic
with its own partition count and settings, e.g. an embedded broker that just
restarted empty); until the worker (or ``meterstream``'s start-up) creates the
topic, sends fail transiently and are retried.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import heapq
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self, TypedDict, Unpack

from meterstream.endpoints import kafka_bootstrap
from meterstream.errors import MeterstreamError
from meterstream.events import (
    MAX_EVENT_BYTES,
    MAX_FUTURE_MS,
    canonical_json,
    loads_exact,
    validate_document,
)
from meterstream.kafka import client_options

if TYPE_CHECKING:
    import aiohttp
    from aiokafka import AIOKafkaProducer

    from meterstream.settings import Settings

log = logging.getLogger("meterstream.client")

DEFAULT_MAX_BUFFER = 10_000
DEFAULT_LINGER_SECONDS = 0.2
HTTP_MAX_BATCH = 100  # the events API's batch limit
HTTP_MAX_BODY_BYTES = 1024 * 1024  # the events API's default body limit
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

ErrorCallback = Callable[[list[dict[str, Any]], "DeliveryError"], None]


class ClientOptions(TypedDict, total=False):
    """What both clients take besides their destination (see :class:`_BatchingClient`)."""

    max_buffer: int  # unacknowledged events held at most; beyond, record() raises BufferFull
    linger: float  # seconds a batch waits to fill up
    batch_size: int  # events per batch (HTTP: at most 100)
    on_error: ErrorCallback | None  # called with events that failed for good, and why
    backoff_base: float  # first retry delay, seconds (doubles per retry, with jitter)
    backoff_max: float  # the retry delay's cap, seconds
    flush_at_exit: float | None  # seconds close() may take at interpreter exit; None: no hook


CLIENT_OPTIONS = frozenset(ClientOptions.__annotations__)


class ClientError(MeterstreamError):
    """Root of the producer SDK's exceptions."""


class InvalidEvent(ClientError, ValueError):
    """The event breaks the event contract; ``problems`` lists every problem. Not buffered."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid usage event: " + "; ".join(self.problems))


class BufferFull(ClientError):
    """The buffer holds ``max_buffer`` unacknowledged events; this event was not accepted."""


class ClientClosed(ClientError):
    """``record()`` after ``close()``: the event was not taken."""


class DeliveryError(ClientError):
    """Events were refused for good (not retried); ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        self.status = status
        self.body = body
        super().__init__(message)


class Abandoned(DeliveryError):
    """The client stopped (``close`` timed out) before these events were acknowledged."""


# --- time-ordered idempotency keys (UUIDv7, RFC 9562) ------------------------------------

_uuid7_lock = threading.Lock()
_uuid7_last = (0, 0)  # (unix ms, 74 random-and-counter bits) of the last key issued


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix ms, version 7, variant, 74 random bits.

    Monotonic within the process (RFC 9562, section 6.2, method 2): keys issued in
    the same millisecond (or after the clock stepped back) continue from the
    previous key's random bits + 1, so every key sorts after the one before it.
    """
    global _uuid7_last
    with _uuid7_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_rand = _uuid7_last
        if ms > last_ms:
            rand = int.from_bytes(os.urandom(10)) >> 6  # 74 bits
        else:
            ms, rand = last_ms, last_rand + 1 + (int.from_bytes(os.urandom(2)) & 0xFF)
            if rand >= 1 << 74:  # the 74 bits overflowed: borrow the next millisecond
                ms, rand = ms + 1, int.from_bytes(os.urandom(10)) >> 7
        _uuid7_last = (ms, rand)
    rand_a, rand_b = rand >> 62, rand & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def rfc3339_ms(moment: datetime) -> str:
    """``2026-01-02T03:04:05.678+00:00``: UTC, millisecond precision, with offset."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


# --- one checked event -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pending:
    seq: int
    idempotency_key: str
    key: bytes  # customer_id, the Kafka record key
    value: bytes  # canonical JSON of the complete event: every retry sends these bytes

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = loads_exact(self.value)
        return doc


def build_event(
    event_name: str,
    customer_id: str,
    properties: dict[str, Any] | None,
    *,
    idempotency_key: str | None,
    timestamp: datetime | str | int | None,
) -> tuple[str, bytes, bytes]:
    """Check an event against the contract; (idempotency key, record key, value) or
    :class:`InvalidEvent` with every problem."""
    problems: list[str] = []
    if isinstance(timestamp, datetime):
        if timestamp.tzinfo is None:
            problems.append("timestamp: a datetime must be timezone-aware")
        stamp: str | int = rfc3339_ms(timestamp)
    else:
        stamp = rfc3339_ms(datetime.now(UTC)) if timestamp is None else timestamp
    doc = {
        "event_name": event_name,
        "customer_id": customer_id,
        "idempotency_key": uuid7() if idempotency_key is None else idempotency_key,
        "timestamp": stamp,
        "properties": {} if properties is None else properties,
    }
    value = b""
    try:
        value = canonical_json(doc).encode()
    except (TypeError, ValueError) as exc:
        problems.append(f"event: not JSON-serializable: {exc}")
        doc = {**doc, "properties": {}}  # still report every other problem
    if len(value) > MAX_EVENT_BYTES:
        problems.append(f"event: {len(value)} bytes > limit {MAX_EVENT_BYTES}")
    now_ms = time.time_ns() // 1_000_000
    event, found = validate_document(doc, record_timestamp_ms=now_ms)
    problems.extend(found)
    if event is not None and event.timestamp_ms > now_ms + MAX_FUTURE_MS:
        problems.append("timestamp: more than 5 minutes in the future")
    if problems:
        raise InvalidEvent(problems)
    return str(doc["idempotency_key"]), customer_id.encode(), value


# --- failures as the delivery loop sees them -------------------------------------------


@dataclass
class Attempt:
    """What became of one send of a batch. Events in none of the lists were acknowledged."""

    retry: list[_Pending] = field(default_factory=list)  # transient: back off, resend
    failed: list[tuple[list[_Pending], DeliveryError]] = field(default_factory=list)
    requeue: list[_Pending] = field(default_factory=list)  # not written, not at fault: resend
    retry_after: float = 0.0  # the server's Retry-After, seconds
    cause: str = ""  # why retry/requeue, for the log


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Capped exponential backoff with equal jitter: in [d/2, d], d = min(cap, base * 2^n)."""
    delay = min(cap, base * 2 ** min(attempt, 32))
    return delay / 2 + random.uniform(0, delay / 2)


class _BatchingClient:
    """The buffer, the background thread and its loop, flush/close and the counters.

    Subclasses say how to open, send one batch, and close (:meth:`_attempt`).
    """

    max_batch = 500
    max_batch_bytes = 4 * 1024 * 1024

    def __init__(
        self,
        *,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        linger: float = DEFAULT_LINGER_SECONDS,
        batch_size: int | None = None,
        on_error: ErrorCallback | None = None,
        backoff_base: float = 0.1,
        backoff_max: float = 10.0,
        flush_at_exit: float | None = 5.0,
    ) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        if batch_size is not None:
            self.max_batch = batch_size
        self.max_buffer = max_buffer
        self.linger = linger
        self.on_error = on_error
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._cond = threading.Condition()
        self._buffer: deque[_Pending] = deque()
        self._in_flight: list[_Pending] = []  # the batch being sent
        self._unsettled: list[int] = []  # heap of seqs not yet sent or failed
        self._settled: set[int] = set()  # settled seqs still in the heap (lazy deletion)
        self._seq = 0
        self._sent = 0
        self._failed = 0
        self._closed = False  # record() refuses new events
        self._stopping = False  # the background loop ends
        self._urgent = False  # a flush or close wants the buffer sent without lingering
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._task: asyncio.Future[None] | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(
            target=self._run_thread, name=f"meterstream-{type(self).__name__}", daemon=True
        )
        self._thread.start()
        self._started.wait()
        self._flush_at_exit = flush_at_exit
        if flush_at_exit is not None:
            atexit.register(self._at_exit)

    # --- the caller's side ---------------------------------------------------------------

    def record(
        self,
        event_name: str,
        customer_id: str,
        properties: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        timestamp: datetime | str | int | None = None,
    ) -> str:
        """Buffer one usage event for sending; returns its idempotency key. Never blocks
        on the network. Raises :class:`InvalidEvent` (every problem listed),
        :class:`BufferFull` or :class:`ClientClosed`; then the event was not taken."""
        key, record_key, value = build_event(
            event_name,
            customer_id,
            properties,
            idempotency_key=idempotency_key,
            timestamp=timestamp,
        )
        with self._cond:
            if self._closed:
                raise ClientClosed("record() after close()")
            if len(self._unsettled) - len(self._settled) >= self.max_buffer:
                raise BufferFull(
                    f"{self.max_buffer} events are waiting to be acknowledged; "
                    "event not accepted (record it again later)"
                )
            self._seq += 1
            self._buffer.append(_Pending(self._seq, key, record_key, value))
            heapq.heappush(self._unsettled, self._seq)
            if len(self._buffer) == 1 or len(self._buffer) >= self.max_batch:
                self._wakeup()
        return key

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event recorded before this call is acknowledged or has failed
        permanently. False if ``timeout`` (seconds) passed first."""
        with self._cond:
            target = self._seq
            self._urgent = True
            self._wakeup()
            done = self._cond.wait_for(lambda: self._oldest_unsettled() > target, timeout)
            return bool(done)

    def close(self, timeout: float | None = None) -> bool:
        """Flush (up to ``timeout``), then stop the background thread. Events still
        unacknowledged then fail with :class:`Abandoned` (logged, ``on_error``; they may
        or may not have been written, and resending them with their keys is safe).
        True if everything was acknowledged or failed permanently before the stop."""
        with self._cond:
            if self._closed and not self._thread.is_alive():
                return self.pending == 0
            self._closed = True
        flushed = self.flush(timeout)
        with self._cond:
            self._stopping = True  # the loop's own check: a cancellation can be swallowed
            self._wakeup()
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)  # interrupt a send or a backoff
        self._thread.join(30)
        if self._flush_at_exit is not None:
            atexit.unregister(self._at_exit)
        return flushed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def sent(self) -> int:
        """Events acknowledged (Kafka acks=all, or HTTP 202)."""
        return self._sent

    @property
    def failed(self) -> int:
        """Events refused for good (or abandoned at close), handed to ``on_error``."""
        return self._failed

    @property
    def pending(self) -> int:
        """Events recorded but neither acknowledged nor failed yet."""
        with self._cond:
            return len(self._unsettled) - len(self._settled)

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.close(self._flush_at_exit)

    def _oldest_unsettled(self) -> int:
        """The smallest unsettled seq (``self._seq + 1`` when none). Holds ``_cond``."""
        while self._unsettled and self._unsettled[0] in self._settled:
            self._settled.discard(heapq.heappop(self._unsettled))
        return self._unsettled[0] if self._unsettled else self._seq + 1

    def _wakeup(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to wake
            self._loop.call_soon_threadsafe(self._wake.set)

    # --- the background thread -----------------------------------------------------------

    def _run_thread(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self._main())
        self._started.set()
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            self._abandon_all()
            self._loop.run_until_complete(self._shutdown())
            self._loop.close()

    async def _main(self) -> None:
        await self._open()
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            await self._linger()
            while not self._stopping and (batch := self._take()):
                await self._deliver(batch)

    async def _linger(self) -> None:
        """Wait for a full batch, the linger time, or a flush: whichever comes first."""
        deadline = self._loop.time() + self.linger
        while not self._urgent and len(self._buffer) < self.max_batch:
            left = deadline - self._loop.time()
            if left <= 0:
                return
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._wake.wait()
            self._wake.clear()

    def _take(self) -> list[_Pending]:
        with self._cond:
            batch: list[_Pending] = []
            size = 0
            while self._buffer and len(batch) < self.max_batch:
                nxt = len(self._buffer[0].value) + 1
                if batch and size + nxt > self.max_batch_bytes:
                    break
                batch.append(self._buffer.popleft())
                size += nxt
            if not self._buffer:
                self._urgent = False
            return batch

    async def _deliver(self, batch: list[_Pending]) -> None:
        """Send until every event of the batch is acknowledged or failed for good."""
        todo, attempt = batch, 0
        while todo and not self._stopping:
            self._in_flight = todo
            try:
                result = await self._attempt(todo)
            except Exception as exc:  # a bug or an unforeseen failure: keep the events
                log.exception("usage events: unexpected failure sending a batch")
                result = Attempt(retry=list(todo), cause=repr(exc))
            unresolved = {e.seq for e in result.retry + result.requeue}
            unresolved.update(e.seq for events, _ in result.failed for e in events)
            self._settle([e for e in todo if e.seq not in unresolved], sent=True)
            for events, error in result.failed:
                self._fail(events, error)
            if result.requeue:
                log.info(
                    "usage events: resending %d event(s): %s", len(result.requeue), result.cause
                )
                with self._cond:
                    self._buffer.extendleft(reversed(result.requeue))
            todo = self._in_flight = result.retry
            if todo:
                delay = max(
                    backoff_delay(attempt, self.backoff_base, self.backoff_max),
                    min(result.retry_after, 60.0),
                )
                log.warning(
                    "usage events: %d event(s) not acknowledged (%s); retry in %.1fs",
                    len(todo),
                    result.cause,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)

    def _settle(self, events: Sequence[_Pending], *, sent: bool) -> None:
        if not events:
            return
        with self._cond:
            self._settled.update(e.seq for e in events)
            if sent:
                self._sent += len(events)
            else:
                self._failed += len(events)
            self._oldest_unsettled()  # prunes the heap: it stays as small as what is pending
            self._cond.notify_all()

    def _fail(self, events: list[_Pending], error: DeliveryError) -> None:
        log.error("usage events: %d event(s) failed for good (not retried): %s", len(events), error)
        if self.on_error is not None:
            try:
                self.on_error([e.document() for e in events], error)
            except Exception:
                log.exception("usage events: the on_error callback failed")
        self._settle(events, sent=False)

    def _abandon_all(self) -> None:
        """At stop: what is still unsettled fails with :class:`Abandoned` (never silently)."""
        with self._cond:
            self._closed = True
            unsettled = set(self._unsettled) - self._settled
            left = [e for e in self._in_flight if e.seq in unsettled] + list(self._buffer)
            self._buffer.clear()
            self._in_flight = []
        if left:
            self._fail(left, Abandoned(f"client closed with {len(left)} event(s) unacknowledged"))

    # --- what a transport provides -------------------------------------------------------

    async def _open(self) -> None:
        """Prepare the transport in the background loop (must not fail)."""

    async def _attempt(self, batch: list[_Pending]) -> Attempt:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        """Release the transport."""


# --- Kafka -----------------------------------------------------------------------------


class _NoAutoCreateConnection:
    """A broker connection whose topic-metadata requests say ``allow_auto_topic_creation
    = false`` (Metadata v4+; older versions leave it to the broker's configuration)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        from aiokafka.protocol.metadata import MetadataRequest

        if isinstance(request, MetadataRequest) and request._topics:
            request = MetadataRequest(request._topics, allow_auto_topic_creation=False)
        return self._conn.send(request, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _no_auto_create(producer: AIOKafkaProducer) -> None:
    client = producer.client
    get_conn = client._get_conn

    async def _get_conn(*args: Any, **kwargs: Any) -> Any:
        conn = await get_conn(*args, **kwargs)
        return None if conn is None else _NoAutoCreateConnection(conn)

    client._get_conn = _get_conn


def _kafka_permanent(exc: BaseException) -> bool:
    """Errors a resend cannot fix: the record or the credentials are refused."""
    from aiokafka import errors

    return isinstance(
        exc,
        errors.MessageSizeTooLargeError
        | errors.RecordListTooLargeError
        | errors.InvalidTopicError
        | errors.TopicAuthorizationFailedError
        | errors.ClusterAuthorizationFailedError
        | errors.CorruptRecordException,
    )


class UsageClient(_BatchingClient):
    """Record usage events straight to Kafka (``usage-events``, key = customer_id).

    ``options`` are :class:`ClientOptions`; the rest go to ``AIOKafkaProducer``
    (security_protocol, sasl_*, ssl_context, request_timeout_ms, ...). acks is
    always "all"; the idempotent producer stays off (the embedded broker has
    none); duplicates from resends are absorbed by the pipeline's dedup on the
    idempotency key. ``verify_topic``: count a batch as sent only if fresh
    metadata still shows the topic after its acks (see :meth:`_topic_exists`).
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        topic: str = "usage-events",
        verify_topic: bool = True,
        **options: Any,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.verify_topic = verify_topic
        sdk = {name: options.pop(name) for name in CLIENT_OPTIONS if name in options}
        self.kafka_options = {
            "request_timeout_ms": 10_000,
            "retry_backoff_ms": 250,
            "linger_ms": 5,
            **options,
        }
        self.kafka_options.update(acks="all", enable_idempotence=False)
        self._producer: AIOKafkaProducer | None = None
        super().__init__(**sdk)

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> UsageClient:
        """A client for the broker, credentials and topic prefix of ``settings``."""
        return cls(
            kafka_bootstrap(settings),
            topic=settings.topic("usage-events"),
            **{**client_options(settings), **options},
        )

    async def _producer_started(self) -> AIOKafkaProducer:
        if self._producer is None:
            from aiokafka import AIOKafkaProducer

            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **self.kafka_options)
            _no_auto_create(producer)
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 5)
                raise
            self._producer = producer
        return self._producer

    async def _attempt(self, batch: list[_Pending]) -> Attempt:
        from aiokafka.errors import KafkaError

        result = Attempt()
        try:
            producer = await self._producer_started()
        except (KafkaError, OSError, TimeoutError) as exc:
            return Attempt(retry=list(batch), cause=f"connecting: {exc!r}")
        queued: list[tuple[_Pending, asyncio.Future[Any]]] = []
        for i, event in enumerate(batch):
            try:
                future = await producer.send(self.topic, key=event.key, value=event.value)
            except (KafkaError, OSError, TimeoutError) as exc:
                if _kafka_permanent(exc):
                    result.failed.append(([event], DeliveryError(f"Kafka refused: {exc!r}")))
                    continue
                result.retry.extend(batch[i:])  # the broker is unwell: stop queueing
                result.cause = repr(exc)
                break
            queued.append((event, future))
        outcomes = await asyncio.gather(*(f for _, f in queued), return_exceptions=True)
        acked = [
            e for (e, _), o in zip(queued, outcomes, strict=True) if not isinstance(o, Exception)
        ]
        if acked and self.verify_topic and not await self._topic_exists(producer):
            result.retry.extend(acked)
            result.cause = f"acknowledged, but topic {self.topic!r} is missing: not counted"
        for (event, _), outcome in zip(queued, outcomes, strict=True):
            if not isinstance(outcome, BaseException):
                continue
            if _kafka_permanent(outcome):
                result.failed.append(([event], DeliveryError(f"Kafka refused: {outcome!r}")))
            else:
                result.retry.append(event)
                result.cause = repr(outcome)
        result.retry.sort(key=lambda e: e.seq)
        return result

    async def _topic_exists(self, producer: AIOKafkaProducer) -> bool:
        """Fresh metadata (never auto-creating) shows the topic. Tansu with memory storage
        that restarted empty acknowledges records for a topic it no longer has, and they
        are gone once the topic is created again: such acks must not count."""
        client = producer.client
        try:
            async with asyncio.timeout(self.kafka_options["request_timeout_ms"] / 1000):
                updated = await client.force_metadata_update()
        except TimeoutError:
            return False
        return bool(updated) and client.cluster.partitions_for_topic(self.topic) is not None

    async def _shutdown(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), 10)
            self._producer = None


# --- HTTP ------------------------------------------------------------------------------


def _indexes(body: Any) -> set[int]:
    """The event indexes a 422/403 answer blames (``{"errors": [{"index": i}, ...]}``)."""
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return set()
    return {e["index"] for e in errors if isinstance(e, dict) and isinstance(e.get("index"), int)}


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


class HttpUsageClient(_BatchingClient):
    """Record usage events through a worker's ``POST {url}/v1/events`` (API key auth).

    Batches hold at most 100 events and ``max_body_bytes`` bytes (the server's
    default body limit). A 422 or 403 names the bad events by index: those fail,
    the others of the batch (not written, since a batch is all or nothing) are
    sent again at once. A 413 for a batch of several events halves the batch
    byte limit and resends; for a single event it is permanent.
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        max_body_bytes: int = HTTP_MAX_BODY_BYTES,
        request_timeout: float = 30.0,
        **options: Unpack[ClientOptions],
    ) -> None:
        options.setdefault("batch_size", HTTP_MAX_BATCH)
        if not 1 <= options["batch_size"] <= HTTP_MAX_BATCH:
            raise ValueError(f"batch_size must be 1-{HTTP_MAX_BATCH}")
        self.url = url.rstrip("/") + "/v1/events"
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.max_batch_bytes = max_body_bytes - len(b'{"events":[]}')
        self.request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        super().__init__(**options)

    async def _open(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.request_timeout)
        )

    async def _attempt(self, batch: list[_Pending]) -> Attempt:
        import aiohttp

        assert self._session is not None
        body = b'{"events":[' + b",".join(e.value for e in batch) + b"]}"
        try:
            async with self._session.post(self.url, data=body, headers=self._headers) as resp:
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                text = await resp.text(errors="replace")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Attempt(retry=list(batch), cause=repr(exc))
        if status == 202:
            return Attempt()
        try:
            answer: Any = loads_exact(text)
        except ValueError:
            answer = text
        if status in RETRYABLE_STATUSES or status >= 500:
            return Attempt(retry=list(batch), retry_after=retry_after, cause=f"HTTP {status}")
        message = answer.get("error", text) if isinstance(answer, dict) else text
        error = DeliveryError(f"HTTP {status}: {message}", status=status, body=answer)
        if status == 413 and len(batch) > 1:
            self.max_batch_bytes = max(1, self.max_batch_bytes // 2)  # down to 1 event
            cause = f"HTTP 413: batch limit now {self.max_batch_bytes} bytes"
            return Attempt(requeue=list(batch), cause=cause)
        blamed = _indexes(answer) if status in (403, 422) else set()
        if blamed and len(blamed) < len(batch):
            bad = [e for i, e in enumerate(batch) if i in blamed]
            good = [e for i, e in enumerate(batch) if i not in blamed]
            return Attempt(failed=[(bad, error)], requeue=good, cause=f"HTTP {status}, others")
        return Attempt(failed=[(list(batch), error)])

    async def _shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
