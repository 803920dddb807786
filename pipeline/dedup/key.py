"""The dedup key: one name, one builder (STYLE habit 3).

An event is identified by (customer_id, idempotency_key). Two copies with the
same key are one event; the first copy counted wins. A copy whose content
fingerprint differs from the first is an idempotency conflict: counted once,
reported with reason ``idempotency_conflict``.
"""

from __future__ import annotations

from collections.abc import Iterable
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


class RecordCoverage:
    """Customers whose dedup table provably holds every key the record holds, so a
    key the table does not know is fresh without asking the record (ClickHouse).

    Why this is safe (the argument the worker relies on):

    * **Table ⊆ record.** A dedup key is written only after the batch's record
      insert returned (pipeline/worker/app.py, steps 1 then 3), with its event's
      timestamp; changelog recovery only restores keys written that way. So every
      table key of a customer is a record key of that customer, same timestamp.
    * **The check.** At the start of a batch (batches are processed one after
      another, so no other batch has inserted rows without writing their keys),
      for customer ``c``: ``T`` = table keys of ``c`` with timestamp >= ``cutoff``
      (counted by one scan of the table when the coverage is built, plus every
      key this worker writes since), ``R`` = distinct record keys of ``c`` with
      timestamp >= ``cutoff`` (one count query). ``T ⊆ R``, so ``|T| == |R|``
      means ``T == R``: every record key of ``c`` in that time range is, or was
      during this epoch, in the table. Any other outcome (a crashed batch left
      recorded-but-uncounted keys, the embedded broker restarted empty so the
      changelog is gone while ClickHouse kept the record, recovery stopped early,
      a sweep removed keys) leaves ``|T| < |R|``: ``c`` is not covered and its
      unknown keys are looked up in the record as before (rechecked every
      ``RECHECK_SECONDS``).
    * **Staying true.** While the epoch lasts, ``c``'s partition is this worker's
      and only this worker writes ``usage_events`` for it; every batch writes the
      dedup key of every record row it inserts. Keys leave the table only by the
      horizon sweep, which removes timestamps below its cutoff; ``floor_ms`` tracks
      the highest such cutoff. So for an event of a covered customer with
      timestamp >= ``floor_ms``: an earlier copy in the record within the range is
      in the table. Events below ``floor_ms`` (clock stepped back) are always
      looked up.
    * **Epochs.** Any rebalance (partitions assigned or revoked, a new consumer
      generation) or new process starts a new, empty coverage: nothing is
      trusted until checked again. Offsets play no part, so a broker that
      restarts empty (offsets from 0 on a new topic incarnation) cannot fool it.

    Not covered, by design: a key reused with a *different* timestamp after its
    first copy's event time fell out of the dedup horizon is not looked up (the
    dedup guarantee is the horizon, DESIGN.md); an exact resend that old is
    rejected as too late anyway.
    """

    RECHECK_SECONDS = 60.0

    def __init__(self, cutoff_ms: int, table_counts: dict[str, int] | None = None) -> None:
        self.cutoff_ms = cutoff_ms
        self.floor_ms = cutoff_ms
        self._table_counts: dict[str, int] = dict(table_counts or {})
        self._covered: set[str] = set()
        self._checked_at: dict[str, float] = {}

    @classmethod
    def from_table(
        cls, items: Iterable[tuple[bytes, list[object]]], cutoff_ms: int
    ) -> RecordCoverage:
        """Count the table's keys with timestamp >= ``cutoff_ms`` per customer."""
        counts: dict[str, int] = {}
        for key, value in items:
            if DedupEntry.load(value).timestamp_ms >= cutoff_ms:
                customer = DedupKey.decode(key).customer_id
                counts[customer] = counts.get(customer, 0) + 1
        return cls(cutoff_ms, counts)

    def to_check(self, customers: Iterable[str], now: float) -> list[str]:
        """Customers not covered and not checked in the last ``RECHECK_SECONDS``."""
        out = []
        for customer in customers:
            if customer in self._covered:
                continue
            checked = self._checked_at.get(customer)
            if checked is None or now - checked >= self.RECHECK_SECONDS:
                out.append(customer)
        return sorted(out)

    def checked(self, customers: Iterable[str], record_counts: dict[str, int], now: float) -> None:
        """Record the counts of distinct record keys (timestamp >= cutoff_ms) of ``customers``."""
        for customer in customers:
            if record_counts.get(customer, 0) == self._table_counts.get(customer, 0):
                self._covered.add(customer)
                self._checked_at.pop(customer, None)
            else:
                self._checked_at[customer] = now

    def written(self, customer_id: str, timestamp_ms: int) -> None:
        """A key newly written to the table (never one it already held)."""
        if timestamp_ms >= self.cutoff_ms:
            self._table_counts[customer_id] = self._table_counts.get(customer_id, 0) + 1

    def swept(self, cutoff_ms: int) -> None:
        """The sweep removed table keys with timestamp < ``cutoff_ms``."""
        self.floor_ms = max(self.floor_ms, cutoff_ms)

    def needs_lookup(self, customer_id: str, timestamp_ms: int) -> bool:
        """True unless a key of this event that the table lacks is provably fresh."""
        return customer_id not in self._covered or timestamp_ms < self.floor_ms

    @property
    def covered(self) -> int:
        return len(self._covered)
