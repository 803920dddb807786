"""What the emulator knows, one :class:`EmulatorState` per app: meters, meter
events, identifiers, the customer registry, sessions, idempotent replies, the
error report, counters and faults; journaled with ``--state-file``
(sinks/stripe/emulator/journal.py)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from aiohttp import web

from meterstream.sinks.stripe.emulator.journal import Journal
from meterstream.sinks.stripe.emulator.options import DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_BASE_MS
from meterstream.sinks.stripe.emulator.payments_state import PaymentsState

MAX_IDENTIFIER_LENGTH = 100
MAX_EVENT_NAME_LENGTH = 100
IDENTIFIER_TTL_SECONDS = 24 * 3600
MAX_PAST_SECONDS = 35 * 24 * 3600
MAX_FUTURE_SECONDS = 5 * 60
MAX_VALUE_DIGITS = 19
SESSION_TTL_SECONDS = 15 * 60
MAX_STREAM_EVENTS = 100
DUPLICATE_MESSAGE = "An event already exists with identifier {identifier}."

Clock = Callable[[], float]


@dataclass(frozen=True)
class FaultConfig:
    """Fault injection and rate limiting; changeable at run time via ``POST /_emulator/faults``.

    ``rate_429`` and ``rate_500`` are probabilities per API request (drawn from
    ``random.Random(seed)``); ``latency_ms`` delays every API request;
    ``rate_limit_per_second`` (``None`` = off) answers ``429 rate_limit`` to
    API requests beyond that many in one clock second. ``lost_answer_rate`` is the
    probability that a POST which was executed (and, with an ``Idempotency-Key``,
    saved for replay) answers ``500`` instead, as if its answer were lost on the
    way: a retry with the same key gets the saved answer, one without a key
    executes again (a second charge).

    Webhook delivery (sinks/stripe/emulator/webhooks.py): ``webhook_duplicates``
    sends every event twice (two deliveries, each with its own retries);
    ``webhook_out_of_order`` holds every new event until its PaymentIntent is
    final (``succeeded``/``canceled``) or ``POST /_emulator/webhook_release``,
    then sends the held events newest first; ``webhook_drop_first`` fails the
    first N attempts of every delivery without sending them (so retries
    happen); ``webhook_delay_ms`` delays every first attempt. Not faults but
    kept here so they are set the same way: ``webhook_retry_base_ms`` (the
    first retry's wait, doubling after each failed attempt),
    ``webhook_max_attempts`` (then the delivery is given up) and
    ``webhook_timeout_ms`` (per attempt).
    """

    rate_429: float = 0.0
    rate_500: float = 0.0
    latency_ms: int = 0
    seed: int | None = None
    rate_limit_per_second: int | None = None
    lost_answer_rate: float = 0.0
    webhook_duplicates: bool = False
    webhook_out_of_order: bool = False
    webhook_drop_first: int = 0
    webhook_delay_ms: int = 0
    webhook_retry_base_ms: int = DEFAULT_RETRY_BASE_MS
    webhook_max_attempts: int = DEFAULT_MAX_ATTEMPTS
    webhook_timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        for name in ("rate_429", "rate_500", "lost_answer_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {rate}")
        if self.rate_429 + self.rate_500 > 1.0:
            raise ValueError("rate_429 + rate_500 must not exceed 1")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if self.rate_limit_per_second is not None and self.rate_limit_per_second < 1:
            raise ValueError("rate_limit_per_second must be >= 1 or null")
        for name in ("webhook_duplicates", "webhook_out_of_order"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false")
        for name, low in (
            ("webhook_drop_first", 0),
            ("webhook_delay_ms", 0),
            ("webhook_retry_base_ms", 1),
            ("webhook_max_attempts", 1),
            ("webhook_timeout_ms", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}")


@dataclass
class Stats:
    accepted: int = 0
    rejected_duplicates: int = 0
    rejected_other: int = 0
    faults_injected: int = 0
    rate_limited: int = 0
    requests: int = 0
    cancelled: int = 0
    rejected_cancellations: int = 0
    last_ties: int = 0  # summaries of a `last` meter whose latest timestamp was a tie


@dataclass
class MeterEvent:
    meter: str
    event_name: str
    identifier: str
    payload: dict[str, str]
    timestamp: int
    received_at: float
    customer: str
    value: str | None
    seq: int
    api: Literal["v1", "v2"]
    cancelled: bool = False
    cancelled_at: float | None = None

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("seq")
        return out


@dataclass
class EmulatorState:
    """Everything the emulator knows; one per app."""

    clock: Clock
    initial_faults: FaultConfig
    faults: FaultConfig = field(init=False)
    rng: random.Random = field(init=False)
    meters: dict[str, dict[str, Any]] = field(default_factory=dict)
    products: dict[str, dict[str, Any]] = field(default_factory=dict)
    prices: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[MeterEvent] = field(default_factory=list)
    identifiers: dict[str, float] = field(default_factory=dict)
    customers: set[str] = field(default_factory=set)
    sessions: dict[str, float] = field(default_factory=dict)
    idempotency: dict[str, tuple[float, str, int, str]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    rate_window: tuple[int, int] = (0, 0)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    journal: Journal | None = None
    # `last` ties seen by summaries (Stripe does not define the winner; the emulator flags
    # them): one entry per (meter, customer, timestamp), GET /_emulator/ties.
    ties: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    # Seconds added to the wall clock (POST /_emulator/clock): tests move time to reach
    # Stripe's limits (24 h adjustments, 35 days of timestamps) without waiting.
    clock_offset: float = 0.0
    pay: PaymentsState = field(default_factory=PaymentsState)

    def __post_init__(self) -> None:
        self.set_faults(self.initial_faults)
        wall = self.clock
        self.clock = lambda: wall() + self.clock_offset

    # -- persistence (``--state-file``; sinks/stripe/emulator/journal.py) ---------------
    #
    # What a Stripe account keeps is journaled: meters, meter events (with their
    # cancellations), the customer registry, idempotent replies, v2 sessions,
    # the v2 error report, and the payments side (customers, payment methods,
    # PaymentIntents, events, webhook endpoints and which deliveries are still
    # owed: sinks/stripe/emulator/payments_state.py). Identifiers seen are the
    # events' identifiers, so they are rebuilt from the events. Counters
    # (``/_emulator/stats``), fault settings, the rate-limit window and the
    # webhook delivery attempts start afresh with each process.

    def log(self, op: str, **fields: Any) -> None:
        """Journal one change (before the request that made it is answered)."""
        if self.journal is not None:
            self.journal.append({"op": op, **fields})

    def records(self) -> list[dict[str, Any]]:
        """The current state as journal records (what compaction writes)."""
        out: list[dict[str, Any]] = [{"op": "meter", "meter": m} for m in self.meters.values()]
        out += [{"op": "product", "product": p} for p in self.products.values()]
        out += [{"op": "price", "price": p} for p in self.prices.values()]
        out += [{"op": "event", "event": asdict(e)} for e in self.events]
        if self.customers:
            out.append({"op": "customers", "ids": sorted(self.customers)})
        out += [
            {"op": "idempotency", "key": k, "value": list(v)} for k, v in self.idempotency.items()
        ]
        out += [{"op": "session", "token": t, "expires": x} for t, x in self.sessions.items()]
        out += [{"op": "error", "error": e} for e in self.errors]
        out += self.pay.records()
        return out

    def restore(self, records: Iterable[dict[str, Any]]) -> None:
        """Replay journal records (from :meth:`records` and :meth:`log`)."""
        by_seq: dict[int, MeterEvent] = {}
        for record in records:
            op = record["op"]
            if op == "meter":
                self.meters[record["meter"]["id"]] = record["meter"]
            elif op == "product":
                self.products[record["product"]["id"]] = record["product"]
            elif op == "price":
                self.prices[record["price"]["id"]] = record["price"]
            elif op == "event":
                event = MeterEvent(**record["event"])
                self.events.append(event)
                by_seq[event.seq] = event
            elif op == "cancel":
                cancelled = by_seq[record["seq"]]
                cancelled.cancelled, cancelled.cancelled_at = True, record["at"]
            elif op == "customers":
                self.customers = set(record["ids"])
            elif op == "idempotency":
                at, fingerprint, status, text = record["value"]
                self.idempotency[record["key"]] = (at, fingerprint, status, text)
            elif op == "session":
                self.sessions[record["token"]] = record["expires"]
            elif op == "error":
                self.errors.append(record["error"])
            elif op == "reset":
                self.reset(journal=False)
                by_seq.clear()
            elif self.pay.restore_record(record):
                pass
            else:
                raise ValueError(f"unknown emulator journal record {op!r}")
        now = self.clock()
        self.identifiers = {e.identifier: e.received_at for e in self.events}
        self.sessions = {t: x for t, x in self.sessions.items() if x > now}
        self.seq = itertools.count(max((e.seq for e in self.events), default=-1) + 1)
        self.pay.owe_pending()
        self.prune(now)

    def set_faults(self, faults: FaultConfig) -> None:
        self.faults = faults
        self.rng = random.Random(faults.seed)

    def reset(self, journal: bool = True) -> None:
        if journal:
            self.log("reset")
        self.meters.clear()
        self.products.clear()
        self.prices.clear()
        self.events.clear()
        self.identifiers.clear()
        self.customers.clear()
        self.sessions.clear()
        self.idempotency.clear()
        self.errors.clear()
        self.ties.clear()
        self.clock_offset = 0.0
        self.pay.clear()
        self.stats = Stats()
        self.rate_window = (0, 0)
        self.set_faults(self.initial_faults)

    def prune(self, now: float) -> None:
        horizon = now - IDENTIFIER_TTL_SECONDS
        if self.identifiers and next(iter(self.identifiers.values())) < horizon:
            self.identifiers = {k: t for k, t in self.identifiers.items() if t >= horizon}
        if self.idempotency and next(iter(self.idempotency.values()))[0] < horizon:
            self.idempotency = {k: v for k, v in self.idempotency.items() if v[0] >= horizon}


STATE_KEY = web.AppKey("meterstream_emulator_state", EmulatorState)
