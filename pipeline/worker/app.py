"""The Faust app: topics, tables and one agent that wires the pure batch logic
(pipeline/dedup/resolve.py, pipeline/meters/fold.py) to Kafka and ClickHouse. No
business rules live here.

Order of side effects for one batch (each step only after the previous succeeded):

0. (No side effect.) The state of every touched window before the batch: the
   table's, or, where the table has none (lost or unrecovered state) or the events
   were recorded but never counted, the exact state recomputed from the record
   (which does not hold this batch's fresh events yet); a provably new window has
   none. Against it, in arrival order, the range decisions (fold.enforce_limits):
   which meters refuse which fresh events because a total would leave its range.
1. Insert accepted events into ClickHouse ``usage_events`` (idempotent:
   ReplacingMergeTree on (customer_id, idempotency_key) plus an insert
   deduplication token), each with the meters that refused it, and send bad ones
   to ``usage-events-dlq``. The record is now complete for this batch, decisions
   included.
2. The new state of every touched window: step 0's state merged with the batch's
   contribution. Insert them into ``meter_windows`` with a fresh version (the
   states are computed while step 1's insert runs; this insert only starts after
   it returned).
3. Write window states, then dedup keys, to the Faust tables (one changelog record
   per key per batch, sent as whole record batches and acknowledged, windows
   before dedup keys; pipeline/worker/tables.py). Meanwhile the audit rows of rejected
   and duplicate events go into ``rejected_events``; nothing reads them to count,
   and a replay finds the same rejections and duplicates again.
4. Return to Faust (after the ``rejected_events`` insert returned), which acks
   the batch; offsets are committed after Faust flushes its producer (changelogs
   included). A crash anywhere before this replays the batch: step 1 is
   idempotent and step 2 recomputes from the record, whose recorded decisions it
   reads instead of deciding again.

A batch that raises for its data rather than a broken dependency is isolated
(``Pipeline._isolate``): processed again in halves, the records that fail alone
set aside as ``unprocessable``; see the comment there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import faust
import orjson
from faust.types import EventT

from meterstream.dedup import resolve
from meterstream.dedup.coverage import RecordCoverage, WindowCoverage
from meterstream.dedup.key import DedupEntry, DedupKey
from meterstream.errors import DependencyError
from meterstream.events import Reason, Rejection, UsageEvent
from meterstream.kafka import client_options, customer_partition, shorten_fetch_wait
from meterstream.meters import fold
from meterstream.meters.aggregation import WindowState
from meterstream.meters.config import MetersConfig
from meterstream.settings import Settings
from meterstream.sinks.clickhouse import queries, writer
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.topics import USAGE_EVENTS, USAGE_EVENTS_DLQ
from meterstream.worker import isolation
from meterstream.worker.batching import broker_backlog, take_batches
from meterstream.worker.gaps import GapFiller
from meterstream.worker.sweep import HorizonSweep
from meterstream.worker.tables import (
    DecodedValues,
    RocksDBMemory,
    delete_by_partition,
    memory_store_dict,
    table_options,
    table_reader,
    write_by_partition,
    write_by_partition_batched,
)

log = logging.getLogger("meterstream.worker")
EXIT_BATCH_FAILED = 70
RecordListener = Callable[
    [Sequence[UsageEvent], Mapping[fold.WindowKey, WindowState], set[fold.WindowKey]],
    None,
]
"""Told each batch's inserted events, their window states and windows counted from the record."""
END_MARKER = b"\x00meterstream:end-of-batch"
SWEEP_EVERY_SECONDS = 60.0
SWEEP_SLICE_SECONDS = 0.02  # of each batch, while a sweep pass runs


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class BatchReport:
    records: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    windows_written: int = 0
    windows_recomputed: int = 0


@dataclass
class Attempt:
    """What one processing attempt of a batch has done, as far as it got: the events it
    is responsible for counting (fresh, or recorded and not counted) and the windows it
    computed (and may have written). A batch isolation cleans up after it."""

    responsible: set[DedupKey] = field(default_factory=set)
    windows: set[fold.WindowKey] = field(default_factory=set)


def is_dependency_failure(exc: BaseException) -> bool:
    """A broken dependency (ClickHouse, the broker, the network), not bad data.

    ClickHouse errors are retried inside ``chio.call`` and never get here; a broker
    error that is about the data (a record too large) is data."""
    from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

    if isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError):
        return False
    return isinstance(exc, DependencyError | KafkaError | OSError | TimeoutError)


def _decode_one(
    record: resolve.SourceRecord, received: int, horizon_ms: int
) -> UsageEvent | Rejection | None:
    """The record as the batch decodes it; None if even that raises."""
    try:
        decoded, rejections = resolve.decode_batch([record], now_ms=received, horizon_ms=horizon_ms)
    except Exception:
        return None
    return decoded[0][1] if decoded else rejections[0]


def _key_of(parsed: UsageEvent | Rejection | None) -> DedupKey | None:
    return DedupKey.of(parsed) if isinstance(parsed, UsageEvent) else None


class Pipeline:
    """Everything one worker needs to process batches; built once per worker."""

    def __init__(
        self, app: faust.App, settings: Settings, meters: MetersConfig, chio: ClickHouseIO
    ) -> None:
        self.app = app
        self.settings = settings
        self.meters = meters
        self.chio = chio
        self.metrics = chio.metrics
        self.horizon_ms = settings.dedup_horizon_seconds * 1000
        self.dlq = app.topic(
            settings.topic(USAGE_EVENTS_DLQ.name),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
        )
        # key_type=bytes is what makes Faust use raw keys in the changelog too, so
        # recovered keys are the same bytes the worker looks up.
        self.dedup, self.windows = (
            app.Table(
                name,
                partitions=settings.partitions,
                key_type=bytes,
                options=table_options(settings),
            )
            for name in ("dedup", "windows")
        )
        # One block cache, memtables charged to it, for every partition of both tables.
        self.rocksdb_memory: RocksDBMemory | None = None
        if settings.store == "rocksdb":
            self.rocksdb_memory = RocksDBMemory(settings.rocksdb_block_cache_mb)
            for table in (self.dedup, self.windows):
                self.rocksdb_memory.install(table)
        self._sweep = HorizonSweep(
            self.dedup,
            self.windows,
            every_seconds=SWEEP_EVERY_SECONDS,
            slice_seconds=SWEEP_SLICE_SECONDS,
        )
        self.gaps: GapFiller | None = None
        # Which customers' unknown keys need no record lookup (pipeline/dedup/coverage.py);
        # rebuilt on every rebalance (``epoch``) and consumer generation.
        self.epoch = 0
        # Told every batch's record inserts, after the inserts returned (the Stripe
        # forwarder's incremental verification).
        self.record_listeners: list[RecordListener] = []
        # Told after every batch: its records came from the broker and its writes were
        # acknowledged by it (the worker's lifeline counts that as contact).
        self.batch_listeners: list[Callable[[], None]] = []
        # Held from the record insert to the meter_windows insert (and by reconciliation).
        self.record_lock = asyncio.Lock()
        self._coverage: RecordCoverage | None = None
        # Which customers' missing windows are new (pipeline/dedup/coverage.py); same epochs.
        self._window_coverage: WindowCoverage | None = None
        self._window_coverage_epoch: tuple[int, int | None] = (-1, None)
        # customer totals missing beside their group windows (see _scan_windows)
        self._legacy_totals: set[fold.Series] = set()
        self._coverage_epoch: tuple[int, int | None] = (-1, None)
        # Window states decoded in the last two batches (memory store only: see
        # DecodedValues; a RocksDB read decodes new objects every time).
        self._decoded_windows = (
            DecodedValues() if memory_store_dict(self.windows) is not None else None
        )

    def new_epoch(self) -> None:
        """Partitions were assigned or revoked: nothing is covered until checked again."""
        self.epoch += 1
        if self._decoded_windows is not None:
            self._decoded_windows.clear()  # not needed to be right: frees revoked windows
        self._sweep.reset()  # its iterators may read revoked partitions

    # -- the batch -------------------------------------------------------------------

    async def process(self, batch: Sequence[EventT]) -> BatchReport:
        """Process one batch (the side effects in the module docstring's order).

        A batch that raises for a reason other than a broken dependency is isolated
        (:meth:`_isolate`): the records that make it fail are dead-lettered
        ``unprocessable`` and the rest is processed. Only a dependency failure (or a
        failure of the isolation itself) leaves this method with an exception.
        """
        received = now_ms()
        context: dict[int, EventT] = {ev.message.partition: ev for ev in batch}
        if log.isEnabledFor(logging.DEBUG):
            spans: dict[int, list[int]] = {}
            for ev in batch:
                spans.setdefault(ev.message.partition, []).append(ev.message.offset)
            log.debug(
                "batch offsets %s",
                {p: (min(o), max(o), len(o)) for p, o in sorted(spans.items())},
            )
        records = [
            resolve.SourceRecord(
                value=ev.message.value or b"",
                partition=ev.message.partition,
                offset=ev.message.offset,
                timestamp_ms=int(ev.message.timestamp * 1000),
                key=ev.message.key if isinstance(ev.message.key, bytes) else None,
            )
            for ev in batch
        ]
        if self.gaps is not None:
            offsets: dict[int, list[int]] = {}
            for rec in records:
                offsets.setdefault(rec.partition, []).append(rec.offset)
            skipped = await self.gaps.missing(batch[-1].message.generation_id, offsets)
            if skipped:
                self.metrics.gap_records.inc(len(skipped))
                records.extend(
                    resolve.SourceRecord(
                        r.value or b"", r.partition, r.offset, r.timestamp, r.key or None
                    )
                    for r in skipped
                )
                # first copy wins in offset order, per partition (= per customer)
                records.sort(key=lambda r: (r.partition, r.offset))
        generation = batch[-1].message.generation_id if batch else None
        attempt = Attempt()
        try:
            return await self._process_records(records, context, generation, received, attempt)
        except Exception as exc:
            if is_dependency_failure(exc):
                raise
            return await self._isolate(records, context, generation, received, attempt, exc)

    async def _process_records(
        self,
        records: Sequence[resolve.SourceRecord],
        context: dict[int, EventT],
        generation: int | None,
        received: int,
        attempt: Attempt,
        exclude: AbstractSet[DedupKey] = frozenset(),
        use_coverage: bool = True,
    ) -> BatchReport:
        """The batch's records through every step; ``attempt`` learns, as they are known,
        the events this call is responsible for counting and the windows it writes (what
        an isolation must clean up if it raises). While a batch is isolated: ``exclude``,
        events in the record but not counted yet that window rebuilds must skip, and no
        coverage (a failed attempt may have inserted rows without writing their keys)."""
        report = BatchReport(records=len(records))
        decoded, rejections = resolve.decode_batch(
            records, now_ms=received, horizon_ms=self.horizon_ms
        )
        partition_of_customer = {ev.customer_id: rec.partition for rec, ev in decoded}
        events = [ev for _, ev in decoded]

        # Dedup: the table knows what was counted; the record knows what was accepted.
        # A key the table lacks is looked up in the record unless its customer is
        # covered (RecordCoverage: the table provably holds all its record keys).
        coverage: RecordCoverage | None = None
        if use_coverage:
            coverage = await self._check_coverage(events, received, generation)
            if self._coverage_epoch != (self.epoch, generation):
                coverage = None  # a rebalance ran during the check: trust nothing this batch
        counted: dict[DedupKey, str] = {}
        unknown: set[DedupKey] = set()
        table_keys: dict[DedupKey, bytes] = {}  # each key encoded once per batch
        dedup_get, windows_get = table_reader(self.dedup), table_reader(self.windows)
        not_looked_up = 0
        for event in events:
            key = DedupKey.of(event)
            if key in table_keys:
                continue
            table_keys[key] = raw_key = key.encode()
            raw = dedup_get(raw_key)
            if raw is not None:
                counted[key] = DedupEntry.load(raw).fingerprint
            elif coverage is None or coverage.needs_lookup(event.customer_id, event.timestamp_ms):
                unknown.add(key)
            else:
                not_looked_up += 1
        self.metrics.record_lookups.inc(len(unknown))
        self.metrics.record_lookups_skipped.inc(not_looked_up)
        found = await self.chio.call(queries.recorded_keys, list(unknown)) if unknown else {}
        recorded = {DedupKey(*pair): rec.fingerprint for pair, rec in found.items()}
        excluded = {DedupKey(*pair) for pair, rec in found.items() if rec.excluded}
        dd = resolve.resolve_duplicates(events, counted, recorded, excluded)
        attempt.responsible.update(map(DedupKey.of, (*dd.fresh, *dd.recorded_uncounted)))

        contrib = fold.contributions(self.meters, dd.fresh)
        deltas = contrib.states
        uncounted_windows = fold.windows_of(self.meters, dd.recorded_uncounted, totals=True)
        # the windows the batch adds to, and the customer totals enforce_limits adds
        totals = fold.total_keys(self.meters, deltas)
        totals.update(k for k in uncounted_windows if k.is_total)
        touched = deltas.keys() | totals
        aggs = self.meters.aggregators
        encoded = {key: key.encode() for key in touched | uncounted_windows}
        window_cache = self._decoded_windows

        # 1. The record, then 2. the windows, under the record lock: a Stripe
        # verification (which repairs meter_windows from the record) never runs
        # between the two inserts, so it never sees half a batch and "repairs" it.
        async with self.record_lock:
            # The state of every touched window before this batch: the table's, or
            # rebuilt from the record (before this batch's rows are in it). The range
            # decisions (enforce_limits) are taken against it, in arrival order, and go
            # into the record rows; a rebuild later reads them back, never re-decides.
            table_states: dict[fold.WindowKey, WindowState] = {}
            for wkey in touched:
                raw_key = encoded[wkey]
                raw = windows_get(raw_key)
                if raw is None:
                    continue
                load = aggs[wkey.meter].load
                table_states[wkey] = (
                    load(raw) if window_cache is None else window_cache.get(raw_key, raw, load)
                )
            absent = [k for k in touched if k not in table_states]
            # A customer total is written with its group windows, so a new one is as
            # provable as a window; never when the table holds one of its groups.
            held = {(k.meter, k.customer_id, k.window_start_ms) for k in table_states}
            new_windows = await self._new_windows(
                [
                    k
                    for k in absent
                    if k not in totals or (k.meter, k.customer_id, k.window_start_ms) not in held
                ],
                coverage,
                generation,
            )
            rebuild = {k for k in absent if k not in (new_windows or ())} | uncounted_windows
            self._count_rebuilds(rebuild, uncounted_windows)
            rebuilt = await self._recompute(rebuild, exclude) if rebuild else {}
            bases = {**table_states, **rebuilt}
            fold.enforce_limits(self.meters, contrib, bases, dd.fresh)
            bad = rejections + dd.conflicts + contrib.rejections
            # 1. The record, inserted while the new window states are computed.
            record_written = asyncio.ensure_future(
                self._write_record(dd.fresh, contrib.counted_by, contrib.refused, received)
            )
            try:
                # Let it start now (build its rows, hand them to the ClickHouse thread):
                # nothing below awaits until the states are computed.
                await asyncio.sleep(0)
                # 2. Windows: the state before the batch merged with what it adds.
                new_states = fold.merge_into(self.meters, bases, deltas)
                for wkey in rebuild:
                    if wkey not in new_states:
                        new_states[wkey] = rebuilt[wkey]
                attempt.windows.update(new_states)
                window_dumps = {k: aggs[k.meter].dump(state) for k, state in new_states.items()}
                window_rows = self._window_rows(new_states, window_dumps, received)
            finally:
                await asyncio.wait([record_written])  # never left running behind the batch
            record_written.result()  # a failed record insert fails the batch here
            await self._send_dlq(bad, received)
            if window_rows:
                await self._insert(writer.METER_WINDOWS, window_rows, writer.METER_WINDOWS_COLUMNS)
            self._injected_fault((*dd.fresh, *dd.recorded_uncounted))
            # The audit rows of rejected and duplicate events go in while the tables are
            # written; the batch returns (and is acked) only after they are in.
            rejected_written = asyncio.ensure_future(
                self._write_rejected(bad, dd.duplicates, received)
            )
            # Told after both the record and meter_windows hold this batch, still under
            # the record lock: the events inserted into the record, their windows'
            # states (the batch's deltas: the same meter code over the same events),
            # and the windows whose record changed otherwise (counted from the record).
            told_states = {k: v for k, v in deltas.items() if k not in totals} if totals else deltas
            told_reread = uncounted_windows - totals
            for listener in self.record_listeners:
                listener(dd.fresh, told_states, told_reread)

        # 3. Tables, one write per key per batch, in the customer's partition.
        # Every key new to the windows table is counted in the window coverage (its
        # ``|T|``), whether or not this batch used the coverage.
        window_coverage = self._window_coverage
        added_windows = [  # keys the windows table did not hold before this batch
            k
            for k in new_states
            if k not in totals
            and k not in table_states
            and (k in deltas or windows_get(encoded[k]) is None)
        ]
        window_items: dict[bytes, Any] = {}
        window_partitions: dict[bytes, int] = {}
        for wkey in new_states:
            raw_key = encoded[wkey]
            window_items[raw_key] = window_dumps[wkey]
            window_partitions[raw_key] = partition_of_customer[wkey.customer_id]
            if window_cache is not None:
                window_cache.put(raw_key, window_dumps[wkey], new_states[wkey])
        # Windows before dedup keys: a key must never say "counted" while its
        # window update could still be lost (each write returns once acknowledged).
        await self._write_table(self.windows, window_items, window_partitions, context)
        if window_cache is not None:
            window_cache.rotate()
        if window_coverage is not None and self._window_coverage is window_coverage:
            for wkey in added_windows:
                window_coverage.written(wkey.customer_id, wkey.window_start_ms)
        counted_now = (*dd.fresh, *dd.recorded_uncounted)
        dedup_items: dict[bytes, Any] = {}
        dedup_partitions: dict[bytes, int] = {}
        for uev in counted_now:
            raw_key = table_keys[DedupKey.of(uev)]
            dedup_items[raw_key] = DedupEntry(uev.fingerprint, uev.timestamp_ms).dump()
            dedup_partitions[raw_key] = partition_of_customer[uev.customer_id]
        await self._write_table(self.dedup, dedup_items, dedup_partitions, context)
        if coverage is not None and self._coverage is coverage:
            for event in counted_now:
                coverage.written(event.customer_id, event.timestamp_ms)
        if self._sweep.running or self._sweep.due():
            self._sweep_slice(received, context)
        await self.app.producer.flush()
        if self.settings.changelog_end_markers:
            await self._end_markers(
                {(self.windows, p) for p in window_partitions.values()}
                | {(self.dedup, p) for p in dedup_partitions.values()}
            )

        await rejected_written
        report.accepted = len(dd.fresh)
        report.duplicates = len(dd.duplicates)
        report.rejected.update(str(r.reason) for r in bad)
        report.windows_written = len(new_states.keys() - totals)
        report.windows_recomputed = len(rebuild - totals)
        self.metrics.windows_new.inc(len((new_windows or set()) - totals))
        self._count(report, contrib.unmetered, told_states)
        return report

    def _count_rebuilds(self, rebuild: set[fold.WindowKey], uncounted: set[fold.WindowKey]) -> None:
        """``meterstream_window_rebuilds_total`` by reason (customer totals not counted,
        as in ``meterstream_windows_recomputed_total``)."""
        absent = sum(1 for k in rebuild if not k.is_total and k not in uncounted)
        replayed = sum(1 for k in uncounted if not k.is_total)
        if absent:
            self.metrics.window_rebuilds.inc(absent, reason="absent")
        if replayed:
            self.metrics.window_rebuilds.inc(replayed, reason="uncounted")

    def _injected_fault(self, counted: Sequence[UsageEvent]) -> None:
        """Test-only (``METERSTREAM_FAULT_UNPROCESSABLE_KEY``): counting an event whose
        idempotency key starts with the setting raises, after the record and
        meter_windows inserts (the worst place: both hold the event)."""
        prefix = self.settings.fault_unprocessable_key
        if prefix:
            for event in counted:
                if event.idempotency_key.startswith(prefix):
                    raise RuntimeError(f"injected fault: event {event.idempotency_key!r}")

    # -- batch isolation ---------------------------------------------------------------
    #
    # A batch that raises for any reason but a broken dependency (a bug, an input nobody
    # foresaw) must not stop the worker: exiting would replay the same batch after every
    # restart, a crash loop. Instead the batch is bisected: each half is processed again,
    # a half that fails is split again, and a single record that still fails alone is
    # dead-lettered ``unprocessable`` with the exception text. Why this is exact:
    #
    # * Processing is idempotent on replay: the record insert collapses on the key, and
    #   an event already in the record is "recorded, not counted" and its windows are
    #   rebuilt from the record. So the halves may be processed after a failed attempt
    #   that inserted some or all of the batch.
    # * While isolating, a window rebuilt for one half must not count events of the
    #   batch that a failed attempt inserted but no half has counted yet (the bad record
    #   among them): they are excluded from rebuilds (``pending``) until their own half
    #   counts them. So each half sees exactly the record before the batch plus the
    #   halves before it, in arrival order, and its range decisions are the same as if
    #   the bad record had never arrived.
    # * A record set aside after a failed attempt may have inserted it is remembered in
    #   the record itself: a second row for its key with ``refused_meters = ['*']``,
    #   which every read of the record prefers (queries.events_in_range) and honours
    #   (it counts for no meter); a copy of it arriving later is a duplicate.
    # * A failed attempt may have written windows (meter_windows, the windows table)
    #   counting the bad record. Every window a failed attempt was about to write is
    #   rebuilt from the record at the end and written again, and the Stripe forwarder
    #   is told they changed.
    # * The coverages (which keys and windows provably need no record lookup) assume no
    #   batch inserted rows without writing its keys: they are dropped after a failure.
    # * A dependency failure (ClickHouse, the broker) is never data: it is retried
    #   inside chio.call, or stops the batch as before (no offsets committed; replayed).

    async def _isolate(
        self,
        records: Sequence[resolve.SourceRecord],
        context: dict[int, EventT],
        generation: int | None,
        received: int,
        attempt: Attempt,
        error: Exception,
    ) -> BatchReport:
        log.error(
            "batch of %d records failed (%s: %s); isolating the record(s) that make it fail",
            len(records),
            type(error).__name__,
            error,
            exc_info=error,
        )
        self.metrics.batch_isolations.inc()
        parsed = [_decode_one(rec, received, self.horizon_ms) for rec in records]
        keys = [_key_of(p) for p in parsed]
        responsible = set(attempt.responsible)
        dirty = set(attempt.windows)
        done: set[DedupKey] = set()
        excluded: set[DedupKey] = set()  # set aside, to be marked in the record
        aside: list[tuple[int, Exception, bool]] = []  # (index, error, mark)
        report = BatchReport(records=len(records))

        def set_aside(index: int, exc: Exception) -> None:
            key = keys[index]
            mark = key is not None and key in responsible and key not in done
            if mark:
                assert key is not None
                excluded.add(key)
            aside.append((index, exc, mark))
            if key is not None:
                done.add(key)

        async def run(lo: int, hi: int) -> None:
            part_keys = {k for k in keys[lo:hi] if k is not None}
            sub = Attempt()
            try:
                got = await self._process_records(
                    records[lo:hi],
                    context,
                    generation,
                    received,
                    sub,
                    exclude=frozenset((responsible - done - part_keys) | excluded),
                    use_coverage=False,
                )
            except Exception:
                responsible.update(sub.responsible)
                dirty.update(sub.windows)
                raise
            done.update(part_keys)
            report.accepted += got.accepted
            report.duplicates += got.duplicates
            report.rejected.update(got.rejected)
            report.windows_written += got.windows_written
            report.windows_recomputed += got.windows_recomputed

        await isolation.bisect(len(records), error, run, set_aside, is_dependency_failure)
        # Windows a failed attempt may have written, from the record without the records
        # set aside; then the record is told they are set aside; then the dead letters.
        # (A crash before the marks replays the batch, which fails and is isolated again.)
        if dirty:
            await self._rewrite_windows(dirty, records, keys, context, received, excluded)
        for index, exc, mark in aside:
            await self._set_aside(records[index], parsed[index], exc, received, mark)
        report.rejected[str(Reason.UNPROCESSABLE)] += len(aside)
        self.new_epoch()  # the coverages are checked again from scratch
        log.warning(
            "batch isolated: %d record(s) set aside as unprocessable, the other %d processed",
            len(aside),
            len(records) - len(aside),
        )
        return report

    async def _set_aside(
        self,
        record: resolve.SourceRecord,
        parsed: UsageEvent | Rejection | None,
        error: Exception,
        received: int,
        mark: bool,
    ) -> None:
        """Dead-letter one record ``unprocessable``; when a failed attempt may have put it
        in the record (``mark``), record that it counts for no meter."""
        detail = f"processing failed: {type(error).__name__}: {error}"[:1000]
        customer = record.key.decode("utf-8", "replace")[:200] if record.key else ""
        key = ""
        marker = None
        if isinstance(parsed, UsageEvent):
            customer, key = parsed.customer_id, parsed.idempotency_key
            if mark:
                try:
                    marker = writer.unprocessable_row(parsed)
                except Exception:  # the row cannot even be built: it was never inserted
                    marker = None
        elif isinstance(parsed, Rejection) and parsed.customer_id:
            customer, key = parsed.customer_id, parsed.idempotency_key
        log.error(
            "record %d@%d set aside as unprocessable (customer %r, key %r): %s",
            record.offset,
            record.partition,
            customer,
            key,
            detail,
        )
        rejection = Rejection(Reason.UNPROCESSABLE, detail, record.value, customer, key)
        if marker is not None:
            async with self.record_lock:
                await self._insert(writer.USAGE_EVENTS, [marker], writer.USAGE_EVENTS_COLUMNS)
        await self._send_dlq([rejection], received)
        await self._write_rejected([rejection], [], received)
        self.metrics.events_in.inc()
        self.metrics.rejected.inc(reason=str(Reason.UNPROCESSABLE))

    async def _rewrite_windows(
        self,
        keys: set[fold.WindowKey],
        records: Sequence[resolve.SourceRecord],
        record_keys: Sequence[DedupKey | None],
        context: dict[int, EventT],
        received: int,
        exclude: AbstractSet[DedupKey],
    ) -> None:
        """Rebuild ``keys`` from the record (without ``exclude``) and write them
        (meter_windows, the windows table): what failed attempts of an isolated batch may
        have written is replaced."""
        partition_of_customer = {
            key.customer_id: rec.partition
            for rec, key in zip(records, record_keys, strict=True)
            if key is not None
        }
        keys = {k for k in keys if k.customer_id in partition_of_customer}
        if not keys:
            return
        aggs = self.meters.aggregators
        async with self.record_lock:
            states = await self._recompute(keys, exclude)
            self.metrics.window_rebuilds.inc(
                sum(1 for k in keys if not k.is_total), reason="isolation"
            )
            dumps = {k: aggs[k.meter].dump(state) for k, state in states.items()}
            rows = self._window_rows(states, dumps, received)
            if rows:
                await self._insert(writer.METER_WINDOWS, rows, writer.METER_WINDOWS_COLUMNS)
            for listener in self.record_listeners:
                listener((), {}, {k for k in keys if not k.is_total})
        items = {k.encode(): dumps[k] for k in states}
        partitions = {k.encode(): partition_of_customer[k.customer_id] for k in states}
        await self._write_table(self.windows, items, partitions, context)
        await self.app.producer.flush()
        if self.settings.changelog_end_markers:
            await self._end_markers({(self.windows, p) for p in partitions.values()})
        log.info("rewrote %d window(s) from the record after isolating a batch", len(keys))

    async def _write_table(
        self,
        table: Any,
        items: dict[bytes, Any],
        partitions: dict[bytes, int],
        context: dict[int, EventT],
    ) -> None:
        """Write a table's keys for this batch; returns when the changelog is acknowledged."""
        if self.app.in_transaction:  # changelogs must go through Faust's transactions
            write_by_partition(table, items, partitions, context)
            await self.app.producer.flush()
            return
        # the app's aiokafka producer (Faust's transport producer keeps it private)
        producer = self.app.producer._ensure_producer()  # type: ignore[attr-defined]
        await write_by_partition_batched(table, producer, items, partitions, context)

    async def _check_coverage(
        self, events: Sequence[UsageEvent], received: int, generation: int | None
    ) -> RecordCoverage:
        """The coverage of this epoch, with the batch's customers checked (one query)."""
        key = (self.epoch, generation)
        if self._coverage is None or self._coverage_epoch != key:
            self._coverage = RecordCoverage.from_table(
                self.dedup.items(), received - self.horizon_ms
            )
            self._coverage_epoch = key
        coverage = self._coverage
        now = time.monotonic()
        todo = coverage.to_check({ev.customer_id for ev in events}, now)
        if todo:
            counts = await self.chio.call(queries.record_key_counts, todo, coverage.cutoff_ms)
            coverage.checked(todo, counts, now)
        return coverage

    async def _new_windows(
        self,
        absent: list[fold.WindowKey],
        coverage: RecordCoverage | None,
        generation: int | None,
    ) -> set[fold.WindowKey] | None:
        """The windows of ``absent`` (not in the table) that provably never had an event
        counted (pipeline/dedup/coverage.py); None when no window coverage applies."""
        if coverage is None or self._coverage is not coverage:
            return None
        key = (self.epoch, generation)
        if self._window_coverage is None or self._window_coverage_epoch != key:
            self._window_coverage, self._legacy_totals = self._scan_windows(coverage.cutoff_ms)
            self._window_coverage_epoch = key
        windows, legacy = self._window_coverage, self._legacy_totals
        candidates = [
            k
            for k in absent
            if not coverage.needs_lookup(k.customer_id, k.window_start_ms)
            and not (k.is_total and (k.meter, k.customer_id, k.window_start_ms) in legacy)
        ]
        now = time.monotonic()
        todo = windows.to_check({k.customer_id for k in candidates}, now)
        if todo:
            counts = await self.chio.call(queries.window_key_counts, todo, windows.cutoff_ms)
            windows.checked(todo, counts, now)
        if self._window_coverage_epoch != key or self._coverage is not coverage:
            return None  # a rebalance ran during the check: trust nothing this batch
        return {k for k in candidates if windows.is_new(k.customer_id, k.window_start_ms)}

    def _scan_windows(self, cutoff_ms: int) -> tuple[WindowCoverage, set[fold.Series]]:
        """The window coverage of the table's keys, and the (meter, customer, window start)
        whose group windows the table holds without their customer total: written before
        customer totals existed, so a total missing there is not new (it is rebuilt)."""
        windows: list[tuple[str, int]] = []
        groups: set[fold.Series] = set()
        totals: set[fold.Series] = set()
        guarded = {m.name for m in self.meters.meters if m.guards_customer_total}
        for k in map(fold.WindowKey.decode, self.windows.keys()):
            if k.is_total:  # the table's only: never in meter_windows
                totals.add((k.meter, k.customer_id, k.window_start_ms))
                continue
            windows.append((k.customer_id, k.window_start_ms))
            if k.meter in guarded:
                groups.add((k.meter, k.customer_id, k.window_start_ms))
        return WindowCoverage.from_windows(windows, cutoff_ms), groups - totals

    async def _end_markers(self, touched: set[tuple[Any, int]]) -> None:
        """One tombstone for a key no one uses, alone in its batch, per changelog partition
        written by this batch.

        The embedded broker reports a partition's end offset as the start of its
        last record batch + 1, so table recovery would stop before the last
        batch's records. With a one-record batch last, the reported end is the
        true end and recovery is complete. Harmless on Apache Kafka: applying the
        tombstone deletes nothing, and compaction drops it.
        """
        if not touched:
            return
        futures = [
            await table.changelog_topic.send(
                key=END_MARKER,
                value=None,
                partition=partition,
                key_serializer="raw",
                value_serializer="raw",  # a real tombstone (null value), not JSON null
            )
            for table, partition in touched
        ]
        await self.app.producer.flush()
        await asyncio.gather(*futures)
        self.metrics.end_markers.inc(len(futures))

    def table_sizes(self) -> dict[str, int]:
        return {"dedup": len(self.dedup), "windows": len(self.windows)}

    async def _write_record(
        self,
        accepted: list[UsageEvent],
        counted_by: dict[DedupKey, list[str]],
        refused: dict[DedupKey, list[str]],
        received: int,
    ) -> None:
        if accepted:
            rows, columns = writer.usage_event_rows(accepted, received, counted_by, refused)
            await self._insert(writer.USAGE_EVENTS, rows, columns)

    async def _write_rejected(
        self, bad: list[Rejection], duplicates: list[UsageEvent], received: int
    ) -> None:
        rejected = [writer.rejected_row(r, received) for r in bad] + [
            writer.rejected_row(
                Rejection(
                    Reason.DUPLICATE,
                    "exact duplicate of an event already counted",
                    b"",
                    ev.customer_id,
                    ev.idempotency_key,
                ),
                received,
            )
            for ev in duplicates
        ]
        if rejected:
            await self._insert(writer.REJECTED_EVENTS, rejected, writer.REJECTED_EVENTS_COLUMNS)

    async def _insert(
        self, table: str, rows: list[tuple[Any, ...]], columns: Sequence[str]
    ) -> None:
        token = writer.call_token(table, rows)
        started = time.perf_counter()
        await self.chio.call(
            lambda ch: ch.insert(table, rows, column_names=list(columns), dedup_token=token)
        )
        self.metrics.sink_batch_rows.observe(len(rows), table=table)
        self.metrics.sink_seconds.observe(time.perf_counter() - started, table=table)

    async def _send_dlq(self, bad: list[Rejection], received: int) -> None:
        futures = [
            await self.dlq.send(key=r.customer_id.encode(), value=orjson.dumps(r.to_dlq(received)))
            for r in bad
        ]
        if futures:
            await asyncio.gather(*futures)

    async def _recompute(
        self, keys: set[fold.WindowKey], exclude: AbstractSet[DedupKey] = frozenset()
    ) -> dict[fold.WindowKey, WindowState]:
        """Exact states from the record, one query per distinct window range (``exclude``:
        see :func:`fold.recompute_windows`)."""
        ranges: dict[tuple[int, int], set[fold.WindowKey]] = {}
        for key in keys:
            meter = self.meters.by_name(key.meter)
            bounds = meter.window_bounds(key.window_start_ms)
            ranges.setdefault(bounds, set()).add(key)
        states: dict[fold.WindowKey, WindowState] = {}
        for (start, end), group in ranges.items():
            customers = sorted({k.customer_id for k in group})
            names = sorted({self.meters.by_name(k.meter).event_name for k in group})
            rows = await self.chio.call(queries.events_in_range, customers, names, start, end)
            record = [UsageEvent(**row) for row in rows]
            states.update(fold.recompute_windows(self.meters, group, record, exclude))
        self.metrics.windows_recomputed.inc(sum(1 for k in keys if not k.is_total))
        return states

    def _window_rows(
        self,
        states: dict[fold.WindowKey, WindowState],
        dumps: dict[fold.WindowKey, dict[str, Any]],
        received: int,
    ) -> list[tuple[Any, ...]]:
        version = time.time_ns()
        rows = []
        for key, state in states.items():
            if key.group_key == fold.ALL_GROUPS:  # the windows table's only
                continue
            meter = self.meters.by_name(key.meter)
            start, end = meter.window_bounds(key.window_start_ms)
            agg = self.meters.aggregators[meter.name]
            rows.append(
                writer.meter_window_row(
                    meter.name,
                    meter.aggregation,
                    key.customer_id,
                    key.group_key,
                    start,
                    end,
                    state,
                    version,
                    received,
                    value=agg.result(state),
                    sorted_distinct=dumps[key]["distinct"],
                )
            )
        return rows

    def _sweep_slice(self, now: int, context: dict[int, EventT]) -> None:
        """Forget dedup keys and window states older than the horizon (tombstones), one
        slice of a pass per batch (pipeline/worker/sweep.py)."""
        sweep = self._sweep
        if not sweep.running:
            cutoff = now - self.horizon_ms
            # Floors first: from now on a key below the cutoff may be gone from the
            # table, so it is looked up in the record (windows: recomputed).
            if self._coverage is not None:
                self._coverage.swept(cutoff)
            if self._window_coverage is not None:
                self._window_coverage.swept(cutoff)
            sweep.start(cutoff)
        old_keys, old_windows = sweep.step()
        n = self.settings.partitions
        partition_of = {
            k: customer_partition(DedupKey.decode(k).customer_id, n) for k in old_keys
        } | {k: customer_partition(fold.WindowKey.decode(k).customer_id, n) for k in old_windows}
        deleted = delete_by_partition(self.dedup, old_keys, partition_of, context)
        deleted += delete_by_partition(self.windows, old_windows, partition_of, context)
        if deleted:
            log.info("expired %d dedup keys and window states older than the horizon", deleted)

    def _count(self, report: BatchReport, unmetered: int, deltas: dict[Any, WindowState]) -> None:
        m = self.metrics
        m.events_in.inc(report.records)
        m.accepted.inc(report.accepted)
        m.duplicates.inc(report.duplicates)
        m.unmetered.inc(unmetered)
        for reason, n in report.rejected.items():
            m.rejected.inc(n, reason=reason)
        per_meter: dict[str, int] = {}  # one labelled increment per meter, not per window
        for key, state in deltas.items():
            per_meter[key.meter] = per_meter.get(key.meter, 0) + state.event_count
        for meter, n in per_meter.items():
            m.meter_updates.inc(n, meter=meter)


def create_app(
    settings: Settings,
    meters: MetersConfig,
    chio: ClickHouseIO,
    bootstrap: str,
    processing_guarantee: str = "at_least_once",
) -> tuple[faust.App, Pipeline]:
    """The worker's Faust app with its agent; web routes are added by meterstream.api.web."""
    app = faust.App(
        settings.app_id,
        # Faust's settings come from meterstream's settings only. Faust would otherwise
        # read generic environment variables (WEB_BIND, WEB_HOST, APP_WEB_TABLES_ENABLED,
        # PROCESSING_GUARANTEE, ...) and let them override the values below: WEB_BIND=0.0.0.0
        # left over in a shell would serve customer data beyond loopback without a key.
        env={},
        broker=f"kafka://{bootstrap}",
        broker_credentials=kafka_credentials(settings),
        store="rocksdb://" if settings.store == "rocksdb" else "memory://",
        datadir=str(settings.store_path or settings.state_dir / "faust"),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        processing_guarantee=processing_guarantee,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_in_thread=False,
        # None of Faust's own views (/table shows table data, /router the cluster, /stats,
        # /graph, /performance internals; none asks for a key). The index at / has no
        # setting: pipeline/api/guard.py answers 404 for every route web.py did not add.
        web_tables_enabled=False,
        web_router_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_metrics_enabled=False,
        consumer_auto_offset_reset="earliest",
        producer_linger_ms=5,
        producer_max_batch_size=256 * 1024,
        stream_buffer_maxsize=max(4096, settings.clickhouse_flush_rows * 2),
        broker_commit_every=max(10_000, settings.clickhouse_flush_rows * 2),
        table_cleanup_interval=3600,
        recovery_consistency_check=False,
        broker_rebalance_timeout=settings.rebalance_timeout_seconds,
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=settings.session_timeout_seconds / 5,
    )
    pipeline = Pipeline(app, settings, meters, chio)
    pipeline.gaps = GapFiller(
        bootstrap, settings.topic(USAGE_EVENTS.name), settings.app_id, **client_options(settings)
    )
    source = app.topic(
        settings.topic(USAGE_EVENTS.name),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
        retention=USAGE_EVENTS.retention_ms / 1000 if USAGE_EVENTS.retention_ms else None,
    )

    def on_rebalance(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        pipeline.new_epoch()

    app.on_partitions_revoked.connect(on_rebalance)
    app.on_partitions_assigned.connect(on_rebalance)

    @app.task
    async def shorten_consumer_fetch_wait() -> None:
        for _ in range(600):  # the consumer thread starts after the app's tasks
            if shorten_fetch_wait(app):
                return
            await asyncio.sleep(0.1)
        log.warning("could not shorten the consumer's fetch wait; latency may be higher")

    @app.agent(source, name="meterstream.process")
    async def process(stream: Any) -> None:
        # noack(): the only acks are take_events' acks of batches we finished. On a
        # plain stream take_events restores auto-acks when it ends, and while the
        # worker stops, Faust's background drainer then acks (and commits) events
        # it pulled but no batch ever processed: lost events on every SIGTERM.
        async for batch in take_batches(
            stream.noack(),
            settings.clickhouse_flush_rows,
            settings.clickhouse_flush_seconds,
            backlog=broker_backlog(app),
        ):
            await run_batch_to_completion(pipeline, batch)
            for listener in pipeline.batch_listeners:
                listener()

    return app, pipeline


async def run_batch_to_completion(pipeline: Pipeline, batch: Sequence[EventT]) -> None:
    """Process a batch; never let Faust ack a batch that did not finish.

    Faust acks a ``take_events`` batch when the agent returns to the loop, and
    also when the loop unwinds (the stream is ``noack()``, so nothing else acks). So a
    cancelled batch (worker stopping) is finished first, and a batch that fails ends
    the process at once (``os._exit``) before any offset can be committed; it is
    replayed on restart. A batch fails here only for a broken dependency (or if its
    isolation fails too): a batch that raises because of its data is isolated inside
    :meth:`Pipeline.process`, so no record can make the worker exit, before or after
    a restart.
    """
    task = asyncio.ensure_future(pipeline.process(batch))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            await asyncio.wait_for(task, timeout=60)
        except BaseException:
            log.critical("batch could not finish while stopping; exiting without commit")
            os._exit(EXIT_BATCH_FAILED)
        raise
    except Exception:
        log.critical("batch failed; exiting without committing its offsets", exc_info=True)
        logging.shutdown()
        os._exit(EXIT_BATCH_FAILED)


def kafka_credentials(settings: Settings) -> Any:
    if settings.kafka_security_protocol == "PLAINTEXT":
        return None
    import ssl

    ssl_context = None
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        ssl_context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    if settings.kafka_security_protocol == "SSL":
        return faust.SSLCredentials(ssl_context)
    password = (
        settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
    )
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username or "",
        password=password,
        mechanism=settings.kafka_sasl_mechanism or "PLAIN",
        ssl_context=ssl_context,
    )
