"""ClickHouse side of prepaid credits (migration 0010): grants and voids as given, and the
append-only ledger. Plain reads and appends; the burn engine is pipeline/credits/.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.pricing import _dt

CREDIT_GRANTS = "credit_grants"
CREDIT_GRANTS_COLUMNS = (
    "customer_id",
    "grant_id",
    "kind",
    "amount",
    "currency",
    "effective_at",
    "expires_at",
    "priority",
    "origin",
    "reason",
    "changed_by",
    "changed_at",
)
CREDIT_LEDGER = "credit_ledger"
CREDIT_LEDGER_COLUMNS = (
    "customer_id",
    "entry_id",
    "kind",
    "amount",
    "currency",
    "at",
    "grant_id",
    "source",
    "seq",
    "key_total",
    "cause",
    "written_at",
)


def _now() -> dt.datetime:
    return _dt(time.time_ns() // 1_000_000)


def _customers_filter(customers: Iterable[str] | None) -> tuple[str, dict[str, Any]]:
    """A WHERE clause on ``customers`` (none: every customer) and its parameters."""
    if customers is None:
        return "", {}
    return "WHERE customer_id IN {customers:Array(String)}", {"customers": sorted(set(customers))}


def append_grants(ch: ClickHouse, rows: Sequence[Sequence[Any]]) -> None:
    """Append grant and void rows (columns :data:`CREDIT_GRANTS_COLUMNS` but ``changed_at``,
    times in epoch ms); a repeat of the same (customer, grant id, kind) collapses."""
    now = _now()
    ch.insert(
        CREDIT_GRANTS,
        [
            (*r[:5], _dt(int(r[5])), None if r[6] is None else _dt(int(r[6])), *r[7:11], now)
            for r in rows
        ],
        column_names=list(CREDIT_GRANTS_COLUMNS),
    )


def grant_rows(ch: ClickHouse, customers: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every grant and void row (of ``customers``, or all), times in epoch ms."""
    return _final_rows(ch, CREDIT_GRANTS, _GRANT_SELECT, _GRANT_ORDER, customers, ("amount",))


_GRANT_SELECT = """customer_id, grant_id, kind, toString(amount) AS amount, currency,
       toUnixTimestamp64Milli(effective_at) AS effective_ms,
       toUnixTimestamp64Milli(expires_at) AS expires_ms,
       toInt64(priority) AS priority, origin, reason, changed_by"""
_GRANT_ORDER = "customer_id, changed_at, grant_id, kind"


def append_entries(ch: ClickHouse, rows: Sequence[Sequence[Any]]) -> None:
    """Append ledger rows (columns :data:`CREDIT_LEDGER_COLUMNS` but ``written_at``, ``at``
    in epoch ms); a repeated entry id collapses (the table keeps one)."""
    if not rows:
        return
    now = _now()
    ch.insert(
        CREDIT_LEDGER,
        [(*r[:5], _dt(int(r[5])), *r[6:11], now) for r in rows],
        column_names=list(CREDIT_LEDGER_COLUMNS),
    )


def ledger_rows(ch: ClickHouse, customers: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every ledger row (of ``customers``, or all), one per entry id, in time order."""
    decimals = ("amount", "key_total")
    return _final_rows(ch, CREDIT_LEDGER, _LEDGER_SELECT, _LEDGER_ORDER, customers, decimals)


_LEDGER_SELECT = """customer_id, entry_id, kind, toString(amount) AS amount, currency,
       toUnixTimestamp64Milli(at) AS at_ms, nullIf(grant_id, '') AS grant_id,
       nullIf(source, '') AS source, toInt64(seq) AS seq,
       toString(key_total) AS key_total, cause"""
_LEDGER_ORDER = "customer_id, at, kind, ifNull(grant_id, ''), ifNull(source, ''), seq"


def _final_rows(
    ch: ClickHouse,
    table: str,
    select: str,
    order: str,
    customers: Iterable[str] | None,
    decimals: tuple[str, ...],
) -> list[dict[str, Any]]:
    """``select`` from ``table`` FINAL (of ``customers``, or all) in ``order``, with the
    decimal strings ``decimals`` (ClickHouse's ``toString``) as Decimals."""
    where, params = _customers_filter(customers)
    rows = ch.query_dicts(
        f"SELECT {select} FROM {table} FINAL {where} ORDER BY {order}", parameters=params
    )
    return [_decimals(r, *decimals) for r in rows]


def _decimals(row: dict[str, Any], *names: str) -> dict[str, Any]:
    """``row`` with the decimal strings ``names`` (ClickHouse's ``toString``) as Decimals."""
    return {**row, **{name: Decimal(row[name]) for name in names}}


def ledger_balance(ch: ClickHouse, customer_id: str) -> Decimal:
    """The sum of the customer's ledger, computed by ClickHouse."""
    return ledger_balances(ch, [customer_id]).get(customer_id, Decimal(0))


def ledger_balances(ch: ClickHouse, customers: Iterable[str]) -> dict[str, Decimal]:
    """The sum of the ledger of each of ``customers`` that has one, computed by ClickHouse
    (one read)."""
    customers = list(customers)
    if not customers:
        return {}
    where, params = _customers_filter(customers)
    rows = ch.query_rows(
        f"SELECT customer_id, toString(sum(amount)) FROM {CREDIT_LEDGER} FINAL {where}"
        " GROUP BY customer_id",
        parameters=params,
    )
    return {str(r[0]): Decimal(str(r[1])) for r in rows}


# ------------------------------------------------------------------ alerts


def set_thresholds(ch: ClickHouse, customer_id: str, doc: str, version: int, by: str) -> None:
    ch.insert(
        "credit_alert_thresholds",
        [(customer_id, doc, version, by)],
        column_names=["customer_id", "thresholds", "version", "changed_by"],
    )


def thresholds(ch: ClickHouse) -> dict[str, str]:
    """The current thresholds JSON per customer."""
    rows = ch.query_rows(
        "SELECT customer_id, argMax(thresholds, version) FROM credit_alert_thresholds"
        " GROUP BY customer_id"
    )
    return {str(r[0]): str(r[1]) for r in rows}


def append_alert_change(
    ch: ClickHouse, customer_id: str, version: int, states: str, alerts: str
) -> None:
    ch.insert(
        "credit_alerts",
        [(customer_id, version, states, alerts, _now())],
        column_names=["customer_id", "version", "states", "alerts", "created_at"],
    )


def alert_states(ch: ClickHouse) -> dict[str, tuple[int, str]]:
    """The latest (version, states JSON) per customer."""
    rows = ch.query_rows(
        "SELECT customer_id, max(version), argMax(states, version) FROM credit_alerts"
        " GROUP BY customer_id"
    )
    return {str(r[0]): (int(r[1]), str(r[2])) for r in rows}


def undelivered_alerts(ch: ClickHouse, channel: str) -> list[str]:
    """Alerts JSON (one string per alert) not yet delivered (nor dead) on ``channel``."""
    rows = ch.query_rows(
        """
        SELECT alert FROM (
            SELECT arrayJoin(JSONExtractArrayRaw(alerts)) AS alert FROM credit_alerts FINAL
        )
        WHERE JSONExtractString(alert, 'id') NOT IN (
            SELECT alert_id FROM credit_alert_deliveries WHERE channel = {channel:String}
        )
        """,
        parameters={"channel": channel},
    )
    return [str(r[0]) for r in rows]


def record_delivery(
    ch: ClickHouse, alert_id: str, channel: str, attempts: int, outcome: str
) -> None:
    ch.insert(
        "credit_alert_deliveries",
        [(alert_id, channel, _now(), attempts, outcome)],
        column_names=["alert_id", "channel", "delivered_at", "attempts", "outcome"],
    )


# ------------------------------------------------------------------ purchases (0012)

CREDIT_PURCHASES_COLUMNS = (
    "purchase_id",
    "customer_id",
    "origin",
    "amount",
    "currency",
    "status",
    "payment_intent_id",
    "stripe_event_ids",
    "failure_code",
    "note",
    "state",
    "version",
    "created_at",
    "updated_at",
)


def append_purchase(ch: ClickHouse, row: Sequence[Any]) -> None:
    """Append one purchase state (columns :data:`CREDIT_PURCHASES_COLUMNS` but
    ``updated_at``; ``created_at`` in epoch ms)."""
    ch.insert(
        "credit_purchases",
        [(*row[:12], _dt(int(row[12])), _now())],
        column_names=list(CREDIT_PURCHASES_COLUMNS),
    )


def purchase_states(ch: ClickHouse, customers: Iterable[str] | None = None) -> list[str]:
    """The latest state JSON of every purchase (of ``customers``, or all), oldest first."""
    where, params = _customers_filter(customers)
    rows = ch.query_rows(
        f"""
        SELECT argMax(state, version), min(created_at) AS made
        FROM credit_purchases {where}
        GROUP BY customer_id, purchase_id
        ORDER BY made
        """,
        parameters=params,
    )
    return [str(r[0]) for r in rows]


def append_recharge(
    ch: ClickHouse, customer_id: str, rule: str, state: str, enabled: bool, version: int, by: str
) -> None:
    ch.insert(
        "credit_recharge",
        [(customer_id, rule, state, enabled, version, by, _now())],
        column_names=[
            "customer_id",
            "rule",
            "state",
            "enabled",
            "version",
            "changed_by",
            "changed_at",
        ],
    )


def recharge_settings(ch: ClickHouse) -> dict[str, tuple[int, str, str]]:
    """The latest (version, rule JSON, state JSON) per customer."""
    rows = ch.query_rows(
        "SELECT customer_id, max(version), argMax(rule, version), argMax(state, version)"
        " FROM credit_recharge GROUP BY customer_id"
    )
    return {str(r[0]): (int(r[1]), str(r[2]), str(r[3])) for r in rows}
