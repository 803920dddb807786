"""The usage event contract (DESIGN.md, "The event") and its validation.

``parse_event`` turns one Kafka record value into a :class:`UsageEvent` or a
:class:`Rejection`. A rejection is data, not an exception: the worker sends it
to the dead-letter topic with its machine-readable reason.

Numbers are exact: JSON numbers with a fraction or exponent are parsed as
``Decimal`` and written back unchanged by :func:`canonical_json`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

import msgspec
import simplejson

MAX_EVENT_BYTES = 64 * 1024
MAX_FUTURE_MS = 5 * 60 * 1000
MAX_PROPERTIES_DEPTH = 32
MAX_TIMESTAMP_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # epoch milliseconds count from here
ALL_METERS = "*"
"""``UsageEvent.refused_meters`` of an event set aside as unprocessable: no meter counts it."""
EVENT_FIELDS = frozenset(
    {"event_name", "customer_id", "idempotency_key", "timestamp", "properties"}
)


class Reason(StrEnum):
    """Machine-readable dead-letter reasons."""

    INVALID_JSON = "invalid_json"
    INVALID_EVENT = "invalid_event"
    TOO_LARGE = "too_large"
    TOO_LATE = "too_late"
    FUTURE_TIMESTAMP = "future_timestamp"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    INVALID_VALUE = "invalid_value"
    # processing the record raised (a bug or an input nobody foresaw); the worker set it
    # aside and went on with the rest of its batch (pipeline/worker/batch.py, batch isolation)
    UNPROCESSABLE = "unprocessable"
    DUPLICATE = (
        "duplicate"  # exact duplicate: recorded in ClickHouse for analysts, not dead-lettered
    )


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One accepted usage event. ``timestamp_ms`` is event time, epoch milliseconds UTC."""

    event_name: str
    customer_id: str
    idempotency_key: str
    timestamp_ms: int
    properties: dict[str, Any]
    key_derived: bool = False
    fingerprint: str = field(default="", compare=False)
    # canonical_json(properties), computed once at parse time (the record's
    # ``properties`` column and the fingerprint both need it); "" = not computed.
    properties_json: str = field(default="", compare=False, repr=False)
    # Record metadata, never from a producer (usage_events.refused_meters, read back by
    # meterstream.sinks.clickhouse.queries.events_in_range): the meters that refused the event when
    # it was counted because a total would have left the meter's range, or ("*",) for
    # an event set aside as unprocessable, which counts for no meter.
    refused_meters: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def canonical_properties(self) -> str:
        return self.properties_json or canonical_json(self.properties)

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC)

    def to_json(self) -> str:
        """The event as producers send it, canonical (sorted keys, exact numbers)."""
        return canonical_json(
            {
                "event_name": self.event_name,
                "customer_id": self.customer_id,
                "idempotency_key": self.idempotency_key,
                "timestamp": self.timestamp_ms,
                "properties": self.properties,
            }
        )


_new_object = object.__new__
# The slots' own setters, looked up by field name: a frozen dataclass's generated
# __init__ sets each field through object.__setattr__ (1.35 us an event, measured);
# these 0.56 us.
(
    _set_event_name,
    _set_customer_id,
    _set_idempotency_key,
    _set_timestamp_ms,
    _set_properties,
    _set_key_derived,
    _set_fingerprint,
    _set_properties_json,
    _set_refused_meters,
) = (
    UsageEvent.__dict__[name].__set__
    for name in (
        "event_name",
        "customer_id",
        "idempotency_key",
        "timestamp_ms",
        "properties",
        "key_derived",
        "fingerprint",
        "properties_json",
        "refused_meters",
    )
)


def accepted_event(
    event_name: str,
    customer_id: str,
    idempotency_key: str,
    timestamp_ms: int,
    properties: dict[str, Any],
    key_derived: bool,
    fingerprint: str,
    properties_json: str,
) -> UsageEvent:
    """``UsageEvent(...)`` of a validated event (no refused meters), built for the hot
    path: every field set once through its slot, equal to the dataclass's own."""
    event = _new_object(UsageEvent)
    _set_event_name(event, event_name)
    _set_customer_id(event, customer_id)
    _set_idempotency_key(event, idempotency_key)
    _set_timestamp_ms(event, timestamp_ms)
    _set_properties(event, properties)
    _set_key_derived(event, key_derived)
    _set_fingerprint(event, fingerprint)
    _set_properties_json(event, properties_json)
    _set_refused_meters(event, ())
    return event


def printable(text: str, limit: int | None = None) -> str:
    """``text`` (cut to ``limit`` characters) as valid UTF-8 text: a lone surrogate (from a
    ``\\ud800`` escape) becomes ``?``, so it can go to Kafka, orjson and ClickHouse."""
    if limit is not None:
        text = text[:limit]
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode()
    return text


@dataclass(frozen=True, slots=True)
class Rejection:
    """An event that is not counted, with why. Goes to the dead-letter topic and ClickHouse.

    Its text fields are made valid UTF-8 on construction (:func:`printable`): a producer's
    lone surrogate in a customer id once made the dead-letter send itself raise.
    """

    reason: Reason
    detail: str
    raw: bytes
    customer_id: str = ""
    idempotency_key: str = ""
    meter: str = ""

    def __post_init__(self) -> None:
        for name in ("detail", "customer_id", "idempotency_key", "meter"):
            value = getattr(self, name)
            clean = printable(value)
            if clean is not value:
                object.__setattr__(self, name, clean)

    def to_dlq(self, received_at_ms: int) -> dict[str, Any]:
        return {
            "reason": str(self.reason),
            "detail": self.detail,
            "raw": self.raw.decode("utf-8", errors="replace"),
            "customer_id": self.customer_id,
            "idempotency_key": self.idempotency_key,
            "meter": self.meter,
            "received_at": received_at_ms,
        }


# msgspec gives the same text as simplejson.dumps(obj, use_decimal=True, sort_keys=True,
# separators=(",", ":"), ensure_ascii=False) (the previous implementation) for every
# JSON value the pipeline holds: str keys sorted by code point, Decimal written as
# str(Decimal) (exponent and trailing zeros kept), ints of any size, and the same
# escapes (tests/unit/test_events.py compares the two on tricky input); ~20x faster.
_CANONICAL = msgspec.json.Encoder(order="sorted", decimal_format="number")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, exact decimals: equal content gives equal text.

    Raises UnicodeEncodeError for a string with a lone surrogate (not UTF-8 text).
    """
    return _CANONICAL.encode(obj).decode()


_EXACT_DECODER = msgspec.json.Decoder(float_hook=Decimal)


def loads_exact(raw: bytes | str) -> Any:
    """JSON with non-integer numbers as Decimal (never float).

    msgspec first (float_hook=Decimal: the number's own text, exact); anything it
    refuses goes to simplejson (use_decimal), which was the only decoder before and
    so decides what is accepted and what error is raised (e.g. a lone ``\\ud800``
    escape, which simplejson accepts). Where both accept, they return equal values
    of equal types (tests/unit/test_canonical_json.py).
    """
    try:
        return _EXACT_DECODER.decode(raw)
    except (msgspec.DecodeError, UnicodeError):
        return simplejson.loads(raw, use_decimal=True)


# -- repeated keys ---------------------------------------------------------------------
#
# JSON decoders keep the last of two equal keys in one object, so an event with two
# ``customer_id``s or two ``properties.tokens`` would be counted with one value picked
# silently: a billing ambiguity. Such a document is refused (RFC 8259: names SHOULD be
# unique; I-JSON, RFC 7493: MUST be). The check costs almost nothing on the hot path:
# outside strings every ``:`` of a JSON text belongs to exactly one key, so a document
# decoded without losing a key has as many ``:`` as the canonical text of what was
# decoded (which writes each key once and every ``:`` inside a string as itself). Only a
# document whose counts differ, or that spells a character near ``:`` as a ``\u003`` escape
# (the one way a string's ``:`` can be absent from the raw text), is parsed again
# exactly (:func:`duplicate_keys`, a Python hook per object).

_COLON_ESCAPE = b"\\u003"

KeyPath = tuple[str | int, ...]


def may_repeat_keys(raw: bytes, decoded_colons: int) -> bool:
    """Whether ``raw`` (valid JSON) may hold a repeated key, given the number of ``:``
    in the canonical text of what it decoded to. False is certain; True needs
    :func:`duplicate_keys`."""
    return raw.count(b":") != decoded_colons or (b"\\" in raw and _COLON_ESCAPE in raw)


def duplicate_keys(raw: bytes | str) -> list[tuple[KeyPath, str]]:
    """Every key repeated within one object of the JSON text ``raw``, as (path of the
    object, key), in document order; [] when none (or when ``raw`` is not JSON)."""
    repeated: dict[int, list[str]] = {}

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj:
                repeated.setdefault(id(obj), []).append(key)
            obj[key] = value
        return obj

    try:
        doc = json.loads(raw, object_pairs_hook=pairs, parse_float=str, parse_int=str)
    except (ValueError, RecursionError):
        return []
    if not repeated:
        return []
    found: list[tuple[KeyPath, str]] = []
    stack: list[tuple[Any, KeyPath]] = [(doc, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            found += [(path, key) for key in repeated.get(id(node), ())]
            children = [(v, (*path, k)) for k, v in node.items()]
        elif isinstance(node, list):
            children = [(v, (*path, i)) for i, v in enumerate(node)]
        else:
            continue
        stack += reversed(children)
    return found


def show_path(path: KeyPath) -> str:
    """``events[0].properties`` for ("events", 0, "properties")."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def duplicate_problem(path: KeyPath, key: str) -> str:
    where = show_path(path)
    return f"{where + ': ' if where else ''}duplicate key {key!r} (keys must be unique)"


def repeated_key_problems(raw: bytes, doc: Any, event: UsageEvent | None) -> list[str]:
    """The repeated keys of a record value, as problems ([] when none): the fast check
    for a valid ``event`` decoded from ``raw`` as ``doc``; exact for anything else."""
    if event is not None:  # the hot path: may_repeat_keys, with the decoded colons counted
        # from what validate_document already built (one per top-level key, those in its
        # strings and in the canonical properties)
        colons = (
            len(doc)
            + event.event_name.count(":")
            + event.customer_id.count(":")
            + event.canonical_properties().count(":")
        )
        if not event.key_derived:
            colons += event.idempotency_key.count(":")
        timestamp = doc.get("timestamp")
        if type(timestamp) is str:
            colons += timestamp.count(":")
        if raw.count(b":") == colons and (b"\\" not in raw or _COLON_ESCAPE not in raw):
            return []
    return [duplicate_problem(path, name) for path, name in duplicate_keys(raw)]


def content_fingerprint(
    event_name: str, timestamp_ms: int, properties: dict[str, Any], properties_json: str = ""
) -> str:
    """Hash of what a duplicate must repeat to be an exact duplicate (not a conflict).

    The hashed text is ``canonical_json([event_name, timestamp_ms, properties])``;
    pass ``properties_json`` (= ``canonical_json(properties)``) to reuse it.
    """
    props = properties_json or canonical_json(properties)
    text = b"".join(
        (b"[", _CANONICAL.encode(event_name), b",%d," % int(timestamp_ms), props.encode(), b"]")
    )
    return hashlib.sha256(text).hexdigest()[:32]


def derive_idempotency_key(
    event_name: str, customer_id: str, timestamp_ms: int, properties: dict[str, Any]
) -> str:
    """Deterministic key for events sent without one: same content, same key."""
    text = canonical_json([event_name, customer_id, timestamp_ms, properties])
    return "drv_" + hashlib.sha256(text.encode()).hexdigest()[:40]


def parse_timestamp(value: Any) -> int:
    """RFC 3339 string (with offset) or epoch milliseconds -> epoch ms. Raises ValueError.

    Bounded to 1970-01-01 .. 9999-12-31 UTC: anything outside cannot be a usage
    time, and would not even convert to a datetime (a poison pill for the worker).
    """
    ms = _timestamp_ms(value)
    if not 0 <= ms <= MAX_TIMESTAMP_MS:
        raise ValueError(f"timestamp {value!r} is outside 1970-01-01 .. 9999-12-31 UTC")
    return ms


def parse_time(text: str | None) -> int | None:
    """A time given as a query parameter or a command's flag: RFC 3339 or epoch ms ->
    epoch ms (None when empty). Without an offset it means UTC. Raises ValueError."""
    if not text:
        return None
    if text.lstrip("-").isdigit():
        return parse_timestamp(int(text))
    if datetime.fromisoformat(text).tzinfo is None:
        text += "+00:00"  # a query parameter without an offset means UTC
    return parse_timestamp(text)


def _timestamp_ms(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("timestamp must be an RFC 3339 string or epoch milliseconds")
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        return int(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"timestamp {value!r} is not RFC 3339") from None
        if parsed.tzinfo is None:
            raise ValueError(f"timestamp {value!r} has no UTC offset (RFC 3339 requires one)")
        return (parsed - EPOCH) // timedelta(milliseconds=1)
    raise ValueError("timestamp must be an RFC 3339 string or epoch milliseconds")


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether objects/arrays nest deeper than ``limit`` (iterative: no recursion to blow)."""
    if not isinstance(value, dict | list):
        return False
    for child in value.values() if isinstance(value, dict) else value:
        if isinstance(child, dict | list):
            break
    else:
        return limit < 1  # flat (most events): depth 1
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, dict | list):  # only containers nest: scalars are skipped
                stack.append((child, depth + 1))
    return False


def _check_string(doc: dict[str, Any], name: str, limit: int, problems: list[str]) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        problems.append(f"{name}: required string of 1-{limit} characters")
        return ""
    if len(value) > limit:
        problems.append(f"{name}: longer than {limit} characters")
    return value


def validate_document(doc: Any, *, record_timestamp_ms: int) -> tuple[UsageEvent | None, list[str]]:
    """Check the shape of a decoded event; returns the event or every problem found."""
    if not isinstance(doc, dict):
        return None, ["event must be a JSON object"]
    problems: list[str] = []
    if not doc.keys() <= EVENT_FIELDS:  # no set built for a valid event's keys
        problems += [f"{name}: unknown field" for name in sorted(doc.keys() - EVENT_FIELDS)]
    event_name = _check_string(doc, "event_name", 100, problems)
    customer_id = _check_string(doc, "customer_id", 200, problems)
    key = doc.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 200):
        problems.append("idempotency_key: must be a string of 1-200 characters")
    properties = doc.get("properties", {})
    if not isinstance(properties, dict):
        problems.append("properties: must be a JSON object")
    elif _depth_exceeds(properties, MAX_PROPERTIES_DEPTH):
        problems.append(f"properties: nested deeper than {MAX_PROPERTIES_DEPTH} levels")
    timestamp_ms = record_timestamp_ms
    if doc.get("timestamp") is not None:
        try:
            timestamp_ms = parse_timestamp(doc["timestamp"])
        except ValueError as exc:
            problems.append(f"timestamp: {exc}")
    if problems:
        return None, problems
    derived = key is None
    properties_json = canonical_json(properties)
    idempotency_key: str = (
        derive_idempotency_key(event_name, customer_id, timestamp_ms, properties)
        if key is None
        else key
    )
    return (
        accepted_event(
            event_name,
            customer_id,
            idempotency_key,
            timestamp_ms,
            properties,
            derived,
            content_fingerprint(event_name, timestamp_ms, properties, properties_json),
            properties_json,
        ),
        [],
    )


def _key_text(key: bytes | None) -> str:
    """The Kafka record key (the customer id, by contract) as text, '' when absent."""
    return key.decode("utf-8", "replace")[:200] if key else ""


def _ids(doc: Any) -> tuple[str, str]:
    """(customer_id, idempotency_key) of a decoded document, as far as it has them."""
    ids = doc if isinstance(doc, dict) else {}
    return str(ids.get("customer_id") or "")[:200], str(ids.get("idempotency_key") or "")[:200]


def _ids_of_large(raw: bytes) -> tuple[str, str]:
    """The ids of a record over the size limit, if it is JSON at all (rare: cost is fine)."""
    try:
        return _ids(loads_exact(raw))
    except (ValueError, UnicodeError, RecursionError):
        return "", ""


def parse_event(
    raw: bytes,
    *,
    record_timestamp_ms: int,
    now_ms: int,
    horizon_ms: int,
    max_bytes: int = MAX_EVENT_BYTES,
    key: bytes | None = None,
) -> UsageEvent | Rejection:
    """Decode and validate one record value against the event contract.

    ``key`` is the Kafka record key, the customer id by contract: a rejection of a
    record that is not a valid event (too large, not JSON, invalid) carries it as the
    customer id, else the ``customer_id`` of its JSON if it has one (the body may not
    say, or say it twice).
    """
    if len(raw) > max_bytes:
        customer, idempotency_key = _ids_of_large(raw)
        return Rejection(
            Reason.TOO_LARGE,
            f"{len(raw)} bytes > limit {max_bytes}",
            raw[:max_bytes],
            _key_text(key) or customer,
            idempotency_key,
        )
    try:
        doc = loads_exact(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return Rejection(Reason.INVALID_JSON, str(exc)[:300], raw, _key_text(key))
    except RecursionError:
        return Rejection(
            Reason.INVALID_EVENT,
            f"nested deeper than {MAX_PROPERTIES_DEPTH} levels (properties may nest at most "
            f"{MAX_PROPERTIES_DEPTH} levels; this document nests too deep to decode)",
            raw,
            _key_text(key),
        )
    try:
        event, problems = validate_document(doc, record_timestamp_ms=record_timestamp_ms)
        if event is not None:  # the ids are written to ClickHouse as UTF-8 too
            event.customer_id.encode()
            event.idempotency_key.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate (\ud800 escape): not UTF-8 text
        customer, idempotency_key = _ids(doc)
        return Rejection(
            Reason.INVALID_JSON, str(exc)[:300], raw, _key_text(key) or customer, idempotency_key
        )
    repeated = repeated_key_problems(raw, doc, event)
    if repeated:
        event, problems = None, problems + repeated
    if event is None:
        customer, idempotency_key = _ids(doc)
        return Rejection(
            Reason.INVALID_EVENT,
            "; ".join(problems),
            raw,
            customer_id=_key_text(key) or customer,
            idempotency_key=idempotency_key,
        )
    late = timing_problem(event, now_ms=now_ms, horizon_ms=horizon_ms)
    if late is not None:
        return Rejection(late[0], late[1], raw, event.customer_id, event.idempotency_key)
    return event


def timing_problem(event: UsageEvent, *, now_ms: int, horizon_ms: int) -> tuple[Reason, str] | None:
    """Why an event's time cannot be counted (too far ahead, or past the dedup horizon)."""
    if event.timestamp_ms > now_ms + MAX_FUTURE_MS:
        return (
            Reason.FUTURE_TIMESTAMP,
            f"timestamp {event.timestamp.isoformat()} is more than 5 minutes in the future",
        )
    if event.timestamp_ms < now_ms - horizon_ms:
        return (
            Reason.TOO_LATE,
            f"timestamp {event.timestamp.isoformat()} is older than the dedup horizon",
        )
    return None
