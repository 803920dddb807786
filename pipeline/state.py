"""Faust tables written once per key per batch, in the right partition.

``stream.take_events`` yields a batch without Faust's per-event context, and a
Faust table decides the changelog partition (and, with RocksDB, the store
partition) from that context. Every key here belongs to one customer, and a
customer's events all arrive on one partition, so we write each partition's
keys with that partition's last event as the context. This is the one place
that touches Faust's ambient event context.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from faust.streams import _current_event
from faust.types import TP, EventT, TableT

from pipeline.settings import Settings


def table_options(settings: Settings) -> dict[str, int] | None:
    """Options for a Faust table (``Table(options=...)``): None on the memory store;
    on RocksDB, per partition database, a fresh dict per table (Faust's RocksDB
    store pops keys from it).

    Faust's defaults are sized for a dedicated host: three 64 MB write buffers and
    a 2 GB block cache for *each* partition of each table, so a worker with two
    tables of 4 partitions can hold 1.5 GB of memtables before anything is flushed,
    and its memory grows for many minutes at a steady input (measured: +51% over a
    10-minute soak). Two small write buffers and a small cache bound it at
    ``partitions x tables x (2 x write buffer + cache)``; reads of keys not in a
    memtable go to the OS page cache, which the kernel manages outside the process.
    """
    if settings.store != "rocksdb":
        return None
    mb = 1024 * 1024
    return {
        "write_buffer_size": settings.rocksdb_write_buffer_mb * mb,
        "max_write_buffer_number": 2,
        "target_file_size_base": max(settings.rocksdb_write_buffer_mb, 8) * mb,
        "block_cache_size": settings.rocksdb_block_cache_mb * mb,
    }


def table_reader(table: Any) -> Callable[[bytes], Any]:
    """``table.get`` without Faust's layers: the value stored for a key, or None.

    ``Table.get`` goes through ``Mapping.get``, the table's ``__getitem__`` with a
    sensor call, the store's ``__getitem__``, and a ``KeyError`` raised and caught
    for every key the table lacks (most dedup keys are new): ~6% of the worker's
    event loop. The memory store keeps values as given in a dict, so its
    ``dict.get`` is the same answer; other stores are read as their
    ``__getitem__`` does, without the exception. For tables without a default.
    """
    store = table.data
    plain = getattr(store, "data", None)
    if type(plain) is dict:  # faust.stores.memory.Store
        return plain.get
    get, encode, decode = store._get, store._encode_key, store._decode_value

    def read(key: bytes) -> Any:
        raw = get(encode(key))
        return None if raw is None else decode(raw)

    return read


def write_by_partition(
    table: TableT[Any, Any],
    items: Mapping[bytes, Any],
    partition_of: Mapping[bytes, int],
    context_events: Mapping[int, EventT],
) -> None:
    """``table[key] = value`` for each item, in the partition ``partition_of[key]``."""
    by_partition: dict[int, list[bytes]] = {}
    for key in items:
        by_partition.setdefault(partition_of[key], []).append(key)
    for partition, keys in by_partition.items():
        token = _current_event.set(weakref.ref(context_events[partition]))
        try:
            for key in keys:
                table[key] = items[key]
        finally:
            _current_event.reset(token)


def delete_by_partition(
    table: TableT[Any, Any],
    keys: Iterable[bytes],
    partition_of: Mapping[bytes, int],
    context_events: Mapping[int, EventT],
) -> int:
    """Delete keys (a tombstone in the changelog) whose partition has a context event."""
    deleted = 0
    for key in keys:
        event = context_events.get(partition_of[key])
        if event is None:
            continue
        token = _current_event.set(weakref.ref(event))
        try:
            table.pop(key, None)
            deleted += 1
        finally:
            _current_event.reset(token)
    return deleted


async def write_by_partition_batched(
    table: Any,  # a faust Table (TableT does not declare its serializers or store)
    producer: Any,
    items: Mapping[bytes, Any],
    partition_of: Mapping[bytes, int],
    context_events: Mapping[int, EventT],
) -> int:
    """Like :func:`write_by_partition`, with the changelog records sent as whole record
    batches and acknowledged before this returns; returns the records sent.

    ``table[key] = value`` costs Faust a future, a pending message, a trip through
    its producer buffer and a serializer lookup per key (~50 us), about half of a
    batch's time at 5,000 keys per table. Here the store is written directly
    (``table.data``, in the partition's event context, exactly what ``table[key] =
    value`` does after its changelog send), the key and value are serialized by the
    changelog topic exactly as Faust would, and the records go out as aiokafka
    record batches (``producer`` is the app's aiokafka producer). The changelog is
    the same records Faust would have written, in the same partitions, so
    recovery is unchanged; the RocksDB store's persisted offset is advanced as
    Faust's own send callback does. Not for transactions (exactly_once): those
    changelog records must go through Faust's transactional producers.
    """
    topic = table.changelog_topic
    name = topic.get_topic_name()
    key_serializer = table.key_serializer
    value_serializer = table.value_serializer
    by_partition: dict[int, list[bytes]] = {}
    for key in items:
        by_partition.setdefault(partition_of[key], []).append(key)
    sent: list[tuple[int, int, Any]] = []  # partition, records, delivery future
    for partition, keys in by_partition.items():
        token = _current_event.set(weakref.ref(context_events[partition]))
        try:
            batch, count = producer.create_batch(), 0
            for key in keys:
                value = items[key]
                table.data[key] = value
                raw_key, _ = topic.prepare_key(key, key_serializer)
                raw_value, _ = topic.prepare_value(value, value_serializer)
                if batch.append(key=raw_key, value=raw_value, timestamp=None) is None:
                    sent.append(
                        (
                            partition,
                            count,
                            await producer.send_batch(batch, name, partition=partition),
                        )
                    )
                    batch, count = producer.create_batch(), 0
                    if batch.append(key=raw_key, value=raw_value, timestamp=None) is None:
                        raise ValueError(f"changelog record of {len(raw_value)} bytes too large")
                count += 1
            if count:
                sent.append(
                    (partition, count, await producer.send_batch(batch, name, partition=partition))
                )
        finally:
            _current_event.reset(token)
    persisted: dict[int, int] = {}
    for partition, count, future in sent:
        metadata = await future
        last = int(metadata.offset) + count - 1
        persisted[partition] = max(persisted.get(partition, -1), last)
    for partition, offset in persisted.items():
        table.data.set_persisted_offset(TP(name, partition), offset)
    return sum(count for _, count, _ in sent)
