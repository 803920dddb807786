"""What the record provably covers: customers whose dedup table holds every key the
record holds (:class:`RecordCoverage`), and (:class:`WindowCoverage`) customers whose
windows table provably holds every window ``meter_windows`` holds, so a window the table
lacks is new and its state is the batch's contribution alone, without recomputing it
from the record (ClickHouse).

Recomputing a window from the record is what the worker does for any window whose
state it does not hold: one ``usage_events`` query per window range, then every
event of the window through the meter again. For a window that never had an event
counted, that is work whose answer is known. Why the shortcut is exact (the
argument the worker relies on, next to :class:`RecordCoverage`'s):

* **Table ⊆ meter_windows.** A window key is written to the windows table only
  after the batch's ``meter_windows`` insert returned (pipeline/worker/batch.py, steps 2
  then 3), and recovery restores only keys written that way. So ``T`` (table keys
  of customer ``c`` with window start >= ``cutoff``, counted by one scan when the
  coverage is built plus every new key this worker writes since) is a subset of
  ``W`` (distinct (meter, customer, group, window start) of ``c`` in
  ``meter_windows`` with window start >= ``cutoff``, one count query). Equal counts
  mean equal sets: every window ``meter_windows`` holds for ``c`` is in the table.
* **No uncounted events.** The shortcut is taken only when ``c`` is also covered by
  the dedup :class:`RecordCoverage` for the window's start: every
  record key of ``c`` (timestamp >= cutoff) is in the dedup table, and a dedup key
  is written only after its event's windows were written to ``meter_windows`` and
  to the windows table. So every event of ``c`` in the record was counted into a
  window that ``meter_windows`` holds.
* **Together:** a window of ``c`` starting at or after both floors that the table
  lacks is in neither, so the record holds no event of it before this batch: its
  state is exactly this batch's contribution. A window of an event recorded but
  not counted (a replayed batch) is still recomputed, as is every window of a
  customer not covered (a lost or partly recovered table, a window written to
  ``meter_windows`` by a repair but not to the table, the broker restarted empty:
  all leave ``|T| < |W|``).
* **Customer totals** (pipeline/meters/fold.py, ``ALL_GROUPS``): the windows table's
  only, never in ``meter_windows``, so not counted in ``T``. A customer total is written
  in the same table write as its group windows, so one the table lacks is new exactly
  when its window is; except beside group windows written before customer totals
  existed (found by the scan that builds the coverage), or when the table holds one of
  its groups: those are rebuilt from the record.
* **Staying true, epochs, sweeps:** as for :class:`RecordCoverage`:
  the coverage is rebuilt on every rebalance or new consumer generation, counts
  every window key this worker adds to the table, and windows starting below the
  highest sweep cutoff (``floor_ms``) are always recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable

from meterstream.dedup.key import DedupEntry, DedupKey


class RecordCoverage:
    """Customers whose dedup table provably holds every key the record holds, so a
    key the table does not know is fresh without asking the record (ClickHouse).

    Why this is safe (the argument the worker relies on):

    * **Table ⊆ record.** A dedup key is written only after the batch's record
      insert returned (pipeline/worker/batch.py, steps 1 then 3), with its event's
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


class WindowCoverage(RecordCoverage):
    """:class:`RecordCoverage`'s bookkeeping, counting window keys by window start."""

    @classmethod
    def from_windows(cls, windows: Iterable[tuple[str, int]], cutoff_ms: int) -> WindowCoverage:
        """Count the table's windows (customer_id, window_start_ms) with start >= cutoff."""
        counts: dict[str, int] = {}
        for customer, start_ms in windows:
            if start_ms >= cutoff_ms:
                counts[customer] = counts.get(customer, 0) + 1
        return cls(cutoff_ms, counts)

    def is_new(self, customer_id: str, window_start_ms: int) -> bool:
        """True when a window the table lacks provably never had an event counted."""
        return not self.needs_lookup(customer_id, window_start_ms)
