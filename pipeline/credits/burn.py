"""The burn engine: grants and spends in, append-only ledger entries out.

The rule (what the ledger holds, whatever the arrival order)
------------------------------------------------------------
The ledger a customer *should* have is a pure function of the inputs and the clock:
``canonical(grants, voids, spends, now)``, computed by walking every input in **event-time
order**. At each instant: grants start (``grant``/``recharge`` entry; a new grant first pays
any outstanding uncovered spend, oldest first: ``settle`` + reversing ``uncovered``), then
grants end (``expiry``/``void`` of what is left), then spends burn, each from the grants
usable at its event time in burn order (priority, soonest expiry, oldest), and what no
grant covers is ``uncovered``. Only instants up to ``now`` are walked: an expiry is written
once its time has come, and a spend dated in the future waits until then.

The live engine (:class:`CreditBook`) keeps what it has written and, after every input,
writes only the *difference* between the new canonical ledger and the entries already
written, as correcting entries. So:

- a **late** spend (event time before spends already burned) burns the grants usable at its
  event time, exactly as if it had arrived on time; burns after it that no longer fit move
  to the next grant (a correcting entry on each), and an expiry after it shrinks by what
  it took. The balance now falls by the spend's cost, minus what it took from credits that
  would have expired unused. A late input never needs a rule of its own;
- a **duplicate** or a replay changes no input, so the canonical ledger is unchanged and
  nothing is written;
- after a **restart**, a book resumed from the ledger rows it wrote (:meth:`CreditBook.resume`)
  writes the same entries, with the same ids, as the run that was killed would have.

Why: the result equals an oracle that sorts the inputs by event time, for any arrival
order, duplicates and restarts; every number in the ledger can be explained by one walk in
time order. Arrival-order burning would make the balance depend on Kafka timing and burn a
late spend from credits bought after it happened.

Uncovered spend
---------------
Spend no usable grant covers is recorded as ``uncovered`` (a negative balance, never a
silent loss). The next grant to start pays it first (``settle`` entries at that grant's
effective time), so a customer who overran their balance by $3 and buys $20 has $17, and an
auto-recharge to a target (``target - balance``) restores exactly the target. Uncovered
spend no grant ever pays is still in the ledger for the invoice to bill. A grant backdated
to before the spend covers it directly instead.

Cost
----
Inputs are kept in time order with a checkpoint of the walk every ``checkpoint_every``
items; an input at event time ``t`` re-walks only from the checkpoint before ``t``. A change
to the newest window costs a few steps; a late spend costs the walk from its time on.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any, NamedTuple

from meterstream.credits.grants import Grant, Void, burn_order, grant_end
from meterstream.credits.ledger import (
    EntryKind,
    LedgerEntry,
    LedgerKey,
    grant_kind,
    key_sums,
    make_entry,
)
from meterstream.credits.money import EXACT, canon, currency_problem
from meterstream.credits.spend import SpendChange
from meterstream.credits.values import id_problem, ms_problem, raise_problems
from meterstream.errors import CreditsError

_START, _END, _SPEND = 0, 1, 2
_ZERO = Decimal(0)

Contribution = tuple[tuple[LedgerKey, Decimal], ...]


class _Item(NamedTuple):
    order: tuple[Any, ...]  # (at_ms, phase, tiebreak): a total order of the walk
    phase: int
    ref: str  # grant_id (start, end) or source (spend)

    @property
    def at_ms(self) -> int:
        return int(self.order[0])


class _Snapshot(NamedTuple):
    remaining: dict[str, Decimal]
    debt_len: int
    debt_head: int
    debt_used: Decimal


class _Walk:
    """The event-time walk, resumable from checkpoints (see the module docstring)."""

    def __init__(self, checkpoint_every: int) -> None:
        self.every = checkpoint_every
        self.items: list[_Item] = []
        self.done = 0  # items[:done] have been walked
        self.contribs: list[Contribution] = []
        self.checkpoints: dict[int, _Snapshot] = {}
        # the state after items[:done]
        self.remaining: dict[str, Decimal] = {}  # grants started and not ended
        self.debt: list[tuple[str, Decimal]] = []  # uncovered (source, amount), oldest first
        self.debt_head = 0  # debt[:head] is paid
        self.debt_used = _ZERO  # paid of debt[head]
        self.grants: dict[str, Grant] = {}
        self.ends: dict[str, tuple[int | None, str]] = {}
        self.spends: dict[str, SpendChange] = {}

    # -- the inputs, as items in time order

    def insert(self, item: _Item) -> None:
        insort(self.items, item)

    def remove(self, item: _Item) -> None:
        index = bisect_left(self.items, item)
        assert index < len(self.items) and self.items[index] == item
        del self.items[index]

    def position(self, order: tuple[Any, ...]) -> int:
        return bisect_left(self.items, (order,))

    # -- walking

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(dict(self.remaining), len(self.debt), self.debt_head, self.debt_used)

    def rewind(self, index: int) -> list[Contribution]:
        """Go back to a checkpoint at or before ``index``; returns the undone contributions."""
        if index >= self.done:
            return []
        start = index - index % self.every
        snap = self.checkpoints[start]
        self.remaining = dict(snap.remaining)
        del self.debt[snap.debt_len :]
        self.debt_head, self.debt_used = snap.debt_head, snap.debt_used
        for key in [k for k in self.checkpoints if k > start]:
            del self.checkpoints[key]
        undone = self.contribs[start:]
        del self.contribs[start:]
        self.done = start
        return undone

    def run(self, now_ms: int) -> list[Contribution]:
        """Walk every item up to ``now_ms``; returns the new contributions."""
        new: list[Contribution] = []
        with localcontext(EXACT):
            while self.done < len(self.items) and self.items[self.done].at_ms <= now_ms:
                if self.done % self.every == 0:
                    self.checkpoints[self.done] = self._snapshot()
                item = self.items[self.done]
                if item.phase == _START:
                    out = self._start(self.grants[item.ref])
                elif item.phase == _END:
                    out = self._end(item.ref)
                else:
                    out = self._spend(self.spends[item.ref])
                self.contribs.append(out)
                new.append(out)
                self.done += 1
        return new

    def _start(self, grant: Grant) -> Contribution:
        at = grant.effective_ms
        out = [(LedgerKey.of(at, grant_kind(grant.origin), grant.grant_id), grant.amount)]
        left = grant.amount
        end, _ = self.ends[grant.grant_id]
        if not _never_usable(grant, end):  # a grant voided before it starts pays nothing
            while self.debt_head < len(self.debt) and left > 0:
                source, owed = self.debt[self.debt_head]
                paid = min(owed - self.debt_used, left)
                out.append((LedgerKey.of(at, EntryKind.SETTLE, grant.grant_id, source), -paid))
                out.append((LedgerKey.of(at, EntryKind.UNCOVERED, "", source), paid))
                left -= paid
                self.debt_used += paid
                if self.debt_used == owed:
                    self.debt_head += 1
                    self.debt_used = _ZERO
        self.remaining[grant.grant_id] = left
        return tuple(out)

    def _end(self, grant_id: str) -> Contribution:
        end, why = self.ends[grant_id]
        assert end is not None
        left = self.remaining.pop(grant_id)
        if left == 0:
            return ()
        kind = EntryKind.VOID if why == "void" else EntryKind.EXPIRY
        return ((LedgerKey.of(end, kind, grant_id), -left),)

    def _spend(self, spend: SpendChange) -> Contribution:
        at, source, left = spend.event_ms, spend.source, spend.amount
        out = []
        for grant_id in sorted(self.remaining, key=lambda g: burn_order(self.grants[g])):
            if left == 0:
                break
            available = self.remaining[grant_id]
            if available <= 0:
                continue
            take = min(available, left)
            self.remaining[grant_id] = available - take
            out.append((LedgerKey.of(at, EntryKind.BURN, grant_id, source), -take))
            left -= take
        if left > 0:
            out.append((LedgerKey.of(at, EntryKind.UNCOVERED, "", source), -left))
            self.debt.append((source, left))
        return tuple(out)


def _valid_clock(now_ms: int) -> None:
    """Refuse a bad clock before any input is touched."""
    raise_problems("clock", [ms_problem(now_ms, "now_ms")])


def _never_usable(grant: Grant, end_ms: int | None) -> bool:
    return end_ms is not None and end_ms <= grant.effective_ms


def _start_item(grant: Grant) -> _Item:
    return _Item((grant.effective_ms, _START, burn_order(grant)), _START, grant.grant_id)


def _end_item(grant_id: str, end_ms: int) -> _Item:
    return _Item((end_ms, _END, grant_id), _END, grant_id)


def _spend_item(spend: SpendChange) -> _Item:
    return _Item((spend.event_ms, _SPEND, spend.source), _SPEND, spend.source)


@dataclass(frozen=True)
class Step:
    """What one input did: the entries to append, in order, and the balance after them.

    ``outcome``: ``applied``; ``duplicate`` (nothing new); ``stale`` (an older revision of a
    spend than the book holds: ignored); ``conflict`` (a grant id or spend revision already
    held with different content: ignored, the first one stands); ``advanced`` (the clock
    moved); ``synced`` (a resumed book wrote what its ledger lacked). ``drift`` is set when a
    spend's ``previous`` was not the level the book held: held level minus ``previous``.
    Whatever the outcome, the clock moved to ``now_ms`` first, so ``entries`` may hold
    expiries (and spends dated in the future) that came due.
    """

    entries: tuple[LedgerEntry, ...]
    outcome: str
    balance: Decimal
    drift: Decimal | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": [e.to_json() for e in self.entries],
            "outcome": self.outcome,
            "balance": canon(self.balance),
            "drift": None if self.drift is None else canon(self.drift),
        }


class CreditBook:
    """One customer's credits: the inputs, the entries written, and the next entries to write.

    Every method that takes ``now_ms`` first moves the book's clock to
    ``max(now_ms, clock)`` (time never goes back) and returns a :class:`Step`. The caller
    appends ``step.entries`` to the ledger (ClickHouse, one row per ``entry_id``) *before* it
    records the book's new state or commits its input offsets; a crash in between makes
    the replay recompute the same entries with the same ids.
    """

    def __init__(
        self, customer_id: str, currency: str, *, now_ms: int = 0, checkpoint_every: int = 32
    ) -> None:
        raise_problems(
            "credit book",
            [
                id_problem(customer_id, "customer_id"),
                currency_problem(currency),
                ms_problem(now_ms, "now_ms"),
                None if checkpoint_every >= 1 else "checkpoint_every must be at least 1",
            ],
        )
        self.customer_id = customer_id
        self.currency = currency
        self._now = now_ms
        self._walk = _Walk(checkpoint_every)
        self._voids: dict[str, Void] = {}
        self._canonical: dict[LedgerKey, Decimal] = {}
        self._written: dict[LedgerKey, tuple[Decimal, int]] = {}
        self._balance = _ZERO  # the sum of the entries written
        self._undone: list[Contribution] = []  # walked contributions undone by a rewind

    # -- reading

    @property
    def now_ms(self) -> int:
        return self._now

    @property
    def grants(self) -> Mapping[str, Grant]:
        return dict(self._walk.grants)

    @property
    def voids(self) -> Mapping[str, Void]:
        return dict(self._voids)

    @property
    def spends(self) -> Mapping[str, SpendChange]:
        """The latest accepted change of each source."""
        return dict(self._walk.spends)

    @property
    def balance(self) -> Decimal:
        """The sum of the entries written (equal to the canonical ledger's sum)."""
        return self._balance

    @property
    def uncovered(self) -> Decimal:
        """Spend no grant has covered yet (owed): minus the sum of ``uncovered`` entries."""
        with localcontext(EXACT):
            return -sum(
                (t for k, (t, _) in self._written.items() if k.kind == EntryKind.UNCOVERED),
                _ZERO,
            )

    def remaining(self, grant_id: str) -> Decimal:
        """What is left of ``grant_id`` (the sum of its entries)."""
        with localcontext(EXACT):
            return sum((t for k, (t, _) in self._written.items() if k.grant_id == grant_id), _ZERO)

    def live_grants(self) -> list[tuple[Grant, Decimal]]:
        """Grants usable now with what is left of each, in burn order."""
        walk = self._walk
        live = [(walk.grants[g], left) for g, left in walk.remaining.items()]
        return sorted(live, key=lambda pair: burn_order(pair[0]))

    def canonical(self) -> dict[LedgerKey, Decimal]:
        """The ledger the inputs call for, as a sum per key (zero keys left out)."""
        return {k: v for k, v in self._canonical.items() if v != 0}

    def written(self) -> dict[LedgerKey, tuple[Decimal, int]]:
        """Per key: the sum of the entries written and how many there are."""
        return dict(self._written)

    # -- inputs

    def add_grant(self, grant: Grant, now_ms: int) -> Step:
        """Add a grant (idempotent by ``grant_id``)."""
        _valid_clock(now_ms)
        self._check(grant.customer_id, grant.currency, f"grant {grant.grant_id!r}")
        held = self._walk.grants.get(grant.grant_id)
        if held is not None:
            return self._step("duplicate" if held == grant else "conflict", now_ms)
        self._place_grant(grant)
        return self._step("applied", now_ms, cause=f"grant:{grant.grant_id}")

    def void(self, void: Void, now_ms: int) -> Step:
        """Void a grant from ``voided_ms`` on (the earliest void wins; held until the grant)."""
        _valid_clock(now_ms)
        self._check(void.customer_id, None, f"void of {void.grant_id!r}")
        held = self._voids.get(void.grant_id)
        if held is not None and held.voided_ms <= void.voided_ms:
            return self._step("duplicate", now_ms)
        self._voids[void.grant_id] = void
        grant = self._walk.grants.get(void.grant_id)
        if grant is not None:
            self._place_end(grant)
        return self._step("applied", now_ms, cause=f"void:{void.grant_id}")

    def apply(self, change: SpendChange, now_ms: int) -> Step:
        """Set a source's cost (idempotent by ``(source, revision)``; see ``spend.py``)."""
        _valid_clock(now_ms)
        self._check(change.customer_id, change.currency, f"spend {change.change_id!r}")
        walk = self._walk
        held = walk.spends.get(change.source)
        if held is not None and change.revision < held.revision:
            return self._step("stale", now_ms)
        if held is not None and change.revision == held.revision:
            return self._step("duplicate" if held.same_level(change) else "conflict", now_ms)
        level = _ZERO if held is None else held.amount
        drift = None
        if change.previous is not None and change.previous != level:
            drift = EXACT.subtract(level, change.previous)
        self._set_spend(change)
        step = self._step("applied", now_ms, cause=change.change_id)
        return Step(step.entries, step.outcome, step.balance, drift)

    def advance(self, now_ms: int) -> Step:
        """Move the clock: write the expiries (and anything dated) up to ``now_ms``."""
        return self._step("advanced", now_ms)

    # -- resuming

    @classmethod
    def resume(
        cls,
        customer_id: str,
        currency: str,
        *,
        ledger: Iterable[LedgerEntry] = (),
        grants: Iterable[Grant] = (),
        voids: Iterable[Void] = (),
        spends: Iterable[SpendChange] = (),
        now_ms: int = 0,
        checkpoint_every: int = 32,
    ) -> tuple[CreditBook, Step]:
        """A book rebuilt from its ledger rows and inputs, and the entries the ledger lacks.

        ``ledger`` is every entry written for the customer (repeats of an ``entry_id``
        count once); ``spends`` any changes per source (the highest revision wins). The
        returned step (outcome ``synced``) holds what the canonical ledger needs beyond the
        rows given, with the ids the killed run would have used.
        """
        book = cls(customer_id, currency, now_ms=now_ms, checkpoint_every=checkpoint_every)
        rows = list(ledger)
        for row in rows:
            book._check(row.customer_id, row.currency, f"ledger entry {row.entry_id!r}")
        book._load(grants, voids, spends)
        book._set_written(key_sums(rows))
        return book, book.sync(now_ms)

    def sync(self, now_ms: int) -> Step:
        """Write whatever the canonical ledger holds beyond the entries written (any key)."""
        self._tick(now_ms)
        undone, self._undone = self._undone, []
        self._absorb(self._walk.run(self._now), undone)
        keys = set(self._canonical) | set(self._written)
        return Step(self._emit(keys, "sync"), "synced", self.balance)

    def to_json(self) -> dict[str, Any]:
        """The book's state (inputs, clock, what was written per key) as JSON."""
        return {
            "customer_id": self.customer_id,
            "currency": self.currency,
            "now_ms": self._now,
            "grants": [g.to_json() for g in self._walk.grants.values()],
            "voids": [v.to_json() for v in self._voids.values()],
            "spends": [s.to_json() for s in self._walk.spends.values()],
            "written": [
                {
                    "at_ms": k.at_ms,
                    "kind": k.kind.value,
                    "grant_id": k.grant_id,
                    "source": k.source,
                    "total": canon(total),
                    "count": count,
                }
                for k, (total, count) in sorted(self._written.items())
            ],
        }

    @classmethod
    def from_json(cls, doc: Any, *, checkpoint_every: int = 32) -> CreditBook:
        """A book from :meth:`to_json`; :meth:`sync` then writes anything it lacks."""
        if not isinstance(doc, dict):
            raise CreditsError("invalid credit book state: expected an object")
        try:
            book = cls(
                doc["customer_id"],
                doc["currency"],
                now_ms=doc["now_ms"],
                checkpoint_every=checkpoint_every,
            )
            book._load(
                [Grant.from_json(g) for g in doc["grants"]],
                [Void.from_json(v) for v in doc["voids"]],
                [SpendChange.from_json(s) for s in doc["spends"]],
            )
            written: dict[LedgerKey, tuple[Decimal, int]] = {}
            for row in doc["written"]:
                key = LedgerKey.of(
                    row["at_ms"], EntryKind(row["kind"]), row["grant_id"], row["source"]
                )
                written[key] = (Decimal(row["total"]), int(row["count"]))
        except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
            raise CreditsError(f"invalid credit book state: {exc!r}") from None
        book._set_written(written)
        book._absorb(book._walk.run(book._now), [])
        return book

    # -- internals

    def _check(self, customer_id: str, currency: str | None, what: str) -> None:
        if customer_id != self.customer_id:
            raise CreditsError(f"{what} is for customer {customer_id!r}, not {self.customer_id!r}")
        if currency is not None and currency != self.currency:
            raise CreditsError(f"{what} is in {currency}, the book in {self.currency}")

    def _place_grant(self, grant: Grant) -> None:
        self._walk.grants[grant.grant_id] = grant
        self._insert(_start_item(grant))
        self._place_end(grant)

    def _place_end(self, grant: Grant) -> None:
        walk = self._walk
        old = walk.ends.get(grant.grant_id)
        if old is not None and old[0] is not None:
            self._remove(_end_item(grant.grant_id, old[0]))
        void = self._voids.get(grant.grant_id)
        new = grant_end(grant, None if void is None else void.voided_ms)
        if old is not None and _never_usable(grant, old[0]) != _never_usable(grant, new[0]):
            # whether the grant pays uncovered spend when it starts changed: redo its start
            self._rewind_to(_start_item(grant).order)
        walk.ends[grant.grant_id] = new
        if new[0] is not None:
            self._insert(_end_item(grant.grant_id, new[0]))

    def _load(
        self, grants: Iterable[Grant], voids: Iterable[Void], spends: Iterable[SpendChange]
    ) -> None:
        """Place inputs without writing anything (resuming)."""
        for void in voids:
            self._check(void.customer_id, None, f"void of {void.grant_id!r}")
            earlier = self._voids.get(void.grant_id)
            if earlier is None or void.voided_ms < earlier.voided_ms:
                self._voids[void.grant_id] = void
        for grant in grants:
            self._check(grant.customer_id, grant.currency, f"grant {grant.grant_id!r}")
            if grant.grant_id not in self._walk.grants:
                self._place_grant(grant)
        for change in spends:
            self._check(change.customer_id, change.currency, f"spend {change.change_id!r}")
            held = self._walk.spends.get(change.source)
            if held is None or held.revision < change.revision:
                self._set_spend(change)

    def _set_written(self, written: dict[LedgerKey, tuple[Decimal, int]]) -> None:
        self._written = written
        with localcontext(EXACT):
            self._balance = sum((total for total, _ in written.values()), _ZERO)

    def _set_spend(self, change: SpendChange) -> None:
        held = self._walk.spends.get(change.source)
        if held is not None and held.amount > 0:
            self._remove(_spend_item(held))
        self._walk.spends[change.source] = change
        if change.amount > 0:
            self._insert(_spend_item(change))

    def _insert(self, item: _Item) -> None:
        self._rewind_to(item.order)
        self._walk.insert(item)

    def _remove(self, item: _Item) -> None:
        self._rewind_to(item.order)
        self._walk.remove(item)

    def _rewind_to(self, order: tuple[Any, ...]) -> None:
        """Before the items change at ``order``, undo the walk from there (kept for the diff)."""
        self._undone.extend(self._walk.rewind(self._walk.position(order)))

    def _tick(self, now_ms: int) -> None:
        _valid_clock(now_ms)
        self._now = max(self._now, now_ms)

    def _step(self, outcome: str, now_ms: int, cause: str = "") -> Step:
        self._tick(now_ms)
        undone, self._undone = self._undone, []
        keys = self._absorb(self._walk.run(self._now), undone)
        entries = self._emit(keys, cause or f"clock:{self._now}")
        return Step(entries, outcome, self.balance)

    def _absorb(self, new: list[Contribution], undone: list[Contribution]) -> set[LedgerKey]:
        """Fold the walk's new and undone contributions into the canonical sums."""
        keys: set[LedgerKey] = set()
        with localcontext(EXACT):
            for contribution in undone:
                for key, amount in contribution:
                    self._canonical[key] = self._canonical.get(key, _ZERO) - amount
                    keys.add(key)
            for contribution in new:
                for key, amount in contribution:
                    self._canonical[key] = self._canonical.get(key, _ZERO) + amount
                    keys.add(key)
        for key in keys:
            if self._canonical.get(key) == 0:
                del self._canonical[key]
        return keys

    def _emit(self, keys: Iterable[LedgerKey], cause: str) -> tuple[LedgerEntry, ...]:
        out = []
        with localcontext(EXACT):
            for key in sorted(keys):
                target = self._canonical.get(key, _ZERO)
                total, count = self._written.get(key, (_ZERO, 0))
                if target == total:
                    continue
                out.append(
                    make_entry(
                        self.customer_id,
                        self.currency,
                        key,
                        count,
                        target - total,
                        target,
                        cause,
                    )
                )
                self._written[key] = (target, count + 1)
                self._balance += target - total
        return tuple(out)


def compute_ledger(
    customer_id: str,
    currency: str,
    *,
    grants: Iterable[Grant] = (),
    voids: Iterable[Void] = (),
    spends: Iterable[SpendChange] = (),
    now_ms: int,
) -> dict[LedgerKey, Decimal]:
    """The canonical ledger of the inputs as of ``now_ms``, as a sum per key (one walk)."""
    book, _ = CreditBook.resume(
        customer_id, currency, grants=grants, voids=voids, spends=spends, now_ms=now_ms
    )
    return book.canonical()
