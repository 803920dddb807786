"""Reading a topic back with a plain aiokafka consumer (no group, from the earliest), and
a consumer group's committed offsets."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition


def consume_all(bootstrap: str, topic: str, timeout: float = 10) -> list[tuple[bytes, bytes]]:
    """Every (key, value) on ``topic``: reads until a poll comes back empty after records
    arrived, or ``timeout`` seconds pass."""

    async def read() -> list[tuple[bytes, bytes]]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
        )
        await consumer.start()
        try:
            out: list[tuple[bytes, bytes]] = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    out += [(r.key or b"", r.value or b"") for r in records]
                if out and not batches:
                    break
            return out
        finally:
            await consumer.stop()

    return asyncio.run(read())


def group_offsets(
    bootstrap: str, topic: str, partitions: int, group: str
) -> tuple[dict[int, int], dict[int, int | None]]:
    """(end offsets, the group's committed offsets: None where it committed none) per
    partition of ``topic``."""

    async def read() -> tuple[dict[int, int], dict[int, int | None]]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
        await consumer.start()
        try:
            parts = [TopicPartition(topic, p) for p in range(partitions)]
            ends = await consumer.end_offsets(parts)
            committed = {tp.partition: await consumer.committed(tp) for tp in parts}
            return {tp.partition: off for tp, off in ends.items()}, committed
        finally:
            await consumer.stop()

    return asyncio.run(read())
