"""The horizon sweep in slices (pipeline/worker/sweep.py), on stand-in tables."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from meterstream.dedup.key import DedupEntry, DedupKey
from meterstream.meters.fold import WindowKey
from meterstream.worker.sweep import CHECK_CLOCK_EVERY, HorizonSweep

CUTOFF = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001  # every look at the clock: 1 ms later
        return self.now


def memory_table(data: dict[bytes, Any]) -> Any:
    """What the sweep reads of a Faust table on the memory store."""
    return SimpleNamespace(data=SimpleNamespace(data=data))


class RocksLike:
    """A table whose store is not a dict: read through ``items()``."""

    def __init__(self, data: dict[bytes, Any]) -> None:
        self.data = SimpleNamespace(data=None)
        self._data = data

    def items(self) -> Any:
        return iter(list(self._data.items()))


def tables(n: int) -> tuple[dict[bytes, Any], dict[bytes, Any], set[bytes], set[bytes]]:
    dedup, windows, old_keys, old_windows = {}, {}, set(), set()
    for i in range(n):
        ts = CUTOFF - 500 + i  # half older than the cutoff
        key = DedupKey(f"c{i % 7}", f"k{i}").encode()
        dedup[key] = DedupEntry("fp", ts).dump()
        window = WindowKey("m", f"c{i % 7}", "{}", ts).encode()
        windows[window] = {"event_count": 1}
        if ts < CUTOFF:
            old_keys.add(key)
            old_windows.add(window)
    return dedup, windows, old_keys, old_windows


def run_pass(sweep: HorizonSweep, during: Any = None) -> tuple[set[bytes], set[bytes], int]:
    found_keys: set[bytes] = set()
    found_windows: set[bytes] = set()
    slices = 0
    sweep.start(CUTOFF)
    while sweep.running:
        keys, windows = sweep.step()
        found_keys.update(keys)
        found_windows.update(windows)
        slices += 1
        if during:
            during()
    return found_keys, found_windows, slices


def test_a_pass_finds_exactly_the_expired_entries_in_bounded_slices() -> None:
    dedup, windows, old_keys, old_windows = tables(6 * CHECK_CLOCK_EVERY)
    written = iter(range(10**6))
    gone = sorted(old_windows)[0]

    def batch_writes() -> None:  # the batches go on writing the dicts between slices
        i = next(written)
        dedup[DedupKey("new", f"n{i}").encode()] = DedupEntry("fp", CUTOFF + i).dump()
        windows.pop(gone, None)  # deleted before the pass reads it: skipped

    clock = Clock()
    sweep = HorizonSweep(
        memory_table(dedup), memory_table(windows), every_seconds=60, slice_seconds=0.0005,
        clock=clock,
    )  # fmt: skip
    keys, found_windows, slices = run_pass(sweep, batch_writes)
    assert keys == old_keys
    assert found_windows == old_windows - {gone}
    assert slices >= 12  # one clock check per CHECK_CLOCK_EVERY entries ends a slice
    assert {DedupKey.decode(k).customer_id for k in keys} == {f"c{i}" for i in range(7)}


def test_a_store_read_through_items_gives_the_same_answer() -> None:
    dedup, windows, old_keys, old_windows = tables(1000)
    sweep = HorizonSweep(
        RocksLike(dedup), RocksLike(windows), every_seconds=60, slice_seconds=10, clock=Clock()
    )
    keys, found_windows, slices = run_pass(sweep)
    assert (keys, found_windows, slices) == (old_keys, old_windows, 1)


def test_passes_are_due_every_interval_and_reset_drops_one() -> None:
    clock = Clock()
    dedup, windows, _, _ = tables(10)
    sweep = HorizonSweep(
        memory_table(dedup), memory_table(windows), every_seconds=1.0, slice_seconds=1.0,
        clock=clock,
    )  # fmt: skip
    assert not sweep.due()
    clock.now += 2
    assert sweep.due()
    sweep.start(CUTOFF)
    assert sweep.running and not sweep.due()
    sweep.reset()
    assert not sweep.running
    assert sweep.step() == ([], [])
    run_pass(sweep)
    assert not sweep.due()  # a finished pass restarts the interval
