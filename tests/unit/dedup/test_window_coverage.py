"""WindowCoverage: a window the table lacks is new only when the customer's windows
table provably holds every window meter_windows holds, in the window-start range."""

from __future__ import annotations

from meterstream.dedup.coverage import WindowCoverage

CUTOFF = 1_000_000


def test_counts_windows_by_start_and_covers_only_equal_counts() -> None:
    cov = WindowCoverage.from_windows(
        [("a", CUTOFF), ("a", CUTOFF - 1), ("b", CUTOFF + 5), ("b", CUTOFF + 6)], CUTOFF
    )
    todo = cov.to_check(["a", "b", "c"], now=0.0)
    # meter_windows: a has 1 window in range (table 1), b has 3 (table 2), c none
    cov.checked(todo, {"a": 1, "b": 3}, now=0.0)
    assert cov.is_new("a", CUTOFF + 10)
    assert not cov.is_new("b", CUTOFF + 10)  # a window the table lost: rebuild it
    assert cov.is_new("c", CUTOFF)  # a customer with no window at all
    assert not cov.is_new("a", CUTOFF - 1)  # starts before the range: always rebuilt
    assert not cov.is_new("zz", CUTOFF)  # never checked


def test_an_empty_table_against_kept_windows_covers_no_one() -> None:
    cov = WindowCoverage.from_windows([], CUTOFF)
    cov.checked(["a"], {"a": 12}, now=0.0)
    assert not cov.is_new("a", CUTOFF + 1)


def test_windows_written_keep_the_count_and_sweeps_raise_the_floor() -> None:
    cov = WindowCoverage.from_windows([("a", CUTOFF)], CUTOFF)
    cov.checked(["a"], {"a": 1}, now=0.0)
    cov.written("a", CUTOFF + 3_600_000)  # a new window: table and meter_windows both gain it
    assert cov.is_new("a", CUTOFF + 7_200_000)
    cov.swept(CUTOFF + 3_600_000)
    assert not cov.is_new("a", CUTOFF + 1)
    assert cov.is_new("a", CUTOFF + 3_600_000)
