"""Customers whose windows table provably holds every window ``meter_windows`` holds,
so a window the table lacks is new and its state is the batch's contribution alone,
without recomputing it from the record (ClickHouse).

Recomputing a window from the record is what the worker does for any window whose
state it does not hold: one ``usage_events`` query per window range, then every
event of the window through the meter again. For a window that never had an event
counted, that is work whose answer is known. Why the shortcut is exact (the
argument the worker relies on, next to :class:`meterstream.dedup.key.RecordCoverage`'s):

* **Table ⊆ meter_windows.** A window key is written to the windows table only
  after the batch's ``meter_windows`` insert returned (pipeline/worker/app.py, steps 2
  then 3), and recovery restores only keys written that way. So ``T`` (table keys
  of customer ``c`` with window start >= ``cutoff``, counted by one scan when the
  coverage is built plus every new key this worker writes since) is a subset of
  ``W`` (distinct (meter, customer, group, window start) of ``c`` in
  ``meter_windows`` with window start >= ``cutoff``, one count query). Equal counts
  mean equal sets: every window ``meter_windows`` holds for ``c`` is in the table.
* **No uncounted events.** The shortcut is taken only when ``c`` is also covered by
  the dedup :class:`~meterstream.dedup.key.RecordCoverage` for the window's start: every
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
* **Staying true, epochs, sweeps:** as for :class:`~meterstream.dedup.key.RecordCoverage`:
  the coverage is rebuilt on every rebalance or new consumer generation, counts
  every window key this worker adds to the table, and windows starting below the
  highest sweep cutoff (``floor_ms``) are always recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable

from meterstream.dedup.key import RecordCoverage


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
