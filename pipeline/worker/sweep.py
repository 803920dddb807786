"""The horizon sweep: dedup keys and window states older than the horizon, forgotten
a slice per batch.

A pass reads every entry of both tables (each dedup value is decoded for its event
time) and returns the keys older than the cutoff. Run at once, a pass stalled the
event loop for the whole table: 1.6 s once a minute at 285,000 dedup keys on
RocksDB (the bench's latency at half load had a p99 above 2 s for it), and it grows
with the horizon. Here a pass runs for at most ``slice_seconds`` per batch and
resumes where it stopped in the next one.

- The memory store's tables are dicts that the batches keep writing, so a pass
  iterates a copy of their keys taken when it starts (a C-speed copy of
  references) and reads each value when its turn comes. RocksDB iterators read a
  consistent view while the batches write.
- Keys written after a pass started are newer than its cutoff, so a pass that
  misses them loses nothing; the next pass sees them.
- The caller raises the coverages' floors to the cutoff before the first key is
  deleted (a key below the floor is always looked up in the record), and drops a
  pass on every rebalance (:meth:`reset`): its iterators may belong to revoked
  partitions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from meterstream.dedup.key import DedupEntry
from meterstream.meters.fold import WindowKey
from meterstream.worker.tables import memory_store_dict

CHECK_CLOCK_EVERY = 512  # entries between looks at the clock


class HorizonSweep:
    """One pass at a time over the dedup and windows tables, in time-bounded slices."""

    def __init__(
        self,
        dedup: Any,
        windows: Any,
        *,
        every_seconds: float,
        slice_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dedup, self.windows = dedup, windows
        self.every_seconds, self.slice_seconds = every_seconds, slice_seconds
        self.clock = clock
        self._last_pass = clock()
        self._pass: Iterator[tuple[bool, bytes | None]] | None = None

    @property
    def running(self) -> bool:
        return self._pass is not None

    def due(self) -> bool:
        return self._pass is None and self.clock() - self._last_pass > self.every_seconds

    def start(self, cutoff_ms: int) -> None:
        self._pass = self._expired(cutoff_ms)

    def reset(self) -> None:
        """Drop the pass in progress (partitions moved); the next starts when due."""
        self._pass = None

    def step(self) -> tuple[list[bytes], list[bytes]]:
        """Expired (dedup keys, window keys) found within one slice of the pass."""
        dedup_keys: list[bytes] = []
        window_keys: list[bytes] = []
        if self._pass is None:
            return dedup_keys, window_keys
        deadline = self.clock() + self.slice_seconds
        for n, (is_dedup, key) in enumerate(self._pass, 1):
            if key is not None:
                (dedup_keys if is_dedup else window_keys).append(key)
            if n % CHECK_CLOCK_EVERY == 0 and self.clock() > deadline:
                break
        else:
            self._pass = None
            self._last_pass = self.clock()
        return dedup_keys, window_keys

    def _expired(self, cutoff_ms: int) -> Iterator[tuple[bool, bytes | None]]:
        """For every entry read: (is a dedup key, the key if older than the cutoff,
        else None), so that a slice can stop after any entry."""
        for key, value in _items(self.dedup):
            yield True, key if DedupEntry.load(value).timestamp_ms < cutoff_ms else None
        for key, _ in _items(self.windows):
            yield False, key if WindowKey.decode(key).window_start_ms < cutoff_ms else None


def _items(table: Any) -> Iterator[tuple[bytes, Any]]:
    plain = memory_store_dict(table)
    if plain is None:
        yield from table.items()
        return
    # the memory store: the batches write the dict, so a copy of its keys (a
    # reference each), each value read when its turn comes (gone: skipped)
    for key in list(plain):
        value = plain.get(key)
        if value is not None:
            yield key, value
