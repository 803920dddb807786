"""Batch isolation by bisection (pipeline/worker/isolation.py), without a broker."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.worker.isolation import bisect


class Broken(Exception):
    pass


def isolate(
    n: int, bad: set[int], fatal: frozenset[int] = frozenset()
) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Bisect [0, n) where a run fails if it holds a bad index; what happened, in order."""
    runs: list[tuple[int, int]] = []
    counted: list[int] = []
    aside: list[int] = []

    async def run(lo: int, hi: int) -> None:
        runs.append((lo, hi))
        if any(i in fatal for i in range(lo, hi)):
            raise ConnectionError("the broker went away")
        if any(i in bad for i in range(lo, hi)):
            raise Broken(f"records {lo}-{hi}")
        counted.extend(range(lo, hi))

    def set_aside(index: int, error: Exception) -> None:
        assert isinstance(error, Broken)
        aside.append(index)

    asyncio.run(
        bisect(n, Broken("whole batch"), run, set_aside, lambda e: isinstance(e, ConnectionError))
    )
    return runs, counted, aside


def test_one_bad_record_in_a_batch() -> None:
    runs, counted, aside = isolate(5_000, {2_345})
    assert aside == [2_345]
    assert counted == [i for i in range(5_000) if i != 2_345]  # each once, in order
    assert len(runs) <= 2 * 13  # ~2 log2(n)


def test_a_batch_of_one_is_set_aside_without_running_again() -> None:
    runs, counted, aside = isolate(1, {0})
    assert (runs, counted, aside) == ([], [], [0])


def test_a_dependency_failure_stops_the_bisection() -> None:
    with pytest.raises(ConnectionError):
        isolate(100, {3}, fatal=frozenset({70}))


def test_set_aside_is_told_before_any_later_record_runs() -> None:
    order: list[str] = []

    async def run(lo: int, hi: int) -> None:
        if lo <= 1 < hi:
            raise Broken()
        order.append(f"run {lo}-{hi}")

    def set_aside(index: int, error: Exception) -> None:
        order.append(f"aside {index}")

    asyncio.run(bisect(4, Broken(), run, set_aside, lambda e: False))
    assert order == ["run 0-1", "aside 1", "run 2-4"]


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.data())
def test_exactly_the_bad_records_are_set_aside(n: int, data: st.DataObject) -> None:
    bad = set(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=5)))
    _, counted, aside = isolate(n, bad)
    assert aside == sorted(bad)
    assert counted == [i for i in range(n) if i not in bad]
