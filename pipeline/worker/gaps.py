"""Records Faust skipped: found by offset, fetched directly, processed in the same batch.

Faust can skip a record around a rebalance or table recovery and later commit
past it (faust-streaming issues #596 and #606: a record whose delivery is
abandoned when flow is suspended leaves a "gap" that the commit logic then
counts as acked). Observed here: SIGTERM restarts lost ~2-3% of a 50,000-event
stream. The record must not depend on that, so the worker checks offsets itself.

Per partition it knows the next offset it expects: the group's committed
offset at the start of a consumer generation, then one past the last batch.
Offsets missing before a batch or inside it are read with a plain consumer
(assign + seek, no group membership) and processed with the batch, before the
batch is acked, so the offset commit still follows the ClickHouse insert.
Offsets that hold no record (transaction markers, compaction) are simply not
returned and cost one short read.

It reads read_committed, as Faust's consumer does under exactly_once: where
usage-events is written in transactions (Apache Kafka), the records of an
aborted transaction are offsets that consumer never delivers, and reading them
back here counted every aborted event (all 2,000 of 2,000 in
tests/integration/test_transactional_source.py before this). Under
at_least_once Faust's own consumer reads read_uncommitted (faust-streaming's
aiokafka driver chooses by the guarantee); ``auto`` runs exactly_once wherever
the broker has transactions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

log = logging.getLogger("meterstream.worker")


def missing_ranges(offsets: Iterable[int], expected: int | None) -> list[tuple[int, int]]:
    """[start, end) ranges absent from ``offsets``: before them (from ``expected``) and
    between them. Offsets below ``expected`` are redeliveries, not gaps."""
    ranges: list[tuple[int, int]] = []
    previous = None if expected is None else expected - 1
    for offset in sorted(set(offsets)):
        if previous is not None and offset > previous + 1:
            ranges.append((previous + 1, offset))
        previous = offset if previous is None else max(previous, offset)
    return ranges


class GapFiller:
    def __init__(self, bootstrap: str, topic: str, group_id: str, **options: Any) -> None:
        self.topic = topic
        self._options = dict(
            bootstrap_servers=bootstrap,
            group_id=group_id,  # only to read the group's committed offsets; never joins
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",  # never an aborted transaction's records
            **options,
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._generation: int | None = None
        self._expected: dict[int, int] = {}
        self.filled = 0

    async def _ensure_started(self) -> AIOKafkaConsumer:
        """Created on first use, inside the worker's event loop."""
        if self._consumer is None:
            consumer = AIOKafkaConsumer(**self._options)
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    def next_offsets(self) -> dict[int, int]:
        """Per partition, the next offset this worker will process."""
        return dict(self._expected)

    async def _start_offset(self, partition: int) -> int:
        consumer = await self._ensure_started()
        tp = TopicPartition(self.topic, partition)
        committed = await consumer.committed(tp)
        if committed is not None:
            return int(committed)
        return int((await consumer.beginning_offsets([tp]))[tp])

    async def missing(
        self, generation: int | None, offsets: dict[int, list[int]]
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """The records absent from this batch's offsets; advances the expectations."""
        if generation != self._generation:
            self._generation = generation
            self._expected.clear()
        found: list[ConsumerRecord[bytes, bytes]] = []
        for partition, offs in offsets.items():
            expected = self._expected.get(partition)
            if expected is None:
                expected = await self._start_offset(partition)
            for start, end in missing_ranges(offs, expected):
                records = await self._read(partition, start, end)
                # none read: transaction markers or an aborted transaction (Apache Kafka)
                log.log(
                    logging.WARNING if records else logging.DEBUG,
                    "partition %d: offsets %d-%d were not delivered by Faust; read %d directly",
                    partition,
                    start,
                    end - 1,
                    len(records),
                )
                found.extend(records)
            self._expected[partition] = max(max(offs) + 1, expected)
        self.filled += len(found)
        return found

    def advance(self, partition: int, offset: int) -> None:
        """Records before ``offset`` of ``partition`` were processed (read directly)."""
        self._expected[partition] = max(offset, self._expected.get(partition, offset))

    async def read(
        self, partition: int, start: int, end: int
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """The records of offsets [start, end) of ``partition``, read directly."""
        return await self._read(partition, start, end)

    async def _read(
        self, partition: int, start: int, end: int
    ) -> list[ConsumerRecord[bytes, bytes]]:
        consumer = await self._ensure_started()
        tp = TopicPartition(self.topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        out: list[ConsumerRecord[bytes, bytes]] = []
        empty_polls = 0
        while empty_polls < 3:
            batch = await consumer.getmany(tp, timeout_ms=500)
            records = batch.get(tp, [])
            if not records:
                empty_polls += 1
                continue
            out.extend(r for r in records if start <= r.offset < end)
            if records[-1].offset >= end - 1:
                break
        return out
