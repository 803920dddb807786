"""Prepaid credits wired to the record: grants, the real-time burn, the ledger, entitlements.

The pure engine is :mod:`meterstream.credits` (:class:`~meterstream.credits.burn.CreditBook`,
one per customer with a grant). This module feeds it and writes what it returns:

- **Grants and voids** come from ``meterstream credits grant``/``void`` or
  ``POST /v1/customers/{id}/credits/grants`` (pipeline/api/credits.py). Each is recorded in
  ClickHouse ``credit_grants`` first (durable), then applied to the book; the entries the
  book returns are appended to ``credit_ledger`` before the answer.
- **Spend** is the customer's priced usage (the plans of pipeline/pricing, per period and
  plan segment, as the invoice preview prices it, base fees excepted), cut per meter
  window: a window's spend is ``charge(the segment's value through the window) -
  charge(through the window before)`` (:func:`spend_levels`), exact, unrounded, dated at
  the window's start (so a grant covers the usage of windows that start while it is
  usable). It is a **level** per source (``meter|window_start|``), derived from the
  totals in ``meter_windows`` (the deduplicated record), never from event deltas: a
  duplicate or a replayed event leaves the totals unchanged, so the level is unchanged
  and nothing burns; a late event changes its window's total, so the level of that
  window (and of later windows whose tier it moved) is set again, and the book writes
  the difference as correcting entries at the window's own time, against the grants
  usable then.
- **When**: the batch only marks the customer and period dirty (a record listener, a
  set insert per touched window) and wakes the burn loop, which waits
  :data:`BURN_GAP_SECONDS` more (a burst is one tick) or at most
  ``METERSTREAM_CREDITS_BURN_SECONDS`` (expiries come due). A tick prices every dirty
  customer of a period together (:func:`spend_levels_of`: two reads whatever their
  number), applies the levels that changed, moves every book's clock, writes the tick's
  ledger lines in one insert, then decides each changed customer. The hot path pays
  nothing else. A plan change (:meth:`CreditService.plan_changed`) marks the customer too.
- **Restart**: at start every book is rebuilt from ``credit_grants`` and the spend levels
  recomputed from the record (batched: two reads per month for all the customers), then
  resumed against the ledger rows (:meth:`CreditBook.resume`): whatever the killed run had
  not written is written with the ids it would have used, and each book's balance is
  checked against ClickHouse's ``sum(amount)`` of its ledger before the routes answer (503
  until then); a book that fails the check is not loaded (logged). Before that, the
  compacted ``entitlements`` topic is read to its end (:meth:`CreditService.adopt_published`):
  each customer on it is taken as published and decided again at the first tick (a limit
  raised, a month turned while the worker was down), published only where it changed.
- **Entitlements** are decided after every change
  (:func:`~meterstream.credits.entitlements.decide`) with the usage limits of the plan in
  force now (:func:`plan_limits`), kept in memory (the route answers from there) and
  written to the compacted topic ``entitlements`` whenever they differ from the last one
  written. When a plan of the file sets limits, the batch marks every customer, not only
  those with credits; the timer reads the plans of the customers without credits (one
  read per tick for all of them) and keeps and publishes the entitlement of each only
  while its plan has limits (a free tier). Any other customer whose entitlement is read is
  read from the record once and followed from then on (``watched``: marked by its
  batches, kept in memory, not published). At the first tick of a month every customer
  with credits or limits is decided again and published (usage starts again).

One worker holds every book (the embedded deployment); with several workers each one
would burn only for the customers of its partitions (not built).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from decimal import Decimal, localcontext
from typing import Any

import faust
import orjson

from meterstream.credits.burn import CreditBook, Step
from meterstream.credits.entitlements import Entitlement, decide
from meterstream.credits.grants import DEFAULT_PRIORITY, Grant, Void
from meterstream.credits.ledger import EntryKind, LedgerEntry, totals
from meterstream.credits.money import EXACT, canon
from meterstream.credits.spend import SpendChange, window_source
from meterstream.credits.status import CustomerStatus
from meterstream.credits.values import from_row
from meterstream.errors import CreditsError, PricingError
from meterstream.meters.windows import day_of, period_label
from meterstream.pricing.invoice import Period
from meterstream.pricing.plans import PlansConfig
from meterstream.pricing.prices import daily_amounts
from meterstream.settings import Settings
from meterstream.sinks.clickhouse import credits as store
from meterstream.sinks.clickhouse import pricing as pricing_store
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.topics import ENTITLEMENTS
from meterstream.worker.alerts import AlertDesk
from meterstream.worker.invoices import merge_windows, merged_to_date, segments_for
from meterstream.worker.raw_topics import raw_topic

log = logging.getLogger("meterstream.credits")

WATCH_LIMIT = 100_000
"""How many customers without credits or limits the worker follows once their entitlement
was read (beyond it, each read of a new one goes to the record)."""

BURN_GAP_SECONDS = 0.2
"""After a batch marks a customer, the burn waits this long, so the batches of a burst are
priced in one tick (the balance follows usage within about this, plus the tick)."""

SLOW_TICK_MS = 1000

ADOPT_SECONDS = 60.0
"""At start, how long the worker reads the compacted ``entitlements`` topic to its end
(:meth:`CreditService.adopt_published`) before it resumes the books without it."""

_UNCOMPARED = ("at_ms", "cause")  # what differs between two equal entitlements

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ZERO = Decimal(0)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _ms(value: dt.datetime) -> int:
    return (value - _EPOCH) // dt.timedelta(milliseconds=1)


# ------------------------------------------------------------------ spend from the record


class PeriodSpend:
    """One customer-period priced from ``meter_windows``: spend per source, usage per meter."""

    def __init__(self) -> None:
        self.levels: dict[str, tuple[int, Decimal, str]] = {}  # source -> (ms, amount, cur)
        self.usage: dict[str, Decimal] = {}
        self.limits: dict[str, Decimal] = {}  # of the plan in force (when asked for)


WindowRewrite = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
"""One customer's stored window rows (latest_windows) in, the rows to price out (a
correction's dry run)."""


def spend_levels(
    ch: ClickHouse,
    plans: PlansConfig,
    customer_id: str,
    period: Period,
    rewrite: WindowRewrite | None = None,
) -> PeriodSpend:
    """The spend level of every priced window of ``customer_id`` in ``period`` (the
    stored windows, or what ``rewrite`` makes of them): :func:`spend_levels_of` of one."""
    return spend_levels_of(ch, plans, [customer_id], period, rewrite)[customer_id]


def spend_levels_of(
    ch: ClickHouse,
    plans: PlansConfig,
    customers: Sequence[str],
    period: Period,
    rewrite: WindowRewrite | None = None,
    errors: dict[str, Exception] | None = None,
    limits_at_ms: int | None = None,
) -> dict[str, PeriodSpend]:
    """:func:`priced_windows` of each of ``customers`` in ``period``, in two reads
    (``pricing_store.schedules_and_windows``): the burn prices every dirty customer of a
    tick at once; ``rewrite`` applies to each customer's windows. With ``errors``, a customer
    whose usage cannot be priced is put there and left out, instead of raising. With
    ``limits_at_ms``, each one's ``limits`` are those of its plan in force then (from the
    same read of the schedules)."""
    schedules, by_customer = pricing_store.schedules_and_windows(
        ch, customers, _ms(period.start), _ms(period.end)
    )
    if rewrite is not None:
        by_customer = {c: rewrite(found) for c, found in by_customer.items()}
    out: dict[str, PeriodSpend] = {}
    for customer, found in by_customer.items():
        schedule = schedules.get(customer)
        try:
            out[customer] = priced_windows(plans, period, schedule, found)
            if limits_at_ms is not None:
                out[customer].limits = limits_at(plans, schedule, limits_at_ms)
        except (PricingError, KeyError, ValueError) as exc:  # e.g. two currencies
            if errors is None:
                raise
            errors[customer] = exc
    return out


def priced_windows(
    plans: PlansConfig,
    period: Period,
    schedule: pricing_store.ScheduleRow | None,
    windows: Sequence[dict[str, Any]],
) -> PeriodSpend:
    """One customer's spend levels and usage in ``period`` from its stored ``windows``
    (latest_windows rows) and plan ``schedule`` (pure).

    Per plan segment and priced meter, the windows (all groups merged) in start order;
    a window's level is ``charge(value through it) - charge(value before it)``
    (:func:`~meterstream.pricing.prices.daily_amounts` over windows), so the levels of a
    segment sum exactly to its usage line before rounding. A window whose charge fell
    (a ``latest`` or ``max`` meter cannot, a decreasing total could) carries the fall
    into the next windows' levels, which never go below zero.
    """
    out = PeriodSpend()
    by_meter_all: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for window in windows:
        by_meter_all[str(window["meter"])].append(window)
    for meter, found in by_meter_all.items():
        out.usage[meter] = merge_windows(str(found[0]["aggregation"]), found)
    for segment in segments_for(plans, period, schedule):
        plan = plans.by_name(segment.plan)
        start, end = _ms(segment.start), _ms(segment.end)
        for price in plan.prices:
            found = [
                w
                for w in by_meter_all.get(price.meter, [])
                if start <= int(w["window_start_ms"]) < end
            ]
            if not found:
                continue
            starts: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for window in found:
                starts[int(window["window_start_ms"])].append(window)
            order = sorted(starts)
            to_date = merged_to_date(str(found[0]["aggregation"]), [starts[at] for at in order])
            carry = _ZERO
            with localcontext(EXACT):
                for at, amount in zip(order, daily_amounts(price.model, to_date), strict=True):
                    level = amount + carry
                    carry = min(level, _ZERO)
                    out.levels[window_source(price.meter, at)] = (
                        at,
                        max(level, _ZERO),
                        plan.money.code,
                    )
    return out


def plan_limits(
    ch: ClickHouse, plans: PlansConfig, customer_id: str, at_ms: int
) -> dict[str, Decimal]:
    """The usage limits per meter of the plan in force for ``customer_id`` at ``at_ms`` (its
    assignment then, else the default plan), for the period (UTC month) of ``at_ms``."""
    return plans_limits(ch, plans, [customer_id], at_ms)[customer_id]


def plans_limits(
    ch: ClickHouse, plans: PlansConfig, customers: Sequence[str], at_ms: int
) -> dict[str, dict[str, Decimal]]:
    """:func:`plan_limits` of several customers in one read of their schedules (none
    without limits in ``plans``)."""
    if not plans.has_limits or not customers:
        return {c: {} for c in customers}
    schedules = pricing_store.current_schedules(ch, list(customers))
    return {c: limits_at(plans, schedules.get(c), at_ms) for c in customers}


def limits_at(
    plans: PlansConfig, schedule: pricing_store.ScheduleRow | None, at_ms: int
) -> dict[str, Decimal]:
    """The usage limits of the plan ``schedule`` puts in force at ``at_ms`` (pure)."""
    if not plans.has_limits:
        return {}
    for segment in segments_for(plans, Period.month(period_label(at_ms)), schedule):
        if _ms(segment.start) <= at_ms < _ms(segment.end):
            return dict(plans.by_name(segment.plan).limits)
    return {}


def _period_bounds(label: str) -> tuple[int, int]:
    period = Period.month(label)
    return _ms(period.start), _ms(period.end)


def _periods_between(first_ms: int, last_ms: int) -> list[str]:
    labels = []
    at = first_ms
    while True:
        label = period_label(at)
        labels.append(label)
        _, end = _period_bounds(label)
        if end > last_ms:
            return labels
        at = end


# ------------------------------------------------------------------ ledger rows


def entry_row(e: LedgerEntry) -> tuple[Any, ...]:
    return (
        e.customer_id,
        e.entry_id,
        e.kind.value,
        e.amount,
        e.currency,
        e.at_ms,
        e.grant_id or "",
        e.source or "",
        e.seq,
        e.key_total,
        e.cause,
    )


def entry_of(row: Mapping[str, Any]) -> LedgerEntry:
    """A ledger entry from its ``credit_ledger`` row (:func:`store.ledger_rows`)."""
    return from_row(LedgerEntry, row, kind=EntryKind(row["kind"]))


def grant_row(grant: Grant, changed_by: str) -> tuple[Any, ...]:
    return (
        grant.customer_id,
        grant.grant_id,
        "grant",
        grant.amount,
        grant.currency,
        grant.effective_ms,
        grant.expires_ms,
        grant.priority,
        grant.origin,
        "",
        changed_by,
    )


def void_row(void: Void, currency: str, changed_by: str) -> tuple[Any, ...]:
    return (
        void.customer_id,
        void.grant_id,
        "void",
        _ZERO,
        currency,
        void.voided_ms,
        None,
        0,
        "",
        void.reason,
        changed_by,
    )


def inputs_of(rows: Sequence[Mapping[str, Any]]) -> tuple[list[Grant], list[Void]]:
    """Grants and voids from ``credit_grants`` rows (the earliest void of a grant wins)."""
    grants: list[Grant] = []
    voids: dict[str, Void] = {}
    for r in rows:
        if r["kind"] == "grant":
            grants.append(from_row(Grant, r))
        elif r["kind"] == "void":
            void = Void(r["grant_id"], r["customer_id"], r["effective_ms"], r["reason"])
            held = voids.get(void.grant_id)
            if held is None or void.voided_ms < held.voided_ms:
                voids[void.grant_id] = void
    return grants, list(voids.values())


# ------------------------------------------------------------------ the service


class CreditService:
    """The worker's credit books, their ledger writes, and the entitlements served."""

    def __init__(
        self,
        app: faust.App | None,
        settings: Settings,
        chio: ClickHouseIO,
        plans: PlansConfig,
        read: Callable[..., Awaitable[Any]] | None = None,
        alerts: AlertDesk | None = None,
    ) -> None:
        self.app = app
        self.alerts = alerts
        # reads of the record (spend levels) go to the read-only connection's thread when
        # given, so the burn never queues behind the batch's inserts
        self.read = read or chio.call
        self.settings = settings
        self.chio = chio
        self.plans = plans
        self.books: dict[str, CreditBook] = {}
        self.usage: dict[str, tuple[str, dict[str, Decimal]]] = {}  # customer -> (period, use)
        self.entitlements: dict[str, Entitlement] = {}
        self.limits: dict[str, dict[str, Decimal]] = {}  # customer -> its plan's limits now
        self._published: dict[str, dict[str, Any]] = {}
        self.dirty: dict[str, set[str]] = defaultdict(set)  # customer -> period labels
        self.marked = asyncio.Event()  # set when a batch marks a customer: burn soon
        # customers without credits or limits whose entitlement was read: followed from
        # then on (their batches mark them), so the next reads come from memory
        self.watched: set[str] = set()
        self._period: str | None = None  # the month of the last burn tick
        self._unwritten: list[LedgerEntry] = []  # ledger lines made, not yet written
        self.ready = asyncio.Event()
        self.lock = asyncio.Lock()
        # called with every status of a customer with credits, after its alerts (the
        # auto-recharge of pipeline/worker/purchases.py), under the lock
        self.status_listeners: list[Callable[[CustomerStatus], Awaitable[None]]] = []
        self.topic: Any = None
        if app is not None:
            self.topic = raw_topic(
                app, settings.topic(ENTITLEMENTS.name), partitions=settings.partitions
            )

    # -- the batch's side: mark, nothing else

    def record_changed(
        self, events: Sequence[Any], states: Mapping[Any, Any], reread: set[Any]
    ) -> None:
        """A record listener: the customers with credits (or every customer, when a plan sets
        usage limits) and the months whose windows changed (a set insert per touched window;
        without limits, customers without credits cost a lookup)."""
        books = self.books
        # Until the books are resumed every customer counts: a batch that lands while
        # ``start`` reads the record may land after the read, and its change must be
        # burned once the books are there (else the balance stays stale until the
        # customer's next event).
        everyone = self.plans.has_limits or not self.ready.is_set()
        dirty, watched = self.dirty, self.watched
        for keys in (states.keys(), reread):
            for key in keys:
                customer = key.customer_id
                if everyone or customer in books or customer in watched:
                    dirty[customer].add(period_label(key.window_start_ms))
        if dirty:
            self.marked.set()

    def plan_changed(self, customer: str) -> None:
        """An assignment listener: ``customer``'s plan schedule changed. Its spend is priced
        again (every month since its first grant: a change may date back) and its
        entitlement decided again (limits) at the next tick."""
        now = now_ms()
        book = self.books.get(customer)
        first = now if book is None else min(g.effective_ms for g in book.grants.values())
        self.dirty[customer].update(_periods_between(min(first, now), now))
        self.marked.set()

    async def burn_soon(self, every: float, gap: float) -> None:
        """Wait until a batch has marked a customer (then ``gap`` more, so the batches of a
        burst are priced in one tick), or at most ``every`` seconds (the clock: expiries
        come due); the worker's burn loop calls :meth:`burn` after each wait. Nothing
        before the books are resumed (their batches stay marked)."""
        await self.ready.wait()
        try:
            await asyncio.wait_for(self.marked.wait(), timeout=every)
        except TimeoutError:
            return
        await asyncio.sleep(gap)

    # -- start

    def adopt_published(self, records: Mapping[bytes | None, bytes | None]) -> int:
        """The last entitlement of each customer on the compacted topic at start (what the
        products hold; ``records``: key -> value): each is taken as published and its
        customer decided again at the first tick, published only where it changed. Without
        this a restarted worker knew only the customers with credits: one cut off at a
        free tier's limit, whose limit was then raised in the plans file or whose month
        turned, kept the stale "no access" on the topic until its next usage, which a
        product that gates on the topic would never send. A record that is not an
        entitlement of ours (the topic is writable by the broker's clients) is skipped; at
        most :data:`WATCH_LIMIT` are taken. Returns how many."""
        label = period_label(now_ms())
        taken = 0
        for key, value in records.items():
            if taken >= WATCH_LIMIT:
                log.warning("entitlements: more than %d customers on the topic", WATCH_LIMIT)
                break
            try:
                customer = (key or b"").decode()
                doc = orjson.loads(value) if value else None
            except (UnicodeDecodeError, orjson.JSONDecodeError):
                continue
            if not customer or not isinstance(doc, dict) or doc.get("customer_id") != customer:
                continue
            self._published[customer] = {k: v for k, v in doc.items() if k not in _UNCOMPARED}
            self.dirty[customer].add(label)
            taken += 1
        if taken:
            self.marked.set()
        return taken

    async def start(self) -> None:
        """Rebuild every book from ClickHouse and the record; write what the ledger lacks;
        check each book against the ledger's sum. Batched: one read of the grants, of the
        ledger and of its sums, and two reads of the record per month, whatever the number
        of customers (a restart of a worker with many books is answered in seconds)."""
        async with self.lock:
            rows = await self.chio.call(store.grant_rows)
            by_customer: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for row in rows:
                by_customer[row["customer_id"]].append(row)
            now = now_ms()
            inputs = {c: inputs_of(r) for c, r in by_customer.items()}
            inputs = {c: (g, v) for c, (g, v) in inputs.items() if g}
            if inputs:
                await self._resume(inputs, now)
            self.ready.set()
        log.info("credits: %d book(s) resumed", len(self.books))

    async def _resume(self, inputs: Mapping[str, tuple[list[Grant], list[Void]]], now: int) -> None:
        """The books of every customer of ``inputs`` (grants, voids) resumed at ``now``."""
        this_period = period_label(now)
        by_period: dict[str, list[str]] = defaultdict(list)
        for customer, (grants, _) in inputs.items():
            for label in _periods_between(min(g.effective_ms for g in grants), now):
                by_period[label].append(customer)
        spends: dict[str, list[SpendChange]] = defaultdict(list)
        failed: dict[str, str] = {}
        for label in sorted(by_period):
            found = await self._priced(by_period[label], label)
            for customer in by_period[label]:
                if customer not in found:  # why: logged by _priced
                    failed[customer] = f"{label} not priced"
            for customer, spend in found.items():
                currency = inputs[customer][0][0].currency
                spends[customer] += self._changes(customer, currency, spend, None, now)
                if label == this_period:
                    self.usage[customer] = (label, spend.usage)
        ledgers: dict[str, list[LedgerEntry]] = defaultdict(list)
        for row in await self.chio.call(store.ledger_rows, list(inputs)):
            ledgers[row["customer_id"]].append(entry_of(row))
        books: dict[str, CreditBook] = {}
        for customer, (grants, voids) in inputs.items():
            if customer in failed:
                continue
            try:
                book, step = CreditBook.resume(
                    customer,
                    grants[0].currency,
                    ledger=ledgers[customer],
                    grants=grants,
                    voids=voids,
                    spends=spends[customer],
                    now_ms=now,
                )
            except CreditsError as exc:
                failed[customer] = str(exc)
                continue
            if step.entries:
                log.warning(
                    "credits of %s: %d ledger line(s) written on resume",
                    customer,
                    len(step.entries),
                )
            self._unwritten += step.entries
            books[customer] = book
        await self._flush()
        recorded = await self.chio.call(store.ledger_balances, list(books))
        for customer, book in books.items():
            held = recorded.get(customer, _ZERO)
            if held != book.balance:
                failed[customer] = (
                    f"ledger sum {canon(held)} differs from the recomputed balance "
                    f"{canon(book.balance)} after resuming"
                )
                continue
            self.books[customer] = book
        for customer, why in failed.items():
            log.error("credits of %s not loaded: %s", customer, why)
            self.usage.pop(customer, None)
        limits = await self._limits_now(list(self.books), now)
        for customer in self.books:
            await self._decide(customer, f"resume:{now}", limits.get(customer, {}))

    def _changes(
        self,
        customer: str,
        currency: str,
        found: PeriodSpend,
        book: CreditBook | None,
        now: int,
        period: str | None = None,
    ) -> list[SpendChange]:
        """The spend changes that set the book's levels to ``found`` (sources of the
        period the book holds and ``found`` lacks go to zero)."""
        held = {} if book is None else book.spends
        changes = []
        for source, (at, amount, cur) in found.levels.items():
            if cur != currency:
                log.warning(
                    "credits of %s: usage priced in %s cannot burn %s credits",
                    customer,
                    cur,
                    currency,
                )
                continue
            before = held.get(source)
            if before is not None and before.amount == amount:
                continue
            revision = now if before is None else max(before.revision + 1, now)
            changes.append(SpendChange(customer, source, at, amount, currency, revision))
        if period is not None:
            start, end = _period_bounds(period)
            for source, change in held.items():
                if (
                    start <= change.event_ms < end
                    and source not in found.levels
                    and change.amount != 0
                ):
                    revision = max(change.revision + 1, now)
                    changes.append(
                        SpendChange(customer, source, change.event_ms, _ZERO, currency, revision)
                    )
        return changes

    # -- the timer

    async def burn(self) -> None:
        """Re-price the dirty customer-periods, apply changed levels, move every clock."""
        if not self.ready.is_set():
            return
        dirty, self.dirty = self.dirty, defaultdict(set)
        self.marked.clear()
        try:
            await self._burn(dirty)
        except BaseException:  # what was not burned is burned next time
            for customer, periods in dirty.items():
                self.dirty[customer] |= periods
            raise

    async def _burn(self, dirty: Mapping[str, set[str]]) -> None:
        """One tick: the dirty customers of each period priced together (two reads per
        period, whatever their number), every changed level applied and every clock moved,
        the ledger lines of the whole tick written in one insert, then each changed
        customer's entitlement decided (its plan's limits read once for all)."""
        async with self.lock:
            await self._flush()  # what a failed tick left unwritten, before anything else
            now = now_ms()
            this_period = period_label(now)
            no_book = [c for c, p in dirty.items() if c not in self.books and this_period in p]
            if no_book:  # no credits: nothing to burn; a limited plan's usage counts
                await self._usage_limited(no_book, this_period, now)
            by_period: dict[str, list[str]] = defaultdict(list)
            for customer, periods in dirty.items():
                if customer in self.books:
                    for label in periods:
                        by_period[label].append(customer)
            changed: dict[str, str] = {}  # customer -> the cause of its decision
            for label in sorted(by_period):
                for customer, found in (await self._priced(by_period[label], label)).items():
                    book = self.books[customer]
                    if label == this_period:
                        self.usage[customer] = (label, found.usage)
                    for change in self._changes(customer, book.currency, found, book, now, label):
                        self._unwritten += book.apply(change, now).entries
                    changed[customer] = f"usage:{now}"
            for customer, book in self.books.items():
                entries = book.advance(now).entries
                if entries:
                    self._unwritten += entries
                    changed.setdefault(customer, f"clock:{now}")
            if self._period is not None and self._period != this_period:
                # a new month: usage and limits start again, for every customer followed
                for customer in (*self.books, *self.limits):
                    changed.setdefault(customer, f"period:{now}")
            self._period = this_period
            await self._flush()
            limits = await self._limits_now(list(changed), now)
            for customer, cause in changed.items():
                await self._decide(customer, cause, limits.get(customer, {}))
            took = now_ms() - now
            if took > SLOW_TICK_MS:  # balances lag usage by this much: worth a line
                log.warning("credit burn tick took %d ms (%d customer(s))", took, len(changed))

    async def _priced(self, customers: Sequence[str], label: str) -> dict[str, PeriodSpend]:
        """:func:`spend_levels_of` of ``customers`` in the period ``label``; a customer whose
        usage cannot be priced (two currencies, a plan no longer in the file) is logged and
        left out, the others are priced."""
        errors: dict[str, Exception] = {}
        found = await self.read(
            spend_levels_of, self.plans, customers, Period.month(label), errors=errors
        )
        for customer, exc in errors.items():
            log.warning("credits of %s: %s not priced: %s", customer, label, exc)
        return found

    async def _limits_now(
        self, customers: Sequence[str], now: int
    ) -> dict[str, dict[str, Decimal]]:
        """The limits of the plan in force of each of ``customers`` (one read; none without
        limits in the plans file)."""
        if not self.plans.has_limits or not customers:
            return {}
        return await self.read(plans_limits, self.plans, customers, now)

    async def _usage_limited(self, customers: Sequence[str], label: str, now: int) -> None:
        """Customers without credits whose usage of this period changed: the entitlement of
        each whose plan has limits, or had them (a plan change), is decided and published
        (one read of all their plans, then one usage read for all the limited ones)."""
        try:
            limits = await self.read(plans_limits, self.plans, customers, now)
        except (PricingError, KeyError, ValueError) as exc:
            log.warning("limits of %d customer(s) not read: %s", len(customers), exc)
            return
        # a plan without limits, and none before, and nobody reads it: nothing kept
        # (one published before, by this worker or before its restart: decided again, so a
        # customer whose plan lost its limits gets access back on the topic too)
        watched, published = self.watched, self._published
        tracked = [
            c
            for c in customers
            if limits.get(c) or c in self.limits or c in watched or c in published
        ]
        if not tracked:
            return
        for customer, found in (await self._priced(tracked, label)).items():
            mine = limits.get(customer, {})
            self.usage[customer] = (label, found.usage)
            if not mine and customer not in self.limits and customer not in published:
                # only read: kept, not published
                self.entitlements[customer] = decide(
                    self._status(customer, f"usage:{now}", {}), requires_balance=False
                )
                continue
            held = await self._decide(customer, f"usage:{now}", mine)
            if not mine:
                self.limits.pop(customer, None)
                if held:  # the topic holds its entitlement without limits: not followed for it
                    published.pop(customer, None)
                if customer not in watched:
                    self.entitlements.pop(customer, None)
                    self.usage.pop(customer, None)

    async def balance_after(
        self, customer: str, periods: Iterable[str], rewrite: WindowRewrite
    ) -> tuple[Decimal, Decimal] | None:
        """The customer's balance now and after its windows of ``periods`` were priced as
        ``rewrite`` makes them (on a copy of the book: nothing is written); None without
        credits."""
        await self.ready.wait()
        async with self.lock:
            book = self.books.get(customer)
            if book is None:
                return None
            trial = copy.deepcopy(book)
            now = now_ms()
            for label in sorted(periods):
                found = await self.read(
                    spend_levels, self.plans, customer, Period.month(label), rewrite
                )
                for change in self._changes(customer, trial.currency, found, trial, now, label):
                    trial.apply(change, now)
            return book.balance, trial.balance

    # -- grants and voids

    async def grant(self, grant: Grant, changed_by: str) -> dict[str, Any]:
        """Record ``grant`` durably, apply it, write its ledger lines."""
        await self.ready.wait()
        async with self.lock:
            book = self.books.get(grant.customer_id)
            if book is not None:
                if book.currency != grant.currency:
                    raise CreditsError(
                        f"{grant.customer_id}'s credits are in {book.currency}, "
                        f"not {grant.currency}"
                    )
                held = book.grants.get(grant.grant_id)
                if held is not None and held != grant:
                    raise CreditsError(f"grant {grant.grant_id!r} exists with other terms")
            await self.chio.call(store.append_grants, [grant_row(grant, changed_by)])
            now = now_ms()
            if book is None:
                book = await self._new_book(grant, now)
            else:
                earliest = min(g.effective_ms for g in book.grants.values())
                await self._append(book.add_grant(grant, now))
                if grant.effective_ms < earliest:  # the months before: priced next tick,
                    # as a restart (which starts at the earliest grant's month) would
                    self.dirty[grant.customer_id].update(
                        _periods_between(grant.effective_ms, min(earliest, now))
                    )
            await self._decide(grant.customer_id, f"grant:{grant.grant_id}")
            return {"grant": grant.to_json(), "balance": canon(book.balance)}

    async def _new_book(self, grant: Grant, now: int) -> CreditBook:
        """The customer's first grant: a book with every spend since it takes effect."""
        customer = grant.customer_id
        spends: list[SpendChange] = []
        for label in _periods_between(min(grant.effective_ms, now), now):
            found = await self.read(spend_levels, self.plans, customer, Period.month(label))
            spends += self._changes(customer, grant.currency, found, None, now)
            if label == period_label(now):
                self.usage[customer] = (label, found.usage)
        ledger = [entry_of(r) for r in await self.chio.call(store.ledger_rows, [customer])]
        book, step = CreditBook.resume(
            customer, grant.currency, ledger=ledger, grants=[grant], spends=spends, now_ms=now
        )
        await self._append(step)
        self.books[customer] = book
        return book

    async def void(self, customer: str, grant_id: str, changed_by: str, reason: str) -> Any:
        await self.ready.wait()
        async with self.lock:
            book = self.books.get(customer)
            if book is None or grant_id not in book.grants:
                raise KeyError(grant_id)
            now = now_ms()
            void = Void(grant_id, customer, now, reason)
            await self.chio.call(store.append_grants, [void_row(void, book.currency, changed_by)])
            await self._append(book.void(void, now))
            await self._decide(customer, f"void:{grant_id}")
            return {"void": void.to_json(), "balance": canon(book.balance)}

    async def refresh(self, customer: str, cause: str) -> None:
        """Decide the customer's entitlement and alerts again (thresholds changed)."""
        async with self.lock:
            if customer in self.books or customer in self.limits:
                await self._decide(customer, cause)

    # -- reads (worker state)

    def holds(self, customer: str, grant_id: str) -> bool:
        """Whether the customer's book has the grant (a purchase's grant is made once)."""
        book = self.books.get(customer)
        return book is not None and grant_id in book.grants

    def currency_of(self, customer: str) -> str:
        """The customer's credit currency: its book's, else the default plan's."""
        book = self.books.get(customer)
        return book.currency if book is not None else self.plans.default.money.code

    def balance_document(self, customer: str) -> dict[str, Any] | None:
        book = self.books.get(customer)
        if book is None:
            return None
        voids = book.voids
        grants = []
        for grant in sorted(book.grants.values(), key=lambda g: g.effective_ms):
            doc = grant.to_json()
            doc["remaining"] = canon(book.remaining(grant.grant_id))
            void = voids.get(grant.grant_id)
            doc["voided_ms"] = None if void is None else void.voided_ms
            grants.append(doc)
        return {
            "customer_id": customer,
            "currency": book.currency,
            "balance": canon(book.balance),
            "uncovered": canon(book.uncovered),
            "at_ms": book.now_ms,
            "grants": grants,
        }

    async def entitlement_document(self, customer: str) -> dict[str, Any]:
        """From the worker's state: a customer with credits, on a plan with usage limits or
        read before. A customer read for the first time (or first this month) is read from
        the record (this month's usage and its plan's limits, two reads) and followed from
        then on, up to :data:`WATCH_LIMIT` customers, so its next reads come from memory."""
        found = self.entitlements.get(customer)
        now = now_ms()
        label = period_label(now)
        if found is not None and (customer in self.books or found.period == label):
            return found.to_json()
        spends = await self.read(
            spend_levels_of, self.plans, [customer], Period.month(label), limits_at_ms=now
        )
        spend = spends[customer]
        status = self._status(customer, f"read:{now}", spend.limits, (label, spend.usage))
        entitlement = decide(status, requires_balance=False)
        if customer not in self.entitlements and len(self.watched) < WATCH_LIMIT:
            # followed from now: its batches mark it, and the next tick reads it again
            # (a batch that landed during this read is not missed)
            self.watched.add(customer)
            self.entitlements[customer] = entitlement
            self.usage.setdefault(customer, (label, spend.usage))
            self.dirty[customer].add(label)
            self.marked.set()
        return entitlement.to_json()

    # -- internals

    async def _append(self, step: Step) -> None:
        self._unwritten += step.entries
        await self._flush()

    async def _flush(self) -> None:
        """Write the ledger lines the books made and the ledger lacks, in one insert. On a
        failure they stay and are written first by the next write (an entry id repeated
        collapses in ``credit_ledger``), so a book never runs ahead of its ledger for
        longer than a failed write; nothing is decided or published before they are in."""
        if self._unwritten:
            entries = list(self._unwritten)
            await self.chio.call(store.append_entries, [entry_row(e) for e in entries])
            del self._unwritten[: len(entries)]

    def _status(
        self,
        customer: str,
        cause: str,
        limits: Mapping[str, Decimal],
        usage: tuple[str, dict[str, Decimal]] | None = None,
    ) -> CustomerStatus:
        """What the worker holds of ``customer`` now: balance, this month's usage (or
        ``usage``: period, use per meter, just read), limits."""
        book = self.books.get(customer)
        now = now_ms()
        label, use = usage or self.usage.get(customer, (period_label(now), {}))
        if label != period_label(now):
            label, use = period_label(now), {}
        return CustomerStatus(
            customer_id=customer,
            currency=book.currency if book is not None else self.plans.default.money.code,
            at_ms=now,
            cause=cause,
            balance=book.balance if book is not None else _ZERO,
            period=label,
            usage=use,
            limits=limits,
        )

    async def _decide(
        self, customer: str, cause: str, limits: Mapping[str, Decimal] | None = None
    ) -> bool:
        """Decide the customer's entitlement (with ``limits``, else its plan's limits now,
        read when a plan sets any), run its alerts and listeners, publish a change. True
        when the topic holds the decision (published now or before)."""
        book = self.books.get(customer)
        now = now_ms()
        if limits is None:
            limits = {}
            if self.plans.has_limits:
                limits = await self.read(plan_limits, self.plans, customer, now)
        if limits:
            self.limits[customer] = dict(limits)
        status = self._status(customer, cause, limits)
        entitlement = decide(status, requires_balance=book is not None)
        self.entitlements[customer] = entitlement
        if self.alerts is not None:
            await self.alerts.evaluate(status, () if book is None else book.live_grants())
        if book is not None:
            for listener in self.status_listeners:
                await listener(status)
        doc = entitlement.to_json()
        compared = {k: v for k, v in doc.items() if k not in _UNCOMPARED}
        if self.topic is None:
            return False
        if self._published.get(customer) == compared:
            return True
        try:
            await self.topic.send(key=customer.encode(), value=orjson.dumps(doc))
        except Exception as exc:  # the state answers; the topic is a copy, sent next change
            log.warning("entitlement of %s not published: %s", customer, exc)
            return False
        self._published[customer] = compared
        return True


def new_grant(
    customer: str,
    amount: Decimal,
    currency: str,
    *,
    effective_ms: int | None = None,
    expires_ms: int | None = None,
    priority: int = DEFAULT_PRIORITY,
    grant_id: str | None = None,
    origin: str = "manual",
) -> Grant:
    """A grant from a request (a fresh ``gr_`` id unless one is given: a retry's idempotency)."""
    return Grant(
        grant_id=grant_id or f"gr_{uuid.uuid4().hex}",
        customer_id=customer,
        amount=amount,
        currency=currency,
        effective_ms=now_ms() if effective_ms is None else effective_ms,
        expires_ms=expires_ms,
        priority=priority,
        origin=origin,
    )


def ledger_document(rows: Sequence[Mapping[str, Any]], customer: str) -> dict[str, Any]:
    """The customer's ledger rows (from ClickHouse) and their sums by kind."""
    entries = [entry_of(r) for r in rows]
    return {
        "customer_id": customer,
        "entries": [e.to_json() for e in entries],
        "totals": totals(entries).to_json(),
        "balance_by_day": balance_by_day(entries),
    }


def balance_by_day(entries: Sequence[LedgerEntry]) -> list[dict[str, str]]:
    """The balance at the end of each UTC day that has ledger lines (by their time ``at_ms``:
    a burn is dated at its window, a grant at its effective time), exact: the running sum of
    the ledger, as the balance always is."""
    by_day: dict[int, Decimal] = {}
    for entry in entries:
        day = day_of(entry.at_ms)
        by_day[day] = by_day.get(day, Decimal(0)) + Decimal(entry.amount)
    out, running = [], Decimal(0)
    for day in sorted(by_day):
        running += by_day[day]
        label = dt.datetime.fromtimestamp(day / 1000, dt.UTC).date().isoformat()
        out.append({"day": label, "balance": str(running)})
    return out
