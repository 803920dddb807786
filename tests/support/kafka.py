"""Reading a topic back with a plain aiokafka consumer (no group, from the earliest)."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer


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
