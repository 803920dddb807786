"""Currencies, minor units and the one rounding rule (issue #24, "Exact money").

What Stripe documents, and what we chose where it is silent:

- **Rounding happens once per invoice line, to the nearest minor unit.** Stripe,
  "Decimal amounts for pricing" (stripe.com/docs/billing/subscriptions/decimal-amounts):
  "Rounding occurs on the line item level of your invoices ... rounding occurs after the
  quantity is multiplied by the decimal amount ... 0.05 * 30 = 1.5, which is then rounded
  up to 2 cents. If you have multiple line items, each will be rounded before summing up
  the total amount for the invoice." So a line's exact amount (quantity x decimal price,
  tiers and flat amounts included) is rounded once and the total is the sum of the
  rounded lines.
- **Halves round up (away from zero).** The docs' only tie (1.5 cents -> 2) does not tell
  half-up from half-even (2 is even); Stripe's own rounding of its fees is "to the nearest
  unit ... 0.025 -> 0.03" (support.stripe.com, "What rules do you use for rounding Stripe
  fees?"), which is half-up. We use ``ROUND_HALF_UP`` everywhere; amounts are never
  negative, so "up" and "away from zero" are the same thing here.
- **Minor units.** Stripe's API amounts are integers in the currency's smallest unit
  (docs.stripe.com/currencies, "Minor units in API amounts"): cents for two-decimal
  currencies; for Stripe's *zero-decimal* currencies (BIF CLP DJF GNF JPY KMF KRW MGA PYG
  RWF UGX VND VUV XAF XOF XPF) the amount is the whole unit (``500`` is 500 JPY);
  *three-decimal* currencies (BHD JOD KWD OMR TND) count thousandths. ISO 4217 agrees
  except for MGA (ISO: 2 decimals; Stripe: zero-decimal) and ISK (below); we follow
  Stripe, since its invoices are what ours must equal.
- **Special cases.** ISK: Stripe treats it as zero-decimal but, for backwards
  compatibility, its API amounts still carry two decimals (5 ISK is ``500``): amounts
  round to whole krónur (``exponent`` 0) and Stripe integers are hundredths
  (``stripe_exponent`` 2). HUF and TWD are two-decimal for charges (their whole-unit rule
  is for payouts only). Three-decimal currencies: Stripe requires *charges* (payment
  intents) to end in 0 (to the nearest ten); the docs say nothing of invoice lines, so
  lines round to the thousandth, and the ten-rounding stays a payment concern.
- **Decimal prices.** ``unit_amount_decimal`` takes "a decimal value in cents (or local
  equivalent) with at most 12 decimal places"; ``flat_amount_decimal`` "a decimal value
  representing an integer in the minor units of the currency" (so a flat amount is whole
  minor units; Stripe support confirmed to tierrun/tier#261 that its decimals are not
  honoured). :func:`stripe_decimal_places` measures the first rule in Stripe's units.

Every amount is a :class:`~decimal.Decimal` in the currency's major unit (dollars, not
cents); :data:`EXACT` traps any inexact operation, so nothing is rounded by accident:
the only rounding is :meth:`Currency.round`.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Final

EXACT: Final = decimal.Context(
    prec=1000,
    traps=[
        decimal.InvalidOperation,
        decimal.DivisionByZero,
        decimal.Overflow,
        decimal.Inexact,
        decimal.Rounded,
    ],
)
"""Arithmetic for money: wide enough for every bounded input, and any rounding raises."""

MAX_QUANTITY_DIGITS: Final = 100
"""Quantities priced have at most this many integer and this many fractional digits."""

ZERO: Final = Decimal(0)


def _codes(text: str) -> frozenset[str]:
    return frozenset(text.split())


ZERO_DECIMAL: Final = _codes("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf")
"""Stripe's zero-decimal currencies (docs.stripe.com/currencies#zero-decimal)."""

THREE_DECIMAL: Final = _codes("bhd jod kwd omr tnd")
"""Stripe's three-decimal currencies (docs.stripe.com/currencies#three-decimal)."""

_TWO_DECIMAL: Final = _codes(
    """
    usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bmd bnd bob brl bsd bwp
    byn bzd cad cdf chf cny cop crc cve czk dkk dop dzd egp etb eur fjd fkp gbp gel gip
    gmd gtq gyd hkd hnl htg huf idr ils inr jmd kes kgs khr kyd kzt lak lbp lkr lrd lsl
    mad mdl mkd mmk mnt mop mur mvr mwk mxn myr mzn nad ngn nio nok npr nzd pab pen pgk
    php pkr pln qar ron rsd rub sar sbd scr sek sgd shp sle sos srd std szl thb tjs top
    try ttd twd tzs uah uyu uzs wst xcd yer zar zmw
    """
)


@dataclass(frozen=True, slots=True)
class Currency:
    """A currency as Stripe charges it.

    ``code`` is the lowercase ISO 4217 code (Stripe's spelling); ``exponent`` the
    decimal places an invoice amount is rounded to; ``stripe_exponent`` the decimal
    places of Stripe's integer amount fields (equal to ``exponent`` except for ISK).
    """

    code: str
    exponent: int
    stripe_exponent: int

    @property
    def quantum(self) -> Decimal:
        """One minor unit, e.g. ``Decimal("0.01")`` for USD, ``Decimal("1")`` for JPY."""
        return Decimal(1).scaleb(-self.exponent)

    def round(self, amount: Decimal | Fraction) -> Decimal:
        """``amount`` rounded half-up to the minor unit: the one rounding of a line."""
        if isinstance(amount, Fraction):
            scaled = amount * 10**self.exponent
            whole, rest = divmod(abs(scaled.numerator), scaled.denominator)
            if 2 * rest >= scaled.denominator:
                whole += 1
            signed = -whole if scaled < 0 else whole
            return Decimal(signed).scaleb(-self.exponent, EXACT)
        return amount.quantize(self.quantum, rounding=decimal.ROUND_HALF_UP, context=_ROUNDING)

    def is_whole(self, amount: Decimal) -> bool:
        """Whether ``amount`` is a whole number of minor units (no rounding needed)."""
        return amount == amount.quantize(self.quantum, context=_ROUNDING)

    def to_minor(self, amount: Decimal) -> int:
        """Stripe's integer for a rounded amount (``12.30`` USD -> ``1230``)."""
        if not self.is_whole(amount):
            raise ValueError(f"{amount} is not a whole number of {self.code} minor units")
        return int(amount.scaleb(self.stripe_exponent, EXACT))

    def to_stripe(self, amount: Decimal) -> Decimal:
        """``amount`` in Stripe's units, exactly (for ``*_decimal`` fields): 0.05 USD -> 5."""
        return amount.scaleb(self.stripe_exponent, EXACT)

    def text(self, amount: Decimal) -> str:
        """A rounded amount as a decimal string with exactly ``exponent`` decimals."""
        return format(self.round(amount), "f")


_ROUNDING: Final = decimal.Context(prec=1000, traps=[decimal.InvalidOperation, decimal.Overflow])


def _table() -> dict[str, Currency]:
    table = {code: Currency(code, 2, 2) for code in _TWO_DECIMAL}
    table |= {code: Currency(code, 0, 0) for code in ZERO_DECIMAL}
    table |= {code: Currency(code, 3, 3) for code in THREE_DECIMAL}
    table["isk"] = Currency("isk", 0, 2)
    return table


CURRENCIES: Final[dict[str, Currency]] = _table()
"""Every currency Stripe presents (docs.stripe.com/currencies), by lowercase code."""


def currency(code: str) -> Currency:
    """The currency for an ISO 4217 code in any case; ``ValueError`` if Stripe has none."""
    found = CURRENCIES.get(code.lower()) if isinstance(code, str) else None
    if found is None:
        raise ValueError(f"{code!r} is not a currency Stripe charges in (ISO 4217 code)")
    return found


def plain(value: Decimal) -> str:
    """Exact decimal text without exponent or trailing zeros: ``6.50`` -> ``"6.5"``."""
    if value.is_zero():
        return "0"
    text = format(value.normalize(_ROUNDING), "f")
    return text


def stripe_decimal_places(amount: Decimal, money: Currency) -> int:
    """How many decimal places ``amount`` has in Stripe's units (``unit_amount_decimal``)."""
    exponent = money.to_stripe(amount).normalize(_ROUNDING).as_tuple().exponent
    assert isinstance(exponent, int)  # finite amounts only
    return max(0, -exponent)


def check_quantity(quantity: object) -> Decimal:
    """A quantity to price: a finite ``Decimal`` or ``int`` within :data:`MAX_QUANTITY_DIGITS`.

    Floats and booleans are refused (``TypeError``), as are NaN, infinities and values
    with more digits than any meter total can have (``ValueError``).
    """
    if isinstance(quantity, bool) or not isinstance(quantity, int | Decimal):
        raise TypeError(f"a quantity must be a Decimal or an int, not {type(quantity).__name__}")
    number = Decimal(quantity)
    if not number.is_finite():
        raise ValueError(f"a quantity must be finite, not {number}")
    if not number.is_zero():
        exponent = number.as_tuple().exponent
        assert isinstance(exponent, int)
        if number.adjusted() >= MAX_QUANTITY_DIGITS or exponent < -MAX_QUANTITY_DIGITS:
            raise ValueError(
                f"quantity {number} is out of range (at most {MAX_QUANTITY_DIGITS} digits "
                "each side of the point)"
            )
    return number
