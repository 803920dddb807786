"""Value ranges (pipeline/meters/config.py, "Ranges"): the bounds, the running-total decisions
in arrival order, and rebuilds from the record that honour the recorded decisions."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.billing.plan import fits_ledger, plan_sends
from meterstream.dedup.key import DedupKey
from meterstream.errors import InvalidValue
from meterstream.events import ALL_METERS, Reason, UsageEvent, content_fingerprint
from meterstream.meters.aggregation import WindowState, aggregator_for
from meterstream.meters.config import COLUMN_LIMITS, STRIPE_LIMITS, parse_meters
from meterstream.meters.fold import (
    ALL_GROUPS,
    WindowKey,
    contributions,
    enforce_limits,
    merge_into,
    recompute_windows,
    total_key,
    windows_of,
)
from meterstream.meters.windows import WINDOW_MS
from meterstream.sinks.clickhouse.writer import decimal_38_9
from tests.unit.billing.test_forwarding import meter

HOUR = 3_600_000
T0 = 1_790_000_000_000 // HOUR * HOUR
DECIMAL_38_9 = Decimal(10) ** 29
INT64_MAX = 2**63 - 1
CENTURY_DAYS = 36_525

METERS = parse_meters(
    {
        "meters": [
            {"name": "tokens", "event_name": "chat", "aggregation": "sum",
             "value": "properties.tokens"},
            {"name": "billed", "event_name": "chat", "aggregation": "sum",
             "value": "properties.tokens", "group_by": ["properties.model"],
             "stripe": {"event_name": "billed"}},
            {"name": "peak", "event_name": "chat", "aggregation": "max",
             "value": "properties.tokens"},
            {"name": "chats", "event_name": "chat", "aggregation": "count"},
        ]
    }
)  # fmt: skip
TOKENS, BILLED = METERS.by_name("tokens"), METERS.by_name("billed")


def ev(key: str, tokens: Any, model: str = "a", customer: str = "c", ts: int = T0) -> UsageEvent:
    props = {"tokens": tokens, "model": model}
    return UsageEvent(
        "chat", customer, key, ts, props, fingerprint=content_fingerprint("chat", ts, props)
    )


def sum_state(value: Decimal, n: int = 1) -> WindowState:
    return WindowState(event_count=n, value=value)


# -- the bounds ------------------------------------------------------------------------


@pytest.mark.parametrize("window", ["minute", "hour", "day"])
def test_column_limits_keep_a_century_of_windows_inside_decimal_38_9(window: str) -> None:
    per_century = CENTURY_DAYS * 86_400_000 // WINDOW_MS[window]
    assert per_century * COLUMN_LIMITS[window] < DECIMAL_38_9
    # and the limit is not needlessly small: ten times it would not fit
    assert per_century * COLUMN_LIMITS[window] * 10 >= DECIMAL_38_9 / 10


@pytest.mark.parametrize("window", ["minute", "hour", "day"])
def test_stripe_limits_keep_a_month_total_and_every_delta_inside_int64(window: str) -> None:
    per_month = 31 * 86_400_000 // WINDOW_MS[window]
    worst_total = per_month * STRIPE_LIMITS[window]  # every customer window at the limit
    # a sum meter sends round(T') - round(T): from the most negative total to the largest
    assert 2 * worst_total + 1 <= INT64_MAX
    assert STRIPE_LIMITS[window] <= COLUMN_LIMITS[window]


def test_values_at_or_past_the_limit_are_invalid_values() -> None:
    limit = TOKENS.limit
    assert TOKENS.extract(ev("k", limit - 1)) == limit - 1
    for value in (limit, -limit, limit * 10, "6e28", Decimal("6E+28"), str(-limit)):
        with pytest.raises(InvalidValue, match=r"out of range.*±10\^23"):
            TOKENS.extract(ev("k", value))
    with pytest.raises(InvalidValue, match=r"forwarded to Stripe.*±10\^15"):
        BILLED.extract(ev("k", STRIPE_LIMITS["hour"]))


# -- running totals, in arrival order --------------------------------------------------


def fold_reference(values: list[Decimal], base: Decimal, limit: Decimal) -> list[bool]:
    """Which values are accepted: a running sum refusing any that reaches ±limit."""
    total, accepted = base, []
    for v in values:
        ok = abs(total + v) < limit
        accepted.append(ok)
        if ok:
            total += v
    return accepted


def test_a_window_keeps_its_last_good_state() -> None:
    limit = TOKENS.limit
    events = [ev("k1", limit * 6 / 10), ev("k2", limit * 6 / 10), ev("k3", 5)]
    contrib = contributions(METERS, events)
    key = WindowKey("tokens", "c", "{}", T0)
    enforce_limits(METERS, contrib, {}, events)
    assert contrib.states[key] == sum_state(limit * 6 / 10 + 5, 2)
    assert contrib.refused == {DedupKey("c", "k2"): ["tokens"]}
    # (6e22 is out of the Stripe meter's range anyway: not counted there either)
    assert contrib.counted_by[DedupKey("c", "k2")] == ["peak", "chats"]
    (rejection,) = [r for r in contrib.rejections if r.meter == "tokens"]
    assert rejection.reason is Reason.INVALID_VALUE
    assert rejection.idempotency_key == "k2"
    assert "would take the window total" in rejection.detail
    # every other meter still counts k2
    assert contrib.states[WindowKey("chats", "c", "{}", T0)].event_count == 3


def test_the_base_state_counts() -> None:
    limit = TOKENS.limit
    key = WindowKey("tokens", "c", "{}", T0)
    events = [ev("k1", 10), ev("k2", -20)]
    contrib = contributions(METERS, events)
    enforce_limits(METERS, contrib, {key: sum_state(limit - 5)}, events)
    assert contrib.refused == {DedupKey("c", "k1"): ["tokens"]}
    assert contrib.states[key] == sum_state(Decimal(-20))


def test_a_stripe_meter_checks_the_customer_total_over_all_groups() -> None:
    limit = BILLED.limit
    events = [ev("k1", limit * 6 / 10, "a"), ev("k2", limit * 6 / 10, "b"), ev("k3", 1, "b")]
    contrib = contributions(METERS, events)
    enforce_limits(METERS, contrib, {}, events)
    assert contrib.refused == {DedupKey("c", "k2"): ["billed"]}
    tkey = WindowKey("billed", "c", ALL_GROUPS, T0)
    assert tkey.is_total and total_key(WindowKey("billed", "c", "{}", T0)) == tkey
    assert contrib.states[tkey] == sum_state(limit * 6 / 10 + 1, 2)
    group_b = WindowKey("billed", "c", '{"properties.model":"b"}', T0)
    assert contrib.states[group_b] == sum_state(Decimal(1))
    # the meter without a Stripe block took all three
    assert contrib.states[WindowKey("tokens", "c", "{}", T0)].event_count == 3


def test_a_series_whose_every_event_is_refused_leaves_no_delta() -> None:
    key = WindowKey("tokens", "c", "{}", T0)
    events = [ev("k1", 5)]
    contrib = contributions(METERS, events)
    enforce_limits(METERS, contrib, {key: sum_state(TOKENS.limit - 1)}, events)
    assert key not in contrib.states


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-12, 12), min_size=1, max_size=30),
    st.integers(-9, 9),
)
def test_the_total_never_leaves_the_range_and_matches_the_reference(
    tenths: list[int], base_tenths: int
) -> None:
    limit = TOKENS.limit
    values = [limit * t / 10 for t in tenths]
    base = limit * base_tenths / 10
    key = WindowKey("tokens", "c", "{}", T0)
    events = [ev(f"k{i:03d}", v) for i, v in enumerate(values)]
    contrib = contributions(METERS, events)
    enforce_limits(METERS, contrib, {key: sum_state(base)}, events)
    accepted = fold_reference([v for v in values if abs(v) < limit], base, limit)
    readable = [v for v in values if abs(v) < limit]
    expected_delta = sum((v for v, ok in zip(readable, accepted, strict=True) if ok), Decimal(0))
    state = contrib.states.get(key)
    delta = Decimal(0) if state is None or state.value is None else state.value
    assert delta == expected_delta
    assert abs(base + delta) < limit
    assert len(contrib.refused) == accepted.count(False)


# -- rebuilds from the record honour the recorded decisions ----------------------------


def record_of(events: list[UsageEvent], refused: dict[DedupKey, list[str]]) -> list[UsageEvent]:
    """What the record returns: the events with their refused_meters, any order."""
    import dataclasses

    return [
        dataclasses.replace(e, refused_meters=tuple(refused.get(DedupKey.of(e), ())))
        for e in events
    ]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-12, 12), min_size=1, max_size=25), st.randoms())
def test_a_rebuild_in_any_order_equals_the_live_result(
    tenths: list[int], rng: random.Random
) -> None:
    limit = BILLED.limit
    models = "abc"
    events = [
        ev(f"k{i:03d}", limit * t / 10, models[i % 3]) for i, t in enumerate(tenths) if abs(t) < 10
    ]
    contrib = contributions(METERS, events)
    enforce_limits(METERS, contrib, {}, events)
    live = merge_into(METERS, {}, contrib.states)
    record = record_of(events, contrib.refused)
    rng.shuffle(record)
    keys = windows_of(METERS, events, totals=True)
    rebuilt = recompute_windows(METERS, keys, record)
    for key in keys:
        agg = aggregator_for(METERS.by_name(key.meter).aggregation)
        want = live.get(key) or agg.start()
        assert agg.result(rebuilt[key]) == agg.result(want), key
        assert rebuilt[key].event_count == want.event_count, key


def test_a_rebuild_skips_unprocessable_and_excluded_events() -> None:
    events = [ev("k1", 1), ev("k2", 2), ev("k3", 4)]
    record = record_of(events, {DedupKey("c", "k2"): [ALL_METERS]})
    keys = windows_of(METERS, events, totals=True)
    states = recompute_windows(METERS, keys, record, exclude={DedupKey("c", "k3")})
    assert states[WindowKey("tokens", "c", "{}", T0)] == sum_state(Decimal(1))
    assert states[WindowKey("chats", "c", "{}", T0)].event_count == 1
    tkey = WindowKey("billed", "c", ALL_GROUPS, T0)
    assert tkey in keys
    assert states[tkey] == sum_state(Decimal(1))


def test_the_forwarder_holds_a_total_the_ledger_cannot_hold() -> None:
    m = meter("sum")
    plan = plan_sends(
        m, "2026-11", {"c": Decimal(2**63), "d": Decimal(5)}, {"c": "x", "d": "y"}, []
    )
    assert plan.held_out_of_range == ["c"]
    assert [r.customer_id for r in plan.new] == ["d"]
    huge = plan_sends(m, "2026-11", {"c": Decimal("1e40")}, {"c": "x"}, [])
    assert huge.held_out_of_range == ["c"] and not huge.new
    assert fits_ledger(Decimal(INT64_MAX), INT64_MAX)
    assert not fits_ledger(Decimal(0), -INT64_MAX - 2)


_VALUES = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.builds(lambda m, e: Decimal(m).scaleb(e), st.integers(-999, 999), st.integers(-60, 60)),
    st.text(max_size=12),
    st.none(),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_VALUES, st.sampled_from("abc")), min_size=1, max_size=20))
def test_no_values_make_the_window_computation_or_its_rows_raise(
    values: list[tuple[Any, str]],
) -> None:
    """Whatever the values, the batch's windows are computed and written: every result
    fits meter_windows (Decimal(38, 9)), before and after a base near the limit."""
    events = [ev(f"k{i:03d}", v, model) for i, (v, model) in enumerate(values)]
    for base_fraction in (Decimal(0), Decimal("0.99"), Decimal("-0.99")):
        contrib = contributions(METERS, events)
        bases = {
            WindowKey(name, "c", "{}", T0): sum_state(METERS.by_name(name).limit * base_fraction)
            for name in ("tokens",)
        }
        enforce_limits(METERS, contrib, bases, events)
        states = merge_into(METERS, bases, contrib.states)
        for key, state in states.items():
            meter = METERS.by_name(key.meter)
            agg = aggregator_for(meter.aggregation)
            value = agg.result(state)
            assert value.copy_abs() < meter.limit or meter.aggregation in ("count",), key
            decimal_38_9(value)  # raised for 1.2e29 before: the crash loop of issue #20
            agg.load(agg.dump(state))
