"""Customers on plans: each customer's plan schedule, durable in ClickHouse, copied on a topic.

A schedule is the list of ``(plan, effective instant)`` of one customer: each plan is in
effect from its instant until the next one; before the first, the plans file's default
plan prices the usage (free unless configured). Ways in, all recorded in ClickHouse
``customer_plans`` (append-only, with who and when):

* ``meterstream plans assign CUSTOMER PLAN --from DATE`` (``unassign``, ``list``):
  through the running worker's HTTP API while it holds the embedded engine, otherwise
  straight to ClickHouse (pipeline/cli/plans.py).
* ``PUT /v1/customers/{id}/plans`` ``{"plan": ..., "from": ...}`` on a worker
  (pipeline/api/invoices.py; an operator key).
* The compacted topic ``customer-plans`` (public contract): key ``customer_id`` (UTF-8),
  value JSON ``{"plans": [{"plan": NAME, "from": RFC 3339}, ...]}``, the whole schedule;
  a null value (tombstone) removes it. Every worker follows it and records each new
  record (timestamp = the change's version; a replay or an older record is ignored, a
  record naming a plan the worker's plans file does not have is refused and logged).
  Changes made through the CLI or the API are published there too.

Assigning a plan at an instant where the schedule already has one replaces it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import orjson

from meterstream.billing.customers import check_customer_id, follow_topic, published
from meterstream.settings import Settings
from meterstream.sinks.clickhouse import pricing as store
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.pricing import ScheduleRow
from meterstream.topics import CUSTOMER_PLANS

log = logging.getLogger("meterstream.plans")

MAX_SCHEDULE = 1000
_PLAN_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
_EARLIEST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_LATEST = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)

Schedule = tuple[tuple[str, int], ...]


class BadSchedule(ValueError):
    """A schedule (a topic record or a request) that cannot be recorded."""


def parse_instant(text: Any) -> int:
    """``YYYY-MM-DD`` (midnight UTC) or RFC 3339 with an offset -> epoch ms (whole ms)."""
    if not isinstance(text, str) or not text:
        raise BadSchedule(f"an effective date must be YYYY-MM-DD or RFC 3339, not {text!r}")
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            when = dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC)
        else:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadSchedule(f"{text!r} is not YYYY-MM-DD or RFC 3339") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise BadSchedule(f"{text!r} has no time zone offset (add Z for UTC)")
    if not _EARLIEST <= when < _LATEST:
        raise BadSchedule(f"{text!r} is out of range (1970 to 9999)")
    if when.microsecond % 1000:
        raise BadSchedule(f"{text!r}: effective instants are whole milliseconds")
    return (when - _EARLIEST) // dt.timedelta(milliseconds=1)


def iso(ms: int) -> str:
    when = _EARLIEST + dt.timedelta(milliseconds=ms)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_plan_name(name: Any, known: Collection[str] | None = None) -> str:
    if not isinstance(name, str) or not _PLAN_NAME.fullmatch(name):
        raise BadSchedule(f"{name!r} is not a plan name")
    if known is not None and name not in known:
        raise BadSchedule(f"no plan named {name!r} (plans: {', '.join(sorted(known))})")
    return name


def with_assignment(schedule: Schedule, plan: str, effective_ms: int) -> Schedule:
    """``schedule`` with ``plan`` from ``effective_ms`` (replacing a plan at that instant)."""
    kept = [(p, ms) for p, ms in schedule if ms != effective_ms]
    result = tuple(sorted([*kept, (plan, effective_ms)], key=lambda x: x[1]))
    if len(result) > MAX_SCHEDULE:
        raise BadSchedule(f"a schedule holds at most {MAX_SCHEDULE} plan changes")
    return result


def without_assignment(schedule: Schedule, effective_ms: int) -> Schedule:
    """``schedule`` without its plan at ``effective_ms`` (``BadSchedule`` if none is there)."""
    if all(ms != effective_ms for _, ms in schedule):
        raise BadSchedule(f"no plan takes effect at {iso(effective_ms)}")
    return tuple((p, ms) for p, ms in schedule if ms != effective_ms)


def encode_schedule(schedule: Schedule) -> bytes | None:
    """The topic value of a schedule (``None``, a tombstone, when it is empty)."""
    if not schedule:
        return None
    return orjson.dumps({"plans": [{"plan": p, "from": iso(ms)} for p, ms in schedule]})


def decode_schedule(
    key: bytes | None, value: bytes | None, known: Collection[str] | None = None
) -> tuple[str, Schedule]:
    """(customer, schedule) of a ``customer-plans`` record; ``BadSchedule`` otherwise."""
    try:
        customer = check_customer_id((key or b"").decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadSchedule(f"bad key {key!r}: {exc}") from None
    if value is None:
        return customer, ()
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise BadSchedule(f"{customer}: value is not JSON") from None
    items = doc.get("plans") if isinstance(doc, Mapping) else None
    if not isinstance(items, list) or len(items) > MAX_SCHEDULE:
        raise BadSchedule(f'{customer}: value is not {{"plans": [{{"plan", "from"}}, ...]}}')
    schedule: Schedule = ()
    for item in items:
        if not isinstance(item, Mapping):
            raise BadSchedule(f"{customer}: each plan is an object with plan and from")
        plan = check_plan_name(item.get("plan"), known)
        schedule = with_assignment(schedule, plan, parse_instant(item.get("from")))
    return customer, schedule


async def publish(
    settings: Settings, bootstrap: str, customer_id: str, schedule: Schedule, version: int
) -> None:
    """The schedule as a ``customer-plans`` record (timestamp = its version)."""
    from aiokafka import AIOKafkaProducer

    from meterstream.kafka import client_options

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", request_timeout_ms=10_000,
        **client_options(settings),
    )  # fmt: skip
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic(CUSTOMER_PLANS.name),
            key=customer_id.encode(),
            value=encode_schedule(schedule),
            timestamp_ms=version,
        )
    finally:
        await producer.stop()


class AssignmentStore:
    """The worker's side: changes through its API, the topic follower, the reads."""

    def __init__(
        self, settings: Settings, chio: ClickHouseIO, bootstrap: str, plans: Collection[str]
    ) -> None:
        self.settings = settings
        self.chio = chio
        self.bootstrap = bootstrap
        self.plans = frozenset(plans)
        self.ready = asyncio.Event()
        self._lock = asyncio.Lock()
        # told the customer whose schedule was recorded (the credit burn re-prices it)
        self.changed: list[Callable[[str], None]] = []

    def _tell(self, customer_id: str) -> None:
        for listener in self.changed:
            listener(customer_id)

    async def current(self, customer_id: str) -> ScheduleRow | None:
        rows = await self.chio.call_once(store.current_schedules, [customer_id])
        return rows.get(customer_id)

    async def all(self) -> dict[str, ScheduleRow]:
        return await self.chio.call_once(store.current_schedules)

    async def change(
        self,
        customer_id: str,
        plan: str | None,
        effective_ms: int,
        origin: str,
        changed_by: str,
    ) -> tuple[ScheduleRow | None, bool]:
        """Assign ``plan`` from ``effective_ms`` (``None``: remove the plan there); record
        durably, then publish. Returns (the row or None when unchanged, published)."""
        async with self._lock:
            current = await self.current(customer_id)
            schedule = current.schedule if current else ()
            if plan is None:
                schedule = without_assignment(schedule, effective_ms)
            else:
                check_plan_name(plan, self.plans)
                schedule = with_assignment(schedule, plan, effective_ms)
            row = await self.chio.call_once(
                store.append_schedule, customer_id, schedule, origin, changed_by
            )
        if row is None:
            return None, False
        self._tell(customer_id)
        log.warning(
            "plan schedule of %s: %s (%s, by %s)", customer_id, schedule, origin, changed_by
        )
        sent = publish(self.settings, self.bootstrap, customer_id, row.schedule, row.version)
        return row, await published(sent, f"plan schedule of {customer_id}", log)

    async def import_record(
        self, key: bytes | None, value: bytes | None, timestamp_ms: int
    ) -> None:
        """One ``customer-plans`` record: recorded unless a replay, stale or refused."""
        try:
            customer, schedule = decode_schedule(key, value, self.plans)
        except BadSchedule as exc:
            log.warning("customer-plans topic: record refused: %s", exc)
            return
        async with self._lock:
            rows = await self.chio.call(store.current_schedules, [customer])
            current = rows.get(customer)
            if current is not None and current.version >= timestamp_ms:
                if current.version > timestamp_ms or current.schedule != schedule:
                    log.warning(
                        "customer-plans topic: record for %s (timestamp %d) is not newer than"
                        " its schedule (version %d); ignored",
                        customer,
                        timestamp_ms,
                        current.version,
                    )
                return
            if timestamp_ms <= 0 or (current is None and not schedule):
                return
            row = await self.chio.call(
                store.append_schedule,
                customer,
                schedule,
                "topic",
                "customer-plans topic",
                timestamp_ms,
            )
        if row is not None:
            self._tell(customer)

    async def follow(self) -> None:
        """Import the topic from the beginning and keep following it (every worker)."""
        topic = self.settings.topic(CUSTOMER_PLANS.name)
        await follow_topic(self.settings, self.bootstrap, topic, self.import_record, self.ready)
