"""RecordCoverage: a customer is covered only when the dedup table provably holds
every record key it has in the time range, and only for events in that range."""

from __future__ import annotations

from meterstream.dedup.coverage import RecordCoverage
from meterstream.dedup.key import DedupEntry, DedupKey

CUTOFF = 1_000_000


def table(*entries: tuple[str, str, int]) -> list[tuple[bytes, list[object]]]:
    return [(DedupKey(c, k).encode(), DedupEntry("fp", ts).dump()) for c, k, ts in entries]


def test_counts_only_keys_at_or_after_the_cutoff() -> None:
    cov = RecordCoverage.from_table(
        table(("a", "1", CUTOFF), ("a", "2", CUTOFF - 1), ("b", "1", CUTOFF + 5)), CUTOFF
    )
    todo = cov.to_check(["a", "b", "c"], now=0.0)
    assert todo == ["a", "b", "c"]
    # record: a has 1 key in range (table 1), b has 2 (table 1), c has none (table none)
    cov.checked(todo, {"a": 1, "b": 2}, now=0.0)
    assert not cov.needs_lookup("a", CUTOFF)
    assert cov.needs_lookup("b", CUTOFF)  # a recorded-but-uncounted key, or a lost table
    assert not cov.needs_lookup("c", CUTOFF)  # a new customer: nothing in the record
    assert cov.needs_lookup("a", CUTOFF - 1)  # older than the range: always looked up
    assert cov.needs_lookup("zz", CUTOFF)  # never checked


def test_an_empty_table_against_a_kept_record_covers_no_one() -> None:
    # the embedded broker restarted empty: the changelog is gone, ClickHouse kept the record
    cov = RecordCoverage.from_table([], CUTOFF)
    cov.checked(["a"], {"a": 4000}, now=0.0)
    assert cov.needs_lookup("a", CUTOFF + 10)


def test_recheck_after_the_interval_and_writes_counted() -> None:
    cov = RecordCoverage.from_table(table(("a", "1", CUTOFF)), CUTOFF)
    cov.checked(["a"], {"a": 2}, now=0.0)
    assert cov.to_check(["a"], now=1.0) == []  # not rechecked at once
    cov.written("a", CUTOFF + 1)  # the uncounted key was counted by a later batch
    cov.written("a", CUTOFF - 1)  # out of range: not counted
    assert cov.to_check(["a"], now=RecordCoverage.RECHECK_SECONDS) == ["a"]
    cov.checked(["a"], {"a": 2}, now=RecordCoverage.RECHECK_SECONDS)
    assert not cov.needs_lookup("a", CUTOFF)
    assert cov.to_check(["a"], now=10_000.0) == []
    assert cov.covered == 1


def test_sweep_raises_the_floor() -> None:
    cov = RecordCoverage.from_table([], CUTOFF)
    cov.checked(["a"], {}, now=0.0)
    cov.swept(CUTOFF + 100)
    assert cov.needs_lookup("a", CUTOFF + 99)
    assert not cov.needs_lookup("a", CUTOFF + 100)
