"""The events API's request check (pure): a body in, Kafka records or every problem out.

A body is one event object or ``{"events": [...]}`` with 1-100 events. The
whole batch is checked before anything is written; one bad event rejects it
all, with the problems of every bad event by index. The checks are the ones
the worker applies (the event contract, the 64 KiB event limit, timestamps no
more than 5 minutes ahead and within the dedup horizon), so an accepted event
is never dead-lettered later for its content.

What is written for each event is the producer's document with two gaps
filled, as Billingrails and the design promise:

- no ``timestamp``: the time the API received it;
- no ``idempotency_key``: none is written, and the worker derives the same
  content key it derives for any keyless event (``drv_...``, a hash of name,
  customer, timestamp and properties). The API computes that key too and
  returns it, so the caller learns the key that will dedup the event. A
  keyless event *with* a timestamp is therefore safe to resend; one without
  either is not, because its receipt time differs on every try.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meterstream.errors import MalformedBody
from meterstream.events import (
    MAX_EVENT_BYTES,
    MAX_PROPERTIES_DEPTH,
    canonical_json,
    duplicate_keys,
    duplicate_problem,
    loads_exact,
    may_repeat_keys,
    timing_problem,
    validate_document,
)

MAX_BATCH_EVENTS = 100


@dataclass(frozen=True)
class IngestRecord:
    """One checked event, ready for ``usage-events``."""

    key: bytes  # customer_id: the partitioning the worker relies on
    value: bytes
    idempotency_key: str
    generated: bool  # the key was derived by meterstream, not sent


@dataclass
class IngestCheck:
    records: list[IngestRecord] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # {"index", "problems"}
    forbidden: list[dict[str, Any]] = field(default_factory=list)  # other customers' events

    @property
    def ok(self) -> bool:
        return not self.errors and not self.forbidden


def batch_of(doc: Any) -> tuple[list[Any], list[str]]:
    """The events of a body, or what is wrong with its shape."""
    if isinstance(doc, dict) and set(doc) == {"events"}:
        events = doc["events"]
        if not isinstance(events, list):
            return [], ['"events" must be an array of event objects']
        if not 1 <= len(events) <= MAX_BATCH_EVENTS:
            return [], [f"a batch holds 1-{MAX_BATCH_EVENTS} events, not {len(events)}"]
        return events, []
    if isinstance(doc, dict):
        return [doc], []
    return [], ['body must be one event object or {"events": [...]}']


def check_body(
    body: bytes, *, now_ms: int, horizon_ms: int, customer_id: str | None = None
) -> tuple[IngestCheck, list[str]]:
    """Check a request body. Returns the per-event check and body-level problems.

    ``customer_id``: the caller's key is restricted to this customer; events for
    any other customer are listed in ``forbidden``. A key repeated within one JSON
    object (``{"events": [A], "events": [B]}``, two ``customer_id``s in an event) is a
    problem of the body or of that event, never silently half-kept; so is nesting too
    deep to decode (the event contract allows 32 levels of properties).
    """
    try:
        doc = loads_exact(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"body is not JSON: {exc}") from None
    except RecursionError:
        return IngestCheck(), [
            f"body nested deeper than {MAX_PROPERTIES_DEPTH} levels (properties may nest at "
            f"most {MAX_PROPERTIES_DEPTH} levels; this body nests too deep to decode)"
        ]
    events, problems = batch_of(doc)
    repeated = _repeated_keys(body, doc, batch=_is_envelope(doc))
    problems = repeated.pop(-1, []) + problems
    check = IngestCheck()
    for index, raw in enumerate(events):
        record, event_problems = check_event(raw, now_ms=now_ms, horizon_ms=horizon_ms)
        event_problems = event_problems + repeated.get(index, [])
        if event_problems:
            check.errors.append({"index": index, "problems": event_problems})
        elif record is not None:
            if customer_id is not None and record.key != customer_id.encode():
                check.forbidden.append(
                    {
                        "index": index,
                        "problems": [f"customer_id: this key may only send {customer_id!r}"],
                    }
                )
            check.records.append(record)
    return check, problems


def _is_envelope(doc: Any) -> bool:
    return isinstance(doc, dict) and set(doc) == {"events"}


def _repeated_keys(body: bytes, doc: Any, *, batch: bool) -> dict[int, list[str]]:
    """Repeated keys of a body, as problems by event index (-1: the body itself)."""
    try:
        colons = canonical_json(doc).count(":")
    except UnicodeEncodeError:  # a lone surrogate: count exactly
        colons = -1
    if not may_repeat_keys(body, colons):
        return {}
    found: dict[int, list[str]] = {}
    for path, key in duplicate_keys(body):
        if not batch:
            found.setdefault(0, []).append(duplicate_problem(path, key))
        elif len(path) >= 2 and path[0] == "events" and isinstance(path[1], int):
            found.setdefault(path[1], []).append(duplicate_problem(path[2:], key))
        else:
            found.setdefault(-1, []).append(duplicate_problem(path, key))
    return found


def check_event(raw: Any, *, now_ms: int, horizon_ms: int) -> tuple[IngestRecord | None, list[str]]:
    try:
        return _check_event(raw, now_ms=now_ms, horizon_ms=horizon_ms)
    except UnicodeEncodeError:  # a lone surrogate escape (\ud800): not UTF-8 text
        return None, ["event holds a lone UTF-16 surrogate (\\ud800-\\udfff): not UTF-8 text"]


def _check_event(
    raw: Any, *, now_ms: int, horizon_ms: int
) -> tuple[IngestRecord | None, list[str]]:
    event, problems = validate_document(raw, record_timestamp_ms=now_ms)
    if event is None:
        return None, problems
    late = timing_problem(event, now_ms=now_ms, horizon_ms=horizon_ms)
    if late is not None:
        return None, [f"timestamp: {late[1]} ({late[0]})"]
    doc = dict(raw)
    if doc.get("timestamp") is None:
        doc["timestamp"] = event.timestamp_ms
    if doc.get("idempotency_key") is None:
        doc.pop("idempotency_key", None)
    value = canonical_json(doc).encode()
    if len(value) > MAX_EVENT_BYTES:
        return None, [f"event is {len(value)} bytes, more than the {MAX_EVENT_BYTES} limit"]
    return IngestRecord(
        key=event.customer_id.encode(),
        value=value,
        idempotency_key=event.idempotency_key,
        generated=event.key_derived,
    ), []
