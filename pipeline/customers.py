"""The customer mapping: meterstream ``customer_id`` -> Stripe customer id.

It lives on the compacted topic ``customers`` (topics.CUSTOMERS), keyed by
``customer_id`` (UTF-8), value JSON ``{"stripe_customer_id": "cus_..."}``; a
null value (tombstone) deletes the mapping. The latest record per key wins.

* ``meterstream customers set ID STRIPE_ID`` / ``unset ID`` write it;
  ``customers get ID`` / ``customers list`` read the topic from the beginning.
* The worker keeps the whole mapping in a Faust ``GlobalTable`` whose
  changelog *is* this topic (:func:`mapping_table`): every worker reads every
  partition and keeps following it, so a new mapping reaches the forwarder
  within one forward interval. Meters with ``stripe.customer_id_from:
  mapping`` read it; customers without a mapping are held (never dropped) and
  counted in ``meterstream_stripe_waiting_customers`` until it appears.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import faust
import orjson

from pipeline.settings import Settings
from topics import CUSTOMERS

TABLE_NAME = "customers"


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


def mapping_table(app: faust.App, settings: Settings) -> Any:
    """A GlobalTable over the ``customers`` topic (its changelog; the worker never writes it)."""
    schema: faust.Schema = faust.Schema(
        key_type=bytes, value_type=None, key_serializer="raw", value_serializer="json"
    )
    changelog = app.topic(
        settings.topic(CUSTOMERS.name),
        schema=schema,
        partitions=settings.partitions,
        compacting=True,
        deleting=False,
    )
    return app.GlobalTable(
        TABLE_NAME,
        partitions=settings.partitions,
        schema=schema,
        changelog_topic=changelog,
        recovery_buffer_size=1,
    )


def lookup(table: Any, customers: list[str]) -> dict[str, str]:
    """Stripe customer ids of ``customers`` found in the mapping table."""
    out: dict[str, str] = {}
    for customer in customers:
        stripe_id = stripe_id_of(table.get(customer.encode()))
        if stripe_id:
            out[customer] = stripe_id
    return out


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
