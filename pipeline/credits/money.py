"""Exact credit amounts: currencies, minor units, canonical decimal strings.

Every amount is a :class:`~decimal.Decimal`, never a float. Arithmetic on credit amounts
runs in :data:`EXACT`, a context that raises instead of rounding, so a sum that could not
be represented exactly stops loudly rather than losing a fraction. The only rounding in the
package is :func:`ceil_to_minor` (an auto-recharge purchase is rounded *up* to the
currency's minor unit).

Amounts are bounded so that every ledger value fits a ClickHouse ``Decimal(38, 18)``: at
most :data:`MAX_SCALE` digits after the point and an absolute value below
``10 ** MAX_INTEGER_DIGITS``.

The minor-unit table is local and small (Stripe's zero- and three-decimal currencies; every
other ISO code has two decimals). When ``pipeline/pricing/money.py`` exists, replace
:func:`minor_exponent` by its lookup; nothing else here depends on the table.
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

MAX_SCALE = 18
MAX_INTEGER_DIGITS = 20

#: Exact arithmetic: 80 significant digits and a trap on any rounding.
EXACT = Context(prec=80, traps=[InvalidOperation, DivisionByZero, Overflow, Inexact])

_CURRENCY = re.compile(r"[A-Z]{3}")

# Stripe's zero-decimal and three-decimal currencies (stripe.com/docs/currencies).
_ZERO_DECIMAL = frozenset(
    {"BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA"}
    | {"PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF"}
)
_THREE_DECIMAL = frozenset(["BHD", "JOD", "KWD", "OMR", "TND"])

_LIMIT = Decimal(10) ** MAX_INTEGER_DIGITS


def currency_problem(code: object) -> str | None:
    """Why ``code`` is not an ISO 4217 code in upper case, or ``None``."""
    if not isinstance(code, str) or _CURRENCY.fullmatch(code) is None:
        return f"currency must be an ISO 4217 code in upper case (e.g. 'USD'), got {code!r}"
    return None


def minor_exponent(currency: str) -> int:
    """Digits after the point in ``currency``'s minor unit: 2 (USD), 0 (JPY), 3 (KWD)."""
    if currency in _ZERO_DECIMAL:
        return 0
    if currency in _THREE_DECIMAL:
        return 3
    return 2


def minor_unit(currency: str) -> Decimal:
    """The smallest amount of ``currency``: ``Decimal('0.01')`` for USD, ``Decimal(1)`` for JPY."""
    return Decimal(1).scaleb(-minor_exponent(currency))


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


def in_minor_units_problem(value: Decimal, currency: str, what: str) -> str | None:
    """Why ``value`` is not a whole number of ``currency``'s minor unit, or ``None``."""
    if value % minor_unit(currency) != 0:
        return (
            f"{what} must be a whole number of {currency}'s minor unit "
            f"({canon(minor_unit(currency))}), got {canon(value)}"
        )
    return None


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


def ceil_to_minor(value: Decimal, currency: str) -> Decimal:
    """``value`` rounded up (towards +infinity) to ``currency``'s minor unit."""
    with localcontext(EXACT) as ctx:
        ctx.traps[Inexact] = False
        return value.quantize(minor_unit(currency), rounding=ROUND_CEILING)


def to_minor_units(value: Decimal, currency: str) -> int:
    """``value`` as an integer count of minor units (Stripe's ``amount``); must be whole."""
    problem = in_minor_units_problem(value, currency, "amount")
    if problem is not None:
        raise ValueError(problem)
    return int(value.scaleb(minor_exponent(currency), EXACT))


def from_minor_units(count: int, currency: str) -> Decimal:
    """An integer count of minor units (Stripe's ``amount``) as an amount of ``currency``."""
    return Decimal(count).scaleb(-minor_exponent(currency), EXACT)


def _scale(number: Decimal) -> int:
    """Significant digits after the point of a finite ``number`` (``1.50`` has 1)."""
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)
    trailing = len(digits) - len("".join(map(str, digits)).rstrip("0"))
    if trailing == len(digits):  # zero
        return 0
    return max(0, -(exponent + trailing))
