"""The dedup key: one name, one builder (STYLE habit 3).

An event is identified by (customer_id, idempotency_key). Two copies with the
same key are one event; the first copy counted wins. A copy whose content
fingerprint differs from the first is an idempotency conflict: counted once,
reported with reason ``idempotency_conflict``.
"""

from __future__ import annotations

from typing import NamedTuple

import orjson

from pipeline.events import UsageEvent


class DedupKey(NamedTuple):
    customer_id: str
    idempotency_key: str

    @classmethod
    def of(cls, event: UsageEvent) -> DedupKey:
        return cls(event.customer_id, event.idempotency_key)

    def encode(self) -> bytes:
        """The dedup table key (JSON text, UTF-8)."""
        return orjson.dumps([self.customer_id, self.idempotency_key])


class DedupEntry(NamedTuple):
    """What the dedup table remembers of a counted event."""

    fingerprint: str
    timestamp_ms: int

    def dump(self) -> list[object]:
        return [self.fingerprint, self.timestamp_ms]

    @classmethod
    def load(cls, value: list[object]) -> DedupEntry:
        return cls(str(value[0]), int(value[1]))  # type: ignore[call-overload]
