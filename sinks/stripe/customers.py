"""The durable customer tables in ClickHouse (migration 0007): the operator's mapping
(``customer_mappings``), property pins (``stripe_customer_pins``) and refused Stripe ids
(``stripe_customer_refusals``), and the read of the Stripe ids a customer's events name.

Plain reads and appends; which id is used is decided by pipeline/billing/stripe_ids.py.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meterstream.sinks.clickhouse.changes import Change, latest_rows, next_version
from meterstream.sinks.clickhouse.client import ClickHouse

CUSTOMER_MAPPINGS = "customer_mappings"
CUSTOMER_MAPPINGS_COLUMNS = (
    "customer_id",
    "stripe_customer_id",
    "origin",
    "changed_by",
    "changed_at",
    "version",
)
PINS = "stripe_customer_pins"
PINS_COLUMNS = ("customer_id", "stripe_customer_id", "source", "pinned_at", "version")
REFUSALS = "stripe_customer_refusals"
REFUSALS_COLUMNS = (
    "customer_id",
    "claimed_stripe_customer_id",
    "reason",
    "kept_stripe_customer_id",
    "other_customer_id",
    "source",
    "meter",
    "detected_at",
)
MAX_VALUES_PER_CUSTOMER = 16  # distinct Stripe ids read per customer (the first ones)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dt(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


@dataclass(frozen=True)
class MappingRow(Change):
    """One change of the operator's mapping (``stripe_customer_id`` '' = removed)."""

    stripe_customer_id: str

    def public(self) -> dict[str, Any]:
        changed_at = _dt(self.changed_at_ms).isoformat(timespec="milliseconds")
        return {
            "customer_id": self.customer_id,
            "stripe_customer_id": self.stripe_customer_id or None,
            **self.provenance(changed_at),
        }


def _row(r: tuple[Any, ...]) -> MappingRow:
    """``(customer_id, stripe_customer_id, origin, changed_by, changed_at ms, version)``."""
    customer, stripe_id, origin, changed_by = (str(v) for v in r[:4])
    return MappingRow(customer, origin, changed_by, int(r[4]), int(r[5]), stripe_id)


_CURRENT = """
SELECT customer_id, argMax(stripe_customer_id, version), argMax(origin, version),
       argMax(changed_by, version), toUnixTimestamp64Milli(argMax(changed_at, version)),
       max(version)
FROM customer_mappings
{where}
GROUP BY customer_id
ORDER BY customer_id
"""


def current_rows(ch: ClickHouse, customers: Iterable[str] | None = None) -> dict[str, MappingRow]:
    """The latest change per customer (removals included), of ``customers`` or of everyone."""
    rows = latest_rows(ch, _CURRENT, customers)
    return {str(r[0]): _row(r) for r in rows}


def current_mapping(ch: ClickHouse) -> dict[str, str]:
    """customer_id -> Stripe customer id, for every customer mapped now."""
    return {c: r.stripe_customer_id for c, r in current_rows(ch).items() if r.stripe_customer_id}


def history(ch: ClickHouse, customer_id: str) -> list[MappingRow]:
    """Every change of one customer's mapping, oldest first (the audit trail)."""
    rows = ch.query_rows(
        """
        SELECT customer_id, stripe_customer_id, origin, changed_by,
               toUnixTimestamp64Milli(changed_at), version
        FROM customer_mappings WHERE customer_id = {customer:String}
        ORDER BY version, stripe_customer_id LIMIT 1 BY version, stripe_customer_id
        """,
        parameters={"customer": customer_id},
    )
    return [_row(r) for r in rows]


def append_change(
    ch: ClickHouse,
    customer_id: str,
    stripe_customer_id: str | None,
    origin: str,
    changed_by: str,
    version: int | None = None,
) -> MappingRow | None:
    """Record a change of ``customer_id``'s mapping (``None`` removes it); returns the row.

    Without ``version`` (the CLI and the API) the change is newer than every change so
    far: ``max(now, current + 1)`` ms. With one (a topic record's timestamp) it is
    recorded as given. Returns ``None``, and writes nothing, when the mapping already
    is what is asked (setting the same id again leaves no new audit row).
    """
    current = current_rows(ch, [customer_id]).get(customer_id)
    wanted = stripe_customer_id or ""
    if current is not None and current.stripe_customer_id == wanted and version is None:
        return None
    if current is None and not wanted and version is None:
        return None  # nothing to remove
    now = _now_ms()
    version = next_version(current, version, now)
    row = MappingRow(customer_id, origin, changed_by, now, version, wanted)
    ch.insert(
        CUSTOMER_MAPPINGS,
        [(customer_id, wanted, origin, changed_by, _dt(now), version)],
        column_names=list(CUSTOMER_MAPPINGS_COLUMNS),
    )
    return row


def known_changes(ch: ClickHouse) -> set[tuple[str, int, str]]:
    """(customer, version, stripe id) of every change recorded: a topic record already
    recorded (the same timestamp and value) is a replay, not a new change."""
    rows = ch.query_rows(
        "SELECT DISTINCT customer_id, version, stripe_customer_id FROM customer_mappings"
    )
    return {(str(c), int(v), str(s)) for c, v, s in rows}


# ------------------------------------------------------------------ pins


def pins(ch: ClickHouse) -> dict[str, tuple[str, int]]:
    """customer_id -> (Stripe id, version) of its pin (the earliest), for every pinned one."""
    rows = ch.query_rows(
        """
        SELECT customer_id, argMin(stripe_customer_id, (version, stripe_customer_id)),
               min(version)
        FROM stripe_customer_pins GROUP BY customer_id
        """
    )
    return {str(c): (str(s), int(v)) for c, s, v in rows}


def write_pins(ch: ClickHouse, new: Mapping[str, str], source: str) -> None:
    now = _now_ms()
    ch.insert(
        PINS,
        [(c, s, source, _dt(now), now) for c, s in sorted(new.items())],
        column_names=list(PINS_COLUMNS),
    )


# ------------------------------------------------------------------ refusals


def refusal_keys(ch: ClickHouse) -> set[tuple[str, str, str]]:
    """(customer, claimed id, reason) of every refusal recorded."""
    rows = ch.query_rows(
        "SELECT DISTINCT customer_id, claimed_stripe_customer_id, reason"
        " FROM stripe_customer_refusals"
    )
    return {(str(c), str(s), str(r)) for c, s, r in rows}


def write_refusals(
    ch: ClickHouse, rows: Iterable[tuple[str, str, str, str, str, str, str]]
) -> None:
    """Rows of (customer, claimed, reason, kept, other customer, source, meter)."""
    now = _dt(_now_ms())
    ch.insert(REFUSALS, [(*r, now) for r in rows], column_names=list(REFUSALS_COLUMNS))


# ------------------------------------------------------------------ the record


def property_values(
    ch: ClickHouse, path: str, customers: list[str]
) -> dict[str, list[tuple[str, int]]]:
    """The distinct values of ``path`` (``properties.a.b``) in each customer's recorded
    events, with when each was first recorded (epoch ms), earliest first; at most
    MAX_VALUES_PER_CUSTOMER per customer. Missing, null and empty are no value; a
    value that is not a JSON string comes back as ``<Type> raw-json`` (never a Stripe
    id: it is refused, not read as one)."""
    if not customers or not path.startswith("properties."):
        return {}
    parts = path.split(".")[1:]
    args = ", ".join(f"{{p{i}:String}}" for i in range(len(parts)))
    params: dict[str, Any] = {f"p{i}": p for i, p in enumerate(parts)}
    params["customers"] = sorted(set(customers))
    rows = ch.query_rows(
        f"""
        SELECT customer_id, value, toUnixTimestamp64Milli(min(ingested_at)) AS first
        FROM (
            SELECT customer_id, ingested_at,
                   JSONExtractRaw(properties, {args}) AS raw,
                   multiIf(startsWith(raw, '"'), JSONExtractString(raw),
                           raw IN ('', 'null'), '',
                           concat('<', toString(JSONType(raw)), '> ', raw)) AS value
            FROM usage_events
            WHERE customer_id IN {{customers:Array(String)}}
        )
        WHERE value != ''
        GROUP BY customer_id, value
        ORDER BY customer_id, first, value
        LIMIT {MAX_VALUES_PER_CUSTOMER} BY customer_id
        """,
        parameters=params,
    )
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for customer, value, first in rows:
        out[str(customer)].append((str(value), int(first)))
    return dict(out)
