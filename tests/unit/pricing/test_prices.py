"""Price models against worked examples (Stripe's docs, the seeds) and their invariants."""

from decimal import Decimal

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from meterstream.pricing import prices as pm

D = Decimal

# Stripe's "Set up tiered pricing" page (Typographic): fonts 1-5 at 7 USD, 6-10 at 6.50 USD,
# 11 and more at 6 USD.
FONTS = (pm.Tier(5, D(7)), pm.Tier(10, D("6.5")), pm.Tier(None, D(6)))


def amount(model: pm.PriceModel, quantity: int | str) -> Decimal:
    return model.charge(D(quantity)).amount


# -- worked examples: Stripe's docs ----------------------------------------------------


@pytest.mark.parametrize(
    ("fonts", "total"),
    # Stripe's volume table: the whole quantity at the rate of the tier it ends in
    [(1, "7"), (5, "35"), (6, "39"), (20, "120"), (25, "150")],
)
def test_volume_fonts_match_stripes_table(fonts: int, total: str) -> None:
    assert amount(pm.Volume(FONTS), fonts) == D(total)


@pytest.mark.parametrize(
    ("fonts", "total"),
    [
        (1, "7"),  # 1 x 7
        (5, "35"),  # 5 x 7
        (6, "41.5"),  # 5 x 7 + 1 x 6.50
        (20, "127.5"),  # 5 x 7 + 5 x 6.50 + 10 x 6 = 35 + 32.50 + 60
        (25, "157.5"),  # 35 + 32.50 + 15 x 6 = 35 + 32.50 + 90
    ],
)
def test_graduated_fonts_by_hand(fonts: int, total: str) -> None:
    assert amount(pm.Graduated(FONTS), fonts) == D(total)


def test_graduated_shows_each_tier() -> None:
    charge = pm.Graduated(FONTS).charge(D(20))
    rows = [(t.tier, t.lower, t.up_to, t.units, t.unit_price, t.amount) for t in charge.tiers]
    assert rows == [
        (1, 0, 5, D(5), D(7), D(35)),  # 5 x 7
        (2, 5, 10, D(5), D("6.5"), D("32.5")),  # 5 x 6.50
        (3, 10, None, D(10), D(6), D(60)),  # 10 x 6
    ]
    assert sum(t.units for t in charge.tiers) == charge.billable == D(20)


def test_transform_quantity_car_rental_per_started_hour() -> None:
    # Stripe's "Transform quantities": usage in minutes, 10 USD per hour, round up
    hourly = pm.PerUnit(D(10), pm.TransformQuantity(60, "up"))
    assert amount(hourly, 60) == D(10)  # 1 hour
    assert amount(hourly, 61) == D(20)  # a started second hour is an hour
    assert amount(hourly, 130) == D(30)  # 2 h 10 min -> 3 hours
    assert amount(hourly, 0) == D(0)
    # rounding down charges complete hours only
    complete = pm.PerUnit(D(10), pm.TransformQuantity(60, "down"))
    assert (amount(complete, 59), amount(complete, 119), amount(complete, 120)) == (0, 10, 20)


def test_decimal_unit_amount() -> None:
    # Stripe's "Decimal amounts": 0.05 cents a unit, quantity 30 -> 1.5 cents (rounded later)
    assert amount(pm.PerUnit(D("0.0005")), 30) == D("0.015")


# -- worked examples: the seeds --------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "essential", "business", "enterprise"),
    [
        # essential 0.05 per started 1,000; business 0.50 per 15,000; enterprise 5 per 200,000
        (1, "0.05", "0.5", "5"),  # one token is one package on every plan
        (1000, "0.05", "0.5", "5"),
        (1001, "0.10", "0.5", "5"),  # 2 packages x 0.05
        # 123,456 tokens: ceil(123.456) = 124 x 0.05 = 6.20; ceil(8.2304) = 9 x 0.50 = 4.50;
        # ceil(0.61728) = 1 x 5
        (123_456, "6.20", "4.5", "5"),
        # ceil(200.001) = 201 x 0.05 = 10.05; ceil(13.33340) = 14 x 0.50 = 7; ceil(1.000005) = 2 x 5
        (200_001, "10.05", "7", "10"),
    ],
)
def test_petal_pro_three_plans(tokens: int, essential: str, business: str, enterprise: str) -> None:
    plans = {
        "essential": pm.PerUnit(D("0.05"), pm.TransformQuantity(1000, "up")),
        "business": pm.PerUnit(D("0.50"), pm.TransformQuantity(15000, "up")),
        "enterprise": pm.PerUnit(D(5), pm.TransformQuantity(200_000, "up")),
    }
    assert amount(plans["essential"], tokens) == D(essential)
    assert amount(plans["business"], tokens) == D(business)
    assert amount(plans["enterprise"], tokens) == D(enterprise)


def test_prefab_graduated_servers() -> None:
    # "99 USD for the first 100 servers, then 99 USD per 100 after" = 0.99 a server
    servers = pm.Graduated((pm.Tier(100, flat_price=D(99)), pm.Tier(None, D("0.99"))))
    assert amount(servers, 0) == D(99)  # the first tier's flat price, whatever the usage
    assert amount(servers, 40) == D(99)
    assert amount(servers, 100) == D(99)
    assert amount(servers, 101) == D("99.99")  # 99 + 1 x 0.99
    assert amount(servers, 250) == D("247.5")  # 99 + 150 x 0.99 = 99 + 148.50
    assert amount(servers, 200) == D(198)  # 99 + 100 x 0.99: "99 per 100 after"


def test_prefab_volume_servers_and_requests() -> None:
    # 2 USD a server, 1 USD or 0.80 USD a server at higher volume
    servers = pm.Volume((pm.Tier(100, D(2)), pm.Tier(1000, D(1)), pm.Tier(None, D("0.8"))))
    assert amount(servers, 100) == D(200)  # 100 x 2
    assert amount(servers, 101) == D(101)  # 101 x 1: cheaper than 100 servers
    assert amount(servers, 1001) == D("800.8")  # 1001 x 0.80
    # requests: 10 USD up to 1.5 million, then every request at 6 or 4 USD a million
    requests = pm.Volume(
        (
            pm.Tier(1_500_000, flat_price=D(10)),
            pm.Tier(15_000_000, D("0.000006")),
            pm.Tier(None, D("0.000004")),
        )
    )
    assert amount(requests, 0) == D(10)
    assert amount(requests, 1_500_000) == D(10)
    assert amount(requests, 1_500_001) == D("9.000006")  # 1,500,001 x 0.000006
    assert amount(requests, 20_000_000) == D(80)  # 20,000,000 x 0.000004


def test_subscribd_two_cents_a_unit() -> None:
    assert amount(pm.PerUnit(D("0.02")), 1234) == D("24.68")  # 1234 x 0.02


# -- choices ---------------------------------------------------------------------------


def test_negative_quantity_prices_as_zero() -> None:
    for model in (
        pm.PerUnit(D("0.02")),
        pm.PerUnit(D(1), pm.TransformQuantity(10, "up")),
        pm.Graduated(FONTS),
        pm.Volume(FONTS),
    ):
        negative, zero = model.charge(D("-12.5")), model.charge(D(0))
        assert negative.quantity == D("-12.5")
        assert negative.billable == 0
        assert negative.amount == zero.amount


def test_fractional_quantities() -> None:
    assert amount(pm.PerUnit(D("0.02")), "10.5") == D("0.21")
    assert amount(pm.Graduated(FONTS), "5.5") == D("38.25")  # 5 x 7 + 0.5 x 6.50
    assert amount(pm.Volume(FONTS), "5.5") == D("35.75")  # 5.5 x 6.50: above 5, in tier 2
    assert amount(pm.PerUnit(D(1), pm.TransformQuantity(2, "up")), "0.1") == 1


def test_later_flat_price_charged_once_reached() -> None:
    model = pm.Graduated((pm.Tier(10, D(1)), pm.Tier(None, D(0), D(50))))
    assert amount(model, 10) == D(10)
    assert amount(model, "10.001") == D(60)  # 10 x 1 + 0.001 x 0 + the second tier's 50


def test_invalid_tiers_are_refused() -> None:
    problems = pm.tier_problems((pm.Tier(5), pm.Tier(5), pm.Tier(None), pm.Tier(7)))
    assert problems == [
        ("[1].up_to", "must be greater than tiers[0].up_to (5), not 5"),
        ("[2].up_to", "only the last tier may be unbounded ('inf')"),
        ("[3].up_to", "the last tier must be unbounded: use 'inf', not 7"),
    ]
    assert pm.tier_problems(()) == [("", "at least one tier is required")]
    assert pm.tier_problems([pm.Tier(i + 1) for i in range(pm.MAX_TIERS)] + [pm.Tier(None)])[0][
        1
    ] == (f"at most {pm.MAX_TIERS} tiers are allowed, not {pm.MAX_TIERS + 1}")
    with pytest.raises(ValueError, match="up_to"):
        pm.Graduated((pm.Tier(0), pm.Tier(None)))
    with pytest.raises(ValueError, match="unit_price"):
        pm.Volume((pm.Tier(None, D(-1)),))
    with pytest.raises(ValueError, match="divide_by"):
        pm.TransformQuantity(0, "up")
    with pytest.raises(TypeError):
        pm.PerUnit(D(1)).charge(1.5)  # type: ignore[arg-type]


# -- properties --------------------------------------------------------------------------

prices = st.decimals(min_value=0, max_value=1000, places=6)
flats = st.integers(min_value=0, max_value=100_000).map(lambda cents: D(cents) / 100)
quantities = st.decimals(min_value=0, max_value=10**7, places=3)


@st.composite
def tier_lists(draw: st.DrawFn, max_bound: int = 10**6) -> tuple[pm.Tier, ...]:
    bounds = sorted(draw(st.sets(st.integers(min_value=1, max_value=max_bound), max_size=5)))
    tiers = [pm.Tier(b, draw(prices), draw(flats)) for b in bounds]
    return (*tiers, pm.Tier(None, draw(prices), draw(flats)))


@given(tier_lists(), quantities, quantities)
def test_graduated_total_never_falls_as_quantity_grows(
    tiers: tuple[pm.Tier, ...], a: Decimal, b: Decimal
) -> None:
    low, high = sorted((a, b))
    assert amount(pm.Graduated(tiers), str(low)) <= amount(pm.Graduated(tiers), str(high))


@given(tier_lists(), quantities, quantities)
def test_volume_rate_changes_only_at_tier_bounds(
    tiers: tuple[pm.Tier, ...], a: Decimal, b: Decimal
) -> None:
    low, high = sorted((a, b))
    bounds = [0, *(t.up_to for t in tiers if t.up_to is not None)]
    # the tier holding a quantity q > 0 is the first with q <= up_to; 0 is in the first
    index = [sum(1 for bound in bounds[1:] if q > bound) for q in (low, high)]
    model = pm.Volume(tiers)
    if index[0] == index[1] and low > 0:
        tier = tiers[index[0]]
        # inside one tier the total is linear: the same rate and flat price for both
        assert amount(model, str(high)) - amount(model, str(low)) == (high - low) * tier.unit_price
    charge = model.charge(high)
    assert charge.amount == high * tiers[index[1]].unit_price + tiers[index[1]].flat_price


@given(st.lists(quantities, max_size=31), prices)
def test_per_unit_period_equals_sum_of_its_days_before_rounding(
    days: list[Decimal], unit_price: Decimal
) -> None:
    model = pm.PerUnit(unit_price)
    assert sum((model.charge(q).amount for q in days), D(0)) == model.charge(sum(days, D(0))).amount


def _models() -> st.SearchStrategy[pm.PriceModel]:
    transform = st.builds(
        pm.TransformQuantity,
        st.integers(min_value=1, max_value=10**4),
        st.sampled_from(["up", "down"]),
    )
    return st.one_of(
        st.builds(pm.PerUnit, prices, st.none() | transform),
        st.builds(pm.Graduated, tier_lists()),
        st.builds(pm.Volume, tier_lists()),
    )


@given(_models(), st.lists(st.decimals(min_value=-100, max_value=10**5, places=2), max_size=31))
def test_days_sum_to_the_period_for_every_model(model: pm.PriceModel, days: list[Decimal]) -> None:
    running, total = [], D(0)
    for q in days:
        total += q
        running.append(total)
    daily = pm.daily_amounts(model, running)
    assert len(daily) == len(days)
    assert sum(daily, D(0)) == (model.charge(total).amount if days else 0)


@given(
    st.lists(st.decimals(min_value=0, max_value=10**5, places=2), min_size=1, max_size=31), prices
)
def test_per_unit_day_costs_its_own_quantity(days: list[Decimal], unit_price: Decimal) -> None:
    running = [sum(days[: i + 1], D(0)) for i in range(len(days))]
    assert pm.daily_amounts(pm.PerUnit(unit_price), running) == tuple(q * unit_price for q in days)


@given(tier_lists(max_bound=300), st.integers(min_value=0, max_value=1200))
def test_graduated_equals_a_unit_by_unit_count(tiers: tuple[pm.Tier, ...], quantity: int) -> None:
    """An independent reference: price each unit k = 1..q at the rate of the tier holding k."""
    expected = D(0)
    for k in range(1, quantity + 1):
        expected += next(t for t in tiers if t.up_to is None or k <= t.up_to).unit_price
    lower = 0
    for i, tier in enumerate(tiers):  # a tier's flat price once reached (the first: always)
        if i == 0 or quantity > lower:
            expected += tier.flat_price
        lower = tier.up_to or lower
    charge: pm.Charge = pm.Graduated(tiers).charge(D(quantity))
    assert charge.amount == expected
    assert sum((t.amount for t in charge.tiers), D(0)) == charge.amount


@given(quantities, st.integers(min_value=1, max_value=10**5), prices)
def test_packages_round_up_and_down(quantity: Decimal, divide_by: int, unit_price: Decimal) -> None:
    up = pm.PerUnit(unit_price, pm.TransformQuantity(divide_by, "up")).charge(quantity)
    down = pm.PerUnit(unit_price, pm.TransformQuantity(divide_by, "down")).charge(quantity)
    assert down.units * divide_by <= quantity <= up.units * divide_by
    assert up.units - down.units == (0 if quantity % divide_by == 0 else 1)
    assume(unit_price > 0)
    assert up.amount == up.units * unit_price
