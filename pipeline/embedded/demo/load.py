"""A realistic synthetic load for the example meters, and the totals it must produce.

Five demo customers (``demo-acme`` ... ``demo-hooli``: named so that they never
meet the README's examples) use an AI chat (tokens per model), call an API
(requests, with user ids), run servers (heartbeats with a count), burn compute
units (decimals) and make calls (with the caller's country). About 3% of
records are resent unchanged (a producer retry), 1% are resent with changed
content (an idempotency conflict: the first copy counts) and 1% are invalid.
A run first sends events spread over the last two hours, so some hourly
windows are already closed and reach Stripe while it runs.

Every run has its own id, and its idempotency keys are ``demo-<run id>-<n>``:
a run never reuses a key of an earlier run in the same state dir (each run's
events are new usage, as they would be from a real producer).

What the pipeline must make of the events is computed here from the events
themselves, independently of the pipeline's meter code, by the rules the
example meters state (:data:`RULES`; :func:`check_meters` refuses a meters file
that says otherwise). :class:`Expected` holds it per (meter, customer, window),
so that any billing period, and the windows Stripe has been sent so far, can be
totalled from it; it merges across runs (pipeline/embedded/demo/ledger.py keeps it in
the state dir).
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from meterstream.events import canonical_json
from meterstream.meters.config import MetersConfig
from meterstream.meters.windows import DAY_MS, HOUR_MS

CUSTOMER_PREFIX = "demo-"
CUSTOMERS = [
    f"{CUSTOMER_PREFIX}{name}" for name in ("acme", "globex", "initech", "umbrella", "hooli")
]
# Who pays, the operator's decision: the demo maps its customers at start
# (pipeline/embedded/demo/totals.py, map_demo_customers); nothing in its events
# names a Stripe customer.
STRIPE_CUSTOMERS = {
    customer: f"cus_demo_{customer.removeprefix(CUSTOMER_PREFIX)}" for customer in CUSTOMERS
}
MODELS = ["gpt-4o", "claude-sonnet", "llama-3"]
COUNTRIES = ["US", "US", "US", "DE", "IN", "BR"]
KEY_PREFIX = "demo-"
HISTORY_MS = 2 * 3600 * 1000

Properties = dict[str, Any]


def is_demo_customer(customer_id: str) -> bool:
    """The demo's namespace: its summary answers for every customer in it."""
    return customer_id.startswith(CUSTOMER_PREFIX)


def new_run_id(now_ms: int | None = None) -> str:
    """``YYYYMMDDTHHMMSS-xxxx`` (UTC start and 4 random hex digits): sortable, unique."""
    now_s = (now_ms if now_ms is not None else time.time_ns() // 1_000_000) // 1000
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_s)) + "-" + secrets.token_hex(2)


# ------------------------------------------------------------------ the rules


@dataclass(frozen=True)
class Rule:
    """What one example meter counts, stated independently of pipeline/meters/config.py."""

    meter: str
    event_name: str
    aggregation: str  # sum | count | max | unique_count
    window_ms: int
    value_path: str | None = None  # as the meters file must say it
    filters: tuple[tuple[str, str, Any], ...] = ()  # (property, operator, value), idem
    value: Callable[[Properties], Decimal | str] | None = None
    applies: Callable[[Properties], bool] = lambda props: True


def _number(name: str) -> Callable[[Properties], Decimal]:
    return lambda props: Decimal(str(props[name]))


RULES: tuple[Rule, ...] = (
    Rule("ai_tokens", "ai_chat", "sum", HOUR_MS, "properties.tokens", value=_number("tokens")),
    Rule("api_requests", "api_request", "count", HOUR_MS),
    Rule(
        "active_servers",
        "server_heartbeat",
        "max",
        HOUR_MS,
        "properties.servers",
        value=_number("servers"),
    ),
    Rule("compute_units", "compute", "sum", HOUR_MS, "properties.units", value=_number("units")),
    Rule(
        "local_calls",
        "call",
        "count",
        HOUR_MS,
        filters=(("properties.country", "eq", "US"),),
        applies=lambda props: props.get("country") == "US",
    ),
    Rule(
        "international_calls",
        "call",
        "count",
        HOUR_MS,
        filters=(("properties.country", "neq", "US"),),
        applies=lambda props: "country" in props and props["country"] != "US",
    ),
    Rule(
        "active_users",
        "api_request",
        "unique_count",
        DAY_MS,
        "properties.user_id",
        value=lambda props: str(props["user_id"]),
    ),
)
RULE_BY_METER = {rule.meter: rule for rule in RULES}
_WINDOW_NAMES = {HOUR_MS: "hour", DAY_MS: "day"}


def check_meters(meters: MetersConfig) -> list[str]:
    """Every way the meters file differs from what the demo's rules assume."""
    by_name = {m.name: m for m in meters.meters}
    problems = []
    for rule in RULES:
        meter = by_name.get(rule.meter)
        if meter is None:
            problems.append(f"meter {rule.meter}: missing")
            continue
        said = (
            meter.event_name,
            meter.aggregation,
            meter.window,
            meter.value,
            tuple((f.property, f.operator, f.value) for f in meter.filters),
        )
        wanted = (
            rule.event_name,
            rule.aggregation,
            _WINDOW_NAMES[rule.window_ms],
            rule.value_path,
            rule.filters,
        )
        labels = ("event_name", "aggregation", "window", "value", "filters")
        for label, have, want in zip(labels, said, wanted, strict=True):
            if have != want:
                problems.append(f"meter {rule.meter}: {label} is {have!r}, the demo needs {want!r}")
    return problems


# ------------------------------------------------------------------ expected totals


@dataclass
class WindowExpect:
    """One (meter, customer, window)'s expected state: mergeable, order-insensitive."""

    total: Decimal = Decimal(0)  # sum of values (sum) or of events (count)
    peak: Decimal | None = None  # max
    distinct: set[str] = field(default_factory=set)  # unique_count

    def add(self, aggregation: str, value: Decimal | str | None) -> None:
        if aggregation == "count":
            self.total += 1
        elif aggregation == "sum":
            assert isinstance(value, Decimal)
            self.total += value
        elif aggregation == "max":
            assert isinstance(value, Decimal)
            self.peak = value if self.peak is None else max(self.peak, value)
        elif aggregation == "unique_count":
            self.distinct.add(str(value))
        else:  # pragma: no cover - RULES use only the four above
            raise ValueError(f"the demo has no rule for {aggregation!r}")

    def merge(self, other: WindowExpect) -> None:
        self.total += other.total
        if other.peak is not None:
            self.peak = other.peak if self.peak is None else max(self.peak, other.peak)
        self.distinct |= other.distinct

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.total:
            out["total"] = str(self.total)
        if self.peak is not None:
            out["peak"] = str(self.peak)
        if self.distinct:
            out["distinct"] = sorted(self.distinct)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WindowExpect:
        peak = data.get("peak")
        return cls(
            Decimal(data.get("total", "0")),
            None if peak is None else Decimal(peak),
            set(data.get("distinct", ())),
        )


WindowKey = tuple[str, str, int]  # (meter, customer, window start ms)


@dataclass
class Expected:
    """What the pipeline must hold, per (meter, customer, window), for a set of events."""

    windows: dict[WindowKey, WindowExpect] = field(default_factory=dict)
    events: int = 0

    def add_event(self, event: dict[str, Any]) -> None:
        """One accepted event (valid, first copy of its key), by :data:`RULES`."""
        self.events += 1
        props = event.get("properties", {})
        ts = int(event["timestamp"])
        for rule in RULES:
            if rule.event_name != event["event_name"] or not rule.applies(props):
                continue
            start = ts - ts % rule.window_ms
            key = (rule.meter, event["customer_id"], start)
            state = self.windows.get(key)
            if state is None:
                state = self.windows[key] = WindowExpect()
            state.add(rule.aggregation, None if rule.value is None else rule.value(props))

    def merge(self, other: Expected) -> None:
        self.events += other.events
        for key, state in other.windows.items():
            mine = self.windows.get(key)
            if mine is None:
                mine = self.windows[key] = WindowExpect()
            mine.merge(state)

    def totals(
        self, start_ms: int, end_ms: int, closed_by: Callable[[str], int] | None = None
    ) -> dict[tuple[str, str], Decimal]:
        """(meter, customer) -> total over the windows starting in ``[start_ms, end_ms)``.

        ``closed_by(meter)``: only windows that end at or before that time (ms).
        """
        merged: dict[tuple[str, str], WindowExpect] = {}
        for (meter, customer, start), state in self.windows.items():
            if not start_ms <= start < end_ms:
                continue
            if closed_by is not None and start + RULE_BY_METER[meter].window_ms > closed_by(meter):
                continue
            acc = merged.get((meter, customer))
            if acc is None:
                acc = merged[(meter, customer)] = WindowExpect()
            acc.merge(state)
        return {key: result(RULE_BY_METER[key[0]].aggregation, acc) for key, acc in merged.items()}

    def open_windows(
        self, start_ms: int, end_ms: int, closed_by: Callable[[str], int], meters: Iterable[str]
    ) -> set[tuple[str, int, int]]:
        """(meter, start, end) of the windows in the period that end after ``closed_by``."""
        wanted = set(meters)
        out = set()
        for meter, _customer, start in self.windows:
            end = start + RULE_BY_METER[meter].window_ms
            if meter in wanted and start_ms <= start < end_ms and end > closed_by(meter):
                out.add((meter, start, end))
        return out

    def drop_before(self, start_ms: int) -> None:
        self.windows = {k: v for k, v in self.windows.items() if k[2] >= start_ms}

    def to_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "windows": [
                [meter, customer, start, state.to_json()]
                for (meter, customer, start), state in sorted(self.windows.items())
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Expected:
        windows = {
            (str(m), str(c), int(s)): WindowExpect.from_json(state)
            for m, c, s, state in data.get("windows", ())
            if m in RULE_BY_METER
        }
        return cls(windows, int(data.get("events", 0)))


def result(aggregation: str, state: WindowExpect) -> Decimal:
    """The period total of merged windows, as ClickHouse's period views give it."""
    if aggregation in ("sum", "count"):
        return state.total
    if aggregation == "max":
        return state.peak if state.peak is not None else Decimal(0)
    return Decimal(len(state.distinct))


# ------------------------------------------------------------------ the generator


@dataclass
class Record:
    """One Kafka record the demo sends; ``event`` is set for a new, valid event."""

    key: bytes
    value: bytes
    event: dict[str, Any] | None = None


@dataclass
class DemoLoad:
    run_id: str
    seed: int | None = None
    history_ms: int = HISTORY_MS
    rng: random.Random = field(init=False)
    sent: list[dict[str, Any]] = field(default_factory=list)
    produced: int = 0
    new: int = 0
    invalid: int = 0
    duplicates: int = 0
    conflicts: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    @property
    def key_prefix(self) -> str:
        return f"{KEY_PREFIX}{self.run_id}-"

    def _base(self, customer: str, now_ms: int, live: bool) -> dict[str, Any]:
        ts = now_ms - (0 if live else self.rng.randrange(self.history_ms))
        self.new += 1
        return {
            "customer_id": customer,
            "idempotency_key": f"{self.key_prefix}{self.new:07d}",
            "timestamp": ts,
            "properties": {},
        }

    def _new_event(self, now_ms: int, live: bool) -> dict[str, Any]:
        customer = self.rng.choice(CUSTOMERS)
        event = self._base(customer, now_ms, live)
        props = event["properties"]
        kind = self.rng.random()
        if kind < 0.35:
            event["event_name"] = "ai_chat"
            props.update(model=self.rng.choice(MODELS), tokens=self.rng.randrange(50, 4000))
        elif kind < 0.65:
            event["event_name"] = "api_request"
            props.update(user_id=f"user_{self.rng.randrange(40)}", path="/v1/things")
        elif kind < 0.75:
            event["event_name"] = "server_heartbeat"
            props.update(servers=self.rng.randrange(1, 30))
        elif kind < 0.88:
            event["event_name"] = "compute"
            props.update(units=Decimal(self.rng.randrange(1, 5000)) / 100)
        else:
            event["event_name"] = "call"
            props.update(country=self.rng.choice(COUNTRIES), seconds=self.rng.randrange(5, 600))
        return event

    def next_batch(self, n: int, now_ms: int, live: bool = True) -> list[Record]:
        """``n`` records, including retries, conflicting copies and invalid ones."""
        out: list[Record] = []
        for _ in range(n):
            roll = self.rng.random()
            if roll < 0.03 and self.sent:
                copy = self.rng.choice(self.sent)
                out.append(_record(copy))
                self.duplicates += 1
            elif roll < 0.04 and self.sent:
                copy = dict(self.rng.choice(self.sent))
                copy["properties"] = {**copy["properties"], "tampered": True}
                out.append(_record(copy))
                self.conflicts += 1
            elif roll < 0.05:
                out.append(Record(b"", b'{"event_name": "api_request", "properties": {}}'))
                self.invalid += 1
            else:
                event = self._new_event(now_ms, live)
                self.sent.append(event)
                out.append(_record(event, new=True))
        self.produced += len(out)
        return out


def _record(event: dict[str, Any], new: bool = False) -> Record:
    return Record(
        event["customer_id"].encode(), canonical_json(event).encode(), event if new else None
    )
