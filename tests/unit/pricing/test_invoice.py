"""Invoices: which plan prices which usage, lines rounded once, totals, JSON."""

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.errors import PricingError
from meterstream.pricing import invoice as inv
from meterstream.pricing.plans import PlansConfig, load_plans, parse_plans
from tests.support import REPO

D = Decimal
DECEMBER = inv.Period.month("2026-12")  # 31 days


def day(n: int, month: int = 12, year: int = 2026) -> datetime:
    return datetime(year, month, n, tzinfo=UTC)


def example() -> PlansConfig:
    return load_plans(REPO / "plans.example.yaml")


def one_plan_invoice(plans: PlansConfig, plan: str, quantities: dict[str, Any]) -> inv.Invoice:
    assignments = [inv.PlanAssignment(plan, day(1, 11))]
    return inv.preview_invoice(plans, DECEMBER, assignments, lambda start, end: quantities, "acme")


def test_period_month() -> None:
    assert (DECEMBER.start, DECEMBER.end) == (day(1), day(1, 1, 2027))
    assert inv.Period.month("2027-02").length == timedelta(days=28)
    assert inv.Period.containing(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == DECEMBER
    for bad in ("2026-13", "2026", "december"):
        with pytest.raises(PricingError, match="not a month"):
            inv.Period.month(bad)
    with pytest.raises(PricingError, match="time zone"):
        inv.Period(datetime(2026, 12, 1), datetime(2027, 1, 1))
    with pytest.raises(PricingError, match="not after"):
        inv.Period(day(2), day(1))


# -- worked examples -----------------------------------------------------------------


def test_subscribd_base_fee_plus_two_cents_a_unit() -> None:
    invoice = one_plan_invoice(example(), "compute_with_base", {"compute_units": D(1234)})
    # 20.00 base fee + 1234 x 0.02 = 24.68 -> 44.68
    assert [(line.kind, line.amount) for line in invoice.lines] == [
        ("base_fee", D("20.00")),
        ("usage", D("24.68")),
    ]
    assert invoice.total == invoice.subtotal == D("44.68")
    out = invoice.to_dict()
    assert (out["total"], out["total_minor"], out["currency"]) == ("44.68", 4468, "usd")


def test_petal_pro_essential_month() -> None:
    invoice = one_plan_invoice(example(), "essential", {"ai_tokens": D(123_456)})
    # ceil(123,456 / 1,000) = 124 packages x 0.05 = 6.20
    (line,) = invoice.lines
    assert line.charge is not None and line.charge.units == 124
    assert (line.amount, invoice.total) == (D("6.20"), D("6.20"))


def test_prefab_servers_with_each_tier() -> None:
    invoice = one_plan_invoice(example(), "servers_pro", {"active_servers": D(250)})
    (line,) = invoice.to_dict()["lines"]
    # 99 flat for the first 100 servers, then 150 x 0.99 = 148.50 -> 247.50
    assert line["tiers"] == [
        {"tier": 1, "from": 0, "up_to": 100, "units": "100", "unit_price": "0",
         "flat_price": "99", "amount": "99"},
        {"tier": 2, "from": 100, "up_to": "inf", "units": "150", "unit_price": "0.99",
         "flat_price": "0", "amount": "148.5"},
    ]  # fmt: skip
    assert (line["amount"], line["amount_minor"], line["tiers_mode"]) == (
        "247.50",
        24750,
        "graduated",
    )


def test_each_line_is_rounded_once_and_the_total_sums_rounded_lines() -> None:
    # Stripe's decimal-amounts example: 0.05 cents a unit x 30 = 1.5 cents -> 2 cents, per line
    plans = parse_plans(
        {
            "plans": [
                {
                    "name": "sub_cent",
                    "currency": "usd",
                    "prices": [
                        {"meter": "a", "unit_price": "0.0005"},
                        {"meter": "b", "unit_price": "0.0005"},
                    ],
                }
            ]
        }
    )
    invoice = one_plan_invoice(plans, "sub_cent", {"a": D(30), "b": D(30)})
    assert [line.amount_exact for line in invoice.lines] == [Fraction(3, 200)] * 2  # 0.015
    assert [line.amount for line in invoice.lines] == [D("0.02"), D("0.02")]
    assert invoice.total == D("0.04")  # not round(0.015 + 0.015) = 0.03


def test_zero_and_three_decimal_currencies() -> None:
    plans = parse_plans(
        {
            "plans": [
                {"name": "yen", "currency": "jpy", "prices": [{"meter": "m", "unit_price": "0.3"}]},
                {
                    "name": "dinar",
                    "currency": "kwd",
                    "prices": [{"meter": "m", "unit_price": "0.0004"}],
                },
            ]
        }
    )
    yen = one_plan_invoice(plans, "yen", {"m": D(1235)}).to_dict()  # 370.5 -> 371 yen
    assert (yen["total"], yen["total_minor"]) == ("371", 371)
    dinar = one_plan_invoice(plans, "dinar", {"m": D(12_345)}).to_dict()  # 4.938 dinar
    assert (dinar["total"], dinar["total_minor"]) == ("4.938", 4938)


# -- plan changes ------------------------------------------------------------------------


def test_usage_before_any_plan_is_free_by_default() -> None:
    segments = inv.plan_segments([inv.PlanAssignment("compute", day(11))], DECEMBER, "default")
    assert [(s.plan, s.start, s.end, s.share, s.default) for s in segments] == [
        ("default", day(1), day(11), Fraction(10, 31), True),
        ("compute", day(11), day(1, 1, 2027), Fraction(21, 31), False),
    ]


def test_mid_period_change_is_prorated() -> None:
    assignments = [
        inv.PlanAssignment("compute", day(11)),
        inv.PlanAssignment("compute_with_base", day(21)),
    ]
    usage = {day(1): D(500), day(11): D(100), day(21): D(100)}
    invoice = inv.preview_invoice(
        example(), DECEMBER, assignments, lambda start, end: {"compute_units": usage[start]}
    )
    out = invoice.to_dict()
    assert [s["plan"] for s in out["segments"]] == ["default", "compute", "compute_with_base"]
    assert [
        (line["kind"], line["plan"], line["amount_exact"], line["amount"]) for line in out["lines"]
    ] == [
        ("usage", "compute", "2", "2.00"),  # Dec 11-20: 100 x 0.02; the 500 before are free
        ("base_fee", "compute_with_base", "220/31", "7.10"),  # 20 x 11/31 = 7.0967...
        ("usage", "compute_with_base", "2", "2.00"),  # Dec 21-31: 100 x 0.02
    ]
    assert out["total"] == "11.10"


def test_tiers_restart_with_each_plan_segment() -> None:
    # servers_pro from Dec 16: its first tier's 99 is charged in full for that segment
    assignments = [
        inv.PlanAssignment("servers_basic", day(1)),
        inv.PlanAssignment("servers_pro", day(16)),
    ]
    peaks = {day(1): D(80), day(16): D(120)}
    invoice = inv.preview_invoice(
        example(), DECEMBER, assignments, lambda start, end: {"active_servers": peaks[start]}
    )
    servers = [line for line in invoice.lines if line.meter == "active_servers"]
    # basic (volume): 80 x 2 = 160; pro (graduated): 99 + 20 x 0.99 = 118.80
    assert [(line.plan, line.amount) for line in servers] == [
        ("servers_basic", D("160.00")),
        ("servers_pro", D("118.80")),
    ]


def test_segments_edge_cases() -> None:
    before = inv.PlanAssignment("compute", day(1, 10))
    again = inv.PlanAssignment("compute", day(5))
    (whole,) = inv.plan_segments([again, before], DECEMBER, "default")  # order does not matter
    assert (whole.plan, whole.start, whole.end, whole.share) == (
        "compute",
        day(1),
        day(1, 1, 2027),
        1,
    )
    later = inv.plan_segments([inv.PlanAssignment("compute", day(1, 1, 2027))], DECEMBER, "default")
    assert [s.plan for s in later] == ["default"]
    with pytest.raises(PricingError, match="both effective"):
        inv.plan_segments(
            [inv.PlanAssignment("a", day(5)), inv.PlanAssignment("b", day(5))], DECEMBER, "d"
        )
    with pytest.raises(PricingError, match="time zone"):
        inv.plan_segments([inv.PlanAssignment("a", datetime(2026, 12, 5))], DECEMBER, "d")
    offset = timezone(timedelta(hours=2))
    (first, second) = inv.plan_segments(
        [inv.PlanAssignment("a", datetime(2026, 12, 5, 2, tzinfo=offset))], DECEMBER, "d"
    )
    assert first.end == day(5) and second.start == day(5)


# -- minimums ------------------------------------------------------------------------


def minimum_plans() -> PlansConfig:
    return parse_plans(
        {
            "plans": [
                {
                    "name": "committed",
                    "currency": "usd",
                    "base_fee": 20,
                    "minimum": 50,
                    "prices": [
                        {"meter": "units", "unit_price": "0.02"},
                        {"meter": "calls", "unit_price": "0.01", "minimum": 5},
                    ],
                }
            ]
        }
    )


def test_price_and_plan_minimums_top_up() -> None:
    invoice = one_plan_invoice(minimum_plans(), "committed", {"units": D(1234), "calls": D(300)})
    assert [(line.kind, line.meter, line.amount) for line in invoice.lines] == [
        ("base_fee", None, D("20.00")),
        ("usage", "units", D("24.68")),  # 1234 x 0.02
        ("usage", "calls", D("3.00")),  # 300 x 0.01
        ("minimum", "calls", D("2.00")),  # calls' minimum 5.00 - 3.00
        ("minimum", None, D("0.32")),  # plan minimum 50 - (20 + 24.68 + 3 + 2) = 0.32
    ]
    assert invoice.total == D(50)
    busy = one_plan_invoice(minimum_plans(), "committed", {"units": D(5000), "calls": D(900)})
    assert [line.kind for line in busy.lines] == ["base_fee", "usage", "usage"]
    assert busy.total == D(20) + D(100) + D(9)


def test_minimums_are_prorated_with_the_plan() -> None:
    assignments = [inv.PlanAssignment("committed", day(17))]  # 15 of 31 days
    invoice = inv.preview_invoice(minimum_plans(), DECEMBER, assignments, lambda s, e: {})
    # base 20 x 15/31 = 9.677.. -> 9.68; calls minimum 5 x 15/31 = 2.419.. -> 2.42;
    # plan minimum 50 x 15/31 = 24.193.. -> 24.19, minus 9.68 + 0 + 0 + 2.42 = 12.09
    assert [(line.kind, line.meter, line.amount) for line in invoice.lines] == [
        ("base_fee", None, D("9.68")),
        ("usage", "units", D("0.00")),
        ("usage", "calls", D("0.00")),
        ("minimum", "calls", D("2.42")),
        ("minimum", None, D("12.09")),
    ]
    assert invoice.total == D("24.19")


# -- refusals --------------------------------------------------------------------------


def test_one_currency_per_invoice() -> None:
    plans = parse_plans(
        {
            "plans": [
                {"name": "us", "currency": "usd", "prices": [{"meter": "m", "unit_price": 1}]},
                {"name": "eu", "currency": "eur", "prices": [{"meter": "m", "unit_price": 1}]},
            ]
        }
    )
    both = [inv.PlanAssignment("us", day(1)), inv.PlanAssignment("eu", day(10))]
    with pytest.raises(PricingError, match="several currencies"):
        inv.preview_invoice(plans, DECEMBER, both, lambda s, e: {"m": D(1)})
    # the built-in free default (in usd, the first plan's currency) binds no currency
    euros = inv.preview_invoice(
        plans, DECEMBER, [inv.PlanAssignment("eu", day(10))], lambda s, e: {"m": D(1)}
    )
    assert euros.currency.code == "eur" and euros.total == D(1)


def test_bad_inputs_are_pricing_errors() -> None:
    plans = example()
    with pytest.raises(PricingError, match="no plan named 'gold'"):
        inv.preview_invoice(plans, DECEMBER, [inv.PlanAssignment("gold", day(1))], lambda s, e: {})
    for bad in (1.5, "3", Decimal("NaN"), None):
        with pytest.raises(PricingError, match="compute_units"):
            one_plan_invoice(plans, "compute", {"compute_units": bad})
    outside = inv.Segment("compute", day(1), day(2, 1, 2027), Fraction(1), False)
    with pytest.raises(PricingError, match="outside the period"):
        inv.compute_invoice(plans, DECEMBER, [inv.SegmentUsage(outside, {})])


def test_negative_usage_is_priced_as_zero() -> None:
    invoice = one_plan_invoice(example(), "compute_with_base", {"compute_units": D(-40)})
    out = invoice.to_dict()
    assert (out["lines"][1]["quantity"], out["lines"][1]["billable_quantity"]) == ("-40", "0")
    assert out["total"] == "20.00"


# -- JSON and properties -------------------------------------------------------------------


def _json_types_only(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_types_only(v) for v in value)
    return value is None or isinstance(value, str | int | bool)


def test_json_is_exact_and_plain() -> None:
    assignments = [
        inv.PlanAssignment("essential", day(1)),
        inv.PlanAssignment("enterprise", day(9)),
    ]
    invoice = inv.preview_invoice(
        example(), DECEMBER, assignments, lambda s, e: {"ai_tokens": D("1000.5")}, "acme"
    )
    out = invoice.to_dict()
    assert _json_types_only(out)
    assert json.loads(json.dumps(out)) == out
    assert out["lines"][0]["transform_quantity"] == {"divide_by": 1000, "round": "up"}
    assert out["lines"][0]["units"] == "2"  # ceil(1000.5 / 1000)
    assert out["period"] == {"start": "2026-12-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}
    assert out["segments"][0]["share"] == "8/31"
    assert [line["amount"] for line in out["lines"]] == ["0.10", "5.00"]
    assert out["subtotal_minor"] == sum(line["amount_minor"] for line in out["lines"]) == 510


amounts = st.decimals(min_value=0, max_value=50, places=6)
usage = st.decimals(min_value=-10, max_value=10**6, places=3)


@given(
    st.lists(st.tuples(amounts, usage), min_size=1, max_size=6),
    st.sampled_from(["usd", "jpy", "bhd"]),
    st.integers(min_value=0, max_value=31 * 24 - 1),  # the plan starts within December
)
def test_total_is_the_sum_of_the_rounded_lines(
    prices: list[tuple[Decimal, Decimal]], code: str, hours: int
) -> None:
    plans = parse_plans(
        {
            "plans": [
                {
                    "name": "p",
                    "currency": code,
                    "base_fee": 7,
                    "prices": [
                        {"meter": f"m{i}", "unit_price": price}
                        for i, (price, _) in enumerate(prices)
                    ],
                }
            ]
        }
    )
    start = DECEMBER.start + timedelta(hours=hours)
    invoice = inv.preview_invoice(
        plans,
        DECEMBER,
        [inv.PlanAssignment("p", start)],
        lambda s, e: {f"m{i}": q for i, (_, q) in enumerate(prices)},
    )
    money = invoice.currency
    for line in invoice.lines:
        assert line.amount == money.round(line.amount_exact)
        assert abs(Fraction(line.amount) - line.amount_exact) <= Fraction(1, 2 * 10**money.exponent)
    assert invoice.total == sum((line.amount for line in invoice.lines), D(0))
    out = invoice.to_dict()
    assert out["total_minor"] == sum(line["amount_minor"] for line in out["lines"])
    usage_lines = [line for line in invoice.lines if line.kind == "usage"]
    for line, (price, quantity) in zip(usage_lines, prices, strict=True):
        assert line.amount == money.round(max(quantity, D(0)) * price)  # an independent line
