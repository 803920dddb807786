"""Fixing history in the worker (issue #26): voids, amendments and backfills, wired to
ClickHouse, Kafka and the batch pipeline. What a correction means is
pipeline/corrections/ (pure); the HTTP routes are pipeline/api/corrections.py.

A correction (``POST /v1/corrections``), in order:

1. Resolve the selector against the effective record (as if this correction had not been
   made: a retry after a crash selects the same events).
2. Dry-run: fold the affected windows' events with and without the correction and
   answer the difference; nothing is written.
3. Insert the ``event_corrections`` rows (one per event; a repeat collapses), then the
   ``corrections`` log row. From the first insert on, every read of the record for
   counting (window rebuilds, the Stripe forwarder's verification, reconciliation) sees
   the effective record.
4. Send one record per affected customer to ``usage-corrections`` (keyed by customer_id,
   co-partitioned with ``usage-events``) naming the windows to rebuild.
5. The agent on ``usage-corrections`` (:meth:`CorrectionService.on_record`) rebuilds those
   windows from the effective record (Pipeline.rebuild_windows: the batch's own rebuild),
   writes them to ``meter_windows`` with a fresh version and to the windows table, and
   tells the record listeners (Stripe forwarder, credits), all under the pipeline's
   ``apply_lock`` so it never interleaves with a batch.

A crash after 3 and before 5 is repaired by a repeat of the request with the same
``correction_id`` (it finds the log row and sends the rebuild records again) or by the
replay of the ``usage-corrections`` record (Faust commits its offset after the rebuild);
a rebuild reads the record, so doing it twice changes nothing. Faust can skip a record
around the rebalance of a restart (worker/gaps.py): a gap before a delivered record is
read directly (GapFiller), and every ``TAIL_SECONDS`` a partition's end that Faust has not
delivered for a whole interval is read directly too (:meth:`CorrectionService.tail`).

A backfill (``POST /v1/backfill``): events inside the dedup horizon are produced to
``usage-events`` like any event (the live dedup and validation handle them, invalid ones
are dead-lettered there); events older than it are sent, per customer, to
``usage-corrections`` and the agent runs them through the batch walk without the horizon
(:meth:`Pipeline.process_backfill`): the same parse, validation, dead letters, dedup (by
(customer_id, idempotency_key) against the table and the record), range decisions and
record insert, then the windows rebuilt from the record. A second run of the same
backfill finds every key in the record and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import faust
import orjson
from aiokafka import TopicPartition
from faust.types import EventT

from meterstream.corrections import effective
from meterstream.corrections.request import Correction
from meterstream.dedup import resolve
from meterstream.errors import CorrectionError
from meterstream.events import (
    Reason,
    Rejection,
    UsageEvent,
    canonical_json,
    loads_exact,
    parse_event,
)
from meterstream.meters import fold
from meterstream.meters.aggregation import WindowState
from meterstream.meters.windows import month_bounds, period_label
from meterstream.pricing.invoice import Period
from meterstream.settings import Settings
from meterstream.sinks.clickhouse import corrections as store
from meterstream.sinks.clickhouse import queries
from meterstream.topics import USAGE_CORRECTIONS
from meterstream.worker.app import EXIT_BATCH_FAILED
from meterstream.worker.batch import is_dependency_failure, now_ms
from meterstream.worker.credits import CreditService
from meterstream.worker.gaps import GapFiller
from meterstream.worker.invoices import preview
from meterstream.worker.raw_topics import raw_topic
from meterstream.worker.services import WorkerServices

log = logging.getLogger("meterstream.corrections")
Send = Callable[[Sequence[tuple[bytes, bytes]]], Awaitable[None]]
"""Produce (key, value) records to a topic; returns once the broker acknowledged them."""
MAX_BACKFILL_EVENTS = 5_000
"""Events per ``POST /v1/backfill`` (the CLI sends a file in batches of this size or less)."""
TAIL_SECONDS = 2.0
"""How often the records Faust left undelivered at a partition's end are looked for."""
_CHUNK = 500  # events or windows per usage-corrections record (well under 1 MB)


def _chunks(raws: Sequence[bytes], max_bytes: int = 512 * 1024) -> Iterable[list[bytes]]:
    """``raws`` in order, in lists of at most ``_CHUNK`` events and about ``max_bytes``
    (one usage-corrections record each, under the broker's 1 MB message limit)."""
    chunk: list[bytes] = []
    size = 0
    for raw in raws:
        if chunk and (len(chunk) == _CHUNK or size + len(raw) > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(raw)
        size += len(raw)
    if chunk:
        yield chunk


def window_row(
    aggregation: str, key: fold.WindowKey, state: WindowState, value: Any
) -> dict[str, Any]:
    """A window state as a stored window row (queries.latest_windows' fields that pricing
    reads)."""
    return {
        "meter": key.meter,
        "aggregation": aggregation,
        "customer_id": key.customer_id,
        "group_key": key.group_key,
        "window_start_ms": key.window_start_ms,
        "value": value,
        "event_count": state.event_count,
        "distinct_values": sorted(state.distinct or ()),
        "latest_ts_ms": state.latest_ts,
        "latest_key": state.latest_key,
    }


def new_correction_id() -> str:
    return f"cor_{time.time_ns() // 1_000_000:013d}_{secrets.token_hex(6)}"


def _window_doc(key: fold.WindowKey) -> list[Any]:
    return [key.meter, key.customer_id, key.group_key, key.window_start_ms]


class CorrectionService:
    """Applies corrections and backfills; one per worker."""

    def __init__(
        self,
        services: WorkerServices,
        send_corrections: Send,
        send_events: Send,
        credits: CreditService | None = None,
        gaps: GapFiller | None = None,
    ) -> None:
        self.services = services
        self.credits = credits
        # records Faust skips are read directly (worker/gaps.py), in the context of the
        # last event Faust delivered of their partition
        self.gaps = gaps
        self.last_event: dict[int, EventT] = {}
        self._waiting: dict[int, int] = {}
        self.tail_lock = asyncio.Lock()  # the agent and the tail check, one at a time
        self.send_corrections = send_corrections
        self.send_events = send_events

    # -- reading the record --------------------------------------------------------------

    async def _events(self, c: Correction, without: str) -> list[UsageEvent]:
        """The effective record's candidates of a selector (without correction ``without``)."""
        if c.by_keys:
            pairs = [(k.customer_id, k.idempotency_key) for k in c.keys]
            rows = await self.services.chio.call(
                store.effective_events_by_key, pairs, without_correction=without
            )
        else:
            assert c.from_ms is not None and c.to_ms is not None
            customers = None if c.customer_id is None else [c.customer_id]
            rows = await self.services.chio.call(
                queries.events_in_range,
                customers,
                c.event_names(self.services.meters),
                c.from_ms,
                c.to_ms,
                without_correction=without,
            )
        return [UsageEvent(**row) for row in rows]

    async def record_of_months(
        self, keys: Iterable[fold.WindowKey], without: str | None = None
    ) -> list[UsageEvent]:
        """Every event of the effective record in the UTC months of these windows, of
        their customers and meters' event names (once each): what a dry run folds."""
        ranges: dict[tuple[int, int], tuple[set[str], set[str]]] = {}
        for customer, meter, period in effective.months_affected(keys):
            customers, names = ranges.setdefault(month_bounds(period), (set(), set()))
            customers.add(customer)
            names.add(self.services.meters.by_name(meter).event_name)
        events: dict[tuple[str, str], UsageEvent] = {}
        for (start, end), (customers, names) in ranges.items():
            rows = await self.services.chio.call(
                queries.events_in_range,
                sorted(customers),
                sorted(names),
                start,
                end,
                without_correction=without,
            )
            for row in rows:
                events[(row["customer_id"], row["idempotency_key"])] = UsageEvent(**row)
        return list(events.values())

    # -- corrections ---------------------------------------------------------------------

    async def correct(self, c: Correction, operator: str) -> dict[str, Any]:
        """Apply (or dry-run) one correction; the answer of ``POST /v1/corrections``."""
        cid = c.correction_id or new_correction_id()
        if c.correction_id is not None:
            logged = await self.services.chio.call(store.correction, cid)
            if logged is not None:
                if logged["kind"] != c.kind:
                    raise CorrectionError(
                        f"correction_id {cid!r} is a {logged['kind']}, not a {c.kind}"
                    )
                if not c.dry_run:
                    await self._resend(cid, logged["kind"])
                return {**logged, "repeated": True}
        chosen = effective.selected(c, self.services.meters, await self._events(c, cid))
        found = {(e.customer_id, e.idempotency_key) for e in chosen}
        at = now_ms()
        rows = effective.planned(c, cid, chosen, at)
        fixes = effective.latest(rows)
        windows = effective.windows_affected(
            self.services.meters, chosen, effective.effective(chosen, fixes)
        )
        doc: dict[str, Any] = {
            "correction_id": cid,
            "kind": c.kind,
            "author": self._author(c.author, operator),
            "reason": c.reason,
            "created_at_ms": at,
            "selector": c.selector_doc,
            "events_affected": len(chosen),
            "windows_affected": sum(1 for k in windows if not k.is_total),
            "status": "applied",
            "not_found": [
                {"customer_id": k.customer_id, "idempotency_key": k.idempotency_key}
                for k in c.keys
                if (k.customer_id, k.idempotency_key) not in found
            ],
        }
        if c.dry_run:
            before = await self.record_of_months(windows, without=cid)
            after = effective.effective(before, fixes)
            doc["status"] = "dry_run"
            doc.update(await self.preview(windows, before, after))
            return doc
        if not chosen:
            doc["status"] = "nothing_to_correct"
            return doc
        await self.services.chio.call(
            store.append_event_corrections, [tuple(r) for r in rows]
        )  # 3. the events, then the log row
        await self.services.chio.call(store.append_correction, doc)
        self.services.metrics.corrections.inc(kind=c.kind)
        self.services.metrics.corrected_events.inc(
            len(chosen), action="voided" if c.kind == "void" else "amended"
        )
        await self._send_rebuilds(cid, c.kind, windows)  # 4.
        log.info(
            "correction %s (%s) by %s: %d event(s), %d window(s) to rebuild",
            cid,
            c.kind,
            doc["author"],
            len(chosen),
            doc["windows_affected"],
        )
        return doc

    @staticmethod
    def _author(author: str, operator: str) -> str:
        return f"{author} ({operator})" if author else operator

    async def preview(
        self,
        windows: set[fold.WindowKey],
        before: Sequence[UsageEvent],
        after: Sequence[UsageEvent],
    ) -> dict[str, Any]:
        """The dry-run's answer: windows and (customer, meter, month) totals before and
        after, the invoice previews before and after (plans loaded), and what the Stripe
        forwarder would send for the months' change."""
        changes = effective.diff(self.services.meters, windows, before, after)
        stripe = []
        for period in changes["periods"]:
            meter = self.services.meters.by_name(period["meter"])
            if meter.stripe is None:
                continue
            additive = meter.aggregation in ("sum", "count")
            stripe.append(
                {
                    "customer_id": period["customer_id"],
                    "meter": meter.name,
                    "period": period["period"],
                    "mode": "delta" if additive else "period_to_date",
                    "value": period["change"] if additive else period["after"]["value"],
                }
            )
        states = fold.fold(self.services.meters, after)
        return {
            **changes,
            "invoices": await self._invoices(windows, states),
            "balances": await self._balances(windows, states),
            "stripe": stripe,
        }

    async def _balances(
        self, windows: set[fold.WindowKey], states: Mapping[fold.WindowKey, WindowState]
    ) -> list[dict[str, Any]]:
        """Each affected customer with credits: its balance now and after the correction
        (its book, on a copy, burning the months priced from the corrected windows)."""
        if self.credits is None:
            return []
        wanted = sorted(k for k in windows if not k.is_total)
        aggs = self.services.meters.aggregators
        out = []
        for customer in sorted({k.customer_id for k in wanted}):
            mine = [k for k in wanted if k.customer_id == customer]
            rows = [
                window_row(
                    self.services.meters.by_name(k.meter).aggregation,
                    k,
                    states.get(k) or aggs[k.meter].start(),
                    aggs[k.meter].result(states.get(k) or aggs[k.meter].start()),
                )
                for k in mine
            ]
            replaced = {(k.meter, k.group_key, k.window_start_ms) for k in mine}

            def rewrite(
                stored: list[dict[str, Any]],
                rows: list[dict[str, Any]] = rows,
                replaced: set[tuple[str, str, int]] = replaced,
            ) -> list[dict[str, Any]]:
                kept = [
                    r
                    for r in stored
                    if (r["meter"], r["group_key"], int(r["window_start_ms"])) not in replaced
                ]
                return kept + rows

            months = {period_label(k.window_start_ms) for k in mine}
            found = await self.credits.balance_after(customer, months, rewrite)
            if found is None:
                continue
            now, then = found
            out.append(
                {
                    "customer_id": customer,
                    "balance_before": str(now),
                    "balance_after": str(then),
                    "change": str(then - now),
                }
            )
        return out

    async def _invoices(
        self, windows: set[fold.WindowKey], states: Mapping[fold.WindowKey, WindowState]
    ) -> list[dict[str, Any]]:
        """Each affected (customer, month)'s invoice preview now and after the correction
        (the corrected meters' quantities from the fold of the record after it, the others
        stored)."""
        plans = self.services.plans
        months: dict[tuple[str, str], set[str]] = {}
        for customer, meter, month in effective.months_affected(
            k for k in windows if not k.is_total
        ):
            months.setdefault((customer, month), set()).add(meter)
        out = []
        for (customer, label), names in sorted(months.items()):
            period = Period.month(label)

            def override(start: int, end: int, c: str = customer, n: set[str] = names) -> Any:
                return effective.quantities(self.services.meters, states, c, n, start, end)

            now = await self.services.chio.call(
                lambda ch, c=customer, p=period: preview(ch, plans, c, p)
            )
            then = await self.services.chio.call(
                lambda ch, c=customer, p=period, o=override: preview(ch, plans, c, p, o)
            )
            out.append(
                {
                    "customer_id": customer,
                    "period": label,
                    "currency": now.currency.code,
                    "total_before": str(now.total),
                    "total_after": str(then.total),
                    "change": str(then.total - now.total),
                }
            )
        return out

    async def _resend(self, cid: str, kind: str) -> None:
        """A repeat of a logged correction: its windows rebuilt again (idempotent)."""
        if kind == "backfill":
            return  # its events are in the record; their batches rebuilt their windows
        fixed = await self.services.chio.call(store.event_corrections_of, cid)
        pairs = [(r["customer_id"], r["idempotency_key"]) for r in fixed]
        before = await self.services.chio.call(
            store.effective_events_by_key, pairs, without_correction=cid
        )
        after = await self.services.chio.call(store.effective_events_by_key, pairs)
        windows = effective.windows_affected(
            self.services.meters,
            [UsageEvent(**r) for r in before],
            [UsageEvent(**r) for r in after],
        )
        await self._send_rebuilds(cid, kind, windows)

    async def _send_rebuilds(self, cid: str, kind: str, windows: Iterable[fold.WindowKey]) -> None:
        by_customer: dict[str, list[list[Any]]] = {}
        for key in sorted(windows):
            by_customer.setdefault(key.customer_id, []).append(_window_doc(key))
        await self.send_corrections(
            [
                (
                    customer.encode(),
                    orjson.dumps(
                        {"correction_id": cid, "kind": kind, "windows": keys[i : i + _CHUNK]}
                    ),
                )
                for customer, keys in by_customer.items()
                for i in range(0, len(keys), _CHUNK)
            ]
        )

    # -- backfill ------------------------------------------------------------------------

    async def backfill(
        self, raws: Sequence[bytes], *, author: str, reason: str, dry_run: bool, operator: str
    ) -> dict[str, Any]:
        """Import events (raw JSON each); the answer of ``POST /v1/backfill``.

        Per event, its ``outcome``: ``live`` (inside the dedup horizon or not a valid
        event: produced to usage-events, where the stream counts it once or dead-letters
        it), ``backfilled`` (older than the horizon, new: counted through the correction
        path), ``already_recorded`` (older than the horizon, its key is in the record: a
        duplicate, or an idempotency conflict when the content differs), or
        ``future_timestamp`` / the stream's reason for an old event (dead-lettered)."""
        received = now_ms()
        horizon = self.services.pipeline.horizon_ms
        outcomes: list[dict[str, Any]] = []
        live: list[tuple[bytes, bytes]] = []
        old: list[tuple[UsageEvent, bytes]] = []
        for index, raw in enumerate(raws):
            parsed = parse_event(
                raw, record_timestamp_ms=received, now_ms=received, horizon_ms=horizon
            )
            if isinstance(parsed, Rejection) and parsed.reason == Reason.TOO_LATE:
                again = parse_event(
                    raw, record_timestamp_ms=received, now_ms=received, horizon_ms=1 << 62
                )
                assert isinstance(again, UsageEvent)
                old.append((again, raw))
                outcomes.append({"index": index, "outcome": "old"})
                continue
            key = parsed.customer_id.encode() if parsed.customer_id else b""
            live.append((key, raw))
            outcome: dict[str, Any] = {"index": index, "outcome": "live"}
            if isinstance(parsed, Rejection):
                outcome["rejected"] = str(parsed.reason)
                outcome["detail"] = parsed.detail
            outcomes.append(outcome)
        recorded = await self.services.chio.call(
            queries.existing_keys, [(e.customer_id, e.idempotency_key) for e, _ in old]
        )
        new: dict[str, list[bytes]] = {}
        seen: set[tuple[str, str]] = set()
        old_iter = iter(old)
        for outcome in outcomes:
            if outcome["outcome"] != "old":
                continue
            event, raw = next(old_iter)
            pair = (event.customer_id, event.idempotency_key)
            outcome["customer_id"], outcome["idempotency_key"] = pair
            if pair in recorded or pair in seen:
                outcome["outcome"] = "already_recorded"
                if pair in recorded and recorded[pair] != event.fingerprint:
                    outcome["outcome"] = "conflict"
                continue
            seen.add(pair)
            outcome["outcome"] = "backfilled"
            new.setdefault(event.customer_id, []).append(raw)
        counts: dict[str, int] = {}
        for outcome in outcomes:
            counts[outcome["outcome"]] = counts.get(outcome["outcome"], 0) + 1
        doc: dict[str, Any] = {
            "events": len(raws),
            "counts": counts,
            "outcomes": [o for o in outcomes if o["outcome"] != "live" or "rejected" in o],
            "status": "dry_run" if dry_run else "applied",
        }
        if dry_run:
            return doc
        if live:
            await self.send_events(live)
        backfilled = sum(len(v) for v in new.values())
        if backfilled:
            cid = new_correction_id()
            await self.services.chio.call(
                store.append_correction,
                {
                    "correction_id": cid,
                    "kind": "backfill",
                    "author": self._author(author, operator),
                    "reason": reason,
                    "created_at_ms": received,
                    "selector": {
                        "events": len(raws),
                        "keys": sorted(f"{c}/{k}" for c, k in seen)[:1000],
                    },
                    "events_affected": backfilled,
                    "windows_affected": 0,
                    "status": "applied",
                },
            )
            self.services.metrics.corrections.inc(kind="backfill")
            doc["correction_id"] = cid
            records = []
            for customer, items in new.items():
                for chunk in _chunks(items):
                    value = canonical_json(
                        {
                            "correction_id": cid,
                            "kind": "backfill",
                            "events": [loads_exact(r) for r in chunk],
                        }
                    )
                    records.append((customer.encode(), value.encode()))
            await self.send_corrections(records)
        return doc

    async def rejected(
        self,
        reason: str,
        customer_id: str | None,
        from_ms: int | None,
        to_ms: int | None,
    ) -> list[bytes]:
        """The raw events kept in ``rejected_events`` for ``reason`` (their text)."""
        rows = await self.services.chio.call(
            store.rejected_raw, reason, customer_id, from_ms, to_ms
        )
        return [raw.encode() for _, raw, _ in rows]

    # -- the agent -----------------------------------------------------------------------

    async def on_record(self, event: EventT) -> None:
        """One ``usage-corrections`` record as Faust delivers it (:meth:`apply`), after the
        records of its partition Faust skipped before it (worker/gaps.py)."""
        message = event.message
        partition = message.partition
        self.last_event[partition] = event
        if self.gaps is not None:
            skipped = await self.gaps.missing(message.generation_id, {partition: [message.offset]})
            for record in skipped:
                await self.apply(record.key, record.value, record.timestamp, event)
        await self.apply(message.key, message.value, int(message.timestamp * 1000), event)

    async def tail(self, highwater: Callable[[int], int | None]) -> int:
        """Records at the end of a partition that Faust has not delivered for a whole
        interval (a record skipped around a rebalance, with none after it to reveal the
        gap): read directly and applied (idempotent if Faust delivers them later too).
        ``highwater(partition)``: the partition's end offset. Returns the records applied."""
        if self.gaps is None:
            return 0
        applied = 0
        for partition, expected in self.gaps.next_offsets().items():
            end = highwater(partition)
            context = self.last_event.get(partition)
            if end is None or end <= expected or context is None:
                self._waiting.pop(partition, None)
                continue
            if self._waiting.get(partition) != expected:
                self._waiting[partition] = expected  # give Faust one interval first
                continue
            records = await self.gaps.read(partition, expected, end)
            log.warning(
                "usage-corrections partition %d: offsets %d-%d not delivered; read %d directly",
                partition,
                expected,
                end - 1,
                len(records),
            )
            for record in records:
                await self.apply(record.key, record.value, record.timestamp, context)
                applied += 1
            self.gaps.advance(partition, end)
            self._waiting.pop(partition, None)
        return applied

    async def apply(
        self, key: bytes | None, value: bytes | None, timestamp_ms: int, context_event: EventT
    ) -> None:
        """One ``usage-corrections`` record: a backfill's events counted, or the windows
        of a correction rebuilt from the effective record. ``context_event``: an event of
        the record's partition (the Faust tables are written in its context)."""
        partition = context_event.message.partition
        doc = loads_exact(value or b"{}")
        customer = (key or b"").decode("utf-8", "replace")
        context = {partition: context_event}
        if doc.get("kind") == "backfill":
            records = [
                resolve.SourceRecord(
                    canonical_json(item).encode(),
                    partition,
                    context_event.message.offset,
                    timestamp_ms,
                    customer.encode(),
                )
                for item in doc.get("events", [])
            ]
            report = await self.services.pipeline.process_backfill(records, context)
            self.services.metrics.corrected_events.inc(report.accepted, action="backfilled")
            return
        keys = {
            fold.WindowKey(str(m), str(c), str(g), int(s))
            for m, c, g, s in doc.get("windows", [])
            if c == customer
        }
        names = {m.name for m in self.services.meters.meters}
        keys = {k for k in keys if k.meter in names}  # a meter removed since: not kept
        async with self.services.pipeline.apply_lock:
            await self.services.pipeline.rebuild_windows(
                keys, {customer: partition}, context, now_ms(), "correction"
            )


def install_corrections(app: faust.App, settings: Settings, service: CorrectionService) -> None:
    """The agent on ``usage-corrections`` that applies ``service``'s records."""
    topic = raw_topic(
        app,
        settings.topic(USAGE_CORRECTIONS.name),
        partitions=settings.partitions,
        retention_seconds=(USAGE_CORRECTIONS.retention_ms or 0) / 1000 or None,
    )

    topic_name = settings.topic(USAGE_CORRECTIONS.name)

    def highwater(partition: int) -> int | None:
        end = app.consumer.highwater(TopicPartition(topic_name, partition))
        return None if end is None else int(end)

    @app.timer(TAIL_SECONDS)
    async def corrections_tail() -> None:
        try:
            async with service.tail_lock:
                await service.tail(highwater)
        except Exception as exc:
            if is_dependency_failure(exc):
                log.warning("usage-corrections tail check failed; retried: %s", exc)
            else:
                log.exception("usage-corrections tail check failed; retried")

    @app.agent(topic, name="meterstream.corrections")
    async def apply_corrections(stream: Any) -> None:
        async for event in stream.events():
            try:
                async with service.tail_lock:
                    await service.on_record(event)
            except Exception as exc:
                if is_dependency_failure(exc):
                    # Never acked: replayed after the restart (the rebuild is idempotent).
                    log.critical("correction record failed; exiting", exc_info=True)
                    logging.shutdown()
                    os._exit(EXIT_BATCH_FAILED)
                log.exception(
                    "usage-corrections record %d@%d is unusable; skipped",
                    event.message.offset,
                    event.message.partition,
                )
