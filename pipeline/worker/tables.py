"""Faust tables written once per key per batch, in the right partition.

``stream.take_events`` yields a batch without Faust's per-event context, and a
Faust table decides the changelog partition (and, with RocksDB, the store
partition) from that context. Every key here belongs to one customer, and a
customer's events all arrive on one partition, so we write each partition's
keys with that partition's last event as the context. This is the one place
that touches Faust's ambient event context.
"""

from __future__ import annotations

import logging
import shutil
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from faust import Schema
from faust.serializers.codecs import get_codec
from faust.serializers.codecs import json as JsonCodec
from faust.streams import _current_event
from faust.types import TP, EventT, ModelT, TableT
from faust.utils.json import dumps as json_dumps

from meterstream.settings import Settings

log = logging.getLogger("meterstream.worker")


def table_options(settings: Settings) -> dict[str, int] | None:
    """Options for a Faust table (``Table(options=...)``): None on the memory store;
    on RocksDB, per partition database, a fresh dict per table (Faust's RocksDB
    store pops keys from it).

    Faust's defaults are sized for a dedicated host: three 64 MB write buffers and
    a 2 GB block cache for *each* partition of each table, so a worker with two
    tables of 4 partitions can hold 1.5 GB of memtables before anything is flushed,
    and its memory grows for many minutes at a steady input (measured: +51% over a
    10-minute soak). Here each partition gets two small write buffers; the block
    cache Faust builds from ``block_cache_size`` is replaced by the worker's shared
    one (:class:`RocksDBMemory`), so the size given here only matters where that is
    not installed.
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


class RocksDBMemory:
    """One block cache for every table partition a worker opens, with their memtables
    charged to it: the worker's RocksDB memory is bounded by ``ROCKSDB_BLOCK_CACHE_MB``
    however many partitions it is assigned.

    Faust gives each partition database a cache of its own, so the bound was
    ``partitions x tables x (2 x write buffer + cache)``: 96 MB for two tables of
    4 partitions at 2 MB / 8 MB, reached ~5 minutes into a soak (+17-22% RSS), and
    1.5 GB for a worker holding 64 partitions. RocksDB's answer is a shared cache and a
    write buffer manager costed to it (github.com/facebook/rocksdb/wiki/Write-Buffer-Manager):
    when the memtables of all databases reach half the cache, the largest is flushed.
    Bloom filters and index blocks stay outside the cache (~10 bits per key).
    """

    def __init__(self, cache_mb: int) -> None:
        import rocksdict

        self.capacity = cache_mb * 1024 * 1024
        self.cache = rocksdict.Cache(self.capacity)
        self.write_buffers = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            self.capacity // 2, False, self.cache
        )

    def usage(self) -> int:
        """Bytes held in the cache now (blocks and the memtables charged to it)."""
        return int(self.cache.get_usage())

    def install(self, table: Any) -> None:
        """Make every database ``table`` opens from now on use the shared memory.

        Wraps the store's ``RocksDBOptions.as_options`` (rocksdict driver): Faust's
        options, then this cache in the block-based table factory (same bloom
        filter and index type as Faust's) and the shared write buffer manager.
        """
        import rocksdict

        options = table.data.rocksdb_options
        if not options.use_rocksdict:
            raise ValueError("shared RocksDB memory needs the rocksdict driver")
        faust_options = options.as_options

        def as_options() -> Any:
            db_options = faust_options()
            factory = rocksdict.BlockBasedOptions()
            factory.set_bloom_filter(options.bloom_filter_size, True)
            factory.set_block_cache(self.cache)
            factory.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
            db_options.set_block_based_table_factory(factory)
            db_options.set_write_buffer_manager(self.write_buffers)
            return db_options

        options.as_options = as_options


def drop_local_stores(tabledir: Path) -> int:
    """Remove the RocksDB table stores in ``tabledir`` (Faust's ``app.conf.tabledir``)
    before the app opens them; returns how many were removed. The worker calls it when
    it runs exactly_once on RocksDB, so that the tables are restored from their
    changelogs alone, which hold exactly the committed transactions.

    Under exactly_once Faust writes a batch's table values to RocksDB at once and their
    changelog records in the partition's transaction. A SIGKILL aborts the transaction
    and leaves its values in RocksDB, and recovery never undoes them: it re-reads each
    changelog from its start (Faust keeps the store's changelog offset for the source
    partition's commit but looks it up by the changelog partition, so under
    exactly_once it is never written: robinhood/faust#599, unchanged in
    faust-streaming 0.15) and applies only committed records over the stale store.
    The replayed batch then finds its keys already counted in the store and writes
    nothing, so the changelog lacks them for good (robinhood/faust#340: a table
    missing events after kill -9 with exactly_once and RocksDB). Kafka Streams has
    the same rule under exactly-once: no checkpoint, so the local state is wiped and
    restored. Restoring into an empty store costs no more than the full re-read Faust
    does anyway; RocksDB still bounds the worker's memory.
    """
    stores = sorted(tabledir.glob("*.db")) if tabledir.is_dir() else []
    for store in stores:
        shutil.rmtree(store)
    if stores:
        log.info(
            "exactly_once on RocksDB: removed %d local table store(s) in %s; the tables"
            " are restored from their changelogs (committed transactions only)",
            len(stores),
            tabledir,
        )
    return len(stores)


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
    plain = memory_store_dict(table)
    if plain is not None:
        return plain.get
    get, encode, decode = store._get, store._encode_key, store._decode_value

    def read(key: bytes) -> Any:
        raw = get(encode(key))
        return None if raw is None else decode(raw)

    return read


class DecodedValues:
    """Values decoded from a table, reused while the table holds the very object they
    were decoded from.

    Each batch reads every window it touches from the windows table and decodes it
    (``Aggregator.load``: a ``unique_count`` window is a set of hundreds of strings);
    most of them were written by the batch before. On the memory store
    :func:`table_reader` returns the stored object itself, so a cached entry is valid
    exactly while ``stored is`` the object it came from: a value replaced by anything
    else (a recovery, a repair, another write) is decoded again. The entry keeps the
    object alive, so its identity cannot be reused. Decoded values must never be
    mutated (window states are not: ``Aggregator.merge`` makes new ones).

    Entries live for two batches (:meth:`rotate` after each): at most two batches'
    windows are held besides the table.
    """

    def __init__(self) -> None:
        self._new: dict[bytes, tuple[Any, Any]] = {}
        self._old: dict[bytes, tuple[Any, Any]] = {}
        self.hits = 0

    def get(self, key: bytes, stored: Any, decode: Callable[[Any], Any]) -> Any:
        hit = self._new.get(key) or self._old.get(key)
        if hit is not None and hit[0] is stored:
            self.hits += 1
            return hit[1]
        return decode(stored)

    def put(self, key: bytes, stored: Any, decoded: Any) -> None:
        self._new[key] = (stored, decoded)

    def rotate(self) -> None:
        self._old, self._new = self._new, {}

    def clear(self) -> None:
        self._new.clear()
        self._old.clear()


def memory_store_dict(table: Any) -> dict[Any, Any] | None:
    """The dict of a table on Faust's memory store (``faust.stores.memory.Store``), which
    keeps values as given: read, written and iterated directly. None on other stores."""
    plain = getattr(table.data, "data", None)
    return plain if type(plain) is dict else None


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


def changelog_encoders(table: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """What the changelog topic's ``prepare_key`` / ``prepare_value`` give for a key and
    a value, with Faust's codecs looked up once instead of per record.

    With Faust's stock ``Schema``, its registry sends ``bytes`` as they are, a Faust
    model as ``model.dumps``, and anything else through ``get_codec(serializer)
    .dumps``, the serializer being the first set of the table's, the schema's and the
    registry's (``raw`` for str/bytes types when none is). Going through the topic,
    schema and registry for every record cost ~2.2 us, ~18 ms of a batch writing
    8,000 keys. Models, and a topic with a schema of another class, keep Faust's path.
    """
    topic = table.changelog_topic
    schema = getattr(topic, "schema", None)

    def key_by_topic(key: Any) -> Any:
        return topic.prepare_key(key, table.key_serializer)[0]

    def value_by_topic(value: Any) -> Any:
        return topic.prepare_value(value, table.value_serializer)[0]

    if type(schema) is not Schema:
        return key_by_topic, value_by_topic
    registry = topic.app.serializers

    def codec(typ: Any, *serializers: Any) -> Any:
        name = next((s for s in serializers if s), None)
        if name is None and typ in (str, bytes):
            name = "raw"
        return get_codec(name) if name else None

    key_codec = codec(schema.key_type, table.key_serializer, schema.key_serializer,
                      registry.key_serializer)  # fmt: skip
    value_codec = codec(schema.value_type, table.value_serializer, schema.value_serializer,
                        registry.value_serializer)  # fmt: skip

    # Faust's json codec alone (the worker's tables): its dumps is faust.utils.json's,
    # called here without the codec's node walk for the worker's values (tuples, dicts).
    plain_json = type(value_codec) is JsonCodec and value_codec.nodes == (value_codec,)

    def encode_key(key: Any) -> Any:
        if type(key) is bytes:  # the worker's keys: no codec, not a model
            return key
        if isinstance(key, ModelT):
            return key_by_topic(key)
        if key is None or isinstance(key, bytes) or key_codec is None:
            return key
        return key_codec.dumps(key)

    def encode_value(value: Any) -> Any:
        kind = type(value)
        if plain_json and (kind is tuple or kind is dict or kind is list):
            return json_dumps(value)
        if isinstance(value, ModelT):
            return value_by_topic(value)
        if isinstance(value, bytes) or value_codec is None:
            return value
        return value_codec.dumps(value)

    return encode_key, encode_value


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
    encode_key, encode_value = changelog_encoders(table)
    # the memory store's __setitem__ is its dict's (as in table_reader); RocksDB's
    # picks the partition database from the event context set below
    plain = memory_store_dict(table)
    store_value = table.data.__setitem__ if plain is None else plain.__setitem__
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
                store_value(key, value)
                raw_key, raw_value = encode_key(key), encode_value(value)
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
