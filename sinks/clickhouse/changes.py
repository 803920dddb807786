"""What every operator-change table carries (``customer_mappings``, ``customer_plans``):
whose row changed, from where (``origin``: cli, api, topic), by whom, when, and the
version (epoch ms) that orders a customer's changes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from meterstream.sinks.clickhouse.client import ClickHouse


@dataclass(frozen=True)
class Change:
    """One change of a customer's row; the tables' own columns come in subclasses."""

    customer_id: str
    origin: str
    changed_by: str
    changed_at_ms: int
    version: int

    def provenance(self, changed_at: str) -> dict[str, Any]:
        """``origin``, ``changed_by``, ``changed_at`` (as the caller writes it), ``version``."""
        return {
            "origin": self.origin,
            "changed_by": self.changed_by,
            "changed_at": changed_at,
            "version": self.version,
        }


def next_version(current: Change | None, version: int | None, now_ms: int) -> int:
    """``version`` as given (a topic record's timestamp), else newer than every change so
    far: ``max(now, current + 1)`` ms."""
    if version is not None:
        return version
    return max(now_ms, (current.version + 1) if current else 0)


def latest_rows(
    ch: ClickHouse, latest_sql: str, customers: Iterable[str] | None
) -> list[tuple[Any, ...]]:
    """The rows of ``latest_sql`` (one per customer; its ``{where}`` is filled in) of
    ``customers``, or of every customer."""
    params: dict[str, Any] = {}
    where = ""
    if customers is not None:
        params["customers"] = sorted(set(customers))
        where = "WHERE customer_id IN {customers:Array(String)}"
    return ch.query_rows(latest_sql.format(where=where), parameters=params)
