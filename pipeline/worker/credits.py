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
  set insert per touched window); a timer (``METERSTREAM_CREDITS_BURN_SECONDS``, default
  1 s) re-prices each dirty customer-period from ``meter_windows`` and applies the
  levels that changed, then moves every book's clock (expiries come due). The hot path
  pays nothing else.
- **Restart**: at start every book is rebuilt from ``credit_grants`` and the spend levels
  recomputed from the record, then resumed against the ledger rows
  (:meth:`CreditBook.resume`): whatever the killed run had not written is written with the
  ids it would have used, and the book's balance is checked against ClickHouse's
  ``sum(amount)`` of the ledger before the routes answer (503 until then).
- **Entitlements** are decided after every change
  (:func:`~meterstream.credits.entitlements.decide`) with the usage limits of the plan in
  force now (:func:`plan_limits`), kept in memory (the route answers from there) and
  written to the compacted topic ``entitlements`` whenever they differ from the last one
  written. When a plan of the file sets limits, the batch marks every customer, not only
  those with credits; the timer reads the plans of the customers without credits (one
  read per tick for all of them) and keeps and publishes the entitlement of each only
  while its plan has limits (a free tier). Without limits in the file, customers without
  credits cost what they did.

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
from meterstream.sinks.clickhouse.queries import latest_windows
from meterstream.topics import ENTITLEMENTS
from meterstream.worker.alerts import AlertDesk
from meterstream.worker.invoices import merge_windows, segments_for
from meterstream.worker.raw_topics import raw_topic

log = logging.getLogger("meterstream.credits")

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


WindowRewrite = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
"""Stored window rows (latest_windows) in, the rows to price out (a correction's dry run)."""


def spend_levels(
    ch: ClickHouse,
    plans: PlansConfig,
    customer_id: str,
    period: Period,
    rewrite: WindowRewrite | None = None,
) -> PeriodSpend:
    """The spend level of every priced window of ``customer_id`` in ``period`` (the
    stored windows, or what ``rewrite`` makes of them).

    Per plan segment and priced meter, the windows (all groups merged) in start order;
    a window's level is ``charge(value through it) - charge(value before it)``
    (:func:`~meterstream.pricing.prices.daily_amounts` over windows), so the levels of a
    segment sum exactly to its usage line before rounding. A window whose charge fell
    (a ``latest`` or ``max`` meter cannot, a decreasing total could) carries the fall
    into the next windows' levels, which never go below zero.
    """
    out = PeriodSpend()
    schedule = pricing_store.current_schedules(ch, [customer_id]).get(customer_id)
    p_start, p_end = _ms(period.start), _ms(period.end)
    all_windows = latest_windows(ch, customer_id=customer_id, start_ms=p_start, end_ms=p_end)
    if rewrite is not None:
        all_windows = rewrite(all_windows)
    by_meter_all: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for window in all_windows:
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
            aggregation = str(found[0]["aggregation"])
            order = sorted(starts)
            so_far: list[dict[str, Any]] = []
            to_date = []
            for at in order:
                so_far += starts[at]
                to_date.append(merge_windows(aggregation, so_far))
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
    out: dict[str, dict[str, Decimal]] = {c: {} for c in customers}
    if not plans.has_limits or not customers:
        return out
    schedules = pricing_store.current_schedules(ch, list(customers))
    period = Period.month(period_label(at_ms))
    for customer in customers:
        for segment in segments_for(plans, period, schedules.get(customer)):
            if _ms(segment.start) <= at_ms < _ms(segment.end):
                out[customer] = dict(plans.by_name(segment.plan).limits)
    return out


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
        for keys in (states.keys(), reread):
            for key in keys:
                if everyone or key.customer_id in books:
                    self.dirty[key.customer_id].add(period_label(key.window_start_ms))

    # -- start

    async def start(self) -> None:
        """Rebuild every book from ClickHouse and the record; write what the ledger lacks."""
        async with self.lock:
            rows = await self.chio.call(store.grant_rows)
            by_customer: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for row in rows:
                by_customer[row["customer_id"]].append(row)
            for customer, grant_rows in by_customer.items():
                try:
                    await self._resume(customer, grant_rows)
                except CreditsError as exc:
                    log.error("credits of %s not loaded: %s", customer, exc)
            self.ready.set()
        log.info("credits: %d book(s) resumed", len(self.books))

    async def _resume(self, customer: str, grant_rows: Sequence[Mapping[str, Any]]) -> None:
        grants, voids = inputs_of(grant_rows)
        if not grants:
            return
        currency = grants[0].currency
        now = now_ms()
        first = min(g.effective_ms for g in grants)
        spends: list[SpendChange] = []
        use: tuple[str, dict[str, Decimal]] = (period_label(now), {})
        for label in _periods_between(first, now):
            found = await self.read(spend_levels, self.plans, customer, Period.month(label))
            spends += self._changes(customer, currency, found, None, now)
            if label == period_label(now):
                use = (label, found.usage)
        ledger = [entry_of(r) for r in await self.chio.call(store.ledger_rows, [customer])]
        book, step = CreditBook.resume(
            customer,
            currency,
            ledger=ledger,
            grants=grants,
            voids=voids,
            spends=spends,
            now_ms=now,
        )
        await self._append(step)
        recorded = await self.chio.call(store.ledger_balance, customer)
        if recorded != book.balance:
            raise CreditsError(
                f"ledger sum {canon(recorded)} differs from the recomputed balance "
                f"{canon(book.balance)} after resuming"
            )
        if step.entries:
            log.warning(
                "credits of %s: %d ledger line(s) written on resume", customer, len(step.entries)
            )
        self.books[customer] = book
        self.usage[customer] = use
        await self._decide(customer, f"resume:{now}")

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
        try:
            await self._burn(dirty)
        except BaseException:  # what was not burned is burned next time
            for customer, periods in dirty.items():
                self.dirty[customer] |= periods
            raise

    async def _burn(self, dirty: Mapping[str, set[str]]) -> None:
        async with self.lock:
            now = now_ms()
            this_period = period_label(now)
            no_book = [c for c, p in dirty.items() if c not in self.books and this_period in p]
            if no_book:  # no credits: nothing to burn; a limited plan's usage counts
                await self._usage_limited(no_book, this_period, now)
            for customer, periods in dirty.items():
                book = self.books.get(customer)
                if book is None:
                    continue
                for label in sorted(periods):
                    try:
                        found = await self.read(
                            spend_levels, self.plans, customer, Period.month(label)
                        )
                    except (PricingError, KeyError, ValueError) as exc:  # e.g. two currencies
                        log.warning("credits of %s: %s not priced: %s", customer, label, exc)
                        continue
                    if label == this_period:
                        self.usage[customer] = (label, found.usage)
                    for change in self._changes(customer, book.currency, found, book, now, label):
                        await self._append(book.apply(change, now))
                await self._decide(customer, f"usage:{now}")
            for customer, book in self.books.items():
                step = book.advance(now)
                if step.entries:
                    await self._append(step)
                    await self._decide(customer, f"clock:{now}")

    async def _usage_limited(self, customers: Sequence[str], label: str, now: int) -> None:
        """Customers without credits whose usage of this period changed: the entitlement of
        each whose plan has limits, or had them (a plan change), is decided and published
        (one read of all their plans, then one usage read per limited customer)."""
        try:
            limits = await self.read(plans_limits, self.plans, customers, now)
        except (PricingError, KeyError, ValueError) as exc:
            log.warning("limits of %d customer(s) not read: %s", len(customers), exc)
            return
        for customer in customers:
            mine = limits.get(customer, {})
            if not mine and customer not in self.limits:
                continue  # a plan without limits: nothing read, nothing kept
            try:
                found = await self.read(spend_levels, self.plans, customer, Period.month(label))
            except (PricingError, KeyError, ValueError) as exc:
                log.warning("usage of %s: %s not read: %s", customer, label, exc)
                continue
            self.usage[customer] = (label, found.usage)
            await self._decide(customer, f"usage:{now}", mine)
            if not mine:
                self.limits.pop(customer, None)
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
        """A customer with credits, or on a plan with usage limits that has used it this
        period: from the worker's state. Otherwise: read from the record (this month's usage
        and the limits of its plan now)."""
        found = self.entitlements.get(customer)
        now = now_ms()
        label = period_label(now)
        if found is not None and (customer in self.books or found.period == label):
            return found.to_json()
        spend = await self.read(spend_levels, self.plans, customer, Period.month(label))
        limits = await self.read(plan_limits, self.plans, customer, now)
        status = CustomerStatus(
            customer_id=customer,
            currency=self.plans.default.money.code,
            at_ms=now,
            cause=f"read:{now}",
            balance=_ZERO,
            period=label,
            usage=spend.usage,
            limits=limits,
        )
        return decide(status, requires_balance=False).to_json()

    # -- internals

    async def _append(self, step: Step) -> None:
        if step.entries:
            await self.chio.call(store.append_entries, [entry_row(e) for e in step.entries])

    async def _decide(
        self, customer: str, cause: str, limits: Mapping[str, Decimal] | None = None
    ) -> None:
        """Decide the customer's entitlement (with ``limits``, else its plan's limits now,
        read when a plan sets any), run its alerts and listeners, publish a change."""
        book = self.books.get(customer)
        now = now_ms()
        label, use = self.usage.get(customer, (period_label(now), {}))
        if label != period_label(now):
            label, use = period_label(now), {}
        if limits is None:
            limits = {}
            if self.plans.has_limits:
                limits = await self.read(plan_limits, self.plans, customer, now)
        if limits:
            self.limits[customer] = dict(limits)
        status = CustomerStatus(
            customer_id=customer,
            currency=book.currency if book is not None else self.plans.default.money.code,
            at_ms=now,
            cause=cause,
            balance=book.balance if book is not None else _ZERO,
            period=label,
            usage=use,
            limits=limits,
        )
        entitlement = decide(status, requires_balance=book is not None)
        self.entitlements[customer] = entitlement
        if self.alerts is not None:
            await self.alerts.evaluate(status, () if book is None else book.live_grants())
        if book is not None:
            for listener in self.status_listeners:
                await listener(status)
        doc = entitlement.to_json()
        compared = {k: v for k, v in doc.items() if k not in ("at_ms", "cause")}
        if self._published.get(customer) == compared or self.topic is None:
            return
        try:
            await self.topic.send(key=customer.encode(), value=orjson.dumps(doc))
        except Exception as exc:  # the state answers; the topic is a copy, sent next change
            log.warning("entitlement of %s not published: %s", customer, exc)
            return
        self._published[customer] = compared


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
