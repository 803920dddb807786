"""write_by_partition_batched: every key in the store and in its partition's changelog,
as record batches (a full batch starts another), acknowledged, persisted offsets set."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from faust.streams import _current_event
from faust.types import TP

from meterstream.settings import Settings
from meterstream.worker.tables import (
    DecodedValues,
    RocksDBMemory,
    changelog_encoders,
    table_options,
    table_reader,
    write_by_partition_batched,
)


class FakeBatch:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.records: list[tuple[bytes, bytes]] = []

    def append(self, *, key: bytes, value: bytes, timestamp: float | None) -> object | None:
        if len(self.records) >= self.capacity:
            return None
        self.records.append((key, value))
        return object()


class FakeProducer:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.log: dict[tuple[str, int], list[tuple[bytes, bytes]]] = {}
        self.batches = 0

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        records = self.log.setdefault((topic, partition), [])
        base = len(records)
        records.extend(batch.records)
        self.batches += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(type("Meta", (), {"offset": base})())
        return future


class FakeTopic:
    def get_topic_name(self) -> str:
        return "t-changelog"

    def prepare_key(self, key: bytes, serializer: Any) -> tuple[bytes, None]:
        return key, None

    def prepare_value(self, value: Any, serializer: Any) -> tuple[bytes, None]:
        return repr(value).encode(), None


class FakeStore(dict[bytes, Any]):
    def __init__(self) -> None:
        super().__init__()
        self.persisted: dict[TP, int] = {}
        self.partitions_seen: dict[bytes, int] = {}

    def __setitem__(self, key: bytes, value: Any) -> None:
        event = _current_event.get()
        assert event is not None
        self.partitions_seen[key] = event().message.partition  # type: ignore[misc]
        super().__setitem__(key, value)

    def set_persisted_offset(self, tp: TP, offset: int) -> None:
        self.persisted[tp] = offset


class FakeTable:
    key_serializer = "raw"
    value_serializer = "json"

    def __init__(self) -> None:
        self.changelog_topic = FakeTopic()
        self.data = FakeStore()


class FakeEvent:
    def __init__(self, partition: int) -> None:
        self.message = type("M", (), {"partition": partition})()


@pytest.mark.parametrize("capacity", [1, 3, 1000])
def test_every_key_stored_and_logged_in_its_partition(capacity: int) -> None:
    table, producer = FakeTable(), FakeProducer(capacity)
    items = {f"k{i}".encode(): [i] for i in range(10)}
    partition_of = {k: i % 2 for i, k in enumerate(items)}
    context = {0: FakeEvent(0), 1: FakeEvent(1)}
    sent = asyncio.run(
        write_by_partition_batched(table, producer, items, partition_of, context)  # type: ignore[arg-type]
    )
    assert sent == 10
    assert dict(table.data) == items
    assert table.data.partitions_seen == partition_of
    for p in (0, 1):
        logged = producer.log[("t-changelog", p)]
        assert [k for k, _ in logged] == [k for k in items if partition_of[k] == p]
        assert table.data.persisted[TP("t-changelog", p)] == len(logged) - 1
    assert producer.batches == 2 * -(-5 // capacity)


def test_rocksdb_options_reach_faust_and_are_fresh_per_table() -> None:
    from faust.stores.rocksdb import RocksDBOptions

    assert table_options(Settings()) is None  # the memory store takes no options
    settings = Settings(store="rocksdb", rocksdb_write_buffer_mb=8, rocksdb_block_cache_mb=32)
    first, second = table_options(settings), table_options(settings)
    assert first == second and first is not second  # Faust's store pops keys from its dict
    assert first is not None
    options = RocksDBOptions(**first)
    assert options.extra_options == {}  # every key is one Faust knows
    assert options.write_buffer_size == 8 * 2**20
    assert options.max_write_buffer_number == 2
    assert options.block_cache_size == 32 * 2**20


def test_rocksdb_memory_is_one_bounded_cache_for_every_partition(tmp_path: Any) -> None:
    pytest.importorskip("rocksdict", reason="the rocksdb extra is not installed")
    import faust

    app = faust.App("memory-test", store="rocksdb://", datadir=str(tmp_path))
    settings = Settings(store="rocksdb", rocksdb_write_buffer_mb=2, rocksdb_block_cache_mb=8)
    table = app.Table("t", key_type=bytes, partitions=2, options=table_options(settings))
    memory = RocksDBMemory(settings.rocksdb_block_cache_mb)
    memory.install(table)
    databases = [table.data._db_for_partition(p) for p in (0, 1)]
    for db in databases:  # ~0.5 MB into each partition's memtable
        for i in range(5_000):
            db[b"k%d" % i] = b"x" * 100
    assert memory.usage() >= 2 * 5_000 * 100  # both memtables are charged to the one cache
    for round_ in range(10):  # 40 MB written, then read: the cache stays within its capacity
        for db in databases:
            for i in range(20_000):
                db[b"r%d-%d" % (round_, i)] = b"y" * 100
    for db in databases:
        for i in range(0, 200_000, 7):
            assert db[b"r%d-%d" % (i % 10, i // 10)] == b"y" * 100
    # the capacity is a soft limit (blocks in use stay), not 40 MB of memtables and blocks
    assert memory.capacity == 8 * 2**20
    assert 0 < memory.usage() <= 1.25 * memory.capacity


def test_changelog_encoders_give_what_the_changelog_topic_gives(tmp_path: Any) -> None:
    import faust

    class Point(faust.Record, serializer="json"):
        x: int

    app = faust.App("encoders-test", store="memory://", datadir=str(tmp_path))
    tables = [
        app.Table("ours", key_type=bytes),  # the worker's tables
        app.Table("typed", key_type=str, value_type=bytes),
        app.Table("models", key_type=Point, value_type=Point),
    ]
    keys: list[Any] = [b'["cust-1","key-\xc3\xbc"]', b"", "text-key", None, Point(x=1)]
    values: list[Any] = [
        ["0f3a", 1764522000000],
        ("0f3a", 1764522000000),
        {"event_count": 3, "value": "1.50", "distinct": ["\u00fc", "a"], "latest_key": ""},
        None,
        b"raw bytes",
        Point(x=2),
    ]
    for table in tables:
        encode_key, encode_value = changelog_encoders(table)
        topic = table.changelog_topic
        for key in keys:
            if table.key_serializer == "raw" and isinstance(key, str):
                continue  # Faust's raw codec takes bytes (and the worker's keys are bytes)
            assert encode_key(key) == topic.prepare_key(key, table.key_serializer)[0], key
        for value in values:
            if table.value_serializer == "raw" and not isinstance(value, bytes | None):
                continue
            expected = topic.prepare_value(value, table.value_serializer)[0]
            assert encode_value(value) == expected, (table.name, value)


def test_table_reader_answers_as_table_get(tmp_path: Any) -> None:
    import faust

    app = faust.App("reader-test", store="memory://", datadir=str(tmp_path))
    table = app.Table("t", key_type=bytes)
    table.data[b"a"] = ["fp", 1]
    read = table_reader(table)
    for key in (b"a", b"missing"):
        assert read(key) == table.get(key)
    assert read(b"a") == ["fp", 1] and read(b"missing") is None
    table.data[b"b"] = {"later": True}  # the same store, not a copy
    assert read(b"b") == {"later": True}


def test_decoded_values_are_reused_only_for_the_very_stored_object() -> None:
    decodes: list[object] = []

    def decode(stored: dict[str, int]) -> tuple[int]:
        decodes.append(stored)
        return (stored["n"],)

    cache = DecodedValues()
    first = {"n": 1}
    assert cache.get(b"k", first, decode) == (1,)  # nothing cached: decoded
    cache.put(b"k", first, (1,))
    cache.rotate()
    assert cache.get(b"k", first, decode) == (1,)  # the same object: reused
    assert cache.get(b"k", {"n": 1}, decode) == (1,)  # an equal, other object: decoded
    replaced = {"n": 2}
    assert cache.get(b"k", replaced, decode) == (2,)  # e.g. recovered or repaired
    assert decodes == [first, {"n": 1}, replaced]
    assert cache.hits == 1


def test_decoded_values_live_two_batches_and_clear() -> None:
    def never(stored: object) -> object:
        return "decoded"

    cache, stored = DecodedValues(), object()
    cache.put(b"k", stored, "cached")
    cache.rotate()
    assert cache.get(b"k", stored, never) == "cached"
    cache.rotate()
    assert cache.get(b"k", stored, never) == "decoded"  # two batches without a write
    cache.put(b"k", stored, "cached")
    cache.clear()
    assert cache.get(b"k", stored, never) == "decoded"
