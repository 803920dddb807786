"""Produce and consume on every Kafka backend (embedded broker; Apache Kafka in a container).

A smoke test of the fixtures themselves: a topic created through the admin API (both
backends run with topic auto-creation off, as in production), 100 keyed records in,
the same 100 records out, each key's records in order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.integration.kafka_fixtures import *  # noqa: F403

pytestmark = pytest.mark.integration

RECORDS = 100
PARTITIONS = 4


async def produce_and_consume(bootstrap: str, topic: str) -> list[tuple[bytes, bytes, int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sends = [
            await producer.send(topic, key=f"cus_{i % 7}".encode(), value=f"{i}".encode())
            for i in range(RECORDS)
        ]
        await producer.flush()
        await asyncio.gather(*sends)
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"smoke-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    received: list[tuple[bytes, bytes, int]] = []
    try:
        async with asyncio.timeout(60):
            while len(received) < RECORDS:
                batches = await consumer.getmany(timeout_ms=1000)
                for tp, messages in batches.items():
                    received.extend((m.key or b"", m.value or b"", tp.partition) for m in messages)
    finally:
        await consumer.stop()
    return received


def test_produce_and_consume_100_records(kafka_backend: str) -> None:
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    received = asyncio.run(produce_and_consume(kafka_backend, topic))

    assert sorted(int(value) for _, value, _ in received) == list(range(RECORDS))
    by_key: dict[bytes, list[int]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for key, value, partition in received:
        by_key[key].append(int(value))
        partitions[key].add(partition)
    for key, values in by_key.items():
        assert values == sorted(values), f"{key!r} out of order"
        assert len(partitions[key]) == 1, f"{key!r} spread over partitions"
    assert len(by_key) == 7
