"""One batch of the worker, step by step: the pure batch logic (pipeline/dedup/resolve.py,
pipeline/meters/fold.py) wired to the Faust tables, Kafka and ClickHouse. No business
rules live here; the Faust app and its agent that hand batches to
:meth:`Pipeline.process` are pipeline/worker/app.py.

The walk of a batch (:meth:`Pipeline._process_records`), each step a method below it in
the order it runs: the source records (``_source_records``, with the consumer's gaps
filled), decode and validate (``_decode_and_validate``), dedup (``_dedup``), the
windows touched (``_windows_touched``), step 0 (``_states_before``), the record insert
(``_write_record``) while the windows are folded (``_fold_windows``) and inserted into
``meter_windows``, the dead letters, the record listeners (``_notify_record_listeners``),
the changelogs (``_write_changelogs``) and the report (``_report``).

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
   contribution. Insert them into ``meter_windows`` with a fresh version. The
   states are computed while step 1's insert runs, and this insert runs beside it
   (its own ClickHouse thread and connection); the batch goes on only when both
   returned. Either may land first: a crash between them replays the batch, whose
   events the record then lacks (fresh again: the same states, merged from the
   same table states, inserted again) or holds uncounted (rebuilt from the
   record), and the record lock keeps verifications and rebuilds from seeing one
   insert without the other.
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
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import faust
import orjson
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError
from faust.types import EventT

from meterstream.dedup import resolve
from meterstream.dedup.coverage import RecordCoverage, WindowCoverage
from meterstream.dedup.key import DedupEntry, DedupKey
from meterstream.errors import DependencyError
from meterstream.events import Reason, Rejection, UsageEvent
from meterstream.kafka import customer_partition
from meterstream.meters import fold
from meterstream.meters.aggregation import WindowState
from meterstream.meters.config import MetersConfig
from meterstream.settings import Settings
from meterstream.sinks.clickhouse import queries, writer
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.topics import USAGE_EVENTS_DLQ
from meterstream.worker import isolation
from meterstream.worker.gaps import GapFiller
from meterstream.worker.raw_topics import raw_topic
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


class Batch(NamedTuple):
    """One batch as its steps see it: the records (gaps filled, in offset order per
    partition), each partition's last event (Faust's context for table writes), the
    consumer generation, and when it was received (epoch ms)."""

    records: Sequence[resolve.SourceRecord]
    context: dict[int, EventT]
    generation: int | None
    received: int
    horizon_ms: int | None = None
    """How old an event may be (None: the dedup horizon); a backfill's is unbounded."""


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


@dataclass(frozen=True)
class Decoded:
    """Decode and validate: the batch's events, its rejections, each customer's partition."""

    events: list[UsageEvent]
    rejections: list[Rejection]
    partition_of_customer: dict[str, int]
    arrived_at: dict[int, int]
    """id(event) -> its Kafka record timestamp (the latency histograms start there)."""


@dataclass(frozen=True)
class Deduped:
    """Dedup: the events resolved against the table and the record, the record coverage
    used (None: none), and each key's table key (encoded once per batch)."""

    resolved: resolve.DedupResult
    coverage: RecordCoverage | None
    table_keys: dict[DedupKey, bytes]


@dataclass(frozen=True)
class Touched:
    """The windows a batch touches: those it adds to and the customer totals
    enforce_limits adds (``keys``), those totals, the windows (and totals) of events
    recorded but not counted (``uncounted``), and every one's table key."""

    keys: set[fold.WindowKey]
    totals: set[fold.WindowKey]
    uncounted: set[fold.WindowKey]
    encoded: dict[fold.WindowKey, bytes]


@dataclass
class StatesBefore:
    """Step 0: the table's states, the provably new windows, the windows rebuilt from
    the record and their states; ``bases``: every touched window's state before the
    batch (absent: none)."""

    table_states: dict[fold.WindowKey, WindowState]
    new_windows: set[fold.WindowKey]
    rebuild: set[fold.WindowKey]
    rebuilt: dict[fold.WindowKey, WindowState]
    bases: dict[fold.WindowKey, WindowState] = field(init=False)

    def __post_init__(self) -> None:
        self.bases = {**self.table_states, **self.rebuilt}


@dataclass(frozen=True)
class NewWindows:
    """Step 2: what the batch adds (``deltas``), the new states, their table values
    (``dumps``) and their ``meter_windows`` rows."""

    deltas: dict[fold.WindowKey, WindowState]
    states: dict[fold.WindowKey, WindowState]
    dumps: dict[fold.WindowKey, dict[str, Any]]
    rows: list[tuple[Any, ...]]


class Pipeline:
    """Everything one worker needs to process batches; built once per worker."""

    def __init__(
        self, app: faust.App, settings: Settings, meters: MetersConfig, chio: ClickHouseIO
    ) -> None:
        self.app = app
        self.settings = settings
        self.meters = meters
        self.chio = chio
        # The batch's meter_windows insert runs on its own thread and connection, at
        # the same time as its record insert (module docstring, step 2).
        self.windows_io = chio.lane("windows")
        self.metrics = chio.metrics
        self.horizon_ms = settings.dedup_horizon_seconds * 1000
        self._stripe_meters = {m.name for m in meters.meters if m.stripe is not None}
        self.dlq = raw_topic(
            app, settings.topic(USAGE_EVENTS_DLQ.name), partitions=settings.partitions
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
        # Held for a whole batch, and by a correction's rebuild or a backfill
        # (pipeline/worker/corrections.py): they never interleave with a batch, whose
        # window states read in step 0 are written back in step 3 outside the record
        # lock. One lock for the worker rather than one per partition: a batch spans
        # every assigned partition, and corrections are rare.
        self.apply_lock = asyncio.Lock()
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

    # -- the batch: one usage event's walk, top-down ------------------------------------

    async def process(self, batch: Sequence[EventT]) -> BatchReport:
        """Process one batch (the side effects in the module docstring's order).

        A batch that raises for a reason other than a broken dependency is isolated
        (:meth:`_isolate`): the records that make it fail are dead-lettered
        ``unprocessable`` and the rest is processed. Only a dependency failure (or a
        failure of the isolation itself) leaves this method with an exception.
        """
        received = now_ms()
        context: dict[int, EventT] = {ev.message.partition: ev for ev in batch}
        async with self.apply_lock:
            records = await self._source_records(batch)
            generation = batch[-1].message.generation_id if batch else None
            return await self._run(Batch(records, context, generation, received))

    async def process_backfill(
        self, records: Sequence[resolve.SourceRecord], context: dict[int, EventT]
    ) -> BatchReport:
        """Backfilled events older than the dedup horizon (pipeline/worker/corrections.py)
        through the same walk as a batch: the same parse and validation, dedup against the
        table and the record (every key looked up: no coverage), the range decisions, the
        record insert, windows rebuilt from the record, the listeners told; only the
        horizon is not applied. ``records``: in the partitions of ``context``."""
        async with self.apply_lock:
            return await self._run(Batch(records, context, None, now_ms(), horizon_ms=1 << 62))

    async def _run(self, taken: Batch) -> BatchReport:
        attempt = Attempt()
        try:
            return await self._process_records(
                taken, attempt, use_coverage=taken.horizon_ms is None
            )
        except Exception as exc:
            if is_dependency_failure(exc):
                raise
            return await self._isolate(taken, attempt, exc)

    async def _process_records(
        self,
        batch: Batch,
        attempt: Attempt,
        exclude: AbstractSet[DedupKey] = frozenset(),
        use_coverage: bool = True,
    ) -> BatchReport:
        """The batch's records through every step; ``attempt`` learns, as they are known,
        the events this call is responsible for counting and the windows it writes (what
        an isolation must clean up if it raises). While a batch is isolated: ``exclude``,
        events in the record but not counted yet that window rebuilds must skip, and no
        coverage (a failed attempt may have inserted rows without writing their keys)."""
        records, context, generation, received, horizon_ms = batch
        decoded = self._decode_and_validate(records, received, horizon_ms or self.horizon_ms)
        dedup = await self._dedup(decoded.events, received, generation, use_coverage)
        dd = dedup.resolved
        counted_now = (*dd.fresh, *dd.recorded_uncounted)
        attempt.responsible.update(map(DedupKey.of, counted_now))
        contrib = fold.contributions(self.meters, dd.fresh)
        touched = self._windows_touched(contrib, dd.recorded_uncounted)

        # 1. The record, then 2. the windows, under the record lock: a Stripe
        # verification (which repairs meter_windows from the record) never runs
        # between the two inserts, so it never sees half a batch and "repairs" it.
        async with self.record_lock:
            # 0. The state of every touched window before this batch: the table's, or
            # rebuilt from the record (before this batch's rows are in it). The range
            # decisions (enforce_limits) are taken against it, in arrival order, and go
            # into the record rows; a rebuild later reads them back, never re-decides.
            before = await self._states_before(touched, dedup.coverage, generation, exclude)
            fold.enforce_limits(self.meters, contrib, before.bases, dd.fresh)
            bad = decoded.rejections + dd.conflicts + contrib.rejections
            # 1. The record, inserted while the new window states are computed.
            inserts = [
                asyncio.ensure_future(
                    self._write_record(dd.fresh, contrib.counted_by, contrib.refused, received)
                )
            ]
            try:
                # Let it start now (build its rows, hand them to the ClickHouse thread):
                # nothing below awaits until the states are computed.
                await asyncio.sleep(0)
                # 2. Windows: the state before the batch merged with what it adds,
                # inserted on a lane of their own while the record insert runs.
                windows = self._fold_windows(contrib.states, before, received)
                attempt.windows.update(windows.states)
                if windows.rows:
                    inserts.append(
                        asyncio.ensure_future(
                            self._insert(
                                writer.METER_WINDOWS,
                                windows.rows,
                                writer.METER_WINDOWS_COLUMNS,
                                self.windows_io,
                            )
                        )
                    )
            finally:
                await asyncio.wait(inserts)  # never left running behind the batch
            for insert in inserts:
                insert.result()  # a failed insert fails the batch here
            arrivals = self._arrivals(decoded.arrived_at, dd.fresh)
            self.metrics.event_to_record.observe_since(t for _, t in arrivals.values())
            await self._send_dlq(bad, received)
            self._observe_windows(arrivals, contrib.counted_by)
            self._injected_fault(counted_now)
            # The audit rows of rejected and duplicate events go in while the tables are
            # written; the batch returns (and is acked) only after they are in.
            rejected_written = asyncio.ensure_future(
                self._write_rejected(bad, dd.duplicates, received)
            )
            told_states = self._notify_record_listeners(dd.fresh, contrib.states, touched)

        # 3. Tables, one write per key per batch, in the customer's partition.
        written = await self._write_changelogs(
            touched, before, windows, dedup, counted_now, decoded.partition_of_customer, context
        )
        if self._sweep.running or self._sweep.due():
            self._sweep_slice(received, context)
        await self.app.producer.flush()
        if self.settings.changelog_end_markers:
            await self._end_markers(written)

        # 4. Return to Faust only after the audit rows are in.
        await rejected_written
        return self._report(len(records), dd, bad, touched, before, windows, contrib, told_states)

    async def _source_records(self, batch: Sequence[EventT]) -> list[resolve.SourceRecord]:
        """The batch's records, with the records the consumer skipped (gaps.py) put back
        in offset order."""
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
        return records

    def _decode_and_validate(
        self, records: Sequence[resolve.SourceRecord], received: int, horizon_ms: int
    ) -> Decoded:
        """Every record becomes an event or a rejection (pipeline/dedup/resolve.py)."""
        decoded, rejections = resolve.decode_batch(records, now_ms=received, horizon_ms=horizon_ms)
        return Decoded(
            events=[ev for _, ev in decoded],
            rejections=rejections,
            partition_of_customer={ev.customer_id: rec.partition for rec, ev in decoded},
            arrived_at={id(ev): rec.timestamp_ms for rec, ev in decoded},
        )

    async def _dedup(
        self,
        events: Sequence[UsageEvent],
        received: int,
        generation: int | None,
        use_coverage: bool,
    ) -> Deduped:
        """Fresh events, duplicates, conflicts, and events recorded but never counted."""
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
        dedup_get = table_reader(self.dedup)
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
        resolved = resolve.resolve_duplicates(events, counted, recorded, excluded)
        return Deduped(resolved, coverage, table_keys)

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

    def _windows_touched(
        self, contrib: fold.Contributions, uncounted: Sequence[UsageEvent]
    ) -> Touched:
        """The windows the batch adds to, the customer totals enforce_limits adds, and
        the windows of events recorded but not counted (rebuilt from the record)."""
        uncounted_windows = fold.windows_of(self.meters, uncounted, totals=True)
        totals = fold.total_keys(self.meters, contrib.states)
        totals.update(k for k in uncounted_windows if k.is_total)
        keys = contrib.states.keys() | totals
        encoded = {key: key.encode() for key in keys | uncounted_windows}
        return Touched(keys, totals, uncounted_windows, encoded)

    async def _states_before(
        self,
        touched: Touched,
        coverage: RecordCoverage | None,
        generation: int | None,
        exclude: AbstractSet[DedupKey],
    ) -> StatesBefore:
        """Step 0 (module docstring): the table's state of every touched window, else
        none for a provably new window, else the exact state rebuilt from the record."""
        aggs = self.meters.aggregators
        windows_get, window_cache = table_reader(self.windows), self._decoded_windows
        table_states: dict[fold.WindowKey, WindowState] = {}
        for wkey in touched.keys:
            raw_key = touched.encoded[wkey]
            raw = windows_get(raw_key)
            if raw is None:
                continue
            load = aggs[wkey.meter].load
            table_states[wkey] = (
                load(raw) if window_cache is None else window_cache.get(raw_key, raw, load)
            )
        absent = [k for k in touched.keys if k not in table_states]
        # A customer total is written with its group windows, so a new one is as
        # provable as a window; never when the table holds one of its groups.
        held = {(k.meter, k.customer_id, k.window_start_ms) for k in table_states}
        totals = touched.totals
        new_windows = await self._new_windows(
            [
                k
                for k in absent
                if k not in totals or (k.meter, k.customer_id, k.window_start_ms) not in held
            ],
            coverage,
            generation,
        )
        rebuild = {k for k in absent if k not in (new_windows or ())} | touched.uncounted
        self._count_rebuilds(rebuild, touched.uncounted)
        rebuilt = await self._recompute(rebuild, exclude) if rebuild else {}
        return StatesBefore(table_states, new_windows or set(), rebuild, rebuilt)

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

    def _fold_windows(
        self,
        deltas: dict[fold.WindowKey, WindowState],
        before: StatesBefore,
        received: int,
    ) -> NewWindows:
        """Step 2's states: each window's state before the batch merged with what the
        batch adds (a rebuilt window the batch adds nothing to: as rebuilt), and its
        ``meter_windows`` rows."""
        aggs = self.meters.aggregators
        states = fold.merge_into(self.meters, before.bases, deltas)
        for wkey in before.rebuild:
            if wkey not in states:
                states[wkey] = before.rebuilt[wkey]
        dumps = {k: aggs[k.meter].dump(state) for k, state in states.items()}
        return NewWindows(deltas, states, dumps, self._window_rows(states, dumps, received))

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

    async def _send_dlq(self, bad: list[Rejection], received: int) -> None:
        futures = [
            await self.dlq.send(key=r.customer_id.encode(), value=orjson.dumps(r.to_dlq(received)))
            for r in bad
        ]
        if futures:
            await asyncio.gather(*futures)

    async def _insert(
        self,
        table: str,
        rows: list[tuple[Any, ...]],
        columns: Sequence[str],
        io: ClickHouseIO | None = None,
    ) -> None:
        token = writer.call_token(table, rows)
        started = time.perf_counter()
        await (io or self.chio).call(
            lambda ch: ch.insert(table, rows, column_names=list(columns), dedup_token=token)
        )
        self.metrics.sink_batch_rows.observe(len(rows), table=table)
        self.metrics.sink_seconds.observe(time.perf_counter() - started, table=table)

    def _injected_fault(self, counted: Sequence[UsageEvent]) -> None:
        """Test-only (``METERSTREAM_FAULT_UNPROCESSABLE_KEY``): counting an event whose
        idempotency key starts with the setting raises, after the record and
        meter_windows inserts (the worst place: both hold the event)."""
        prefix = self.settings.fault_unprocessable_key
        if prefix:
            for event in counted:
                if event.idempotency_key.startswith(prefix):
                    raise RuntimeError(f"injected fault: event {event.idempotency_key!r}")

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

    def _notify_record_listeners(
        self,
        fresh: Sequence[UsageEvent],
        deltas: dict[fold.WindowKey, WindowState],
        touched: Touched,
    ) -> dict[fold.WindowKey, WindowState]:
        """Tell the record listeners (the Stripe forwarder) what the batch inserted; the
        window states they were told."""
        # Told after both the record and meter_windows hold this batch, still under
        # the record lock: the events inserted into the record, their windows'
        # states (the batch's deltas: the same meter code over the same events),
        # and the windows whose record changed otherwise (counted from the record).
        totals = touched.totals
        told_states = {k: v for k, v in deltas.items() if k not in totals} if totals else deltas
        told_reread = touched.uncounted - totals
        for listener in self.record_listeners:
            listener(fresh, told_states, told_reread)
        return told_states

    async def _write_changelogs(
        self,
        touched: Touched,
        before: StatesBefore,
        windows: NewWindows,
        dedup: Deduped,
        counted_now: Sequence[UsageEvent],
        partition_of_customer: dict[str, int],
        context: dict[int, EventT],
    ) -> set[tuple[Any, int]]:
        """Step 3: window states, then dedup keys, to the Faust tables; the (table,
        partition) pairs written."""
        # Every key new to the windows table is counted in the window coverage (its
        # ``|T|``), whether or not this batch used the coverage.
        window_coverage = self._window_coverage
        windows_get, window_cache = table_reader(self.windows), self._decoded_windows
        added_windows = [  # keys the windows table did not hold before this batch
            k
            for k in windows.states
            if k not in touched.totals
            and k not in before.table_states
            and (k in windows.deltas or windows_get(touched.encoded[k]) is None)
        ]
        window_items: dict[bytes, Any] = {}
        window_partitions: dict[bytes, int] = {}
        for wkey, state in windows.states.items():
            raw_key = touched.encoded[wkey]
            window_items[raw_key] = windows.dumps[wkey]
            window_partitions[raw_key] = partition_of_customer[wkey.customer_id]
            if window_cache is not None:
                window_cache.put(raw_key, windows.dumps[wkey], state)
        # Windows before dedup keys: a key must never say "counted" while its
        # window update could still be lost (each write returns once acknowledged).
        await self._write_table(self.windows, window_items, window_partitions, context)
        if window_cache is not None:
            window_cache.rotate()
        if window_coverage is not None and self._window_coverage is window_coverage:
            for wkey in added_windows:
                window_coverage.written(wkey.customer_id, wkey.window_start_ms)
        dedup_items: dict[bytes, Any] = {}
        dedup_partitions: dict[bytes, int] = {}
        for uev in counted_now:
            raw_key = dedup.table_keys[DedupKey.of(uev)]
            dedup_items[raw_key] = DedupEntry(uev.fingerprint, uev.timestamp_ms).dump()
            dedup_partitions[raw_key] = partition_of_customer[uev.customer_id]
        await self._write_table(self.dedup, dedup_items, dedup_partitions, context)
        coverage = dedup.coverage
        if coverage is not None and self._coverage is coverage:
            for event in counted_now:
                coverage.written(event.customer_id, event.timestamp_ms)
        return {(self.windows, p) for p in window_partitions.values()} | {
            (self.dedup, p) for p in dedup_partitions.values()
        }

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

    def _count_rebuilds(self, rebuild: set[fold.WindowKey], uncounted: set[fold.WindowKey]) -> None:
        """``meterstream_window_rebuilds_total`` by reason (customer totals not counted,
        as in ``meterstream_windows_recomputed_total``)."""
        absent = sum(1 for k in rebuild if not k.is_total and k not in uncounted)
        replayed = sum(1 for k in uncounted if not k.is_total)
        if absent:
            self.metrics.window_rebuilds.inc(absent, reason="absent")
        if replayed:
            self.metrics.window_rebuilds.inc(replayed, reason="uncounted")

    def _report(
        self,
        records: int,
        dd: resolve.DedupResult,
        bad: list[Rejection],
        touched: Touched,
        before: StatesBefore,
        windows: NewWindows,
        contrib: fold.Contributions,
        told_states: dict[fold.WindowKey, WindowState],
    ) -> BatchReport:
        """The batch's report, counted in the metrics."""
        report = BatchReport(records=records)
        report.accepted = len(dd.fresh)
        report.duplicates = len(dd.duplicates)
        report.rejected.update(str(r.reason) for r in bad)
        report.windows_written = len(windows.states.keys() - touched.totals)
        report.windows_recomputed = len(before.rebuild - touched.totals)
        self.metrics.windows_new.inc(len(before.new_windows - touched.totals))
        self._count(report, contrib.unmetered, told_states)
        return report

    @staticmethod
    def _arrivals(
        arrived_at: Mapping[int, int], fresh: Sequence[UsageEvent]
    ) -> dict[int, tuple[UsageEvent, int]]:
        """id(event) -> (event, its Kafka timestamp) for the batch's fresh events."""
        return {id(ev): (ev, arrived_at[id(ev)]) for ev in fresh if id(ev) in arrived_at}

    def _observe_windows(
        self,
        arrivals: dict[int, tuple[UsageEvent, int]],
        counted_by: Mapping[DedupKey, Sequence[str]],
    ) -> None:
        """Latency to meter_windows of the fresh events some meter counted, and the oldest
        arrival per (meter with a stripe block, customer) for the Stripe forwarder's."""
        counted = []
        oldest: dict[tuple[str, str], int] = {}
        stripe_meters = self._stripe_meters
        for ev, arrival in arrivals.values():
            meters = counted_by.get(DedupKey.of(ev))
            if not meters:
                continue
            counted.append(arrival)
            for meter in meters:
                if meter in stripe_meters:
                    key = (meter, ev.customer_id)
                    if arrival < oldest.get(key, arrival + 1):
                        oldest[key] = arrival
        self.metrics.event_to_window.observe_since(counted)
        if oldest:
            self.metrics.stripe_arrivals.recorded(oldest)

    def _count(self, report: BatchReport, unmetered: int, deltas: dict[Any, WindowState]) -> None:
        m = self.metrics
        m.events_in.inc(report.records)
        m.last_batch.set(time.time())
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

    def table_sizes(self) -> dict[str, int]:
        return {"dedup": len(self.dedup), "windows": len(self.windows)}

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

    async def _isolate(self, batch: Batch, attempt: Attempt, error: Exception) -> BatchReport:
        records, context, received = batch.records, batch.context, batch.received
        log.error(
            "batch of %d records failed (%s: %s); isolating the record(s) that make it fail",
            len(records),
            type(error).__name__,
            error,
            exc_info=error,
        )
        self.metrics.batch_isolations.inc()
        horizon_ms = batch.horizon_ms or self.horizon_ms
        parsed = [_decode_one(rec, received, horizon_ms) for rec in records]
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
                    batch._replace(records=records[lo:hi]),
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
            partition_of_customer = {
                key.customer_id: rec.partition
                for rec, key in zip(records, keys, strict=True)
                if key is not None
            }
            await self.rebuild_windows(
                dirty, partition_of_customer, context, received, "isolation", excluded
            )
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

    async def rebuild_windows(
        self,
        keys: set[fold.WindowKey],
        partition_of_customer: Mapping[str, int],
        context: dict[int, EventT],
        received: int,
        reason: str,
        exclude: AbstractSet[DedupKey] = frozenset(),
    ) -> int:
        """Rebuild ``keys`` from the (effective) record, without ``exclude``, and write them
        (meter_windows with a fresh version, the windows table), telling the record
        listeners (Stripe forwarder, credits) they changed; returns the windows rebuilt
        (customer totals not counted). Idempotent: the same record gives the same states.

        Used after an isolated batch (``reason`` isolation: what failed attempts may have
        written is replaced) and by corrections (``correction``, under ``apply_lock``).
        Only windows of customers in ``partition_of_customer`` (partitions of
        ``context``) are rebuilt."""
        keys = {k for k in keys if k.customer_id in partition_of_customer}
        if not keys:
            return 0
        aggs = self.meters.aggregators
        rebuilt = sum(1 for k in keys if not k.is_total)
        async with self.record_lock:
            states = await self._recompute(keys, exclude)
            self.metrics.window_rebuilds.inc(rebuilt, reason=reason)
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
        log.info("rebuilt %d window(s) from the record (%s)", rebuilt, reason)
        return rebuilt
