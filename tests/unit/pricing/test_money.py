from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.pricing.money import (
    CURRENCIES,
    THREE_DECIMAL,
    ZERO_DECIMAL,
    check_quantity,
    currency,
    plain,
    stripe_decimal_places,
)

USD, JPY, KRW, BHD, KWD, EUR, GBP, ISK = (
    currency(code) for code in ("usd", "JPY", "krw", "bhd", "kwd", "eur", "gbp", "isk")
)


def test_minor_units_follow_stripe() -> None:
    # two decimals: cents, pence
    assert (USD.exponent, EUR.exponent, GBP.exponent) == (2, 2, 2)
    # Stripe's zero-decimal list: 500 is 500 JPY
    assert (JPY.exponent, KRW.exponent) == (0, 0)
    assert currency("mga").exponent == 0  # ISO says 2; Stripe charges it zero-decimal
    # three decimals: fils
    assert (BHD.exponent, KWD.exponent) == (3, 3)
    # ISK rounds to whole kronur, but Stripe's integers keep two decimals (5 ISK is 500)
    assert (ISK.exponent, ISK.stripe_exponent) == (0, 2)
    assert ISK.to_minor(Decimal(5)) == 500
    assert CURRENCIES.keys() >= ZERO_DECIMAL | THREE_DECIMAL
    assert len(ZERO_DECIMAL) == 16 and len(THREE_DECIMAL) == 5


def test_unknown_currency_is_refused() -> None:
    for code in ("xxx", "us", "", "dollar"):
        with pytest.raises(ValueError, match="not a currency Stripe charges in"):
            currency(code)


def test_round_half_up_to_the_minor_unit() -> None:
    # Stripe's decimal-amounts page: 30 x 0.05 cents = 1.5 cents -> 2 cents
    assert USD.round(Decimal("0.015")) == Decimal("0.02")
    assert USD.round(Decimal("0.0149999")) == Decimal("0.01")
    assert USD.round(Decimal("0.025")) == Decimal("0.03")  # half-up, not half-even (0.02)
    assert JPY.round(Decimal("12.5")) == Decimal("13")
    assert JPY.round(Decimal("12.49")) == Decimal("12")
    assert BHD.round(Decimal("1.2345")) == Decimal("1.235")
    assert USD.round(Fraction(200, 31)) == Decimal("6.45")  # 6.4516...
    assert USD.round(Fraction(1, 200)) == Decimal("0.01")  # exactly half a cent: up
    assert USD.round(Fraction(1, 201)) == Decimal("0.00")


def test_minor_integers_and_text() -> None:
    assert USD.to_minor(Decimal("12.3")) == 1230
    assert JPY.to_minor(Decimal("1200")) == 1200
    assert BHD.to_minor(Decimal("1.235")) == 1235
    assert USD.text(Decimal("12.3")) == "12.30"
    assert JPY.text(Decimal("7")) == "7"
    assert BHD.text(Decimal("0")) == "0.000"
    with pytest.raises(ValueError, match="not a whole number"):
        USD.to_minor(Decimal("0.001"))


def test_stripe_decimal_places_count_in_minor_units() -> None:
    assert stripe_decimal_places(Decimal("0.05"), USD) == 0  # 5 cents
    assert stripe_decimal_places(Decimal("0.000004"), USD) == 4  # 0.0004 cents
    assert stripe_decimal_places(Decimal("0.5"), JPY) == 1
    assert stripe_decimal_places(Decimal("0.0001"), BHD) == 1
    assert plain(Decimal("6.50")) == "6.5" and plain(Decimal("100")) == "100"
    assert plain(Decimal("0E-8")) == "0"


def test_quantities_are_exact_and_bounded() -> None:
    assert check_quantity(3) == Decimal(3)
    assert check_quantity(Decimal("-1.5")) == Decimal("-1.5")
    for bad in (1.5, True, "3", None):
        with pytest.raises(TypeError):
            check_quantity(bad)
    for bad in (Decimal("NaN"), Decimal("Infinity"), Decimal("1E+100"), Decimal("1E-101")):
        with pytest.raises(ValueError):
            check_quantity(bad)


@given(st.integers(min_value=0, max_value=10**12), st.sampled_from(sorted(CURRENCIES)))
def test_rounding_a_whole_amount_changes_nothing(minor: int, code: str) -> None:
    money = currency(code)
    amount = Decimal(minor).scaleb(-money.exponent)
    assert money.round(amount) == amount
    assert money.round(Fraction(amount)) == amount
    assert money.to_minor(amount) == minor * 10 ** (money.stripe_exponent - money.exponent)


@given(st.fractions(min_value=0, max_value=10**9), st.sampled_from(["usd", "jpy", "bhd"]))
def test_rounding_is_to_the_nearest_minor_unit(value: Fraction, code: str) -> None:
    money = currency(code)
    rounded = money.round(value)
    half = Fraction(1, 2 * 10**money.exponent)
    assert -half < Fraction(rounded) - value <= half
