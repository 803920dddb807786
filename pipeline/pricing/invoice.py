"""A customer's invoice for one period: which plan prices which usage, and the lines.

**Which plan prices which usage** (:func:`plan_segments`). A customer's plan
assignments each take effect at an instant and last until the next one. Before
the first, the plans file's default plan applies (free unless configured). The
period ``[start, end)`` is cut at every change into segments, one plan each.

**A plan change in the middle of a period is prorated, like Stripe's default**
(``proration_behavior=create_prorations``): usage in each segment is priced by
the plan in effect when it happened, with that plan's tiers applied to that
segment's usage alone (as Stripe prices each price's own usage when a metered
price is swapped), and a plan's base fee and minimums are charged for the share
of the period the plan was in effect, by the second (Stripe prorates by time).
Why: the preview must equal what Stripe will invoice, a customer never pays for a
plan it did not have, and a downgrade on the last day of the month cannot
reprice the whole month. The cost: tiers restart at a change, so a customer
who changes plan mid-month starts the new plan's tiers from zero, and pays its
first tier's flat price in full (tier prices are not prorated; Stripe's are not
either: only fees for time are).

**The lines** (:func:`compute_invoice`), per segment in time order: the base fee
(``base_fee x share``), then one usage line per price of the plan (the meter's
quantity over the segment, every tier's units and exact amount), each followed by
its minimum top-up if the line is below the price's minimum, then the plan's
minimum top-up if the segment's lines are below it. Each line is rounded once to
the currency's minor unit, half up (:mod:`meterstream.pricing.money`); a top-up is
the difference of rounded amounts; the subtotal is the sum of the rounded lines,
and the total equals the subtotal (credits and taxes are not applied here).

A segment whose plan charges nothing (the built-in free plan) has no lines. An
invoice has one currency: every plan that charges something in the period must
use it (:class:`~meterstream.errors.PricingError` otherwise, as Stripe refuses a
customer with subscriptions in two currencies).

**Quantities** are the meter's value over a segment as the record holds it (not
the whole numbers sent to Stripe): for sum and count the sum, for max, min,
unique_count and latest the segment's value. Exact decimals; fractional and
negative values are priced as :mod:`meterstream.pricing.prices` says. A meter with
no usage is 0.

:meth:`Invoice.to_dict` is plain JSON: amounts as decimal strings (``"12.30"``)
plus Stripe's minor-unit integers (``1230``); exact amounts that do not terminate
(a prorated fee of 20 USD for 10 of 31 days) are written as a fraction ``"200/31"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any, Literal

from meterstream.errors import PricingError
from meterstream.pricing.money import EXACT, ZERO, Currency, check_quantity, plain
from meterstream.pricing.plans import Plan, PlanPrice, PlansConfig
from meterstream.pricing.prices import Charge

LineKind = Literal["base_fee", "usage", "minimum"]

_MICROSECOND = timedelta(microseconds=1)


def _utc(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime):
        raise PricingError(f"{what} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise PricingError(f"{what} must carry a time zone (UTC), not a naive datetime")
    return value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Period:
    """A billing period ``[start, end)`` in UTC (meterstream bills calendar months)."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        start, end = _utc(self.start, "period start"), _utc(self.end, "period end")
        if end <= start:
            raise PricingError(f"period end {_iso(end)} is not after its start {_iso(start)}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    @classmethod
    def month(cls, text: str) -> Period:
        """The calendar month ``YYYY-MM`` (UTC), e.g. ``Period.month("2026-12")``."""
        try:
            start = datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
        except (TypeError, ValueError):
            raise PricingError(f"{text!r} is not a month: use YYYY-MM") from None
        if start.year < 1970:
            raise PricingError(f"{text!r} is before 1970")
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        return cls(start, start.replace(year=year, month=month))

    @classmethod
    def containing(cls, instant: datetime) -> Period:
        """The calendar month (UTC) holding ``instant``."""
        moment = _utc(instant, "instant")
        return cls.month(f"{moment.year:04d}-{moment.month:02d}")

    @property
    def length(self) -> timedelta:
        return self.end - self.start

    def to_dict(self) -> dict[str, str]:
        return {"start": _iso(self.start), "end": _iso(self.end)}


@dataclass(frozen=True, slots=True)
class PlanAssignment:
    """A customer is on ``plan`` from ``effective`` (tz-aware) until its next assignment."""

    plan: str
    effective: datetime


@dataclass(frozen=True, slots=True)
class Segment:
    """A part ``[start, end)`` of a period priced by one plan."""

    plan: str
    start: datetime
    end: datetime
    share: Fraction
    """``(end - start) / period length``: the part of the period's fees it carries."""
    default: bool
    """Priced by the default plan because no assignment was in effect yet."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "start": _iso(self.start),
            "end": _iso(self.end),
            "share": _fraction_text(self.share),
            "default": self.default,
        }


def plan_segments(
    assignments: Iterable[PlanAssignment], period: Period, default_plan: str
) -> tuple[Segment, ...]:
    """Cut ``period`` into segments by the plan in effect (see the module docstring).

    The plan in effect at ``t`` is the assignment with the latest ``effective <= t``;
    before every assignment it is ``default_plan``. Consecutive segments of the same
    plan are one segment. Two assignments at the same instant naming different plans
    are a :class:`~meterstream.errors.PricingError` (which one holds would be a guess).
    """
    ordered: dict[datetime, str] = {}
    for assignment in assignments:
        when = _utc(assignment.effective, f"effective date of plan {assignment.plan!r}")
        if ordered.get(when, assignment.plan) != assignment.plan:
            raise PricingError(
                f"plans {ordered[when]!r} and {assignment.plan!r} are both effective "
                f"at {_iso(when)}"
            )
        ordered[when] = assignment.plan
    current, is_default = default_plan, True
    cuts: list[tuple[datetime, str, bool]] = []
    for when in sorted(ordered):
        if when <= period.start:
            current, is_default = ordered[when], False
        elif when < period.end:
            cuts.append((when, ordered[when], False))
    bounds = [(period.start, current, is_default), *cuts]
    total = period.length // _MICROSECOND
    segments: list[Segment] = []
    for i, (start, plan, default) in enumerate(bounds):
        end = bounds[i + 1][0] if i + 1 < len(bounds) else period.end
        if segments and segments[-1].plan == plan:
            last = segments.pop()
            start, default = last.start, last.default
        share = Fraction((end - start) // _MICROSECOND, total)
        segments.append(Segment(plan, start, end, share, default))
    return tuple(segments)


@dataclass(frozen=True, slots=True)
class SegmentUsage:
    """The meters' quantities over one segment: ``{meter: value over [start, end)}``."""

    segment: Segment
    quantities: Mapping[str, Decimal] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    """One invoice line; ``amount`` is ``amount_exact`` rounded once to the minor unit."""

    kind: LineKind
    plan: str
    start: datetime
    end: datetime
    amount: Decimal
    amount_exact: Fraction
    description: str
    meter: str | None = None
    price: PlanPrice | None = None
    charge: Charge | None = None
    """Usage lines: the quantity, the units priced and every tier's units and amount."""


def _fraction_text(value: Fraction) -> str:
    """A decimal string when ``value`` terminates, else ``"numerator/denominator"``."""
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    with localcontext(EXACT):
        return plain(Decimal(value.numerator) / Decimal(value.denominator))


def _money(amount: Decimal, currency: Currency) -> dict[str, Any]:
    return {"amount": currency.text(amount), "amount_minor": currency.to_minor(amount)}


def _line_dict(line: InvoiceLine, currency: Currency) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": line.kind,
        "plan": line.plan,
        "meter": line.meter,
        "start": _iso(line.start),
        "end": _iso(line.end),
        "description": line.description,
    }
    if line.price is not None and line.charge is not None:
        price, charge = line.price, line.charge
        out["quantity"] = plain(charge.quantity)
        out["billable_quantity"] = plain(charge.billable)
        out["units"] = plain(charge.units)
        out["billing_scheme"] = price.billing_scheme
        if price.billing_scheme == "per_unit":
            assert price.unit_price is not None
            out["unit_price"] = plain(price.unit_price)
            transform = price.transform_quantity
            out["transform_quantity"] = (
                None
                if transform is None
                else {"divide_by": transform.divide_by, "round": transform.round}
            )
        else:
            out["tiers_mode"] = price.tiers_mode
            out["tiers"] = [
                {
                    "tier": t.tier,
                    "from": t.lower,
                    "up_to": "inf" if t.up_to is None else t.up_to,
                    "units": plain(t.units),
                    "unit_price": plain(t.unit_price),
                    "flat_price": plain(t.flat_price),
                    "amount": plain(t.amount),
                }
                for t in charge.tiers
            ]
    out["amount_exact"] = _fraction_text(line.amount_exact)
    out |= _money(line.amount, currency)
    return out


@dataclass(frozen=True, slots=True)
class Invoice:
    """A period's priced usage for one customer; :meth:`to_dict` is its JSON form."""

    customer_id: str | None
    period: Period
    currency: Currency
    segments: tuple[Segment, ...]
    lines: tuple[InvoiceLine, ...]
    subtotal: Decimal
    total: Decimal

    def lines_for(self, meter: str) -> tuple[InvoiceLine, ...]:
        """The usage and minimum lines of ``meter``, in order."""
        return tuple(line for line in self.lines if line.meter == meter)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only: strings, ints, booleans, None, lists and dicts."""
        subtotal, total = _money(self.subtotal, self.currency), _money(self.total, self.currency)
        return {
            "customer_id": self.customer_id,
            "period": self.period.to_dict(),
            "currency": self.currency.code,
            "segments": [segment.to_dict() for segment in self.segments],
            "lines": [_line_dict(line, self.currency) for line in self.lines],
            "subtotal": subtotal["amount"],
            "subtotal_minor": subtotal["amount_minor"],
            "total": total["amount"],
            "total_minor": total["amount_minor"],
        }


def _quantity(usage: SegmentUsage, meter: str) -> Decimal:
    value = usage.quantities.get(meter, ZERO)
    try:
        return check_quantity(value)
    except (TypeError, ValueError) as exc:
        raise PricingError(f"meter {meter!r} from {_iso(usage.segment.start)}: {exc}") from None


def _segment_lines(plan: Plan, usage: SegmentUsage) -> list[InvoiceLine]:
    """The lines of one segment: base fee, usage (+ price minimums), plan minimum."""
    segment, money = usage.segment, plan.money
    share = segment.share
    of_period = "" if share == 1 else f" x {_fraction_text(share)} of the period"
    lines: list[InvoiceLine] = []

    def add(kind: LineKind, exact: Fraction, description: str, **usage_fields: Any) -> None:
        line = InvoiceLine(
            kind=kind,
            plan=plan.name,
            start=segment.start,
            end=segment.end,
            amount=money.round(exact),
            amount_exact=exact,
            description=description,
            **usage_fields,
        )
        lines.append(line)

    def top_up(minimum: Decimal, covered: Sequence[InvoiceLine], meter: str | None) -> None:
        target = money.round(Fraction(minimum) * share)
        with localcontext(EXACT):
            shortfall = target - sum((line.amount for line in covered), ZERO)
        if shortfall > 0:
            what = f"{meter} minimum" if meter else f"{plan.name} minimum"
            add(
                "minimum",
                Fraction(shortfall),
                f"{what} {money.text(minimum)}{of_period}",
                meter=meter,
            )

    if not plan.base_fee.is_zero():
        fee = Fraction(plan.base_fee) * share
        add("base_fee", fee, f"{plan.name} base fee {money.text(plan.base_fee)}{of_period}")
    for price in plan.prices:
        charge = price.model.charge(_quantity(usage, price.meter))
        description = f"{price.meter} on {plan.name}"
        add(
            "usage",
            Fraction(charge.amount),
            description,
            meter=price.meter,
            price=price,
            charge=charge,
        )
        if price.minimum is not None:
            top_up(price.minimum, lines[-1:], price.meter)
    if plan.minimum is not None:
        top_up(plan.minimum, list(lines), None)
    return lines


def compute_invoice(
    plans: PlansConfig,
    period: Period,
    usage: Sequence[SegmentUsage],
    customer_id: str | None = None,
) -> Invoice:
    """The invoice for ``period`` from each segment's quantities (see the module docstring).

    ``usage`` holds one :class:`SegmentUsage` per segment of :func:`plan_segments`, in
    order. Raises :class:`~meterstream.errors.PricingError` for a segment outside the
    period, overlapping segments, an unknown plan, two currencies or a bad quantity.
    """
    plan_of: list[Plan] = []
    previous_end = period.start
    for item in usage:
        segment = item.segment
        if segment.start < previous_end or segment.end > period.end or segment.end <= segment.start:
            raise PricingError(
                f"segment {_iso(segment.start)}..{_iso(segment.end)} is outside the period "
                "or overlaps the previous one"
            )
        previous_end = segment.end
        try:
            plan_of.append(plans.by_name(segment.plan))
        except KeyError:
            raise PricingError(f"no plan named {segment.plan!r} in the plans file") from None
    charging = [plan for plan in plan_of if not plan.charges_nothing]
    codes = sorted({plan.currency for plan in charging})
    if len(codes) > 1:
        raise PricingError(
            f"plans in one period use several currencies ({', '.join(codes)}); "
            "an invoice has one currency"
        )
    money = (charging or plan_of or [plans.default])[0].money
    lines: list[InvoiceLine] = []
    for plan, item in zip(plan_of, usage, strict=True):
        if not plan.charges_nothing:
            lines += _segment_lines(plan, item)
    with localcontext(EXACT):
        subtotal = sum((line.amount for line in lines), ZERO)
    subtotal = money.round(subtotal)  # exact already; fixes the exponent for an empty invoice
    return Invoice(
        customer_id=customer_id,
        period=period,
        currency=money,
        segments=tuple(item.segment for item in usage),
        lines=tuple(lines),
        subtotal=subtotal,
        total=subtotal,
    )


def preview_invoice(
    plans: PlansConfig,
    period: Period,
    assignments: Iterable[PlanAssignment],
    quantities: Callable[[datetime, datetime], Mapping[str, Decimal]],
    customer_id: str | None = None,
) -> Invoice:
    """:func:`plan_segments` then :func:`compute_invoice`, asking ``quantities(start, end)``
    for the meters' values over each segment (e.g. a query of the verified record)."""
    segments = plan_segments(assignments, period, plans.default.name)
    usage = [SegmentUsage(s, quantities(s.start, s.end)) for s in segments]
    return compute_invoice(plans, period, usage, customer_id)
