"""What every operator-change table carries (``customer_mappings``, ``customer_plans``):
whose row changed, from where (``origin``: cli, api, topic), by whom, when, and the
version (epoch ms) that orders a customer's changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
