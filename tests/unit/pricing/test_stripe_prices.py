"""Stripe create parameters: exact shapes, Stripe's units, deterministic keys."""

import math
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from meterstream.pricing.invoice import Period, PlanAssignment, preview_invoice
from meterstream.pricing.plans import Plan, PlansConfig, load_plans, parse_plans
from meterstream.pricing.stripe_prices import (
    base_fee_params,
    plan_requests,
    price_lookup_key,
    price_params,
    unsupported,
)
from tests.support import REPO

D = Decimal
METER_IDS = {
    "ai_tokens": "mtr_tokens",
    "active_servers": "mtr_servers",
    "api_requests": "mtr_requests",
    "compute_units": "mtr_compute",
}


def example() -> PlansConfig:
    return load_plans(REPO / "plans.example.yaml")


def only_price(plan: Plan, meter_id: str) -> dict[str, Any]:
    (price,) = plan.prices
    return price_params(plan, price, meter_id)


def test_petal_pro_essential_is_the_seeds_stripe_price() -> None:
    # the seed's CLI call: unit-amount 5 (cents), transform_quantity divide_by 1000 round up,
    # recurring month, usage_type metered, currency usd
    essential = example().by_name("essential")
    params = only_price(essential, "mtr_tokens")
    assert params == {
        "currency": "usd",
        "product": "ms_meter_ai_tokens",
        "billing_scheme": "per_unit",
        "unit_amount_decimal": "5",
        "transform_quantity": {"divide_by": 1000, "round": "up"},
        "lookup_key": price_lookup_key(essential, essential.prices[0]),
        "nickname": "essential ai_tokens",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": "mtr_tokens"},
        "metadata": {"meterstream_plan": "essential", "meterstream_meter": "ai_tokens"},
    }
    assert params["lookup_key"].startswith("ms_essential_ai_tokens_")


def test_tiers_in_stripes_units() -> None:
    plans = example()
    pro = only_price(plans.by_name("servers_pro"), "mtr_servers")
    assert (pro["billing_scheme"], pro["tiers_mode"]) == ("tiered", "graduated")
    assert pro["tiers"] == [
        {"up_to": 100, "unit_amount_decimal": "0", "flat_amount_decimal": "9900"},  # 99 USD
        {"up_to": "inf", "unit_amount_decimal": "99", "flat_amount_decimal": "0"},  # 0.99 USD
    ]
    assert "transform_quantity" not in pro and "unit_amount_decimal" not in pro
    basic = plans.by_name("servers_basic")
    requests = price_params(basic, basic.prices[1], "mtr_requests")
    assert requests["tiers_mode"] == "volume"
    assert [t["unit_amount_decimal"] for t in requests["tiers"]] == ["0", "0.0006", "0.0004"]


def test_zero_decimal_and_isk_amounts() -> None:
    plans = parse_plans(
        {
            "plans": [
                {
                    "name": "yen",
                    "currency": "jpy",
                    "base_fee": 500,
                    "prices": [{"meter": "m", "unit_price": "0.3"}],
                },
                {
                    "name": "krona",
                    "currency": "isk",
                    "base_fee": 5,
                    "prices": [{"meter": "m", "unit_price": 5}],
                },
            ]
        }
    )
    yen, krona = plans.by_name("yen"), plans.by_name("krona")
    assert only_price(yen, "mtr")["unit_amount_decimal"] == "0.3"
    assert (base_fee_params(yen) or {})["unit_amount"] == 500
    assert only_price(krona, "mtr")["unit_amount_decimal"] == "500"  # Stripe's ISK hundredths
    assert (base_fee_params(krona) or {})["unit_amount"] == 500


def test_base_fee_is_a_licensed_monthly_price() -> None:
    plan = example().by_name("compute_with_base")
    params = base_fee_params(plan)
    assert params is not None
    assert params["unit_amount"] == 2000
    assert params["recurring"] == {"interval": "month", "usage_type": "licensed"}
    assert params["product"] == "ms_plan_compute_with_base"
    assert base_fee_params(example().by_name("compute")) is None
    kinds = [(r.kind, r.lookup) for r in plan_requests(plan, METER_IDS)]
    assert kinds == [
        ("product", "ms_plan_compute_with_base"),
        ("price", params["lookup_key"]),
        ("product", "ms_meter_compute_units"),
        ("price", price_lookup_key(plan, plan.prices[0])),
    ]


def test_creating_twice_is_the_same_requests() -> None:
    for plan in example().plans:
        first, second = plan_requests(plan, METER_IDS), plan_requests(plan, dict(METER_IDS))
        assert first == second
    keys = {r.lookup for plan in example().plans for r in plan_requests(plan, METER_IDS)}
    prices = [
        r for plan in example().plans for r in plan_requests(plan, METER_IDS) if r.kind == "price"
    ]
    assert len({r.lookup for r in prices}) == len(prices) == 9  # 8 metered + 1 base fee
    assert len({r.idempotency_key for r in prices}) == 9
    assert all(len(key) <= 200 for key in keys)


def test_a_changed_price_gets_a_new_key_and_a_new_meter_a_new_idempotency_key() -> None:
    def key_of(unit_price: str, meter_id: str = "mtr") -> tuple[str, str]:
        doc = {
            "plans": [
                {
                    "name": "p",
                    "currency": "usd",
                    "prices": [{"meter": "m", "unit_price": unit_price}],
                }
            ]
        }
        (request,) = [
            r
            for r in plan_requests(parse_plans(doc).plans[0], {"m": meter_id})
            if r.kind == "price"
        ]
        return request.lookup, request.idempotency_key

    assert key_of("0.02") == key_of("0.020")  # the same price written otherwise
    assert key_of("0.02")[0] != key_of("0.03")[0]
    assert key_of("0.02")[0] == key_of("0.02", "mtr_other")[0]
    assert key_of("0.02")[1] != key_of("0.02", "mtr_other")[1]


def test_long_names_fit_stripes_lookup_key_limit() -> None:
    name, meter = "p" * 63, "m" * 63
    doc = {
        "plans": [{"name": name, "currency": "usd", "prices": [{"meter": meter, "unit_price": 1}]}]
    }
    plan = parse_plans(doc).plans[0]
    assert len(price_lookup_key(plan, plan.prices[0])) <= 200


def test_minimums_are_reported_unsupported() -> None:
    doc = {
        "plans": [
            {
                "name": "p",
                "currency": "usd",
                "minimum": 50,
                "prices": [
                    {"meter": "m", "unit_price": 1, "minimum": 5},
                    {"meter": "n", "unit_price": 1},
                ],
            }
        ]
    }
    assert unsupported(parse_plans(doc).plans[0]) == [
        "plan p: minimum 50 has no Stripe price field",
        "plan p, meter m: minimum 5 has no Stripe price field",
    ]
    assert unsupported(example().by_name("essential")) == []


# -- the Stripe params priced by Stripe's documented rules equal the preview ----------------


def stripe_amount(params: dict[str, Any], quantity: int) -> int:
    """An independent reading of a Stripe price: the line in minor units, rounded half up."""
    if params["billing_scheme"] == "per_unit":
        transform = params.get("transform_quantity")
        units = D(quantity)
        if transform:
            ratio = D(quantity) / transform["divide_by"]
            units = D(math.ceil(ratio) if transform["round"] == "up" else math.floor(ratio))
        exact = units * D(params["unit_amount_decimal"])
    else:
        tiers = [(None if t["up_to"] == "inf" else t["up_to"], t) for t in params["tiers"]]
        if params["tiers_mode"] == "volume":
            up_to, tier = next((u, t) for u, t in tiers if u is None or quantity <= u)
            exact = quantity * D(tier["unit_amount_decimal"]) + D(tier["flat_amount_decimal"])
        else:
            exact, lower = D(0), 0
            for i, (up_to, tier) in enumerate(tiers):
                if i and quantity <= lower:
                    break
                top = quantity if up_to is None else min(quantity, up_to)
                exact += (top - lower) * D(tier["unit_amount_decimal"]) + D(
                    tier["flat_amount_decimal"]
                )
                lower = up_to or lower
    return int(exact.quantize(D(1), rounding=ROUND_HALF_UP))


@given(st.integers(min_value=0, max_value=40_000_000))
def test_stripe_would_bill_what_the_preview_shows(quantity: int) -> None:
    plans = example()
    december = Period.month("2026-12")
    for plan in plans.plans:
        for price in plan.prices:
            invoice = preview_invoice(
                plans,
                december,
                [PlanAssignment(plan.name, december.start)],
                lambda s, e, meter=price.meter: {meter: D(quantity)},
            )
            (line,) = [line for line in invoice.to_dict()["lines"] if line["meter"] == price.meter]
            params = price_params(plan, price, METER_IDS[price.meter])
            assert line["amount_minor"] == stripe_amount(params, quantity)
