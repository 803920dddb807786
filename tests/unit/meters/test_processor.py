"""The batch logic without Kafka or ClickHouse: dedup decisions and window states."""

from __future__ import annotations

import dataclasses
import tracemalloc
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.dedup.key import DedupKey
from meterstream.dedup.resolve import SourceRecord, decode_batch, resolve_duplicates
from meterstream.events import Reason, UsageEvent, content_fingerprint
from meterstream.meters.aggregation import aggregator_for
from meterstream.meters.config import parse_meters
from meterstream.meters.fold import (
    WindowKey,
    contributions,
    fold,
    merge_into,
    recompute_windows,
    windows_of,
)

HOUR = 3_600_000
T0 = 1_790_000_000_000 // HOUR * HOUR

METERS = parse_meters(
    {
        "meters": [
            {"name": "tokens", "event_name": "chat", "aggregation": "sum",
             "value": "properties.tokens", "group_by": ["properties.model"]},
            {"name": "chats", "event_name": "chat", "aggregation": "count"},
            {"name": "peak", "event_name": "chat", "aggregation": "max",
             "value": "properties.tokens", "window": "day"},
        ]
    }
)  # fmt: skip


def ev(
    key: str, tokens: object = 1, ts: int = T0, model: str = "a", customer: str = "c"
) -> UsageEvent:
    props = {"tokens": tokens, "model": model}
    return UsageEvent(
        "chat", customer, key, ts, props, fingerprint=content_fingerprint("chat", ts, props)
    )


def test_decode_batch_splits_events_and_rejections() -> None:
    records = [
        SourceRecord(b'{"event_name":"chat","customer_id":"c","idempotency_key":"k"}', 0, 1, T0),
        SourceRecord(b"nope", 0, 2, T0),
    ]
    events, rejections = decode_batch(records, now_ms=T0, horizon_ms=HOUR)
    assert [e.idempotency_key for _, e in events] == ["k"]
    assert [r.reason for r in rejections] == [Reason.INVALID_JSON]


def test_first_copy_wins_inside_a_batch() -> None:
    a, a_again, a_changed = ev("a", 5), ev("a", 5), ev("a", 6)
    result = resolve_duplicates([a, a_again, a_changed], {}, {})
    assert result.fresh == [a]
    assert result.duplicates == [a_again]
    assert [r.reason for r in result.conflicts] == [Reason.IDEMPOTENCY_CONFLICT]
    assert result.conflicts[0].idempotency_key == "a"


def test_counted_keys_are_duplicates_or_conflicts() -> None:
    a = ev("a", 5)
    counted = {DedupKey("c", "a"): a.fingerprint}
    assert resolve_duplicates([ev("a", 5)], counted, {}).duplicates
    assert resolve_duplicates([ev("a", 7)], counted, {}).conflicts


def test_recorded_but_uncounted_events_trigger_a_recompute_not_an_increment() -> None:
    a = ev("a", 5)
    result = resolve_duplicates([a], {}, {DedupKey("c", "a"): a.fingerprint})
    assert result.fresh == [] and result.recorded_uncounted == [a]
    changed = resolve_duplicates([ev("a", 9)], {}, {DedupKey("c", "a"): a.fingerprint})
    assert changed.conflicts and not changed.recorded_uncounted


def test_contributions_fold_a_batch_per_window_and_group() -> None:
    out = contributions(
        METERS, [ev("1", 5), ev("2", "2.5"), ev("3", 1, model="b"), ev("4", 4, ts=T0 + HOUR)]
    )
    states = out.states
    assert out.rejections == [] and out.unmetered == 0
    assert out.counted_by[DedupKey("c", "1")] == ["tokens", "chats", "peak"]
    sums = {
        (k.group_key, k.window_start_ms): aggregator_for("sum").result(s)
        for k, s in states.items()
        if k.meter == "tokens"
    }
    assert sums == {
        ('{"properties.model":"a"}', T0): Decimal("7.5"),
        ('{"properties.model":"b"}', T0): Decimal(1),
        ('{"properties.model":"a"}', T0 + HOUR): Decimal(4),
    }
    peak = [s for k, s in states.items() if k.meter == "peak"]
    assert len(peak) == 1 and aggregator_for("max").result(peak[0]) == 5


def test_invalid_value_is_dead_lettered_for_that_meter_only() -> None:
    out = contributions(METERS, [ev("1", "lots")])
    states = out.states
    assert out.counted_by[DedupKey("c", "1")] == ["chats"]
    assert [(r.reason, r.meter) for r in out.rejections] == [
        (Reason.INVALID_VALUE, "tokens"),
        (Reason.INVALID_VALUE, "peak"),
    ]
    assert [k.meter for k in states] == ["chats"]  # still counted where it can be


def test_unmetered_events_are_counted() -> None:
    other = UsageEvent("other", "c", "k", T0, {})
    out = contributions(METERS, [other])
    assert out.unmetered == 1 and out.counted_by[DedupKey("c", "k")] == []


def test_window_key_round_trip() -> None:
    key = WindowKey("m", 'c"1', '{"g":1}', T0)
    assert WindowKey.decode(key.encode()) == key


def test_table_keys_hold_only_their_own_bytes() -> None:
    # The dedup and windows tables keep a key per event and per window for
    # days; a key that pins a 4 KiB encoder buffer makes RSS grow without end.
    n = 2_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        keys = [DedupKey(f"cust-{i}", f"key-{i}").encode() for i in range(n)]
        keys += [WindowKey("m", f"cust-{i}", "", T0).encode() for i in range(n)]
        per_key = (tracemalloc.get_traced_memory()[0] - before) / len(keys)
    finally:
        tracemalloc.stop()
    assert per_key < 200, f"{per_key:.0f} bytes held per table key"


events_strategy = st.lists(
    st.builds(
        ev,
        key=st.sampled_from([f"k{i}" for i in range(30)]),
        tokens=st.integers(0, 10_000).map(lambda n: Decimal(n) / 100),
        ts=st.integers(0, 3 * HOUR - 1).map(lambda d: T0 + d),
        model=st.sampled_from(["a", "b"]),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(events_strategy, st.integers(1, 5))
def test_batches_with_duplicates_equal_recompute_from_the_record(
    events: list[UsageEvent], batches: int
) -> None:
    """Processing in batches against the dedup state gives exactly what the record gives."""
    counted: dict[DedupKey, str] = {}
    state: dict[WindowKey, object] = {}
    record: list[UsageEvent] = []
    size = max(1, len(events) // batches)
    for start in range(0, len(events), size):
        batch = events[start : start + size]
        result = resolve_duplicates(batch, counted, {})
        deltas = contributions(METERS, result.fresh).states
        state.update(merge_into(METERS, state, deltas))  # type: ignore[arg-type]
        for e in result.fresh:
            counted[DedupKey.of(e)] = e.fingerprint
            record.append(e)
    exact = recompute_windows(METERS, windows_of(METERS, record), record)
    assert set(state) == set(exact)
    for key, s in exact.items():
        agg = aggregator_for(METERS.by_name(key.meter).aggregation)
        assert agg.result(state[key]) == agg.result(s)  # type: ignore[arg-type]
        assert state[key].event_count == s.event_count  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),  # customer
            st.sampled_from([1, 2, 7, "x", None]),  # tokens ("x", None: unreadable)
            st.integers(0, 5),  # half hours after T0
            st.sampled_from(["a", "b"]),  # model
            st.sampled_from([(), ("tokens",), ("*",)]),  # what the record row refused
        ),
        max_size=30,
    )
)
def test_the_live_batch_the_rebuild_and_the_records_read_fold_alike(
    rows: list[tuple[int, object, int, str, tuple[str, ...]]],
) -> None:
    """One fold (meters/fold.fold) behind contributions, recompute_windows and the
    record's read for verification (billing/record.read_record): the same events give
    the same states, whichever of the three folds them."""
    fresh = [
        ev(f"k{i}", tokens, T0 + half * HOUR // 2, model, customer=f"c{c}")
        for i, (c, tokens, half, model, _) in enumerate(rows)
    ]
    recorded = [
        dataclasses.replace(e, refused_meters=refused)
        for e, (*_, refused) in zip(fresh, rows, strict=True)
    ]

    def dumps(states: dict[WindowKey, Any]) -> dict[WindowKey, Any]:
        return {k: METERS.aggregators[k.meter].dump(s) for k, s in states.items()}

    # live: fresh events carry no refusals; a window only its unreadable values fall in
    # has no state (the rebuild has it, empty)
    live = dumps(contributions(METERS, fresh).states)
    rebuilt_fresh = dumps(recompute_windows(METERS, windows_of(METERS, fresh), fresh))
    assert live == {k: d for k, d in rebuilt_fresh.items() if k in live}
    assert all(rebuilt_fresh[k] == empty_of(k) for k in rebuilt_fresh.keys() - live.keys())

    # the record's read, one meter at a time, against the rebuild of the same record
    rebuilt = dumps(recompute_windows(METERS, windows_of(METERS, recorded), recorded))
    for meter in METERS.meters:
        read = dumps(fold(METERS, recorded, meter=meter, empty_windows=True))
        mine = {k: d for k, d in rebuilt.items() if k.meter == meter.name}
        assert read == {k: d for k, d in mine.items() if k in read}
        # every window of the events not set aside ('*') is there, empty when the meter
        # refused or could not read all its events; the others are empty in the rebuild
        kept = [e for e in recorded if "*" not in e.refused_meters]
        assert read.keys() == {k for k in windows_of(METERS, kept) if k.meter == meter.name}
        assert all(mine[k] == empty_of(k) for k in mine.keys() - read.keys())


def empty_of(key: WindowKey) -> Any:
    agg = METERS.aggregators[key.meter]
    return agg.dump(agg.start())
