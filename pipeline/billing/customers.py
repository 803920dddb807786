"""The customer mapping: meterstream ``customer_id`` -> the Stripe customer that pays.

The operator's decision (pipeline/billing/stripe_ids.py), kept durably in ClickHouse
(``customer_mappings``, append-only with who and when: sinks/stripe/customers.py).
It survives a restart of anything, the embedded broker included (which keeps
nothing). Ways in, all recorded in ClickHouse:

* ``meterstream customers set ID STRIPE_ID`` / ``unset ID`` (``get``, ``list``):
  through the running worker's HTTP API while it holds the embedded engine
  (``endpoints.json`` names it), otherwise straight to ClickHouse.
* ``PUT`` / ``DELETE /v1/stripe/customers/{customer_id}`` on a worker (an
  operator key; a key restricted to one customer gets 403).
* The compacted topic ``customers`` (public contract): key ``customer_id``
  (UTF-8), value JSON ``{"stripe_customer_id": "cus_..."}``, a null value
  (tombstone) removes the mapping. Every worker follows it (:class:`MappingStore`)
  and records each new record in ClickHouse, with the record's timestamp as the
  change's version. A replay of a recorded record (the same customer, timestamp
  and value) is not a new change; a record older than the customer's current
  mapping is ignored and logged. Changes made through the CLI or the API are
  also published there (timestamp = their version), for anything that follows
  the topic.

Each forward round reads the current mapping from ClickHouse, so a change made
anywhere applies within one forward interval, on every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar, cast

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from meterstream.billing.stripe_ids import check_stripe_customer_id
from meterstream.endpoints import kafka_bootstrap, web_url
from meterstream.errors import BadRecord, ConfigError, MeterstreamError
from meterstream.kafka import client_options, topic_partitions
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.client import open_clickhouse
from meterstream.sinks.clickhouse.migrate import migrate
from meterstream.sinks.stripe import customers as store
from meterstream.sinks.stripe.customers import MappingRow
from meterstream.topics import CUSTOMERS

log = logging.getLogger("meterstream.customers")

MAX_CUSTOMER_ID = 200


def check_customer_id(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CUSTOMER_ID:
        raise ValueError(f"customer id must be 1-{MAX_CUSTOMER_ID} characters")
    return value


def encode_mapping(stripe_customer_id: str | None) -> bytes | None:
    """The record value for a mapping (``None`` deletes it)."""
    if stripe_customer_id is None:
        return None
    return orjson.dumps({"stripe_customer_id": stripe_customer_id})


def decode_record(key: bytes | None, value: bytes | None) -> tuple[str, str | None]:
    """(customer, Stripe id or None for a removal) of a ``customers`` record."""
    try:
        customer = check_customer_id((key or b"").decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRecord(f"bad key {key!r}: {exc}") from None
    if value is None:
        return customer, None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise BadRecord(f"{customer}: value is not JSON") from None
    if not isinstance(doc, Mapping) or "stripe_customer_id" not in doc:
        raise BadRecord(f'{customer}: value is not {{"stripe_customer_id": ...}}')
    found = doc["stripe_customer_id"]
    if found is None:
        return customer, None
    try:
        return customer, check_stripe_customer_id(found)
    except ValueError as exc:
        raise BadRecord(f"{customer}: {exc}") from None


async def published(send: Awaitable[None], what: str, logger: logging.Logger) -> bool:
    """Await the topic copy of a change recorded durably already; whether it was published
    (a failure is a warning naming ``what``: the topic is a copy)."""
    try:
        await send
    except Exception as exc:  # recorded durably already; the topic is a copy
        logger.warning("%s not published to the topic: %s", what, exc)
        return False
    return True


async def publish(
    settings: Settings, bootstrap: str, customer_id: str, stripe_id: str, version: int
) -> None:
    """The change as a ``customers`` record (timestamp = its version)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        request_timeout_ms=10_000,
        **client_options(settings),
    )
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic(CUSTOMERS.name),
            key=customer_id.encode(),
            value=encode_mapping(stripe_id or None),
            timestamp_ms=version,
        )
    finally:
        await producer.stop()


class MappingStore:
    """The worker's side: changes through its API, the topic follower, the reads."""

    def __init__(self, settings: Settings, chio: ClickHouseIO, bootstrap: str) -> None:
        self.settings = settings
        self.chio = chio
        self.bootstrap = bootstrap
        self.ready = asyncio.Event()
        self._known: set[tuple[str, int, str]] | None = None
        self._lock = asyncio.Lock()

    async def rows(self) -> dict[str, MappingRow]:
        """The latest change of every customer (the API; ClickHouse errors to the caller)."""
        return await self.chio.call_once(store.current_rows)

    async def history(self, customer_id: str) -> list[MappingRow]:
        return await self.chio.call_once(store.history, customer_id)

    async def change(
        self, customer_id: str, stripe_id: str | None, origin: str, changed_by: str
    ) -> tuple[MappingRow | None, bool]:
        """Record a change (durable first), then publish it; returns (row, or None when
        the mapping already was that, and whether it was published on the topic)."""
        async with self._lock:
            row = await self.chio.call_once(
                store.append_change, customer_id, stripe_id, origin, changed_by
            )
            if row is None:
                return None, False
            if self._known is not None:
                self._known.add((row.customer_id, row.version, row.stripe_customer_id))
        log.warning(
            "customer mapping: %s -> %s (%s, by %s)",
            customer_id,
            stripe_id or "(removed)",
            origin,
            changed_by,
        )
        sent = publish(
            self.settings, self.bootstrap, customer_id, row.stripe_customer_id, row.version
        )
        return row, await published(sent, f"customer mapping of {customer_id}", log)

    async def import_record(
        self, key: bytes | None, value: bytes | None, timestamp_ms: int
    ) -> None:
        """One ``customers`` record: recorded in ClickHouse unless it is a replay or stale."""
        try:
            customer, stripe_id = decode_record(key, value)
        except BadRecord as exc:
            log.warning("customers topic: record ignored: %s", exc)
            return
        wanted = stripe_id or ""
        async with self._lock:
            if self._known is None:
                self._known = await self.chio.call(store.known_changes)
            if (customer, timestamp_ms, wanted) in self._known:
                return  # a replay of a recorded change
            current = (await self.chio.call(store.current_rows, [customer])).get(customer)
            if current is not None and (
                (current.version, current.stripe_customer_id) == (timestamp_ms, wanted)
            ):
                self._known.add((customer, timestamp_ms, wanted))
                return  # recorded by another worker or the CLI
            if timestamp_ms <= 0 or (current is not None and current.version >= timestamp_ms):
                log.warning(
                    "customers topic: record for %s (%s, timestamp %d) is older than its "
                    "current mapping (%s, version %d); ignored",
                    customer,
                    stripe_id or "removal",
                    timestamp_ms,
                    current.stripe_customer_id if current else "-",
                    current.version if current else 0,
                )
                return
            if current is None and stripe_id is None:
                return  # removing what was never mapped
            await self.chio.call(
                store.append_change, customer, stripe_id, "topic", "customers topic", timestamp_ms
            )
            self._known.add((customer, timestamp_ms, wanted))
        log.warning(
            "customer mapping: %s -> %s (customers topic)", customer, stripe_id or "(removed)"
        )

    async def follow(self) -> None:
        """Import the topic from the beginning and keep following it (every worker).

        ``ready`` is set once the records present at start-up are recorded.
        """
        topic = self.settings.topic(CUSTOMERS.name)
        await follow_topic(self.settings, self.bootstrap, topic, self.import_record, self.ready)


async def follow_topic(
    settings: Settings,
    bootstrap: str,
    topic: str,
    handle: Callable[[bytes | None, bytes | None, int], Awaitable[None]],
    ready: asyncio.Event,
) -> None:
    """Read a compacted topic from the beginning and keep following it, each record to
    ``handle(key, value, timestamp_ms)``; ``ready`` is set once the records present at
    start-up are handled."""

    from meterstream.kafka import client_options

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        **client_options(settings),
    )
    await consumer.start()
    try:
        partitions: set[int] = set()
        while not partitions:
            partitions = await topic_partitions(consumer, topic)
            if not partitions:
                await asyncio.sleep(1.0)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while True:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    await handle(record.key, record.value, record.timestamp)
            if not ready.is_set():
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                    ready.set()
    finally:
        await consumer.stop()


async def read_to_end(
    settings: Settings, bootstrap: str, topic: str, timeout: float
) -> dict[bytes | None, bytes | None]:
    """The last value per key of a compacted topic as it is now (read from the beginning to
    its end offsets at the call, with :func:`follow_topic`); ``TimeoutError`` past
    ``timeout`` seconds, the follower's error if it fails."""
    last: dict[bytes | None, bytes | None] = {}
    ready = asyncio.Event()

    async def keep(key: bytes | None, value: bytes | None, _timestamp: int) -> None:
        last[key] = value

    follower = asyncio.ensure_future(follow_topic(settings, bootstrap, topic, keep, ready))
    waiting = asyncio.ensure_future(ready.wait())
    try:
        done, _ = await asyncio.wait(
            {follower, waiting}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if follower in done:
            follower.result()  # its error (it never returns)
        if waiting not in done:
            raise TimeoutError(f"{topic} not read to its end in {timeout:g} s")
        return last
    finally:
        for task in (follower, waiting):
            task.cancel()
        await asyncio.gather(follower, waiting, return_exceptions=True)


# -------------------------------------------------------------- the CLI's side


def _operator() -> str:
    with contextlib.suppress(Exception):
        return f"{getpass.getuser()}@{socket.gethostname()}"
    return "unknown"


def _request(settings: Settings, method: str, url: str, body: Any = None) -> Any:
    # Inside: billing must not import the CLI (a known exception in pyproject.toml until
    # this client of the worker's routes moves out of billing/, with cli_key).
    from meterstream.cli.sql import call_worker

    data = (
        body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    )  # bytes: JSON already (exact decimals written by the caller)
    return call_worker(settings, method, url, data, 60, _refused)


def _refused(status: int, detail: str) -> Exception:
    with contextlib.suppress(ValueError, AttributeError):
        detail = json.loads(detail).get("error", detail)
    return MeterstreamError(f"the worker refused ({status}): {detail}")


def _customer_url(base: str, customer_id: str) -> str:
    return f"{base}/v1/stripe/customers/{urllib.parse.quote(customer_id, safe='')}"


def _direct(settings: Settings) -> Any:
    ch = open_clickhouse(settings)
    try:
        migrate(ch)
    except BaseException:
        ch.close()
        raise
    return ch


def set_mapping(settings: Settings, customer_id: str, stripe_id: str | None) -> dict[str, Any]:
    """Set (or with ``None`` remove) a customer's mapping, through the worker or directly.

    Returns ``{"change": row or None (unchanged), "published": bool}``.
    """
    check_customer_id(customer_id)
    if stripe_id is not None:
        check_stripe_customer_id(stripe_id)
    url = web_url(settings)
    if url:
        if stripe_id is None:
            return dict(_request(settings, "DELETE", _customer_url(url, customer_id)))
        body = {"stripe_customer_id": stripe_id}
        return dict(_request(settings, "PUT", _customer_url(url, customer_id), body))
    return direct_change(
        settings,
        lambda ch: store.append_change(ch, customer_id, stripe_id, "cli", _operator()),
        lambda row, bootstrap: publish(
            settings, bootstrap, customer_id, row.stripe_customer_id, row.version
        ),
    )


class _Change(Protocol):
    def public(self) -> dict[str, Any]: ...


_C = TypeVar("_C", bound=_Change)


def direct_change(
    settings: Settings,
    record: Callable[[Any], _C | None],
    send: Callable[[_C, str], Awaitable[None]],
) -> dict[str, Any]:
    """A change the CLI records in ClickHouse itself (no worker): ``record(ch)`` returns the
    new row (``None``: nothing changed), ``send(row, bootstrap)`` publishes its copy
    (:func:`publish_copy`). Returns ``{"change": row or None, "published": bool}``."""
    ch = _direct(settings)
    try:
        row = record(ch)
    finally:
        ch.close()
    if row is None:
        return {"change": None, "published": False}
    published = publish_copy(settings, lambda bootstrap: send(row, bootstrap))
    return {"change": row.public(), "published": published}


def publish_copy(settings: Settings, send: Callable[[str], Awaitable[None]]) -> bool:
    """Publish a change the CLI recorded in ClickHouse itself, on its topic, when a broker
    is known (``send(bootstrap)``); whether it was. ClickHouse has the change: the topic
    is a copy, so a failure is a warning."""
    with contextlib.suppress(ConfigError):
        bootstrap = kafka_bootstrap(settings)
        try:
            asyncio.run(cast(Any, send(bootstrap)))
            return True
        except Exception as exc:  # recorded in ClickHouse; the topic is a copy
            log.warning("not published to the topic: %s", exc)
    return False


def list_mappings(settings: Settings) -> dict[str, Any]:
    """``{"customers": [current rows], "held": [...]}`` through the worker or directly
    (``held``, the customers the forwarder holds, only from a running worker)."""
    url = web_url(settings)
    if url:
        return dict(_request(settings, "GET", f"{url}/v1/stripe/customers"))
    ch = _direct(settings)
    try:
        rows = store.current_rows(ch)
    finally:
        ch.close()
    return {"customers": [r.public() for r in rows.values() if r.stripe_customer_id], "held": []}


def get_mapping(settings: Settings, customer_id: str) -> dict[str, Any]:
    """``{"customer_id", "stripe_customer_id" (None: not mapped), "history": [...], "held"}``."""
    url = web_url(settings)
    if url:
        return dict(_request(settings, "GET", _customer_url(url, customer_id)))
    ch = _direct(settings)
    try:
        rows = store.history(ch, customer_id)
    finally:
        ch.close()
    return mapping_document(customer_id, rows, [])


def mapping_document(
    customer_id: str, history: list[MappingRow], held: list[dict[str, str]]
) -> dict[str, Any]:
    """The answer of ``GET /v1/stripe/customers/{id}`` (and of ``customers get``)."""
    current = max(history, key=lambda r: r.version, default=None)
    return {
        "customer_id": customer_id,
        "stripe_customer_id": (current.stripe_customer_id or None) if current else None,
        "history": [r.public() for r in history],
        "held": held,
    }
