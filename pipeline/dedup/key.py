"""The dedup key: one name, one builder (STYLE habit 3).

An event is identified by (customer_id, idempotency_key). Two copies with the
same key are one event; the first copy counted wins. A copy whose content
fingerprint differs from the first is an idempotency conflict: counted once,
reported with reason ``idempotency_conflict``.
"""

from __future__ import annotations

from typing import NamedTuple

import orjson

from meterstream.events import UsageEvent

_new_tuple = tuple.__new__


def json_key(parts: list[object]) -> bytes:
    """``parts`` as compact JSON bytes sized to their content, for a long-lived table key.

    orjson (3.12 and later) returns bytes that keep its 4 KiB output buffer;
    a table holding a million keys would hold 4 GB. The join copies the key
    into an object of its own size (measured: 4,097 bytes per key before, 65
    after).
    """
    return b"".join((orjson.dumps(parts), b""))


class DedupKey(NamedTuple):
    customer_id: str
    idempotency_key: str

    @classmethod
    def of(cls, event: UsageEvent) -> DedupKey:
        # tuple.__new__ directly: the generated __new__ is a Python call (5 per event)
        return _new_tuple(cls, (event.customer_id, event.idempotency_key))

    def encode(self) -> bytes:
        """The dedup table key (JSON text, UTF-8)."""
        return json_key([self.customer_id, self.idempotency_key])

    @classmethod
    def decode(cls, raw: bytes) -> DedupKey:
        """Inverse of :meth:`encode`."""
        customer_id, idempotency_key = orjson.loads(raw)
        return cls(str(customer_id), str(idempotency_key))


class DedupEntry(NamedTuple):
    """What the dedup table remembers of a counted event."""

    fingerprint: str
    timestamp_ms: int

    def dump(self) -> tuple[str, int]:
        """The table value: a JSON array in the changelog. A plain tuple of a str and an
        int, not a list: the garbage collector stops tracking it, and the memory store
        holds one per key of the horizon (millions); recovered values are lists."""
        return (self.fingerprint, self.timestamp_ms)

    @classmethod
    def load(cls, value: list[object]) -> DedupEntry:
        return cls(str(value[0]), int(value[1]))  # type: ignore[call-overload]
