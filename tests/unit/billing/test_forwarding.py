"""plan_sends and the reconcile comparison: pure, no I/O."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterstream.billing.plan import (
    build_checks,
    differences,
    event_timestamp_s,
    expected_whole,
    plan_sends,
    sequence_of,
)
from meterstream.meters.config import Meter, parse_meters, yaml_load_exact
from meterstream.meters.windows import month_bounds
from meterstream.sinks.stripe.ledger import LedgerRow
from meterstream.sinks.stripe.payloads import meter_event_identifier

P = "2026-11"


def meter(aggregation: str = "sum", rounding: str = "carry") -> Meter:
    value = "" if aggregation == "count" else "\n    value: properties.v"
    doc = f"""
meters:
  - name: m
    event_name: e
    aggregation: {aggregation}{value}
    stripe: {{event_name: s, rounding: {rounding}, interval: 1s, grace: 0s}}
"""
    return parse_meters(yaml_load_exact(doc)).meters[0]


def row(
    seq: int, value: int, status: str = "sent", customer: str = "c", code: str = ""
) -> LedgerRow:
    ident = meter_event_identifier("m", customer, P, seq)
    return LedgerRow(
        ident, "m", customer, f"cus_{customer}", P, value, Decimal(value), status, code
    )


def test_first_forward_sends_the_rounded_total_with_sequence_1() -> None:
    plan = plan_sends(meter(), P, {"c": Decimal("2.6")}, {"c": "cus_c"}, [])
    assert [(r.identifier, r.value, r.status) for r in plan.new] == [
        (meter_event_identifier("m", "c", P, 1), 3, "pending")
    ]
    assert plan.new[0].stripe_customer_id == "cus_c" and plan.new[0].exact_total == Decimal("2.6")
    assert plan.resend == [] and plan.held_no_customer == [] and plan.held_error == []


@pytest.mark.parametrize(
    ("rounding", "steps", "sent"),
    [
        # exact totals after each forward -> whole numbers sent each time
        ("carry", ["0.4", "0.8", "1.2", "2.6"], [0, 1, 0, 2]),
        ("up", ["0.4", "0.8", "1.2", "2.6"], [1, 0, 1, 1]),
        ("down", ["0.4", "0.8", "1.2", "2.6"], [0, 0, 1, 1]),
    ],
)
def test_the_fraction_is_carried_across_forwards(
    rounding: str, steps: list[str], sent: list[int]
) -> None:
    m = meter("sum", rounding)
    history: list[LedgerRow] = []
    got = []
    for total in steps:
        plan = plan_sends(m, P, {"c": Decimal(total)}, {"c": "cus_c"}, history)
        assert len(plan.new) <= 1
        got.append(plan.new[0].value if plan.new else 0)
        history += [r.with_status("sent") for r in plan.new]
    assert got == sent
    assert sum(r.value for r in history) == expected_whole(m, Decimal(steps[-1]))
    assert abs(sum(r.value for r in history) - Decimal(steps[-1])) < 1


def test_a_customer_without_stripe_id_is_held_not_dropped() -> None:
    plan = plan_sends(meter(), P, {"c": Decimal(5), "d": Decimal(1)}, {"d": "cus_d"}, [])
    assert plan.held_no_customer == ["c"]
    assert [r.customer_id for r in plan.new] == ["d"]
    later = plan_sends(meter(), P, {"c": Decimal(5)}, {"c": "cus_c"}, [])
    assert [(r.customer_id, r.value) for r in later.new] == [("c", 5)]


def test_pending_rows_are_resent_and_counted() -> None:
    history = [row(1, 3), row(2, 4, "pending")]
    plan = plan_sends(meter(), P, {"c": Decimal(10)}, {"c": "cus_c"}, history)
    assert plan.resend == [history[1]]
    assert [(r.identifier, r.value) for r in plan.new] == [
        (meter_event_identifier("m", "c", P, 3), 3)
    ]
    # Nothing new when the pending row already covers the total.
    plan = plan_sends(meter(), P, {"c": Decimal(7)}, {"c": "cus_c"}, history)
    assert plan.resend == [history[1]] and plan.new == []


def test_an_error_holds_the_customer_until_retried() -> None:
    history = [row(1, 3), row(2, 4, "error", code="resource_missing"), row(3, 1, "pending")]
    plan = plan_sends(
        meter(), P, {"c": Decimal(20), "d": Decimal(1)}, {"c": "cus_c", "d": "cus_d"}, history
    )
    assert plan.held_error == ["c"]
    assert plan.resend == []
    assert [r.customer_id for r in plan.new] == ["d"]


def test_last_formula_sends_only_changes() -> None:
    m = meter("max")
    history = [row(1, 5)]
    assert plan_sends(m, P, {"c": Decimal("5.2")}, {"c": "cus_c"}, history).new == []
    plan = plan_sends(m, P, {"c": Decimal("5.5")}, {"c": "cus_c"}, history)
    assert [(r.value, r.identifier) for r in plan.new] == [
        (6, meter_event_identifier("m", "c", P, 2))
    ]
    # A total that goes back to an earlier value is a change from the last one sent.
    history = [row(1, 5), row(2, 6)]
    assert [r.value for r in plan_sends(m, P, {"c": Decimal(5)}, {"c": "cus_c"}, history).new] == [
        5
    ]


def test_the_last_row_is_found_by_sequence_not_identifier_order() -> None:
    m = meter("latest")
    history = [row(i, i) for i in range(1, 12)]  # "_10_" and "_11_" sort before "_2_"
    assert sequence_of("m", "c", P, history)[history[10].identifier] == 11
    assert plan_sends(m, P, {"c": Decimal(11)}, {"c": "cus_c"}, history).new == []
    plan = plan_sends(m, P, {"c": Decimal(9)}, {"c": "cus_c"}, history)
    assert [(r.value, r.identifier) for r in plan.new] == [
        (9, meter_event_identifier("m", "c", P, 12))
    ]


def test_count_meters_send_deltas() -> None:
    m = meter("count")
    plan = plan_sends(m, P, {"c": Decimal(7)}, {"c": "cus_c"}, [row(1, 5)])
    assert [r.value for r in plan.new] == [2]


def test_negative_deltas_when_a_total_goes_down() -> None:
    plan = plan_sends(meter(), P, {"c": Decimal(3)}, {"c": "cus_c"}, [row(1, 5)])
    assert [r.value for r in plan.new] == [-2]


def test_event_timestamps_stay_inside_the_period() -> None:
    start, end = month_bounds(P)
    assert event_timestamp_s(P, start + 10_000) == (start + 9_000) // 1000
    assert event_timestamp_s(P, end + 86_400_000) == end // 1000 - 1


def test_reconcile_compares_rounded_totals_per_customer() -> None:
    m = meter("sum", "up")
    rows = [row(1, 2), row(2, 1, "error", customer="d")]
    checks = build_checks(m, {"c": Decimal("2.1"), "d": Decimal(1), "e": Decimal(4)}, rows, {})
    by_customer = {c.customer_id: c for c in checks}
    assert by_customer["c"].expected == 3 and by_customer["c"].stripe_customer_id == "cus_c"
    assert by_customer["d"].unsent == 1
    diffs = differences(checks, {("m", "cus_c"): Decimal(3), ("m", "cus_d"): Decimal(0)})
    assert [(d.check.customer_id, d.stripe_value) for d in diffs] == [
        ("d", Decimal(0)),
        ("e", None),
    ]
    assert "customer=d" in diffs[0].describe() and "1 unsent" in diffs[0].describe()
