"""Pure, mergeable aggregations over one window (DESIGN.md, "Meters").

Every aggregation shares one state type, :class:`WindowState`, and one
interface, :class:`Aggregator` (``start / add / merge / result`` plus
``dump / load`` for stores and sinks). All of them are order-insensitive and
mergeable: ``merge(aggregate(A), aggregate(B)) == aggregate(A + B)`` for
disjoint event sets A and B, down to the decimal text, so a window total does
not depend on arrival order or on how the events were split across workers.

Semantics:

- ``count``: ``event_count``; the value is ignored.
- ``sum``: exact decimal sum (:data:`EXACT`, 100 digits: meter values are
  bounded, see ``meterstream.meters.config``, so no sum is ever rounded); empty -> 0.
- ``max`` / ``min``: the greatest / least value. Numerically equal values with
  different text (``1.0`` vs ``1``) are ordered by ``Decimal.compare_total`` so
  the kept text does not depend on arrival order either.
- ``unique_count``: number of distinct canonical strings (``Meter.extract``).
- ``latest``: the value of the event with the greatest
  ``(timestamp_ms, idempotency_key.encode())``; a full tie (only possible for
  the same event, which dedup removes) keeps the greater value.
- ``result`` of a state with no events is ``Decimal(0)`` for every kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Context, Decimal
from typing import Any, ClassVar

EXACT = Context(prec=100)
"""Arithmetic context for meter values: wide enough that sums are never rounded."""

_ZERO = Decimal(0)


@dataclass(slots=True)
class WindowState:
    """Running state of one (meter, customer, group, window); same shape for every kind."""

    event_count: int = 0
    value: Decimal | None = None  # running sum / max / min / latest value
    distinct: set[str] | None = None  # unique_count: canonical values
    latest_ts: int = -1  # latest: event timestamp ms of the winning event
    latest_key: str = ""  # latest: idempotency key of the winning event (byte order tie-break)


def _decimal(value: Decimal | str) -> Decimal:
    if not isinstance(value, Decimal):
        raise TypeError(f"numeric aggregation needs a Decimal, got {type(value).__name__}")
    return value


class Aggregator(ABC):
    """One aggregation kind. ``add`` may mutate its state; ``merge`` never mutates."""

    kind: ClassVar[str]

    def start(self) -> WindowState:
        return WindowState()

    @abstractmethod
    def add(
        self, state: WindowState, value: Decimal | str, timestamp_ms: int, idempotency_key: str
    ) -> WindowState:
        """Fold one (deduplicated) event's extracted value into ``state`` and return it."""

    @abstractmethod
    def merge(self, a: WindowState, b: WindowState) -> WindowState:
        """A new state equal to aggregating the events of ``a`` and ``b`` together."""

    @abstractmethod
    def result(self, state: WindowState) -> Decimal:
        """The meter value of the state (``Decimal(0)`` when no event was added)."""

    def dump(self, state: WindowState) -> dict[str, Any]:
        """JSON-safe form: decimals as strings, the distinct set as a sorted list."""
        return {
            "event_count": state.event_count,
            "value": None if state.value is None else str(state.value),
            "distinct": None if state.distinct is None else sorted(state.distinct),
            "latest_ts": state.latest_ts,
            "latest_key": state.latest_key,
        }

    def load(self, data: dict[str, Any]) -> WindowState:
        """Inverse of :meth:`dump`."""
        value, distinct = data.get("value"), data.get("distinct")
        return WindowState(
            event_count=int(data.get("event_count", 0)),
            value=None if value is None else Decimal(value),
            distinct=None if distinct is None else set(distinct),
            latest_ts=int(data.get("latest_ts", -1)),
            latest_key=str(data.get("latest_key", "")),
        )


class CountAggregator(Aggregator):
    kind = "count"

    def add(
        self, state: WindowState, value: Decimal | str, timestamp_ms: int, idempotency_key: str
    ) -> WindowState:
        state.event_count += 1
        return state

    def merge(self, a: WindowState, b: WindowState) -> WindowState:
        return WindowState(event_count=a.event_count + b.event_count)

    def result(self, state: WindowState) -> Decimal:
        return Decimal(state.event_count)


class _ValueAggregator(Aggregator):
    """An aggregation of decimal values: each counted, then folded in by :meth:`fold`;
    the result is the state's value (0 for none)."""

    def add(
        self, state: WindowState, value: Decimal | str, timestamp_ms: int, idempotency_key: str
    ) -> WindowState:
        number = _decimal(value)
        state.event_count += 1
        self.fold(state, number, timestamp_ms, idempotency_key)
        return state

    @abstractmethod
    def fold(self, state: WindowState, number: Decimal, timestamp_ms: int, key: str) -> None:
        """Fold one event's value (already counted) into ``state``."""

    def result(self, state: WindowState) -> Decimal:
        return _ZERO if state.value is None else state.value


class SumAggregator(_ValueAggregator):
    kind = "sum"

    def fold(self, state: WindowState, number: Decimal, timestamp_ms: int, key: str) -> None:
        state.value = number if state.value is None else EXACT.add(state.value, number)

    def merge(self, a: WindowState, b: WindowState) -> WindowState:
        if a.value is None or b.value is None:
            value = a.value if b.value is None else b.value
        else:
            value = EXACT.add(a.value, b.value)
        return WindowState(event_count=a.event_count + b.event_count, value=value)


class _ExtremumAggregator(_ValueAggregator):
    """max (``sign = 1``) or min (``sign = -1``) under ``Decimal.compare_total``."""

    sign: ClassVar[int]

    def _wins(self, candidate: Decimal, current: Decimal | None) -> bool:
        return current is None or int(candidate.compare_total(current)) * self.sign > 0

    def fold(self, state: WindowState, number: Decimal, timestamp_ms: int, key: str) -> None:
        if self._wins(number, state.value):
            state.value = number

    def merge(self, a: WindowState, b: WindowState) -> WindowState:
        value = b.value if b.value is not None and self._wins(b.value, a.value) else a.value
        return WindowState(event_count=a.event_count + b.event_count, value=value)


class MaxAggregator(_ExtremumAggregator):
    kind = "max"
    sign = 1


class MinAggregator(_ExtremumAggregator):
    kind = "min"
    sign = -1


class UniqueCountAggregator(Aggregator):
    kind = "unique_count"

    def add(
        self, state: WindowState, value: Decimal | str, timestamp_ms: int, idempotency_key: str
    ) -> WindowState:
        if not isinstance(value, str):
            raise TypeError(f"unique_count needs a canonical string, got {type(value).__name__}")
        state.event_count += 1
        if state.distinct is None:
            state.distinct = set()
        state.distinct.add(value)
        return state

    def merge(self, a: WindowState, b: WindowState) -> WindowState:
        if a.distinct is None or b.distinct is None:
            either = a.distinct if b.distinct is None else b.distinct
            distinct = None if either is None else set(either)  # a copy: add() mutates
        else:
            distinct = a.distinct | b.distinct  # a new set; day windows hold hundreds
        return WindowState(event_count=a.event_count + b.event_count, distinct=distinct)

    def result(self, state: WindowState) -> Decimal:
        return Decimal(len(state.distinct or ()))


def _later(ts: int, key: str, value: Decimal, than: WindowState) -> bool:
    """Whether (ts, key bytes, value) beats the current winner of a ``latest`` state."""
    if than.value is None:
        return True
    if ts != than.latest_ts:
        return ts > than.latest_ts
    if key != than.latest_key:
        return key.encode() > than.latest_key.encode()
    return value.compare_total(than.value) > 0


class LatestAggregator(_ValueAggregator):
    kind = "latest"

    def fold(self, state: WindowState, number: Decimal, timestamp_ms: int, key: str) -> None:
        if _later(timestamp_ms, key, number, state):
            state.value = number
            state.latest_ts = timestamp_ms
            state.latest_key = key

    def merge(self, a: WindowState, b: WindowState) -> WindowState:
        winner = b if b.value is not None and _later(b.latest_ts, b.latest_key, b.value, a) else a
        return WindowState(
            event_count=a.event_count + b.event_count,
            value=winner.value,
            latest_ts=winner.latest_ts,
            latest_key=winner.latest_key,
        )


_AGGREGATORS: dict[str, Aggregator] = {
    agg.kind: agg
    for agg in (
        SumAggregator(),
        CountAggregator(),
        MaxAggregator(),
        MinAggregator(),
        UniqueCountAggregator(),
        LatestAggregator(),
    )
}
AGGREGATION_KINDS = tuple(_AGGREGATORS)


def aggregator_for(kind: str) -> Aggregator:
    """The shared (stateless) aggregator of ``kind``; ``ValueError`` for an unknown kind."""
    try:
        return _AGGREGATORS[kind]
    except KeyError:
        raise ValueError(
            f"unknown aggregation {kind!r}: use one of {', '.join(AGGREGATION_KINDS)}"
        ) from None


def aggregate(kind: str, items: Iterable[tuple[Decimal | str, int, str]]) -> WindowState:
    """Aggregate ``(value, timestamp_ms, idempotency_key)`` items into a fresh state."""
    agg = aggregator_for(kind)
    state = agg.start()
    for value, timestamp_ms, key in items:
        agg.add(state, value, timestamp_ms, key)
    return state
