"""The customer mapping: meterstream ``customer_id`` -> Stripe customer id.

It lives on the compacted topic ``customers`` (topics.CUSTOMERS), keyed by
``customer_id`` (UTF-8), value JSON ``{"stripe_customer_id": "cus_..."}``; a
null value (tombstone) deletes the mapping. The latest record per key wins.

* ``meterstream customers set ID STRIPE_ID`` / ``unset ID`` write it;
  ``customers get ID`` / ``customers list`` read the topic from the beginning.
* The worker keeps the whole mapping in memory (:class:`MappingFollower`):
  every worker reads every partition and keeps following it, so a new
  mapping reaches the forwarder within one forward interval. Meters with ``stripe.customer_id_from:
  mapping`` read it; customers without a mapping are held (never dropped) and
  counted in ``meterstream_stripe_waiting_customers`` until it appears.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import orjson

from pipeline.settings import Settings
from topics import CUSTOMERS


def encode_mapping(stripe_customer_id: str | None) -> bytes | None:
    """The record value for a mapping (``None`` deletes it)."""
    if stripe_customer_id is None:
        return None
    return orjson.dumps({"stripe_customer_id": stripe_customer_id})


def stripe_id_of(value: Any) -> str | None:
    """The Stripe customer id of a decoded record value (``None`` when unusable)."""
    if isinstance(value, bytes | str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    if isinstance(value, Mapping):
        found = value.get("stripe_customer_id")
        if isinstance(found, str) and found:
            return found
    return None


class MappingFollower:
    """The whole mapping, kept in memory by following every partition of the topic.

    Every worker reads the topic from the beginning (no consumer group) and
    keeps following it, so a new mapping reaches the forwarder within one
    forward interval. ``ready`` is set once the records present at start-up
    have been read.

    Why not a Faust ``GlobalTable`` with this topic as its changelog: with
    faust-streaming 0.15.3 on the embedded broker the worker's first group
    assignment never completes once a GlobalTable is declared (the worker
    stays in "performing partition assignments"), so nothing is consumed.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.mapping: dict[str, str] = {}
        self.ready = asyncio.Event()

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        customer = (key or b"").decode()
        stripe_id = stripe_id_of(value) if value is not None else None
        if stripe_id:
            self.mapping[customer] = stripe_id
        else:
            self.mapping.pop(customer, None)

    def lookup(self, customers: list[str]) -> dict[str, str]:
        return {c: self.mapping[c] for c in customers if c in self.mapping}

    async def run(self, bootstrap: str) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = self.settings.topic(CUSTOMERS.name)
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions: set[int] = set()
            while not partitions:
                await consumer.topics()
                partitions = consumer.partitions_for_topic(topic) or set()
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
                        self.apply(record.key, record.value)
                if not self.ready.is_set():
                    positions = [await consumer.position(tp) for tp in tps]
                    if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                        self.ready.set()
        finally:
            await consumer.stop()


# -------------------------------------------------------------- the topic, from outside


async def write_mapping(
    settings: Settings, customer_id: str, stripe_customer_id: str | None
) -> None:
    from aiokafka import AIOKafkaProducer

    from pipeline.endpoints import kafka_bootstrap

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap(settings), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic(CUSTOMERS.name),
            key=customer_id.encode(),
            value=encode_mapping(stripe_customer_id),
        )
    finally:
        await producer.stop()


async def read_mapping(settings: Settings, idle_seconds: float = 1.0) -> dict[str, str]:
    """The whole mapping, read from the beginning of the topic (the latest record per key)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from pipeline.endpoints import kafka_bootstrap

    topic = settings.topic(CUSTOMERS.name)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap(settings), enable_auto_commit=False
    )
    await consumer.start()
    mapping: dict[str, str] = {}
    try:
        await consumer.topics()  # fetch metadata for every topic
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return mapping
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        # Read up to the reported end, then until the topic has been quiet for a
        # moment (the embedded broker may report an end offset that is too early).
        last_data = time.monotonic()
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    last_data = time.monotonic()
                    key = (record.key or b"").decode()
                    stripe_id = stripe_id_of(record.value) if record.value is not None else None
                    if stripe_id:
                        mapping[key] = stripe_id
                    else:
                        mapping.pop(key, None)
            reached = all([await consumer.position(tp) >= ends[tp] for tp in tps])
            if reached and time.monotonic() - last_data >= idle_seconds:
                return mapping
    finally:
        await consumer.stop()


def read_mapping_sync(settings: Settings) -> dict[str, str]:
    return asyncio.run(read_mapping(settings))
