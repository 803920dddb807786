"""Exact credit amounts: currencies, minor units, canonical decimal strings.

Every amount is a :class:`~decimal.Decimal` in the currency's major unit (dollars, not
cents), never a float. Arithmetic on credit amounts runs in :data:`EXACT`, a context that
raises instead of rounding, so a sum that could not be represented exactly stops loudly
rather than losing a fraction. The only rounding in the package is :func:`ceil_to_charge`
(an auto-recharge purchase is rounded *up*).

Amounts are bounded so that every ledger value fits a ClickHouse ``Decimal(38, 18)``: at
most :data:`MAX_SCALE` digits after the point and an absolute value below
``10 ** MAX_INTEGER_DIGITS``.

Currencies are lowercase ISO 4217 codes, Stripe's spelling and the plans' (``usd``). The
table is the same as ``pipeline/pricing/money.py``'s (Stripe's): two decimals by default,
zero-decimal and three-decimal currencies, ISK rounded to whole kronur with Stripe
integers in hundredths. Three-decimal *charges* must end in 0 (Stripe), so a purchase is
a whole number of :func:`charge_unit`. To switch to the pricing package's table, replace
:func:`minor_exponent`, :func:`stripe_exponent` and :func:`currency_problem` by
``meterstream.pricing.money.currency(code)`` (``.exponent``, ``.stripe_exponent``, its
``ValueError`` for an unknown code); nothing else here reads the table.
"""

from __future__ import annotations

import re
from decimal import (
    ROUND_CEILING,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)

from meterstream.errors import CreditsError

MAX_SCALE = 18
MAX_INTEGER_DIGITS = 20

#: Exact arithmetic: 80 significant digits and a trap on any rounding.
EXACT = Context(prec=80, traps=[InvalidOperation, DivisionByZero, Overflow, Inexact])

_CURRENCY = re.compile(r"[a-z]{3}")

# Stripe's zero-decimal and three-decimal currencies (docs.stripe.com/currencies).
_ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga"}
    | {"pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
_THREE_DECIMAL = frozenset(["bhd", "jod", "kwd", "omr", "tnd"])
# ISK: whole kronur, but Stripe's integer amounts still count hundredths.
_WHOLE_UNITS_IN_HUNDREDTHS = frozenset(["isk"])

_LIMIT = Decimal(10) ** MAX_INTEGER_DIGITS


def currency_problem(code: object) -> str | None:
    """Why ``code`` is not a lowercase ISO 4217 code, or ``None``."""
    if not isinstance(code, str) or _CURRENCY.fullmatch(code) is None:
        return f"currency must be a lowercase ISO 4217 code (e.g. 'usd'), got {code!r}"
    return None


def minor_exponent(currency: str) -> int:
    """Digits after the point of ``currency``'s minor unit: 2 (usd), 0 (jpy, isk), 3 (kwd)."""
    if currency in _ZERO_DECIMAL or currency in _WHOLE_UNITS_IN_HUNDREDTHS:
        return 0
    if currency in _THREE_DECIMAL:
        return 3
    return 2


def stripe_exponent(currency: str) -> int:
    """Digits after the point counted by Stripe's integer amounts (``minor_exponent`` but isk)."""
    return 2 if currency in _WHOLE_UNITS_IN_HUNDREDTHS else minor_exponent(currency)


def minor_unit(currency: str) -> Decimal:
    """The smallest amount of ``currency``: ``Decimal('0.01')`` for usd, ``Decimal(1)`` for jpy."""
    return Decimal(1).scaleb(-minor_exponent(currency))


def charge_unit(currency: str) -> Decimal:
    """The smallest step of a charge: the minor unit, but 0.010 for three-decimal currencies.

    Stripe requires a three-decimal currency's charge amount to end in 0.
    """
    if currency in _THREE_DECIMAL:
        return Decimal("0.01")
    return minor_unit(currency)


def amount_problem(
    value: object, what: str, *, positive: bool = False, non_negative: bool = False
) -> str | None:
    """Why ``value`` is not an exact amount (Decimal or int, finite, bounded), or ``None``."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        return f"{what} must be a Decimal (never a float), got {type(value).__name__}"
    number = Decimal(value)
    if not number.is_finite():
        return f"{what} must be finite, got {number}"
    if _scale(number) > MAX_SCALE:
        return f"{what} has more than {MAX_SCALE} digits after the point: {number}"
    if number.copy_abs() >= _LIMIT:
        return f"{what} must be below 10^{MAX_INTEGER_DIGITS} in absolute value, got {number}"
    if positive and number <= 0:
        return f"{what} must be positive, got {canon(number)}"
    if non_negative and number < 0:
        return f"{what} must not be negative, got {canon(number)}"
    return None


def in_minor_units_problem(
    value: Decimal, currency: str, what: str, *, unit: Decimal | None = None
) -> str | None:
    """Why ``value`` is not a whole number of ``unit`` (the minor unit), or ``None``."""
    step = minor_unit(currency) if unit is None else unit
    if EXACT.remainder(value, step) != 0:
        return f"{what} must be a whole number of {canon(step)} {currency}, got {canon(value)}"
    return None


def json_decimal(value: object, name: str) -> Decimal:
    """An amount from a JSON document: a decimal string or an integer, never a float (a
    binary number is not the amount the sender wrote); :class:`CreditsError` otherwise."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise CreditsError(
            f'{name} must be a decimal string (never a float), e.g. "20.00", '
            f"not {type(value).__name__}"
        )
    try:
        return Decimal(value)
    except InvalidOperation:
        raise CreditsError(f"{name} is not a decimal: {value!r}") from None


def canon(value: Decimal) -> str:
    """The canonical plain string of ``value``: no exponent, no trailing zeros (``'1.5'``, ``'0'``).

    Equal amounts have equal strings whatever their scale (``1.50`` and ``1.5``), so ids
    hashed from amounts do not depend on how an amount was computed or stored.
    """
    if value == 0:
        return "0"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def ceil_to_charge(value: Decimal, currency: str) -> Decimal:
    """``value`` rounded up (towards +infinity) to a whole :func:`charge_unit`."""
    step = charge_unit(currency)
    with localcontext(EXACT) as ctx:
        ctx.traps[Inexact] = False
        whole = (value / step).to_integral_value(rounding=ROUND_CEILING)
    return EXACT.multiply(whole, step)


def to_stripe_amount(value: Decimal, currency: str) -> int:
    """``value`` as Stripe's integer ``amount`` (``20.05`` usd -> ``2005``); must be whole."""
    problem = in_minor_units_problem(value, currency, "amount")
    if problem is not None:
        raise ValueError(problem)
    return int(value.scaleb(stripe_exponent(currency), EXACT))


def from_stripe_amount(count: int, currency: str) -> Decimal:
    """Stripe's integer ``amount`` as an amount of ``currency`` (``2005`` usd -> ``20.05``)."""
    return Decimal(count).scaleb(-stripe_exponent(currency), EXACT)


def _scale(number: Decimal) -> int:
    """Significant digits after the point of a finite ``number`` (``1.50`` has 1)."""
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)
    trailing = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    if trailing == len(digits):  # zero
        return 0
    return max(0, -(exponent + trailing))
