from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.credits.money import (
    amount_problem,
    canon,
    ceil_to_charge,
    charge_unit,
    currency_problem,
    from_stripe_amount,
    minor_exponent,
    to_stripe_amount,
)

D = Decimal


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (D("1.50"), "1.5"),
        (D("1.5"), "1.5"),
        (D("-0.000"), "0"),
        (D("1E+3"), "1000"),
        (D("0.000000000000000001"), "0.000000000000000001"),
        (D("-20.00"), "-20"),
    ],
)
def test_canonical_strings_do_not_depend_on_scale(value: Decimal, text: str) -> None:
    assert canon(value) == text


@given(st.integers(-(10**20), 10**20), st.integers(0, 18))
def test_canon_round_trips_and_ignores_trailing_zeros(n: int, places: int) -> None:
    value = D(n).scaleb(-places)
    assert D(canon(value)) == value
    assert canon(value) == canon(value.quantize(D(1).scaleb(-places - 3)))


def test_minor_units_of_two_zero_and_three_decimal_currencies() -> None:
    assert [minor_exponent(c) for c in ("usd", "jpy", "kwd", "isk")] == [2, 0, 3, 0]
    assert to_stripe_amount(D("20.05"), "usd") == 2005
    assert to_stripe_amount(D("500"), "jpy") == 500
    assert to_stripe_amount(D("1.234"), "kwd") == 1234
    assert to_stripe_amount(D("5"), "isk") == 500  # whole kronur, Stripe counts hundredths
    assert from_stripe_amount(2005, "usd") == D("20.05")
    assert from_stripe_amount(500, "isk") == D(5)
    for amount, currency in ((D("0.001"), "usd"), (D("0.5"), "isk"), (D("0.5"), "jpy")):
        with pytest.raises(ValueError, match="whole number"):
            to_stripe_amount(amount, currency)


def test_ceil_rounds_up_to_the_charge_unit_only_when_needed() -> None:
    assert ceil_to_charge(D("15.001"), "usd") == D("15.01")
    assert ceil_to_charge(D("15.00"), "usd") == D("15.00")
    assert ceil_to_charge(D("0.1"), "jpy") == D(1)
    assert ceil_to_charge(D("-0.019"), "usd") == D("-0.01")
    # a three-decimal charge must end in 0
    assert charge_unit("kwd") == D("0.01") and ceil_to_charge(D("1.231"), "kwd") == D("1.24")


def test_amounts_and_currencies_are_checked() -> None:
    assert amount_problem(1.5, "x") is not None  # a float is never money
    assert amount_problem(True, "x") is not None
    assert amount_problem(D("NaN"), "x") is not None
    assert amount_problem(D("Infinity"), "x") is not None
    assert amount_problem(D("1e-19"), "x") is not None
    assert amount_problem(D("1.000000000000000000000"), "x") is None  # zeros are not digits
    assert amount_problem(D("1e20"), "x") is not None
    assert amount_problem(D(0), "x", positive=True) is not None
    assert amount_problem(D(-1), "x", non_negative=True) is not None
    assert amount_problem(D("-99999999999999999999.999999999999999999"), "x") is None
    for bad in ("USD", "us", "usdx", "", None, "u$d"):
        assert currency_problem(bad) is not None
    assert currency_problem("eur") is None


def test_an_amount_from_json_is_a_string_or_an_integer_never_a_float() -> None:
    from meterstream.credits.money import json_decimal
    from meterstream.errors import CreditsError

    assert json_decimal("20.50", "amount") == Decimal("20.50")
    assert json_decimal(7, "amount") == Decimal(7)
    for bad, why in ((1.5, "never a float"), (True, "never a float"), (None, "never a float"),
                     ("2,5", "not a decimal")):  # fmt: skip
        with pytest.raises(CreditsError, match=why):
            json_decimal(bad, "amount")
