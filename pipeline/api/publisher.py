"""The events API's way into Kafka: one producer per worker, acks from all in-sync replicas.

Its own producer, not Faust's: Faust's may be transactional (exactly_once),
and an API write must not wait for, or be aborted with, a processing batch.
No idempotent producer (the embedded broker has none): a resend after a lost
acknowledgement can write an event twice, which the worker's dedup absorbs
(same idempotency key, same content).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from meterstream.api.ingest import IngestRecord
from meterstream.errors import DependencyError

log = logging.getLogger("meterstream.api")


class PublishError(DependencyError):
    """The broker did not acknowledge every record; some may have been written."""


class EventPublisher:
    def __init__(
        self, bootstrap: str, topic: str, *, timeout_seconds: float = 10.0, **options: Any
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_seconds = timeout_seconds
        self.options = options
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap,
                    acks="all",
                    linger_ms=2,
                    request_timeout_ms=int(self.timeout_seconds * 1000),
                    **self.options,
                )
                try:
                    await producer.start()
                except Exception:
                    await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def publish(self, records: Sequence[IngestRecord]) -> None:
        """Return only when the broker acknowledged every record (acks=all)."""
        try:
            producer = await asyncio.wait_for(self._started(), self.timeout_seconds)
            futures = [await producer.send(self.topic, key=r.key, value=r.value) for r in records]
            await asyncio.wait_for(asyncio.gather(*futures), self.timeout_seconds)
        except (KafkaError, TimeoutError, OSError) as exc:
            log.warning("events API: broker did not acknowledge a batch: %r", exc)
            raise PublishError(f"broker did not acknowledge: {type(exc).__name__}") from exc

    async def stop(self) -> None:
        async with self._lock:
            if self._producer is not None:
                await self._producer.stop()
                self._producer = None
