"""The backfill route's body (pipeline/api/corrections.py): every problem listed, events
kept as exact JSON text; and the split of a backfill into usage-corrections records."""

from __future__ import annotations

from typing import Any

import pytest

from meterstream.api.corrections import backfill_request
from meterstream.errors import CorrectionError
from meterstream.events import loads_exact
from meterstream.worker.corrections import _chunks


def test_events_are_kept_exactly() -> None:
    body = loads_exact(
        b'{"events": [{"properties": {"v": 0.10000000000000000001}}], "reason": "r"}'
    )
    options, raws = backfill_request(body)
    assert raws == [b'{"properties":{"v":0.10000000000000000001}}']
    assert options["dry_run"] is False


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"events": [{}]}, "reason: required, a string of 1-1000 characters"),
        ({"reason": "r"}, "give either events (a list) or rejected (a reason, e.g. too_late)"),
        (
            {"reason": "r", "events": [{}], "rejected": "too_late"},
            "give either events (a list) or rejected (a reason, e.g. too_late)",
        ),
        ({"reason": "r", "events": []}, "events: must be a list of 1-5000 events"),
        (
            {"reason": "r", "rejected": "duplicate"},
            "rejected: only too_late events can be re-imported",
        ),
        (
            {"reason": "r", "rejected": "too_late", "customer_id": 5},
            "customer_id: a string of 1-200 characters",
        ),
        ({"reason": "r", "events": [{}], "dry_run": "yes"}, "dry_run: must be true or false"),
        ({"reason": "r", "events": [{}], "extra": 1}, "unknown field(s): extra"),
    ],
)
def test_bad_bodies_say_what_is_wrong(body: dict[str, Any], problem: str) -> None:
    with pytest.raises(CorrectionError) as bad:
        backfill_request(body)
    assert problem in bad.value.problems


def test_a_bad_time_is_refused() -> None:
    with pytest.raises(CorrectionError, match=r"^from: "):
        backfill_request({"reason": "r", "rejected": "too_late", "from": "yesterday"})


def test_chunks_keep_order_and_bound_count_and_size() -> None:
    raws = [bytes([65 + i % 26]) * (1000 if i % 7 else 300_000) for i in range(1200)]
    chunks = list(_chunks(raws))
    assert [r for c in chunks for r in c] == raws
    assert all(len(c) <= 500 for c in chunks)
    assert all(sum(map(len, c)) <= 512 * 1024 or len(c) == 1 for c in chunks)


def test_a_dead_letter_without_a_timestamp_is_not_re_imported() -> None:
    from meterstream.api.corrections import _has_timestamp

    assert _has_timestamp(b'{"event_name": "x", "customer_id": "c", "timestamp": 5}')
    assert not _has_timestamp(b'{"event_name": "x", "customer_id": "c"}')
    assert not _has_timestamp(b'{"event_name": "x", "timestamp": null}')
    assert _has_timestamp(b"not json")  # dead-lettered again by the stream, with its reason
