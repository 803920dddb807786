"""Meter declarations (DESIGN.md, "Meters"): loading, validation and evaluation.

A meters file is YAML, ``{meters: [...]}``. :func:`load_meters` reports every
problem at once as a :class:`~meterstream.errors.ConfigError`, each prefixed with
its path (``meters[2].filters[0].operator: ...``).

YAML is read exactly: floats become ``Decimal`` from their text (``0.1`` is
``Decimal("0.1")``), and only ``true``/``false`` are booleans (YAML 1.2), so
``country: NO`` is the string ``"NO"``, not ``False``, and ``1e3`` is a number.

Paths are ``properties.<key>[.<key>...]`` (keys cannot contain dots) or one of
the top-level fields ``event_name``, ``customer_id``, ``idempotency_key``.

Evaluation semantics (the hot path; paths and filters are compiled once):

- **Missing and null are the same**: a property that is absent, or present with
  JSON ``null``, is *missing*. Every filter on a missing property is false
  except ``not_exists`` (true); ``exists`` is true iff present and not null.
  ``neq`` and ``not_in`` are "present and not equal": false when missing.
- **Equality** (eq, neq, in, not_in): numbers compare numerically (``1 == 1.0``);
  a numeric *string* in the event equals a *number* in the filter when it parses
  as a finite decimal (``"1.50"`` eq ``1.5``); a *string* in the filter only
  equals the same text in the event (``"1"`` does not equal the number ``1``);
  booleans only equal booleans; objects and arrays equal nothing.
- **Ordering** (gt, gte, lt, lte): with a number in the filter, the event value
  must be a number or a numeric string; with a string in the filter, a string
  (code point order). Anything else is false; booleans cannot be ordered (a
  config error).
- **Values** (sum, max, min, latest): an exact ``Decimal`` from a JSON number
  or a numeric string (``"12.5"``); booleans, NaN/Infinity, other strings,
  objects, arrays and missing values raise :class:`InvalidValue`, as do
  numbers with more than :data:`MAX_DIGITS` fractional digits and numbers whose
  magnitude reaches the meter's :attr:`Meter.limit` (see "Ranges").
- **unique_count** values are canonical strings: strings as-is, booleans
  ``"true"``/``"false"``, numbers as plain decimal text without exponent or
  trailing zeros (``1``, ``1.0`` and ``1E+0`` are all ``"1"``). So the number
  ``1`` and the string ``"1"`` count as one value (a user id sent either way
  counts once). Missing, objects and arrays raise :class:`InvalidValue`.
- **group_key** is canonical JSON of ``{path: value}``; missing values are
  ``null`` and values are kept as sent (``1`` and ``1.0`` are different groups).

Versions (README, "Meters that change"): a meter may list earlier definitions under
``versions``, oldest first, each valid until its ``effective_until`` (the first from the
beginning of time, each next from where the one before ends, the top-level definition
from the last ``effective_until`` on). :meth:`Meter.matches` and :meth:`Meter.extract`
use the definition valid at the event's timestamp, so every fold (the live batch, every
rebuild from the record) counts history with the definition of its time. A version
changes ``filters`` and ``value`` only; each ``effective_until`` is on a window boundary
of the meter, so every window has one definition.

Ranges (DESIGN.md: no value, and no combination of values, may leave what a
column or Stripe can hold). Every value of a sum/max/min/latest meter, every
window total of a sum meter, and for a sum meter with a ``stripe`` block and a
``group_by`` also the customer's window total over all its groups, stays strictly
within ``±limit``, where ``limit`` (:data:`COLUMN_LIMITS`, :data:`STRIPE_LIMITS`)
depends on the window size and on the ``stripe`` block:

- ``meter_windows.value`` and the period views are ``Decimal(38, 9)`` (|x| < 10^29),
  and ClickHouse adds decimals modulo 2^128 without an error, so a sum that left the
  type would be silently wrong. With every window within the column limit, the sum
  of one series' windows over a century fits: a view, a month, a usage query over
  any range of windows.
- Stripe's ledger (``stripe_meter_events.value``) is ``Int64``. A forwarded period
  total ``T`` is a month of windows, and a ``sum`` meter sends deltas
  ``round(T') - round(T)``, so ``|T|`` must stay below (2^63 - 1) / 2. With every
  customer window within the Stripe limit, a 31-day month of windows at the limit
  stays below it, and so does every delta.

The running totals are checked by :func:`meterstream.meters.fold.enforce_limits`, in
arrival order; an event that would take a total out of range is refused by that
meter (``invalid_value``) and the refusal is recorded with the event in the record.
"""

from __future__ import annotations

import operator
import re
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from meterstream.errors import ConfigError, InvalidValue
from meterstream.events import UsageEvent, canonical_json, parse_timestamp
from meterstream.meters.aggregation import EXACT, Aggregator, aggregator_for
from meterstream.meters.windows import WINDOW_MS
from meterstream.settings import Settings

Operator = Literal["in", "not_in", "eq", "neq", "gt", "gte", "lt", "lte", "exists", "not_exists"]
AggregationKind = Literal["sum", "count", "max", "min", "unique_count", "latest"]
WindowKind = Literal["minute", "hour", "day"]
Rounding = Literal["carry", "up", "down"]

TOP_LEVEL_PATHS: Final = ("event_name", "customer_id", "idempotency_key")
MAX_DIGITS: Final = 38
"""Meter values have at most this many fractional digits (and fewer integer digits: see
:data:`COLUMN_LIMITS`)."""

COLUMN_LIMITS: Final[dict[str, Decimal]] = {
    "minute": Decimal("1e21"),
    "hour": Decimal("1e23"),
    "day": Decimal("1e24"),
}
"""Per window size: values and window totals stay strictly within ±limit, so a century of
one series' windows sums within ``Decimal(38, 9)`` (module docstring, "Ranges")."""

STRIPE_LIMITS: Final[dict[str, Decimal]] = {
    "minute": Decimal("1e14"),
    "hour": Decimal("1e15"),
    "day": Decimal("1e17"),
}
"""Per window size, for meters with a ``stripe`` block: a 31-day month of customer windows
within ±limit keeps the period total and every delta within Int64."""

_VERSION_FIELD: Final = (
    "a version changes filters and value only (a meter with another event_name, "
    "aggregation, window, group_by or stripe block is a new meter)"
)
_MISSING: Final = object()
_ONE: Final = Decimal(1)
_SLUG = re.compile(r"[a-z][a-z0-9_]{0,62}")
_NUMERIC = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_ORDERING = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}

Getter = Callable[[UsageEvent], Any]
Predicate = Callable[[UsageEvent], bool]


# -- values ------------------------------------------------------------------


def show_value(value: Any, *, width: int = 80, sequence: str = "an array") -> str:
    """``value`` as an error message names it: short, and never a whole object or list."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return sequence
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


_show = show_value


def _number(value: Any) -> Decimal | None:
    """Exact finite decimal of an int, Decimal or numeric string; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, str) and _NUMERIC.fullmatch(value):
        return Decimal(value)
    return None


def _meter_number(value: Any) -> Decimal:
    """A value for sum/max/min/latest; ``ValueError`` saying what is wrong with it."""
    number = _number(value)
    if number is None:
        if value is _MISSING:
            raise ValueError("is missing")
        if value is None:
            raise ValueError("is null")
        raise ValueError(f"is not a number: {_show(value)}")
    if number.adjusted() >= MAX_DIGITS or (
        type(value) is not int and int(number.as_tuple().exponent) < -MAX_DIGITS  # an int's is 0
    ):
        raise ValueError(f"is out of range (at most {MAX_DIGITS} digits each side of the point)")
    return number


def _canonical(value: Any) -> str:
    """A unique_count value: strings as-is, booleans true/false, numbers normalised."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        number = _meter_number(value)
        return "0" if number.is_zero() else format(number.normalize(EXACT), "f")
    if value is _MISSING:
        raise ValueError("is missing")
    if value is None:
        raise ValueError("is null")
    raise ValueError(f"is not a single value: {_show(value)}")


# -- paths -------------------------------------------------------------------


def _check_path(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if value in TOP_LEVEL_PATHS:
            return value
        head, _, rest = value.partition(".")
        if head == "properties" and rest and all(rest.split(".")):
            return value
    raise ValueError(
        f"{_show(value)} is not a valid path: use 'properties.<name>' (nested: "
        f"'properties.<name>.<name>') or one of {', '.join(TOP_LEVEL_PATHS)}"
    )


def compile_path(path: str) -> Getter:
    """A function returning the value at ``path`` in an event, or a missing marker."""
    if path in TOP_LEVEL_PATHS:
        return operator.attrgetter(path)
    keys = tuple(path.split(".")[1:])
    if len(keys) == 1:
        key = keys[0]
        return lambda event: event.properties.get(key, _MISSING)

    def nested(event: UsageEvent) -> Any:
        node: Any = event.properties
        for key in keys:
            if not isinstance(node, dict):
                return _MISSING
            node = node.get(key, _MISSING)
        return node

    return nested


def _present(value: Any) -> bool:
    return value is not None and value is not _MISSING


# -- validators ----------------------------------------------------------------


def one_of(*allowed: str, show: Callable[[Any], str] = show_value) -> BeforeValidator:
    """A validator: the value is one of ``allowed`` (strings)."""

    def check(value: Any) -> Any:
        if not (isinstance(value, str) and value in allowed):
            raise ValueError(f"{show(value)} is not one of {', '.join(allowed)}")
        return value

    return BeforeValidator(check)


_one_of = one_of


def _text(limit: int) -> BeforeValidator:
    def check(value: Any) -> Any:
        if not isinstance(value, str) or not 1 <= len(value) <= limit:
            raise ValueError(f"must be a string of 1-{limit} characters")
        return value

    return BeforeValidator(check)


def slug_check(what: str, show: Callable[[Any], str] = show_value) -> Callable[[Any], Any]:
    """A check that a value is a slug (a meter's or a plan's name); ``what`` names it."""

    def check(value: Any) -> Any:
        if not (isinstance(value, str) and _SLUG.fullmatch(value)):
            raise ValueError(
                f"{show(value)} is not a valid {what}: lowercase letters, digits and "
                "underscores, starting with a letter, at most 63 characters"
            )
        return value

    return check


_check_slug = slug_check("meter name")


def parse_duration(value: Any, *, minimum: int = 0) -> int:
    """Seconds of an int or a string like ``"30s"``, ``"5m"``, ``"1h"``, ``"1d"``."""
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is not None:
        seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    else:
        raise ValueError(
            f"{_show(value)} is not a duration: use seconds (30) or '30s', '5m', '1h', '1d'"
        )
    if seconds < minimum:
        raise ValueError("must not be negative" if minimum == 0 else f"must be at least {minimum}s")
    return seconds


def _duration(minimum: int) -> BeforeValidator:
    def check(value: Any) -> Any:
        parse_duration(value, minimum=minimum)
        return value

    return BeforeValidator(check)


def _check_scalar(value: Any) -> Any:
    if isinstance(value, float):
        raise ValueError(f"{value!r} is a float; use Decimal or str for an exact number")
    if isinstance(value, Decimal) and not value.is_finite():
        raise ValueError(f"{value} is not a finite number")
    if not isinstance(value, str | int | Decimal):  # bool is an int
        raise ValueError(f"must be a string, number or boolean, not {_show(value)}")
    return value


def _check_customer_source(value: Any) -> Any:
    """``"mapping"`` (the operator's customer mapping, the default) or a dotted path into
    the event (opt-in; pinned: see pipeline/billing/stripe_ids.py)."""
    if value == "mapping":
        return value
    if value is None:
        raise ValueError(
            "must be 'mapping' or a dotted path such as 'properties.stripe_customer_id'"
        )
    return _check_path(value)


DottedPath = Annotated[str, BeforeValidator(_check_path)]
OptionalPath = Annotated[str | None, BeforeValidator(_check_path)]
Duration = Annotated[int | str, _duration(0)]
Interval = Annotated[int | str, _duration(1)]
_FROZEN = ConfigDict(frozen=True, extra="forbid")


# -- filters -------------------------------------------------------------------


class _Matcher:
    """Membership under the equality rule of the module docstring."""

    __slots__ = ("bools", "numbers", "strings")

    def __init__(self, values: tuple[Any, ...]) -> None:
        self.bools = frozenset(v for v in values if isinstance(v, bool))
        self.strings = frozenset(v for v in values if isinstance(v, str))
        self.numbers = frozenset(
            Decimal(v) for v in values if isinstance(v, int | Decimal) and not isinstance(v, bool)
        )

    def __call__(self, value: Any) -> bool:
        if isinstance(value, str):
            if value in self.strings:
                return True
            if not self.numbers:
                return False
        elif isinstance(value, bool):
            return value in self.bools
        number = _number(value)
        return number is not None and number in self.numbers


def _value_test(op: str, value: Any) -> Callable[[Any], bool]:
    """The test a present event value must pass for ``op`` against the filter ``value``."""
    if op in ("eq", "neq", "in", "not_in"):
        matcher = _Matcher(value if op in ("in", "not_in") else (value,))
        if op in ("eq", "in"):
            return matcher
        return lambda v: not matcher(v)
    compare = _ORDERING[op]
    if isinstance(value, str):
        return lambda v: isinstance(v, str) and compare(v, value)
    target = Decimal(value)

    def numeric(v: Any) -> bool:
        number = _number(v)
        return number is not None and compare(number, target)

    return numeric


class Filter(BaseModel):
    """``{property, operator, value}``; see the module docstring for the semantics.

    ``value`` is required (a list for in/not_in) except for exists/not_exists,
    where it must be absent; an explicit ``value: null`` counts as absent.
    """

    model_config = _FROZEN

    property: DottedPath
    operator: Annotated[Operator, _one_of(*get_args(Operator))]
    value: Any = Field(default=None, validate_default=True)

    @field_validator("value")
    @classmethod
    def _value_for_operator(cls, value: Any, info: ValidationInfo) -> Any:
        op = info.data.get("operator")
        if op is None:  # the operator is invalid and reported on its own
            return value
        if op in ("exists", "not_exists"):
            if value is not None:
                raise ValueError(f"must be absent for operator '{op}'")
            return None
        if value is None:
            raise ValueError(f"required for operator '{op}'")
        if op in ("in", "not_in"):
            if not isinstance(value, list | tuple) or not value:
                raise ValueError(f"must be a non-empty list for operator '{op}'")
            for item in value:
                _check_scalar(item)
            return tuple(value)
        if isinstance(value, list | tuple | dict):
            raise ValueError(f"must be a single string, number or boolean for operator '{op}'")
        _check_scalar(value)
        if isinstance(value, bool) and op in _ORDERING:
            raise ValueError(f"a boolean cannot be compared with '{op}'; use eq, neq, in or not_in")
        return value

    @cached_property
    def _predicate(self) -> Predicate:
        get = compile_path(self.property)
        if self.operator == "exists":
            return lambda event: _present(get(event))
        if self.operator == "not_exists":
            return lambda event: not _present(get(event))
        test = _value_test(self.operator, self.value)

        def predicate(event: UsageEvent) -> bool:
            v = get(event)
            return v is not None and v is not _MISSING and test(v)

        return predicate

    def model_post_init(self, context: Any, /) -> None:
        self._predicate  # noqa: B018 - compile once, at construction

    def holds(self, event: UsageEvent) -> bool:
        """Whether the filter holds for ``event``."""
        return self._predicate(event)


# -- meters ------------------------------------------------------------------


class StripeBlock(BaseModel):
    """How a meter is forwarded to a Stripe Billing meter."""

    model_config = _FROZEN

    event_name: Annotated[str, _text(100)]
    customer_key: Annotated[str, _text(100)] = "stripe_customer_id"
    value_key: Annotated[str, _text(100)] = "value"
    interval: Interval = "1h"
    # Which Stripe customer pays: the operator's mapping by default, never event content
    # unless asked for (a property is pinned per customer: pipeline/billing/stripe_ids.py).
    customer_id_from: Annotated[str, BeforeValidator(_check_customer_source)] = "mapping"
    rounding: Annotated[Rounding, _one_of(*get_args(Rounding))] = "carry"
    grace: Duration = "5m"

    @property
    def interval_seconds(self) -> int:
        return parse_duration(self.interval, minimum=1)

    @property
    def grace_seconds(self) -> int:
        return parse_duration(self.grace)


@dataclass(frozen=True, slots=True)
class _Definition:
    """What a version of a meter decides per event: its filters and its value path."""

    filters: tuple[Predicate, ...]
    value: Getter | None
    value_path: str | None


@dataclass(frozen=True, slots=True)
class _Compiled:
    filters: tuple[Predicate, ...]
    value: Getter | None
    group_by: tuple[tuple[str, Getter], ...]
    window_ms: int
    limit: Decimal
    # earlier versions: their ``effective_until`` (epoch ms, ascending) and definitions
    until_ms: tuple[int, ...]
    earlier: tuple[_Definition, ...]


def _instant(value: Any) -> int:
    """Epoch ms of an RFC 3339 time with an offset (YAML reads one as a datetime)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{value.isoformat()} has no UTC offset: write it with Z")
        return parse_timestamp(value.isoformat())
    if isinstance(value, str):
        return parse_timestamp(value)
    raise ValueError(
        f"{_show(value)} is not a time: use RFC 3339 with an offset, e.g. 2026-12-01T00:00:00Z"
    )


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


class PathProblems(ValueError):
    """Several problems of one field, each at a path below it (``[1].effective_until``);
    a config file's problem list shows each with its full path."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))


class MeterVersion(BaseModel):
    """An earlier definition of a meter, valid for events before ``effective_until``
    (and at or after the previous version's ``effective_until``). A version changes
    what counts (``filters``) and what is counted (``value``) only: the series
    (event name, aggregation, window, groups) and its forwarding stay the meter's, as
    the windows, their ranges and Stripe's meter are one series over time."""

    model_config = _FROZEN

    effective_until: Annotated[int, BeforeValidator(_instant)]
    value: OptionalPath = None
    filters: tuple[Filter, ...] = ()
    description: str | None = None

    @property
    def effective_until_text(self) -> str:
        return _iso(self.effective_until)


class Meter(BaseModel):
    """One meter; :meth:`matches`, :meth:`extract`, :meth:`group_key` are the hot path."""

    model_config = _FROZEN

    name: Annotated[str, BeforeValidator(_check_slug)]
    event_name: Annotated[str, _text(100)]
    aggregation: Annotated[AggregationKind, _one_of(*get_args(AggregationKind))]
    value: OptionalPath = Field(default=None, validate_default=True)
    group_by: tuple[DottedPath, ...] = ()
    filters: tuple[Filter, ...] = ()
    window: Annotated[WindowKind, _one_of(*get_args(WindowKind))] = "hour"
    description: str | None = None
    unit: str | None = None
    stripe: StripeBlock | None = None
    versions: tuple[MeterVersion, ...] = ()

    @field_validator("value")
    @classmethod
    def _value_for_aggregation(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("aggregation")
        if kind == "count" and value is not None:
            raise ValueError("must be absent for aggregation 'count'")
        if kind not in (None, "count") and value is None:
            raise ValueError(f"required for aggregation '{kind}'")
        return value

    @field_validator("group_by")
    @classmethod
    def _distinct_group_by(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise ValueError(f"duplicate path(s): {', '.join(repeated)}")
        return paths

    @field_validator("versions", mode="before")
    @classmethod
    def _versions_in_order(cls, versions: Any, info: ValidationInfo) -> Any:
        """Each version valid on its own, ending after the one before (no overlap; no gap
        by construction: a version starts where the one before ends) and on a window
        boundary, with a value exactly when the aggregation needs one. Every problem of
        every version is reported, each with its path."""
        if not isinstance(versions, list | tuple):
            return versions  # pydantic says what is wrong with it
        kind, window = info.data.get("aggregation"), info.data.get("window")
        problems: list[tuple[str, str]] = []
        parsed: list[MeterVersion] = []
        previous: tuple[int, MeterVersion] | None = None
        for i, item in enumerate(versions):
            at = f"[{i}]"
            try:
                version = MeterVersion.model_validate(item)
            except ValidationError as exc:
                for line in _problems(exc, at):
                    path, _, message = line.partition(": ")
                    field = path.rpartition(".")[2]
                    if message == "unknown field" and field in cls.model_fields:
                        message = f"unknown field: {_VERSION_FIELD}"
                    problems.append((path, message))
                continue
            parsed.append(version)
            if kind == "count" and version.value is not None:
                problems.append((f"{at}.value", "must be absent for aggregation 'count'"))
            if kind not in (None, "count") and version.value is None:
                problems.append((f"{at}.value", f"required for aggregation '{kind}'"))
            until = version.effective_until
            if window in WINDOW_MS and until % WINDOW_MS[window]:
                problems.append(
                    (
                        f"{at}.effective_until",
                        f"{version.effective_until_text} is not a window boundary of this "
                        f"meter ({window} windows): a version ends where a window ends, so "
                        "every window has one definition",
                    )
                )
            if previous is not None and until <= previous[1].effective_until:
                problems.append(
                    (
                        f"{at}.effective_until",
                        f"{version.effective_until_text} must be after versions[{previous[0]}]'s "
                        f"{previous[1].effective_until_text} (versions are listed oldest "
                        "first and cannot overlap)",
                    )
                )
            previous = (i, version)
        if problems:
            raise PathProblems(problems)
        return tuple(parsed)

    @cached_property
    def _compiled(self) -> _Compiled:
        return _Compiled(
            filters=tuple(f._predicate for f in self.filters),
            value=None if self.value is None else compile_path(self.value),
            group_by=tuple((path, compile_path(path)) for path in sorted(self.group_by)),
            window_ms=WINDOW_MS[self.window],
            limit=(STRIPE_LIMITS if self.stripe is not None else COLUMN_LIMITS)[self.window],
            until_ms=tuple(v.effective_until for v in self.versions),
            earlier=tuple(
                _Definition(
                    filters=tuple(f._predicate for f in v.filters),
                    value=None if v.value is None else compile_path(v.value),
                    value_path=v.value,
                )
                for v in self.versions
            ),
        )

    def _definition(self, timestamp_ms: int) -> _Definition | None:
        """The earlier version valid at ``timestamp_ms``; None for the current one."""
        compiled = self._compiled
        i = bisect_right(compiled.until_ms, timestamp_ms)
        return compiled.earlier[i] if i < len(compiled.earlier) else None

    @property
    def effective_from_ms(self) -> int | None:
        """When the current definition starts (the last version's end); None: always."""
        return self.versions[-1].effective_until if self.versions else None

    def definition_at(self, timestamp_ms: int) -> tuple[tuple[Filter, ...], str | None]:
        """The filters and value path that decide for an event at ``timestamp_ms``."""
        i = bisect_right(self._compiled.until_ms, timestamp_ms)
        if i < len(self.versions):
            return self.versions[i].filters, self.versions[i].value
        return self.filters, self.value

    def model_post_init(self, context: Any, /) -> None:
        self._compiled  # noqa: B018 - compile once, at construction

    @property
    def limit(self) -> Decimal:
        """Values and totals of this meter stay strictly within ±limit (module docstring)."""
        return self._compiled.limit

    @property
    def guards_customer_total(self) -> bool:
        """Whether the customer's window total over all groups is range-checked too: a
        sum meter forwarded to Stripe (which bills all groups together) with groups."""
        return self.aggregation == "sum" and self.stripe is not None and bool(self.group_by)

    def range_problem(self, value: Decimal) -> str | None:
        """Why ``value`` cannot be a value or total of this meter, or None when it can."""
        limit = self._compiled.limit
        if value.copy_abs() < limit:
            return None
        return f"is out of range: {self.range_text()}"

    def range_text(self) -> str:
        """``values and totals of this meter (hour windows, ...) stay within ±10^23``."""
        why = f"{self.window} windows" + (", forwarded to Stripe" if self.stripe else "")
        return (
            f"values and totals of this meter ({why}) stay strictly within "
            f"±10^{self._compiled.limit.adjusted()}"
        )

    def matches(self, event: UsageEvent) -> bool:
        """The event has this meter's event name and every filter holds, of the
        definition valid at the event's time (:attr:`versions`)."""
        if event.event_name != self.event_name:
            return False
        compiled = self._compiled
        filters = compiled.filters
        if compiled.until_ms:
            earlier = self._definition(event.timestamp_ms)
            if earlier is not None:
                filters = earlier.filters
        for predicate in filters:  # noqa: SIM110 - a loop beats all(genexpr)
            if not predicate(event):
                return False
        return True

    def extract(self, event: UsageEvent) -> Decimal | str:
        """The event's value for this meter, read with the definition valid at the
        event's time; :class:`InvalidValue` if it has none."""
        if self.aggregation == "count":
            return _ONE
        compiled = self._compiled
        getter, path = compiled.value, self.value
        if compiled.until_ms:
            earlier = self._definition(event.timestamp_ms)
            if earlier is not None:
                getter, path = earlier.value, earlier.value_path
        assert getter is not None  # guaranteed by validation: only count has no value
        raw = getter(event)
        try:
            if self.aggregation == "unique_count":
                return _canonical(raw)
            number = _meter_number(raw)
        except ValueError as exc:
            parsed = _number(raw)  # too many digits: say which range it is out of
            problem = None if parsed is None else self.range_problem(parsed)
            raise InvalidValue(
                f"meter {self.name!r}: {path} "
                + (str(exc) if problem is None else f"{_show(raw)} {problem}")
            ) from None
        if number.copy_abs() >= compiled.limit:
            problem = self.range_problem(number)
            raise InvalidValue(f"meter {self.name!r}: {path} {_show(raw)} {problem}")
        return number

    def group_key(self, event: UsageEvent) -> str:
        """Canonical JSON of ``{path: value}`` over ``group_by`` (missing -> null)."""
        getters = self._compiled.group_by
        if not getters:
            return "{}"
        values = {}
        for path, get in getters:
            v = get(event)
            values[path] = None if v is _MISSING else v
        return canonical_json(values)

    def window_bounds(self, timestamp_ms: int) -> tuple[int, int]:
        """UTC tumbling window ``[start, end)`` in epoch ms holding ``timestamp_ms``."""
        size = self._compiled.window_ms
        start = timestamp_ms - timestamp_ms % size
        return start, start + size


class MetersConfig(BaseModel):
    """Every meter of a file; names are unique."""

    model_config = _FROZEN

    meters: tuple[Meter, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> MetersConfig:
        problems = duplicate_names([m.name for m in self.meters])
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @cached_property
    def _by_event(self) -> dict[str, tuple[Meter, ...]]:
        grouped: dict[str, list[Meter]] = {}
        for meter in self.meters:
            grouped.setdefault(meter.event_name, []).append(meter)
        return {name: tuple(meters) for name, meters in grouped.items()}

    @cached_property
    def _by_name(self) -> dict[str, Meter]:
        return {meter.name: meter for meter in self.meters}

    @cached_property
    def aggregators(self) -> dict[str, Aggregator]:
        """Each meter's aggregator, by meter name."""
        return {meter.name: aggregator_for(meter.aggregation) for meter in self.meters}

    def model_post_init(self, context: Any, /) -> None:
        self._by_event  # noqa: B018 - index once, at construction
        self._by_name  # noqa: B018
        self.aggregators  # noqa: B018

    def for_event_name(self, name: str) -> tuple[Meter, ...]:
        """Meters reading events named ``name``, in file order (empty if none)."""
        return self._by_event.get(name, ())

    def by_name(self, name: str) -> Meter:
        """The meter called ``name``; ``KeyError`` if there is none."""
        return self._by_name[name]


def duplicate_names(names: list[Any], kind: str = "meter") -> list[str]:
    """``{kind}s[i].name: duplicate ...`` for every string name seen at an earlier index
    (a config file's list of meters, plans, ...)."""
    first: dict[str, int] = {}
    problems = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            continue
        if name in first:
            problems.append(
                f"{kind}s[{i}].name: duplicate {kind} name {name!r} (also {kind}s[{first[name]}])"
            )
        else:
            first[name] = i
    return problems


# -- loading -----------------------------------------------------------------


class _ExactLoader(yaml.SafeLoader):
    """SafeLoader with exact Decimal floats, YAML 1.2 booleans (true/false) and ``1e3``."""


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    text = str(loader.construct_scalar(node)).replace("_", "")
    if _NUMERIC.fullmatch(text):
        return Decimal(text)
    return Decimal(repr(loader.construct_yaml_float(node)))  # .inf, .nan, base 60


_ExactLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ExactLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ExactLoader.add_implicit_resolver(  # YAML 1.2 also reads 1e3 (no dot) as a number
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
_ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


def yaml_load_exact(text: str) -> Any:
    """Parse YAML with exact decimals; raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_ExactLoader)  # a SafeLoader subclass: safe


PYDANTIC_MESSAGES = {  # a pydantic error type, as a config file's problem list says it
    "missing": "required",
    "extra_forbidden": "unknown field",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
}


def _problems(exc: ValidationError, prefix: str) -> list[str]:
    """``path: message`` lines for a pydantic error, the path built from each ``loc``."""
    lines = []
    for err in exc.errors(include_url=False):
        path = prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        error = err.get("ctx", {}).get("error")
        if err["type"] == "value_error" and isinstance(error, PathProblems):
            lines += [f"{path}{below}: {message}" for below, message in error.problems]
            continue
        if err["type"] == "value_error":
            message = str(err["ctx"]["error"])
        else:
            message = PYDANTIC_MESSAGES.get(err["type"], err["msg"])
        lines.append(f"{path}: {message}")
    return lines


ModelT = TypeVar("ModelT", bound=BaseModel)


def validate_items(
    doc: dict[str, Any],
    key: str,
    kind: str,
    model: type[ModelT],
    problems_of: Callable[[ValidationError, str], list[str]] = _problems,
) -> tuple[list[ModelT], list[Any] | None, list[str]]:
    """``doc[key]``, a config file's list of ``kind`` mappings, validated item by item with
    ``model``: the valid items, the raw list (``None`` when there is no usable list) and
    every problem (the list missing, not a list or empty; an item not a mapping or
    invalid, its lines from ``problems_of``; a duplicate name)."""
    problems: list[str] = []
    parsed: list[ModelT] = []
    items = doc.get(key)
    if key not in doc:
        problems.append(f"{key}: required")
    elif not isinstance(items, list):
        problems.append(f"{key}: must be a list of {key}")
    elif not items:
        problems.append(f"{key}: at least one {kind} is required")
    else:
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                problems.append(f"{key}[{i}]: must be a mapping")
                continue
            try:
                parsed.append(model.model_validate(item))
            except ValidationError as exc:
                problems += problems_of(exc, f"{key}[{i}]")
        names = [item.get("name") if isinstance(item, dict) else None for item in items]
        return parsed, items, problems + duplicate_names(names, kind)
    return parsed, None, problems


def parse_meters(doc: Any, source: str = "meters") -> MetersConfig:
    """Validate a decoded meters document; :class:`ConfigError` lists every problem."""
    problems: list[str] = []
    meters: list[Meter] = []
    if not isinstance(doc, dict):
        problems.append("meters: required (the document must be a mapping with a 'meters' list)")
    else:
        problems += [f"{key}: unknown field" for key in doc if key != "meters"]
        meters, _, item_problems = validate_items(doc, "meters", "meter", Meter)
        problems += item_problems
    if problems:
        raise ConfigError(problems, source=source)
    return MetersConfig(meters=tuple(meters))


def read_yaml_file(path: str | Path) -> Any:
    """The document of a YAML config file, numbers exact (:func:`yaml_load_exact`);
    :class:`ConfigError` (source: the path) when it cannot be read or is not YAML."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["file not found"], source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read file: {exc}"], source=source) from None
    try:
        return yaml_load_exact(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"YAML syntax error{where}: {detail}"], source=source) from None


def load_meters(path: str | Path) -> MetersConfig:
    """Read, parse and validate a meters YAML file; :class:`ConfigError` on any problem."""
    return parse_meters(read_yaml_file(path), str(path))


DEFAULT_METERS_FILE = Path("meters.example.yaml")


def meters_path(settings: Settings) -> Path:
    path = settings.meters_file or DEFAULT_METERS_FILE
    if not path.exists():
        raise ConfigError(
            [f"meters file {path} not found (set --meters or METERSTREAM_METERS_FILE)"],
            source="meters",
        )
    return path
