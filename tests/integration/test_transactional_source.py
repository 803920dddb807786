"""usage-events written in transactions (a Kafka Streams app or a transactional outbox
upstream): on Apache Kafka each transaction's commit or abort marker takes an offset,
and an aborted transaction's records stay in the log. Only committed events count."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from meterstream.events import canonical_json
from tests.faults.fault_load import METERS, make_load, reference
from tests.faults.test_crash_restart import metric_value, record_count, wait_windows_exact
from tests.harness import StackSlice

pytestmark = pytest.mark.integration


async def produce_in_transactions(
    stack: StackSlice, transactions: list[tuple[list[dict[str, Any]], bool]]
) -> None:
    """Each (records, commit) in a transaction of its own, committed or aborted."""
    await stack.create_topics()
    producer = AIOKafkaProducer(
        bootstrap_servers=stack.bootstrap, transactional_id=f"upstream-{uuid.uuid4().hex[:8]}"
    )
    await producer.start()
    try:
        for records, commit in transactions:
            await producer.begin_transaction()
            for rec in records:
                await producer.send(
                    stack.topic,
                    key=str(rec["customer_id"]).encode(),
                    value=canonical_json(rec).encode(),
                )
            await producer.flush()
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    finally:
        await producer.stop()


@pytest.mark.brokers("kafka")
def test_events_of_an_aborted_transaction_are_never_counted(stack: StackSlice) -> None:
    """Transactions of 500 events, every third one aborted, and every window and the
    record hold exactly the committed events. Under exactly_once the worker reads
    read_committed, so the aborted records and the markers are offsets it is never
    given: the gap reader (meterstream.worker.gaps) must not fetch them back."""
    records, _ = make_load(unique=6_000, duplicates=0, seed=81)
    chunks = [records[i : i + 500] for i in range(0, len(records), 500)]
    plan = [(chunk, i % 3 != 1) for i, chunk in enumerate(chunks)]
    committed = [r for chunk, commit in plan if commit for r in chunk]
    worker = stack.start_worker(stack.meters_file(METERS))
    asyncio.run(produce_in_transactions(stack, plan))
    try:
        wait_windows_exact(worker, reference(committed), timeout=180)
    finally:
        gaps = metric_value(worker.metrics(), "meterstream_gap_records_total")
        print(f"record {record_count(worker)} of {len(committed)}; gap records {gaps:g}")
    assert record_count(worker) == len(committed)
    worker.stop()
