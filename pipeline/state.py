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
from collections.abc import Iterable, Mapping
from typing import Any

from faust.streams import _current_event
from faust.types import EventT, TableT


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
