"""Corrections of periods already forwarded to Stripe (pure): timestamps that order every
send, `last` ties cancelled within 24 hours or reported, negative deltas for sums, and
what is reported once a period is past the correction horizon."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

from meterstream.billing.plan import plan_sends
from meterstream.billing.stripe_corrections import (
    CANCEL_REFUSED,
    RESERVED_SECONDS,
    correctable,
    next_timestamp,
    stamped_at,
    stripe_holds,
    ties_to_cancel,
    uncorrectable,
)
from meterstream.meters.windows import DAY_MS, month_bounds
from meterstream.sinks.stripe.ledger import LedgerRow
from meterstream.sinks.stripe.payloads import meter_event_identifier
from tests.unit.billing.test_forwarding import meter

P = "2026-11"
START, END = month_bounds(P)
LAST_S = END // 1000 - 1  # the period's last second
HOUR = 3_600_000


def row(
    seq: int,
    value: int,
    *,
    ts: int = 0,
    sent_at: int = 0,
    status: str = "sent",
    code: str = "",
) -> LedgerRow:
    ident = meter_event_identifier("m", "c", P, seq)
    return LedgerRow(
        ident, "m", "c", "cus_c", P, value, Decimal(value), status, code, 1, sent_at, ts
    )


def sent(plan_rows: list[LedgerRow], at_ms: int) -> list[LedgerRow]:
    return [dataclasses.replace(r, status="sent", sent_at_ms=at_ms) for r in plan_rows]


# ------------------------------------------------------------------ timestamps


def test_a_send_while_the_month_is_open_is_stamped_at_the_forward_time() -> None:
    now = START + 10 * DAY_MS + 5_000
    assert next_timestamp(P, now, None) == now // 1000 - 1
    # never in the month's last hour, which is kept for corrections after it ends
    assert next_timestamp(P, END - 60_000, None) == LAST_S - RESERVED_SECONDS
    # and never before the period starts
    assert next_timestamp(P, START + 200, None) == START // 1000


def test_each_send_is_stamped_after_the_one_before_even_after_the_month_ended() -> None:
    after = END + 2 * HOUR
    first = next_timestamp(P, after, None)
    assert first == LAST_S - RESERVED_SECONDS
    second = next_timestamp(P, after + HOUR, first)
    third = next_timestamp(P, after + 2 * HOUR, second)
    assert first < second < third <= LAST_S
    # a forward within the same second as the previous stamp still moves on
    assert next_timestamp(P, START + DAY_MS, START // 1000 + 86_399) == START // 1000 + 86_400
    # the reserve used up: the period's last second (then ties are cancelled)
    assert next_timestamp(P, after, LAST_S) == LAST_S


def test_rows_from_before_the_ledger_kept_timestamps_are_estimated_conservatively() -> None:
    assert stamped_at(row(1, 5, ts=1234)) == 1234
    assert stamped_at(row(1, 5, sent_at=START + DAY_MS)) == (START + DAY_MS) // 1000
    assert stamped_at(row(1, 5, sent_at=END + DAY_MS)) == LAST_S  # clamped, as sent then
    assert stamped_at(row(1, 5, status="pending")) == LAST_S


# ------------------------------------------------------------------ last meters


@pytest.mark.parametrize("aggregation", ["max", "min", "unique_count", "latest"])
def test_a_last_meter_corrected_twice_for_a_closed_month_has_one_latest_event(
    aggregation: str,
) -> None:
    m = meter(aggregation)
    now = END - 2 * HOUR  # the month open: first value
    first = plan_sends(m, P, {"c": Decimal(10)}, {"c": "cus_c"}, [], now_ms=now)
    history = sent(first.new, now)
    for value, at in [(7, END + HOUR), (12, END + 30 * HOUR)]:  # two corrections after it
        plan = plan_sends(m, P, {"c": Decimal(value)}, {"c": "cus_c"}, history, now_ms=at)
        (new,) = plan.new
        assert new.value == value and plan.cancel == [] and plan.ties == []
        assert START // 1000 <= new.timestamp_s <= LAST_S
        history += sent(plan.new, at)
    stamps = [r.timestamp_s for r in history]
    assert stamps == sorted(set(stamps)), "every send stamped later than the one before"
    assert stripe_holds("last", history) == 12


def test_a_tie_with_an_event_from_before_is_cancelled_within_24_hours() -> None:
    m = meter("max")
    # the old stamping: a send after the month ended was stamped at its last second
    old = row(1, 10, sent_at=END + HOUR)
    at = END + 5 * HOUR
    plan = plan_sends(m, P, {"c": Decimal(7)}, {"c": "cus_c"}, [old], now_ms=at)
    (new,) = plan.new
    assert new.timestamp_s == LAST_S  # nothing later exists inside the period
    assert plan.cancel == [old] and plan.ties == []
    # without the cancellation Stripe's winner would be undefined
    assert stripe_holds("last", [old, *sent(plan.new, at)]) is None
    cancelled = dataclasses.replace(old, status="cancelled")
    assert stripe_holds("last", [cancelled, *sent(plan.new, at)]) == 7


def test_a_tie_past_24_hours_is_reported_not_left_to_chance() -> None:
    m = meter("max")
    old = row(1, 10, sent_at=END + HOUR)
    at = END + 26 * HOUR
    plan = plan_sends(m, P, {"c": Decimal(7)}, {"c": "cus_c"}, [old], now_ms=at)
    assert plan.cancel == []
    (tie,) = plan.ties
    assert (tie.customer_id, tie.stripe, tie.expected, tie.reason) == ("c", None, 7, "tie")
    # a cancellation Stripe refused is not tried again: reported as well
    refused = dataclasses.replace(old, sent_at_ms=END + 20 * HOUR, error_code=CANCEL_REFUSED)
    again = plan_sends(m, P, {"c": Decimal(7)}, {"c": "cus_c"}, [refused], now_ms=at)
    assert again.cancel == [] and [t.reason for t in again.ties] == ["tie"]


def test_a_tie_left_by_a_crash_is_cancelled_by_the_next_round() -> None:
    old = row(1, 10, sent_at=END + HOUR)
    new = row(2, 7, ts=LAST_S, sent_at=END + 2 * HOUR)
    plan = plan_sends(
        meter("max"), P, {"c": Decimal(7)}, {"c": "cus_c"}, [old, new], END + 3 * HOUR
    )
    assert plan.new == [] and plan.cancel == [old]


def test_earlier_events_at_other_timestamps_or_equal_values_are_left_alone() -> None:
    history = [row(1, 10, ts=100, sent_at=START), row(2, 9, ts=200, sent_at=START)]
    assert ties_to_cancel(history, START + HOUR) == ([], [])
    same = [row(1, 9, ts=300, sent_at=START), row(2, 9, ts=300, sent_at=START)]
    assert ties_to_cancel(same, START + HOUR) == ([], [])


# ------------------------------------------------------------------ sum and count meters


@pytest.mark.parametrize("aggregation", ["sum", "count"])
def test_a_sum_that_goes_down_sends_a_negative_delta_stamped_later(aggregation: str) -> None:
    m = meter(aggregation)
    history = [row(1, 10, ts=LAST_S - RESERVED_SECONDS, sent_at=END + HOUR)]
    plan = plan_sends(m, P, {"c": Decimal(6)}, {"c": "cus_c"}, history, now_ms=END + 2 * HOUR)
    (new,) = plan.new
    assert new.value == -4 and new.timestamp_s == LAST_S - RESERVED_SECONDS + 1
    assert plan.cancel == [] and plan.ties == []
    assert stripe_holds("sum", [*history, *sent(plan.new, END)]) == 6


@pytest.mark.parametrize(("aggregation", "value"), [("sum", -10), ("count", -10), ("max", 0)])
def test_a_customer_whose_events_were_all_voided_goes_to_zero(aggregation: str, value: int) -> None:
    history = [row(1, 10, ts=100, sent_at=START)]
    # no total any more, and (absent from the totals) no Stripe id resolved: the ledger's
    plan = plan_sends(meter(aggregation), P, {}, {}, history, now_ms=END + HOUR)
    (new,) = plan.new
    assert (new.value, new.stripe_customer_id, new.exact_total) == (value, "cus_c", 0)
    assert plan.held_no_customer == []
    # one never forwarded and without a total: nothing
    assert plan_sends(meter(aggregation), P, {}, {}, [], now_ms=END).new == []


# ------------------------------------------------------------------ the correction horizon


def test_the_correction_horizon() -> None:
    assert correctable(P, END - 1, 0)
    assert not correctable(P, END, 0)
    assert correctable(P, END + 3 * DAY_MS - 1, 3)
    assert not correctable(P, END + 3 * DAY_MS, 3)


def test_past_the_horizon_a_sum_that_went_down_is_reported_with_the_amount_to_credit() -> None:
    history = [row(1, 10), row(2, 5), row(3, 99, status="pending")]  # pending: never at Stripe
    (found,) = uncorrectable("m", "sum", P, {"c": (Decimal("11.4"), 11)}, history, {})
    assert (found.stripe, found.expected, found.difference, found.to_credit) == (15, 11, -4, 4)
    assert found.reason == "past_correction_horizon" and found.stripe_customer_id == "cus_c"
    # under-billed: a positive difference, nothing to credit
    (under,) = uncorrectable("m", "sum", P, {"c": (Decimal(20), 20)}, history, {})
    assert (under.difference, under.to_credit) == (5, 0)
    # right: nothing reported
    assert uncorrectable("m", "sum", P, {"c": (Decimal(15), 15)}, history, {}) == []


def test_past_the_horizon_a_last_meter_and_a_customer_never_forwarded() -> None:
    history = [row(1, 10, ts=100), row(2, 8, ts=200), row(3, 12, ts=150, status="cancelled")]
    expected = {"c": (Decimal(6), 6), "d": (Decimal(3), 3)}
    found = {
        u.customer_id: u for u in uncorrectable("m", "last", P, expected, history, {"d": "cus_d"})
    }
    assert (found["c"].stripe, found["c"].difference, found["c"].to_credit) == (8, -2, 2)
    assert (found["d"].stripe, found["d"].difference, found["d"].stripe_customer_id) == (
        0,
        3,
        "cus_d",
    )
    # a customer whose events all went away: Stripe keeps the last value, all to credit
    (gone,) = uncorrectable("m", "last", P, {}, history, {})
    assert (gone.expected, gone.to_credit) == (0, 8)
    # a tie at Stripe is reported as one
    tied = [row(1, 10, ts=100), row(2, 8, ts=100)]
    (tie,) = uncorrectable("m", "last", P, {"c": (Decimal(8), 8)}, tied, {})
    assert (tie.stripe, tie.reason) == (None, "tie")
