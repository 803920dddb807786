"""Price models: a period's quantity in, the exact (unrounded) charge out.

Each model is a small frozen object with one interface, :meth:`PriceModel.charge`,
following Stripe's price semantics (docs.stripe.com/api/prices, "Set up tiered
pricing", "Transform quantities"):

- :class:`PerUnit` (``billing_scheme=per_unit``): ``units x unit_price``, where
  ``units`` is the quantity or, with :class:`TransformQuantity`, the number of
  packages: the quantity divided by ``divide_by`` and rounded ``up`` (a started
  package is a package) or ``down`` (only complete packages). Stripe: "Quantity
  transformation isn't compatible with tiered pricing", so packages exist only here.
- :class:`Graduated` (``tiers_mode=graduated``): the quantity fills the tiers in
  order; each tier charges its own ``unit_price`` for the units inside it plus its
  ``flat_price``. Stripe's tiered-pricing page: 5 fonts at 7 USD, 6-10 at 6.50 USD,
  11+ at 6 USD; graduated, 6 fonts cost 5 x 7 + 1 x 6.50 = 41.50 USD.
- :class:`Volume` (``tiers_mode=volume``): the tier holding the whole quantity
  prices every unit (plus that tier's flat price); the same tiers, volume: 5 fonts
  35 USD, 6 fonts 6 x 6.50 = 39 USD (Stripe's table: the total may fall as the
  quantity crosses a bound).

Tier bounds are Stripe's: ``up_to`` is inclusive and the next tier starts above
it ("the lower bound of a tier is the upper bound of the previous tier adding
one"); the last tier is unbounded (``up_to=None``, Stripe's ``inf``). Quantities
may be fractional (compute units), so tier *j* holds the part of the quantity in
``(up_to[j-1], up_to[j]]``.

Choices where Stripe's docs are silent:

- **Zero usage still pays the first tier's flat price**, in both tier modes:
  Stripe's "fixed fee and overage" model is a first tier with a flat amount for the
  first N units, and Prefab's "$99 for the first 100 servers" means 99 USD with
  2 servers or none. A later tier's flat price is charged once the quantity exceeds
  the previous tier's bound.
- **A negative quantity prices as zero.** A meter total below zero (more corrections
  than usage) is not usage and must never become a payment to the customer; refunds
  and credits are separate instruments. :attr:`Charge.quantity` keeps the raw value
  and :attr:`Charge.billable` the zero that was priced.
- **Amounts are exact.** :attr:`Charge.amount` and every tier's amount are
  unrounded; the invoice rounds each line once (:mod:`meterstream.pricing.money`).

**Daily attribution** (the analysts' per-day view, issue #24 item 5):
:func:`daily_amounts` charges a day with what it added to the period's price so
far, ``charge(total through day d) - charge(total through day d-1)``, the first day
carrying the whole first charge (the first tier's flat price included). The days
telescope: their sum is exactly the period's charge before rounding, for every
model and aggregation (pass the meter's period-to-date value after each day: the
running sum for sum/count, the running max for max, and so on). For a per-unit price
without packages and non-negative days this is simply ``day quantity x unit_price``.
With tiers it is a rule, not a fact: the day a bound is crossed gets the next
tier's flat price, and with volume tiers a crossing day can be negative (the whole
period got cheaper). Rounding stays on the period's line: round the sum of the days,
never each day.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Final, Literal, Protocol, runtime_checkable

from meterstream.pricing.money import EXACT, ZERO, check_quantity

TransformRound = Literal["up", "down"]

MAX_TIERS: Final = 250
"""Most tiers a price may have. Stripe's API reference gives no number in what we read; 250
is the bound the issue's brief names, and far above any price list seen in the seeds."""

MAX_BOUND: Final = 2**63 - 1
"""Largest ``up_to`` / ``divide_by``: Stripe's integers are 64-bit."""


@dataclass(frozen=True, slots=True)
class TransformQuantity:
    """Stripe's ``transform_quantity``: divide the quantity, then round ``up`` or ``down``."""

    divide_by: int
    round: TransformRound

    def __post_init__(self) -> None:
        if isinstance(self.divide_by, bool) or not isinstance(self.divide_by, int):
            raise TypeError("divide_by must be an int")
        if not 1 <= self.divide_by <= MAX_BOUND:
            raise ValueError(f"divide_by must be a positive integer, not {self.divide_by}")
        if self.round not in ("up", "down"):
            raise ValueError(f"round must be 'up' or 'down', not {self.round!r}")

    def apply(self, quantity: Decimal) -> Decimal:
        """The whole number of packages in a non-negative ``quantity`` (exact division)."""
        ratio = Fraction(quantity) / self.divide_by
        return Decimal(math.ceil(ratio) if self.round == "up" else math.floor(ratio))


@dataclass(frozen=True, slots=True)
class Tier:
    """One tier: units up to ``up_to`` (inclusive; ``None`` = unbounded) and its prices."""

    up_to: int | None
    unit_price: Decimal = ZERO
    flat_price: Decimal = ZERO


@dataclass(frozen=True, slots=True)
class TierCharge:
    """What one tier charged: ``units x unit_price + flat_price`` (exact)."""

    tier: int
    """1-based position of the tier in the price."""
    lower: int
    """The quantity above which the tier starts (0 for the first)."""
    up_to: int | None
    units: Decimal
    unit_price: Decimal
    flat_price: Decimal
    """The flat price charged (0 when the tier was not reached)."""
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Charge:
    """A price applied to one quantity; :attr:`amount` is exact, not yet rounded."""

    quantity: Decimal
    """The quantity as given (may be negative or fractional)."""
    billable: Decimal
    """The quantity priced: ``max(quantity, 0)``."""
    units: Decimal
    """What unit prices multiplied: ``billable``, or the packages of a ``transform_quantity``."""
    tiers: tuple[TierCharge, ...]
    """Each tier that charged something (tiered prices only; empty for per-unit prices)."""
    amount: Decimal


@runtime_checkable
class PriceModel(Protocol):
    """The one interface every price model has."""

    def charge(self, quantity: Decimal) -> Charge:
        """The exact charge for a period's ``quantity`` of the meter."""
        ...


def _check_price(value: Decimal, what: str) -> None:
    if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
        raise ValueError(f"{what} must be a finite, non-negative Decimal, not {value!r}")


def tier_problems(tiers: Sequence[Tier]) -> list[tuple[str, str]]:
    """``(relative path, message)`` for every rule the tiers break (empty if none).

    Rules (Stripe's): at least one and at most :data:`MAX_TIERS` tiers; bounds are
    positive integers in strictly ascending order; only the last tier is unbounded,
    and it must be; prices are non-negative.
    """
    problems: list[tuple[str, str]] = []
    if not tiers:
        return [("", "at least one tier is required")]
    if len(tiers) > MAX_TIERS:
        problems.append(("", f"at most {MAX_TIERS} tiers are allowed, not {len(tiers)}"))
    previous: int | None = 0  # the bound the next tier must exceed; None after a bad tier
    for i, tier in enumerate(tiers):
        last = i == len(tiers) - 1
        bound = tier.up_to
        if bound is None:
            if not last:
                problems.append((f"[{i}].up_to", "only the last tier may be unbounded ('inf')"))
            previous = None
            continue
        if last:
            problems.append(
                (f"[{i}].up_to", f"the last tier must be unbounded: use 'inf', not {bound}")
            )
        if isinstance(bound, bool) or not isinstance(bound, int) or not 1 <= bound <= MAX_BOUND:
            problems.append((f"[{i}].up_to", f"must be a positive integer or 'inf', not {bound!r}"))
            previous = None
            continue
        if previous is not None and bound <= previous:
            problems.append(
                (
                    f"[{i}].up_to",
                    f"must be greater than tiers[{i - 1}].up_to ({previous}), not {bound}",
                )
            )
        previous = bound
    return problems


def _check_tiers(tiers: tuple[Tier, ...]) -> None:
    problems = tier_problems(tiers)
    if problems:
        raise ValueError("; ".join(f"tiers{path}: {message}" for path, message in problems))
    for i, tier in enumerate(tiers):
        _check_price(tier.unit_price, f"tiers[{i}].unit_price")
        _check_price(tier.flat_price, f"tiers[{i}].flat_price")


@dataclass(frozen=True, slots=True)
class PerUnit:
    """``billing_scheme=per_unit``, optionally per package (``transform_quantity``)."""

    unit_price: Decimal
    transform: TransformQuantity | None = None

    def __post_init__(self) -> None:
        _check_price(self.unit_price, "unit_price")

    def charge(self, quantity: Decimal) -> Charge:
        """``units x unit_price``; ``units`` are packages when a transform is set."""
        raw = check_quantity(quantity)
        billable = max(raw, ZERO)
        units = billable if self.transform is None else self.transform.apply(billable)
        with localcontext(EXACT):
            amount = units * self.unit_price
        return Charge(raw, billable, units, (), amount)


def _tier_charge(i: int, tier: Tier, lower: int, units: Decimal, flat: Decimal) -> TierCharge:
    with localcontext(EXACT):
        amount = units * tier.unit_price + flat
    return TierCharge(i + 1, lower, tier.up_to, units, tier.unit_price, flat, amount)


@dataclass(frozen=True, slots=True)
class _Tiered:
    """A tiered price model: its tiers are checked when it is built (:func:`tier_problems`,
    then every tier's prices)."""

    tiers: tuple[Tier, ...]

    def __post_init__(self) -> None:
        _check_tiers(self.tiers)


@dataclass(frozen=True, slots=True)
class Graduated(_Tiered):
    """``tiers_mode=graduated``: each tier prices the units that fall inside it."""

    def charge(self, quantity: Decimal) -> Charge:
        """The sum over reached tiers of ``units in tier x unit_price + flat_price``."""
        raw = check_quantity(quantity)
        billable = max(raw, ZERO)
        lines: list[TierCharge] = []
        lower = 0
        for i, tier in enumerate(self.tiers):
            if i > 0 and billable <= lower:
                break
            top = billable if tier.up_to is None else min(billable, Decimal(tier.up_to))
            with localcontext(EXACT):
                units = max(top - lower, ZERO)
            lines.append(_tier_charge(i, tier, lower, units, tier.flat_price))
            if tier.up_to is None:
                break
            lower = tier.up_to
        with localcontext(EXACT):
            amount = sum((line.amount for line in lines), ZERO)
        return Charge(raw, billable, billable, tuple(lines), amount)


@dataclass(frozen=True, slots=True)
class Volume(_Tiered):
    """``tiers_mode=volume``: the tier holding the whole quantity prices every unit."""

    def charge(self, quantity: Decimal) -> Charge:
        """``quantity x unit_price + flat_price`` of the first tier with ``quantity <= up_to``."""
        raw = check_quantity(quantity)
        billable = max(raw, ZERO)
        lower = 0
        for i, tier in enumerate(self.tiers):
            if tier.up_to is None or billable <= tier.up_to:
                line = _tier_charge(i, tier, lower, billable, tier.flat_price)
                return Charge(raw, billable, billable, (line,), line.amount)
            lower = tier.up_to
        raise AssertionError("unreachable: the last tier is unbounded")  # pragma: no cover


def daily_amounts(model: PriceModel, period_to_date: Sequence[Decimal]) -> tuple[Decimal, ...]:
    """What each day of a period costs under ``model``, exactly (see the module docstring).

    ``period_to_date[d]`` is the meter's period value through the end of day ``d``.
    Returns one exact amount per day; their sum equals
    ``model.charge(period_to_date[-1]).amount`` exactly. Round the sum, never a day.
    """
    amounts: list[Decimal] = []
    before: Decimal | None = None
    for value in period_to_date:
        now = model.charge(value).amount
        with localcontext(EXACT):
            amounts.append(now if before is None else now - before)
        before = now
    return tuple(amounts)
