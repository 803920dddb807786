"""A correction request (``POST /v1/corrections``), validated with every problem listed.

A correction is one of:

* ``void`` by keys: ``{"kind": "void", "keys": [{"customer_id", "idempotency_key"}, ...]}``
* ``void`` by range: ``{"kind": "void", "from": T, "to": T, "customer_id"?, "event_name"?,
  "meter"?, "where"?: [{property, operator, value}, ...]}``: every event of the effective
  record with ``from <= timestamp < to`` of that customer (else every customer), event
  name and meter (the meter's event name and filters), for which every ``where`` filter
  holds (the meters file's filter syntax). At least one of customer_id, event_name, meter.
* ``amend`` by keys: ``{"kind": "amend", "keys": [{"customer_id", "idempotency_key",
  "properties": {...}}, ...]}``: the event's properties are replaced (validated as the
  stream validates properties). Moving an event in time or to another customer is a void
  and a backfill with a new key.

and carries ``author`` (optional: the API key is recorded too), ``reason`` (required),
``dry_run`` and an optional client ``correction_id`` (a repeat is the same correction).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from meterstream.errors import CorrectionError
from meterstream.events import (
    UsageEvent,
    canonical_json,
    parse_time,
    parse_timestamp,
    validate_document,
)
from meterstream.meters.config import Filter, Meter, MetersConfig

MAX_KEYS = 10_000
CORRECTION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_FIELDS = {
    "kind",
    "keys",
    "from",
    "to",
    "customer_id",
    "event_name",
    "meter",
    "where",
    "author",
    "reason",
    "dry_run",
    "correction_id",
}


@dataclass(frozen=True)
class KeyItem:
    """One event by its key; ``properties`` (canonical JSON) for an amend."""

    customer_id: str
    idempotency_key: str
    properties: str | None = None


@dataclass(frozen=True)
class Correction:
    """A validated correction request."""

    kind: Literal["void", "amend"]
    reason: str
    author: str = ""
    keys: tuple[KeyItem, ...] = ()
    from_ms: int | None = None
    to_ms: int | None = None
    customer_id: str | None = None
    event_name: str | None = None
    meter: str | None = None
    where: tuple[Filter, ...] = ()
    dry_run: bool = False
    correction_id: str | None = None
    selector_doc: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def by_keys(self) -> bool:
        return bool(self.keys)

    def event_names(self, meters: MetersConfig) -> list[str] | None:
        """The event names a range selects (None: every name)."""
        if self.meter is not None:
            return [meters.by_name(self.meter).event_name]
        return None if self.event_name is None else [self.event_name]

    def selects(self, meters: MetersConfig) -> Callable[[UsageEvent], bool]:
        """The predicate of a range selector over effective-record events."""
        meter: Meter | None = None if self.meter is None else meters.by_name(self.meter)
        where = self.where
        lo, hi = self.from_ms, self.to_ms

        def holds(event: UsageEvent) -> bool:
            if lo is not None and event.timestamp_ms < lo:
                return False
            if hi is not None and event.timestamp_ms >= hi:
                return False
            if self.customer_id is not None and event.customer_id != self.customer_id:
                return False
            if self.event_name is not None and event.event_name != self.event_name:
                return False
            if meter is not None and (
                event.event_name != meter.event_name or not meter.matches(event)
            ):
                return False
            return all(f.holds(event) for f in where)

        return holds


def _text(body: dict[str, Any], name: str, limit: int, problems: list[str]) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= limit:
        problems.append(f"{name}: must be a string of 1-{limit} characters")
        return None
    return value


def instant(body: dict[str, Any], name: str, problems: list[str]) -> int | None:
    """``body[name]`` as epoch ms (RFC 3339 text or epoch ms), None when absent or bad
    (the problem appended)."""
    value = body.get(name)
    if value is None:
        return None
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return parse_timestamp(value)
        ms = parse_time(value) if isinstance(value, str) else None
    except ValueError as exc:
        problems.append(f"{name}: {exc}")
        return None
    if ms is None:
        problems.append(f"{name}: must be RFC 3339 or epoch milliseconds")
    return ms


def _amended_properties(item: dict[str, Any], where: str, problems: list[str]) -> str | None:
    """The new properties, checked by the event contract's own validation."""
    props = item.get("properties")
    doc = {"event_name": "x", "customer_id": "x", "timestamp": 0, "properties": props}
    event, found = validate_document(doc, record_timestamp_ms=0)
    if event is None:
        problems.extend(f"{where}.{p}" for p in found)
        return None
    return canonical_json(event.properties)


def _keys(body: dict[str, Any], kind: str, problems: list[str]) -> tuple[KeyItem, ...]:
    raw = body.get("keys")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_KEYS:
        problems.append(f"keys: must be a list of 1-{MAX_KEYS} objects")
        return ()
    items: list[KeyItem] = []
    seen: set[tuple[str, str]] = set()
    for i, item in enumerate(raw):
        where = f"keys[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be an object")
            continue
        allowed = {"customer_id", "idempotency_key"} | (
            {"properties"} if kind == "amend" else set()
        )
        extra = set(item) - allowed
        if extra:
            problems.append(f"{where}: unknown field(s) {', '.join(sorted(extra))}")
        sub: list[str] = []
        customer = _text(item, "customer_id", 200, sub)
        key = _text(item, "idempotency_key", 200, sub)
        if customer is None or key is None:
            sub.append("customer_id and idempotency_key are required")
        props = None
        if kind == "amend":
            if "properties" not in item:
                sub.append("properties: required for an amend")
            else:
                props = _amended_properties(item, "properties", sub)
        problems.extend(f"{where}.{p}" for p in sub)
        if sub or customer is None or key is None:
            continue
        if (customer, key) in seen:
            problems.append(f"{where}: ({customer!r}, {key!r}) is listed twice")
            continue
        seen.add((customer, key))
        items.append(KeyItem(customer, key, props))
    return tuple(items)


def _filters(raw: Any, problems: list[str]) -> tuple[Filter, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("where: must be a list of {property, operator, value} filters")
        return ()
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(Filter.model_validate(item))
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(x) for x in err["loc"])
                problems.append(f"where[{i}]{'.' + loc if loc else ''}: {err['msg']}")
    return tuple(out)


def parse_correction(body: Any, meters: MetersConfig) -> Correction:
    """The correction a request body asks for; :class:`CorrectionError` with every problem."""
    if not isinstance(body, dict):
        raise CorrectionError('body must be a JSON object {"kind": "void", ...}')
    problems: list[str] = []
    unknown = set(body) - _FIELDS
    if unknown:
        problems.append(f"unknown field(s): {', '.join(sorted(unknown))}")
    kind = body.get("kind")
    if kind not in ("void", "amend"):
        problems.append("kind: must be 'void' or 'amend'")
        raise CorrectionError(problems)
    reason = _text(body, "reason", 1000, problems)
    if body.get("reason") is None:
        problems.append("reason: required (why history is changed)")
    author = _text(body, "author", 200, problems) or ""
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        problems.append("dry_run: must be true or false")
    cid = body.get("correction_id")
    if cid is not None and (not isinstance(cid, str) or not CORRECTION_ID.fullmatch(cid)):
        problems.append("correction_id: 1-100 characters of A-Z a-z 0-9 _ . : -")
        cid = None
    range_fields = {"from", "to", "customer_id", "event_name", "meter", "where"} & set(body)
    keys: tuple[KeyItem, ...] = ()
    from_ms = to_ms = None
    customer = event_name = meter = None
    where: tuple[Filter, ...] = ()
    if "keys" in body or kind == "amend":
        if range_fields:
            problems.append(
                f"keys: select by keys or by range, not both ({', '.join(sorted(range_fields))})"
            )
        keys = _keys(body, kind, problems)
    else:
        from_ms = instant(body, "from", problems)
        to_ms = instant(body, "to", problems)
        if "from" not in body or "to" not in body:
            problems.append("from, to: a range void needs both (to is exclusive)")
        elif from_ms is not None and to_ms is not None and from_ms >= to_ms:
            problems.append("from: must be before to")
        customer = _text(body, "customer_id", 200, problems)
        event_name = _text(body, "event_name", 100, problems)
        meter = _text(body, "meter", 100, problems)
        if meter is not None:
            try:
                found = meters.by_name(meter)
            except KeyError:
                problems.append(f"meter: no meter named {meter!r}")
            else:
                if event_name is not None and event_name != found.event_name:
                    problems.append(
                        f"event_name: meter {meter!r} reads {found.event_name!r},"
                        f" not {event_name!r}"
                    )
        if customer is None and event_name is None and meter is None:
            problems.append("a range void needs at least one of customer_id, event_name, meter")
        where = _filters(body.get("where"), problems)
    if problems:
        raise CorrectionError(problems)
    assert reason is not None
    selector = {
        k: v for k, v in body.items() if k not in {"author", "reason", "dry_run", "correction_id"}
    }
    return Correction(
        kind=kind,
        reason=reason,
        author=author,
        keys=keys,
        from_ms=from_ms,
        to_ms=to_ms,
        customer_id=customer,
        event_name=event_name,
        meter=meter,
        where=where,
        dry_run=dry_run,
        correction_id=cid,
        selector_doc=selector,
    )
