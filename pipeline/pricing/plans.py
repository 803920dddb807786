"""Plans: the YAML file beside the meters, its validation, and the default plan.

A plans file is ``{plans: [...], default_plan: NAME}`` (``default_plan`` optional).
:func:`load_plans` reports every problem at once as a :class:`~meterstream.errors.ConfigError`,
each with its path (``plans[1].prices[0].tiers[2].up_to: ...``); given the meters
config it also checks that every priced meter exists.

.. code-block:: yaml

    plans:
      - name: pro                    # slug, unique
        currency: usd                # ISO 4217, a currency Stripe charges in
        base_fee: 20                 # optional, per period (calendar month, UTC)
        minimum: 50                  # optional: the period's invoice is at least this
        prices:                      # at most one per meter
          - meter: compute_units     # per unit
            unit_price: 0.02
          - meter: ai_tokens         # per package: 0.05 per started 1,000 tokens
            unit_price: 0.05
            transform_quantity: {divide_by: 1000, round: up}
          - meter: active_servers    # graduated tiers (or tiers_mode: volume)
            billing_scheme: tiered
            tiers_mode: graduated
            tiers:
              - {up_to: 100, flat_price: 99}
              - {up_to: inf, unit_price: 0.99}
            minimum: 10              # optional: this line is at least this

Amounts are in the currency's **major** unit (``0.05`` is five cents, ``20`` is twenty
dollars), written as YAML numbers or strings and read exactly (never as floats).
The keys follow Stripe's price semantics (``billing_scheme``, ``tiers_mode``, ``tiers``
with ``up_to``, ``transform_quantity`` with ``divide_by`` and ``round``), so each price
maps one to one onto a Stripe price (:mod:`meterstream.pricing.stripe_prices`); the
rules are Stripe's too:

- ``billing_scheme: per_unit`` (the default) needs ``unit_price`` and may have
  ``transform_quantity``; ``tiered`` needs ``tiers_mode`` and ``tiers``, and cannot have
  ``transform_quantity`` (Stripe: not compatible with tiers).
- Tiers: 1 to 250, ``up_to`` positive integers strictly ascending, the last ``inf``.
- ``unit_price``: at most 12 decimal places in Stripe's minor units (``unit_amount_decimal``:
  0.00000000000001 USD is the finest price); ``flat_price``, ``base_fee`` and ``minimum``:
  whole minor units (Stripe's ``flat_amount`` is an integer). No amount is negative, and none
  is above 999,999,999,999 minor units.
- A plan has one currency; a price may repeat it (``currency:``) but not differ.

The **default plan** prices usage before a customer has any plan: the plan named by
``default_plan``, else a plan named ``default``, else the built-in free plan (named
``default``, no prices, no fee: that usage is metered and costs nothing).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)

from meterstream.errors import ConfigError
from meterstream.meters.config import (
    PYDANTIC_MESSAGES,
    duplicate_names,
    one_of,
    read_yaml_file,
    show_value,
    slug_check,
    validate_items,
)
from meterstream.pricing.money import ZERO, Currency, currency, plain, stripe_decimal_places
from meterstream.pricing.prices import (
    MAX_BOUND,
    Graduated,
    PerUnit,
    PriceModel,
    Tier,
    TransformQuantity,
    Volume,
    tier_problems,
)

BillingScheme = Literal["per_unit", "tiered"]
TiersMode = Literal["graduated", "volume"]
Round = Literal["up", "down"]

DEFAULT_PLAN_NAME: Final = "default"
MAX_UNIT_DECIMALS: Final = 12
"""Stripe's ``unit_amount_decimal``: at most 12 decimal places (in minor units)."""
MAX_MINOR_UNITS: Final = 10**12 - 1
"""Largest amount in minor units we accept for any price, fee or minimum."""

_NUMERIC = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class MeterNames(Protocol):
    """What :func:`load_plans` needs of a meters config (``MetersConfig`` has it)."""

    @property
    def meters(self) -> Sequence[Any]:  # each has a ``name``
        ...


class _Problems(ValueError):
    """Several problems found by one validator, each with a path relative to its model."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items
        super().__init__("; ".join(f"{path}: {message}" for path, message in items))


# -- field validators ------------------------------------------------------------------


def _show(value: Any) -> str:
    return show_value(value, width=60, sequence="a list")


def _check_amount(value: Any) -> Any:
    """A non-negative exact amount from an int, a Decimal or a numeric string."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"must be an amount (a number), not {_show(value)}")
    if isinstance(value, float):
        raise ValueError(f"{value!r} is a float; use a Decimal or a string for an exact amount")
    if isinstance(value, str) and _NUMERIC.fullmatch(value.strip()):
        value = Decimal(value.strip())
    if isinstance(value, int):
        value = Decimal(value)
    if not isinstance(value, Decimal):
        raise ValueError(f"must be an amount (a number), not {_show(value)}")
    if not value.is_finite():
        raise ValueError(f"must be a finite amount, not {value}")
    if value < 0:
        raise ValueError(f"must not be negative, not {value}")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if not value.is_zero() and (value.adjusted() >= 15 or exponent < -30):
        raise ValueError(f"{value} is out of range for an amount")
    return abs(value) if value.is_zero() else value  # -0 is 0


def _count(*, inf: bool) -> BeforeValidator:
    allowed = "a positive integer or 'inf'" if inf else "a positive integer"

    def check(value: Any) -> Any:
        if inf and (value == "inf" or (isinstance(value, Decimal) and value == Decimal("inf"))):
            return None
        if (
            isinstance(value, Decimal)
            and value.is_finite()
            and value.adjusted() < 19  # never build a huge int from 1E+999999999
            and value == value.to_integral()
        ):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BOUND:
            raise ValueError(f"must be {allowed}, not {_show(value)}")
        return value

    return BeforeValidator(check)


def _one_of(*allowed: str) -> BeforeValidator:
    return one_of(*allowed, show=_show)


_check_slug = slug_check("name", _show)


def _check_currency(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError(f"must be an ISO 4217 currency code such as usd, not {_show(value)}")
    return currency(value).code


Amount = Annotated[Decimal, BeforeValidator(_check_amount)]


def _check_limit(value: Any) -> Any:
    """A usage limit: a positive exact amount (zero would be a plan nobody can use)."""
    value = _check_amount(value)
    if value.is_zero():
        raise ValueError("must be positive, not 0")
    return value


Limit = Annotated[Decimal, BeforeValidator(_check_limit)]
Slug = Annotated[str, BeforeValidator(_check_slug)]
CurrencyCode = Annotated[str, BeforeValidator(_check_currency)]


# -- models --------------------------------------------------------------------------


class PlanTransform(BaseModel):
    """``transform_quantity``: ``divide_by`` (positive integer) and ``round`` (up | down)."""

    model_config = _FROZEN

    divide_by: Annotated[int, _count(inf=False)]
    round: Annotated[Round, _one_of(*get_args(Round))]


class PlanTier(BaseModel):
    """One tier: ``up_to`` (positive integer or ``inf``), ``unit_price``, ``flat_price``."""

    model_config = _FROZEN

    up_to: Annotated[int | None, _count(inf=True)]
    unit_price: Amount = ZERO
    flat_price: Amount = ZERO


_SCHEME_KEYS: Final = ("unit_price", "transform_quantity", "tiers_mode", "tiers")


def _scheme_problems(
    scheme: str, present: set[str], tiers: list[Tier] | None
) -> list[tuple[str, str]]:
    """The rules of ``billing_scheme`` (Stripe's): which keys each scheme needs and refuses,
    and the tier rules; ``present`` holds the keys of :data:`_SCHEME_KEYS` that are set."""
    problems: list[tuple[str, str]] = []
    if scheme == "per_unit":
        if "unit_price" not in present:
            problems.append(("unit_price", "required for billing_scheme 'per_unit'"))
        for key in ("tiers_mode", "tiers"):
            if key in present:
                problems.append(
                    (key, "only for billing_scheme 'tiered' (set billing_scheme: tiered)")
                )
        return problems
    if "tiers_mode" not in present:
        problems.append(("tiers_mode", "required for billing_scheme 'tiered'"))
    if "tiers" not in present:
        problems.append(("tiers", "required for billing_scheme 'tiered'"))
    elif tiers is not None:
        problems += [(f"tiers{path}", message) for path, message in tier_problems(tiers)]
    if "unit_price" in present:
        problems.append(("unit_price", "not for tiered prices: put it in the tiers"))
    if "transform_quantity" in present:
        problems.append(
            ("transform_quantity", "cannot be combined with tiers (Stripe does not allow it)")
        )
    return problems


def _raw_scheme_problems(data: Any, exc: ValidationError) -> list[tuple[str, str]]:
    """:func:`_scheme_problems` of a raw price mapping whose fields did not all validate,
    leaving out the fields already reported (their own error says more)."""
    if not isinstance(data, dict):
        return []
    scheme = data.get("billing_scheme", "per_unit")
    if scheme not in get_args(BillingScheme):
        return []
    reported = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
    present = {k for k in _SCHEME_KEYS if data.get(k) is not None}
    tiers = None
    raw_tiers = data.get("tiers")
    if "tiers" not in reported and isinstance(raw_tiers, list):
        try:
            tiers = [Tier(PlanTier.model_validate(t).up_to) for t in raw_tiers]
        except ValidationError:
            tiers = None
    return [
        (path, message)
        for path, message in _scheme_problems(scheme, present, tiers)
        if path.split("[")[0].split(".")[0] not in reported
    ]


class PlanPrice(BaseModel):
    """A plan's price for one meter; :attr:`model` is its pure price model."""

    model_config = _FROZEN

    meter: Slug
    billing_scheme: Annotated[BillingScheme, _one_of(*get_args(BillingScheme))] = "per_unit"
    currency: CurrencyCode | None = None
    unit_price: Amount | None = None
    transform_quantity: PlanTransform | None = None
    tiers_mode: Annotated[TiersMode | None, _one_of(*get_args(TiersMode))] = None
    tiers: tuple[PlanTier, ...] | None = None
    minimum: Amount | None = None

    @model_validator(mode="after")
    def _scheme(self) -> PlanPrice:
        tiers = None
        if self.tiers is not None:
            tiers = [Tier(t.up_to, t.unit_price, t.flat_price) for t in self.tiers]
        problems = _scheme_problems(
            self.billing_scheme,
            {k for k in _SCHEME_KEYS if getattr(self, k) is not None},
            tiers,
        )
        if problems:
            raise _Problems(problems)
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: ModelWrapValidatorHandler[PlanPrice]) -> PlanPrice:
        """When a field is invalid the scheme rules above never run; check them on the raw
        mapping then, so one run reports every problem (``plans check``)."""
        try:
            return handler(data)
        except ValidationError as exc:
            if any(not e["loc"] for e in exc.errors()):
                raise  # the scheme rules ran: every field was valid
            extra = _raw_scheme_problems(data, exc)
            if not extra:
                raise
            details: list[Any] = [
                {"type": e["type"], "loc": e["loc"], "input": e["input"], "ctx": e.get("ctx", {})}
                for e in exc.errors(include_url=False)
            ]
            details.append(
                {
                    "type": "value_error",
                    "loc": (),
                    "input": data,
                    "ctx": {"error": _Problems(extra)},
                }
            )
            raise ValidationError.from_exception_data(exc.title, details) from None

    @cached_property
    def model(self) -> PriceModel:
        """The pure price model (:class:`PerUnit`, :class:`Graduated` or :class:`Volume`)."""
        if self.billing_scheme == "per_unit":
            assert self.unit_price is not None
            transform = self.transform_quantity
            return PerUnit(
                self.unit_price,
                None
                if transform is None
                else TransformQuantity(transform.divide_by, transform.round),
            )
        assert self.tiers is not None
        tiers = tuple(Tier(t.up_to, t.unit_price, t.flat_price) for t in self.tiers)
        return Graduated(tiers) if self.tiers_mode == "graduated" else Volume(tiers)

    def unit_prices(self) -> list[tuple[str, Decimal]]:
        """Every per-unit price with its path (for the currency checks)."""
        if self.unit_price is not None:
            return [("unit_price", self.unit_price)]
        return [(f"tiers[{i}].unit_price", t.unit_price) for i, t in enumerate(self.tiers or ())]

    def flat_amounts(self) -> list[tuple[str, Decimal]]:
        """Every flat amount with its path: tier flat prices and the minimum."""
        found = [(f"tiers[{i}].flat_price", t.flat_price) for i, t in enumerate(self.tiers or ())]
        return found + ([("minimum", self.minimum)] if self.minimum is not None else [])


class Plan(BaseModel):
    """A plan: currency, optional base fee and minimum per period, one price per meter, and
    optional usage limits per meter and billing period (the UTC month).

    ``limits`` is a mapping ``{meter: positive amount}`` on the plan, not a field of a price:
    a free tier limits meters it does not price (``prices: []``, ``limits: {tokens: 10000}``).
    A customer on the plan has access until its usage of the period reaches a limit
    (``usage >= limit``; see :mod:`meterstream.credits.entitlements`).
    """

    model_config = _FROZEN

    name: Slug
    description: str | None = None
    currency: CurrencyCode
    base_fee: Amount = ZERO
    minimum: Amount | None = None
    prices: tuple[PlanPrice, ...] = ()
    limits: dict[Slug, Limit] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _amounts(self) -> Plan:
        money = self.money
        problems: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        flats = [("base_fee", self.base_fee)]
        flats += [("minimum", self.minimum)] if self.minimum is not None else []
        units: list[tuple[str, Decimal]] = []
        for i, price in enumerate(self.prices):
            if price.meter in seen:
                problems.append(
                    (
                        f"prices[{i}].meter",
                        f"{price.meter!r} is priced twice (also prices[{seen[price.meter]}])",
                    )
                )
            seen.setdefault(price.meter, i)
            if price.currency is not None and price.currency != money.code:
                problems.append(
                    (
                        f"prices[{i}].currency",
                        f"{price.currency!r} differs from the plan's {money.code!r}: "
                        "a plan's prices are in one currency",
                    )
                )
            flats += [(f"prices[{i}].{path}", amount) for path, amount in price.flat_amounts()]
            units += [(f"prices[{i}].{path}", amount) for path, amount in price.unit_prices()]
        problems += [(path, why) for path, amount in flats if (why := _flat_problem(amount, money))]
        problems += [(path, why) for path, amount in units if (why := _unit_problem(amount, money))]
        if problems:
            raise _Problems(problems)
        return self

    @property
    def money(self) -> Currency:
        """The plan's :class:`~meterstream.pricing.money.Currency`."""
        return currency(self.currency)

    def price_for(self, meter: str) -> PlanPrice | None:
        """The plan's price for ``meter``, or None if the plan does not price it."""
        return next((p for p in self.prices if p.meter == meter), None)

    @property
    def charges_nothing(self) -> bool:
        """No price, no base fee, no minimum: every invoice line would be absent."""
        return not self.prices and self.base_fee.is_zero() and self.minimum is None


class PlansConfig(BaseModel):
    """Every plan of a file (names unique) and which one is the default."""

    model_config = _FROZEN

    plans: tuple[Plan, ...] = Field(min_length=1)
    default_plan: Slug | None = None

    @cached_property
    def has_limits(self) -> bool:
        """Whether any plan sets a usage limit (else entitlements never need the plan)."""
        return any(plan.limits for plan in self.plans)

    @model_validator(mode="after")
    def _names(self) -> PlansConfig:
        problems = duplicate_names([p.name for p in self.plans], "plan")
        if self.default_plan is not None and self.default_plan not in self._by_name:
            problems.append(f"default_plan: no plan named {self.default_plan!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @cached_property
    def _by_name(self) -> dict[str, Plan]:
        return {plan.name: plan for plan in self.plans}

    def by_name(self, name: str) -> Plan:
        """The plan called ``name`` (the default plan's name included); ``KeyError`` if none."""
        if name == self.default.name:
            return self.default
        return self._by_name[name]

    @cached_property
    def default(self) -> Plan:
        """The plan for usage before any assignment (see the module docstring)."""
        name = self.default_plan or DEFAULT_PLAN_NAME
        if name in self._by_name:
            return self._by_name[name]
        return Plan(
            name=DEFAULT_PLAN_NAME,
            description="built-in free plan: usage before any plan is metered, not charged",
            currency=self.plans[0].currency,
        )


def _flat_problem(amount: Decimal, money: Currency) -> str | None:
    """Why a fee, a minimum or a flat price cannot be sent to Stripe in ``money``: not a
    whole number of minor units, or too large; ``None`` if it can."""
    code = money.code.upper()
    if not money.is_whole(amount):
        return f"{plain(amount)} is not a whole number of {code} minor units ({money.quantum})"
    if money.to_minor(amount) > MAX_MINOR_UNITS:
        return f"{plain(amount)} is too large (at most {MAX_MINOR_UNITS} {code} minor units)"
    return None


def _unit_problem(amount: Decimal, money: Currency) -> str | None:
    """Why a unit price cannot be sent to Stripe in ``money``: more decimal places in minor
    units than Stripe takes, or too large; ``None`` if it can."""
    code = money.code.upper()
    places = stripe_decimal_places(amount, money)
    if places > MAX_UNIT_DECIMALS:
        return (
            f"{plain(amount)} has {places} decimal places in {code} minor units; "
            f"Stripe allows at most {MAX_UNIT_DECIMALS}"
        )
    if money.to_stripe(amount) > MAX_MINOR_UNITS:
        return f"{plain(amount)} is too large (at most {MAX_MINOR_UNITS} {code} minor units)"
    return None


# -- loading -------------------------------------------------------------------------


def _problems(exc: ValidationError, prefix: str) -> list[str]:
    """``path: message`` lines for a pydantic error, expanding multi-problem validators."""
    lines = []
    for err in exc.errors(include_url=False):
        path = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        error = err.get("ctx", {}).get("error")
        if isinstance(error, _Problems):
            for sub, message in error.items:
                joint = "" if not sub or sub.startswith("[") else "."
                lines.append(f"{path}{joint}{sub}: {message}")
        elif err["type"] == "value_error":
            lines.append(f"{path}: {error}")
        else:
            lines.append(f"{path}: {PYDANTIC_MESSAGES.get(err['type'], err['msg'])}")
    return lines


def parse_plans(doc: Any, source: str = "plans", meters: MeterNames | None = None) -> PlansConfig:
    """Validate a decoded plans document; :class:`ConfigError` lists every problem.

    With ``meters`` (a ``MetersConfig``), every priced meter must be one of its meters.
    """
    problems: list[str] = []
    plans: list[Plan] = []
    default_plan: Any = None
    if not isinstance(doc, dict):
        problems.append("plans: required (the document must be a mapping with a 'plans' list)")
    else:
        problems += [f"{key}: unknown field" for key in doc if key not in ("plans", "default_plan")]
        plans, items, item_problems = validate_items(doc, "plans", "plan", Plan, _problems)
        problems += item_problems
        if items is not None:
            names = [item.get("name") if isinstance(item, dict) else None for item in items]
            default_plan = doc.get("default_plan")
            if default_plan is not None:
                try:
                    _check_slug(default_plan)
                    if default_plan not in names:
                        problems.append(f"default_plan: no plan named {default_plan!r}")
                except ValueError as exc:
                    problems.append(f"default_plan: {exc}")
            if meters is not None:
                problems += _unknown_meters(items, meters)
    if problems:
        raise ConfigError(problems, source=source)
    return PlansConfig(plans=tuple(plans), default_plan=default_plan)


def _unknown_meters(items: list[Any], meters: MeterNames) -> list[str]:
    known = {m.name for m in meters.meters}
    problems = []
    for i, item in enumerate(items):
        prices = item.get("prices") if isinstance(item, dict) else None
        for j, price in enumerate(prices if isinstance(prices, list) else []):
            name = price.get("meter") if isinstance(price, dict) else None
            if isinstance(name, str) and name not in known:
                problems.append(
                    f"plans[{i}].prices[{j}].meter: no meter named {name!r} in the meters file "
                    f"(meters: {', '.join(sorted(known))})"
                )
        limits = item.get("limits") if isinstance(item, dict) else None
        for name in limits if isinstance(limits, dict) else {}:
            if isinstance(name, str) and name not in known:
                problems.append(
                    f"plans[{i}].limits.{name}: no meter named {name!r} in the meters file "
                    f"(meters: {', '.join(sorted(known))})"
                )
    return problems


def free_plans(currency_code: str = "usd") -> PlansConfig:
    """The plans of a deployment without a plans file: the built-in free plan only."""
    return PlansConfig(plans=(Plan(name=DEFAULT_PLAN_NAME, currency=currency_code),))


def load_plans(path: str | Path, meters: MeterNames | None = None) -> PlansConfig:
    """Read, parse and validate a plans YAML file; :class:`ConfigError` on any problem."""
    return parse_plans(read_yaml_file(path), str(path), meters)
