"""The gap finder of the worker's consumer (pipeline/worker/gaps.py)."""

from meterstream.worker.gaps import missing_ranges


def test_missing_ranges_before_and_inside_a_batch() -> None:
    assert missing_ranges([10, 11, 12], expected=10) == []
    assert missing_ranges([13, 14], expected=10) == [(10, 13)]
    assert missing_ranges([10, 12, 13, 17], expected=10) == [(11, 12), (14, 17)]
    assert missing_ranges([5, 6, 10], expected=8) == [(8, 10)]  # 5, 6: redelivered
    assert missing_ranges([3, 4], expected=None) == []
