import json
from collections.abc import Callable
from decimal import Decimal
from functools import reduce

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.meters.aggregation import AGGREGATION_KINDS, WindowState, aggregate, aggregator_for

# A unique event: idempotency key -> (numeric value, unique value, timestamp ms).
Events = dict[str, tuple[Decimal, str, int]]

decimals = st.builds(
    lambda n, places: Decimal(n).scaleb(-places),
    st.integers(-(10**12), 10**12),
    st.integers(0, 4),
)
keys = st.text(alphabet="abAB0é€😀", min_size=1, max_size=4)
events_st = st.dictionaries(
    keys,
    st.tuples(decimals, st.sampled_from(["u1", "u2", "u3", "1", "é"]), st.integers(0, 20)),
    max_size=30,
)


def for_every_kind(test: Callable[..., None]) -> Callable[..., None]:
    """``test(kind, events, data)`` for every aggregation kind, on generated unique events
    (``data`` draws more: duplicates, orders, partitions)."""
    return pytest.mark.parametrize("kind", AGGREGATION_KINDS)(
        given(events=events_st, data=st.data())(test)
    )


def items(kind: str, events: Events, order: list[str] | None = None) -> list:
    """(value, ts, key) items for ``kind``: unique_count reads the string value."""
    chosen = order if order is not None else sorted(events)
    out = []
    for key in chosen:
        number, text, ts = events[key]
        out.append((text if kind == "unique_count" else number, ts, key))
    return out


def reference(kind: str, events: Events) -> Decimal:
    """Straightforward definition of each aggregation over unique events."""
    numbers = [number for number, _, _ in events.values()]
    if not events:
        return Decimal(0)
    if kind == "count":
        return Decimal(len(events))
    if kind == "sum":
        return sum(numbers, Decimal(0))
    if kind == "max":
        return max(numbers)
    if kind == "min":
        return min(numbers)
    if kind == "unique_count":
        return Decimal(len({text for _, text, _ in events.values()}))
    assert kind == "latest"
    winner = max(events, key=lambda k: (events[k][2], k.encode()))
    return events[winner][0]


@for_every_kind
def test_result_ignores_order_and_duplicates(
    kind: str, events: Events, data: st.DataObject
) -> None:
    agg = aggregator_for(kind)
    unique = list(events)
    duplicates = data.draw(st.lists(st.sampled_from(unique), max_size=20)) if unique else []
    arrival = data.draw(st.permutations(unique + duplicates))
    deduplicated = list(dict.fromkeys(arrival))  # dedup by key, first arrival wins

    state = aggregate(kind, items(kind, events, deduplicated))

    assert agg.result(state) == reference(kind, events)
    assert state.event_count == len(events)
    # Not only equal numbers: the same state, text included, whatever the order.
    assert agg.dump(state) == agg.dump(aggregate(kind, items(kind, events)))


@for_every_kind
def test_merge_of_partition_equals_aggregate_of_union(
    kind: str, events: Events, data: st.DataObject
) -> None:
    agg = aggregator_for(kind)
    parts_count = data.draw(st.integers(1, 4))
    assignment = {key: data.draw(st.integers(0, parts_count - 1)) for key in events}
    parts = [
        aggregate(kind, items(kind, events, [k for k in events if assignment[k] == i]))
        for i in range(parts_count)
    ]
    merged = reduce(agg.merge, parts, agg.start())
    assert agg.dump(merged) == agg.dump(aggregate(kind, items(kind, events)))
    assert agg.result(merged) == reference(kind, events)


def three_states(kind: str, events: Events, data: st.DataObject) -> list[WindowState]:
    assignment = {key: data.draw(st.integers(0, 2)) for key in events}
    return [
        aggregate(kind, items(kind, events, [k for k in events if assignment[k] == i]))
        for i in range(3)
    ]


@for_every_kind
def test_merge_is_commutative_associative_and_pure(
    kind: str, events: Events, data: st.DataObject
) -> None:
    agg = aggregator_for(kind)
    a, b, c = three_states(kind, events, data)
    before = [agg.dump(s) for s in (a, b, c)]

    assert agg.dump(agg.merge(a, b)) == agg.dump(agg.merge(b, a))
    assert agg.dump(agg.merge(agg.merge(a, b), c)) == agg.dump(agg.merge(a, agg.merge(b, c)))
    assert agg.dump(agg.merge(a, agg.start())) == agg.dump(a)
    assert [agg.dump(s) for s in (a, b, c)] == before  # inputs never mutated

    merged = agg.merge(a, b)
    agg.add(merged, *items(kind, {"zz-new": (Decimal(1), "new", 99)})[0])
    assert [agg.dump(s) for s in (a, b)] == before[:2]  # nothing shared with the inputs


@pytest.mark.parametrize("kind", AGGREGATION_KINDS)
@given(events=events_st)
def test_dump_load_round_trip(kind: str, events: Events) -> None:
    agg = aggregator_for(kind)
    state = aggregate(kind, items(kind, events))
    dumped = agg.dump(state)
    assert agg.load(json.loads(json.dumps(dumped))) == state


# -- examples ------------------------------------------------------------------

D = Decimal


def test_latest_tie_on_timestamp_greater_key_wins() -> None:
    agg = aggregator_for("latest")
    forward = aggregate("latest", [(D(1), 100, "a"), (D(2), 100, "b"), (D(3), 99, "z")])
    backward = aggregate("latest", [(D(3), 99, "z"), (D(2), 100, "b"), (D(1), 100, "a")])
    assert agg.result(forward) == agg.result(backward) == D(2)
    assert (forward.latest_ts, forward.latest_key) == (100, "b")


def test_latest_key_order_is_byte_order() -> None:
    # "é" (U+00E9, UTF-8 C3 A9) sorts after "z" (7A) in byte order.
    state = aggregate("latest", [(D(1), 5, "é"), (D(2), 5, "z")])
    assert aggregator_for("latest").result(state) == D(1)


def test_empty_results_are_zero() -> None:
    for kind in AGGREGATION_KINDS:
        agg = aggregator_for(kind)
        assert agg.result(agg.start()) == D(0)
        assert agg.result(agg.merge(agg.start(), agg.start())) == D(0)


def test_examples_per_kind() -> None:
    values = [(D("1.5"), 1, "a"), (D("-2"), 2, "b"), (D("10.25"), 3, "c")]
    expected = {
        "sum": D("9.75"),
        "count": D(3),
        "max": D("10.25"),
        "min": D(-2),
        "latest": D("10.25"),
    }
    for kind, result in expected.items():
        assert aggregator_for(kind).result(aggregate(kind, values)) == result
    uniques = [("u1", 1, "a"), ("u2", 2, "b"), ("u1", 3, "c")]
    assert aggregator_for("unique_count").result(aggregate("unique_count", uniques)) == D(2)


def test_sum_is_exact_beyond_default_precision() -> None:
    big = D("12345678901234567890.123456789012345678")
    state = aggregate("sum", [(big, 1, "a"), (D("0.000000000000000000001"), 2, "b")])
    assert str(aggregator_for("sum").result(state)) == "12345678901234567890.123456789012345678001"


def test_max_keeps_the_same_text_whatever_the_order() -> None:
    one, one_point_zero = (D(1), 1, "a"), (D("1.0"), 2, "b")
    assert str(aggregate("max", [one, one_point_zero]).value) == "1"
    assert str(aggregate("max", [one_point_zero, one]).value) == "1"


def test_dump_is_json_safe() -> None:
    state = aggregate("unique_count", [("b", 1, "k1"), ("a", 2, "k2")])
    assert aggregator_for("unique_count").dump(state) == {
        "event_count": 2,
        "value": None,
        "distinct": ["a", "b"],
        "latest_ts": -1,
        "latest_key": "",
    }
    summed = aggregator_for("sum").dump(aggregate("sum", [(D("0.10"), 1, "k")]))
    assert summed["value"] == "0.10"


def test_wrong_value_type_and_unknown_kind() -> None:
    with pytest.raises(TypeError):
        aggregate("sum", [("1", 1, "k")])
    with pytest.raises(TypeError):
        aggregate("unique_count", [(D(1), 1, "k")])
    with pytest.raises(ValueError, match="unknown aggregation 'avg'"):
        aggregator_for("avg")
    assert aggregator_for("sum") is aggregator_for("sum")
