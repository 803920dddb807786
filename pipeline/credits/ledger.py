"""The append-only credit ledger: entries, their ids, and what sums of them mean.

Every entry's ``amount`` is its signed effect on the balance (credit +, debit -), so:

- the **balance** is the sum of all entries (:func:`balance`);
- what is **left of a grant** is the sum of the entries carrying its ``grant_id``;
- the **uncovered** spend still owed is minus the sum of the ``uncovered`` entries.

Kinds (``EntryKind``):

========== ====== ===========================================================
kind       sign   meaning
========== ====== ===========================================================
grant      \\+     a grant became effective (``at_ms`` = its effective time)
recharge   \\+     the same, for a grant bought by auto-recharge
burn       \\-     a spend (``source``) burned part of a grant, at the spend's time
uncovered  \\-     the part of a spend no grant covered (a negative balance) ...
uncovered  \\+     ... and, when a later grant pays that debt, its reversal
settle     \\-     the later grant's side of that payment (at the grant's effective time)
expiry     \\-     what was left of a grant when it expired
void       \\-     what was left of a grant when it was voided
========== ====== ===========================================================

An entry accounts for one **key** ``(at_ms, kind, grant_id, source)``. The first entry of
a key has ``seq`` 0; when a late input changes what a key should hold, a *correcting*
entry for the difference follows with ``seq`` 1, 2, ... and ``key_total`` is the key's sum
after the entry. Nothing is ever updated or deleted.

``entry_id`` is a hash of the key, ``seq``, ``amount`` and ``key_total`` (amounts in
canonical form), so recomputing the same entry after a restart gives the same id, and a
table that keeps one row per ``entry_id`` makes a repeated insert harmless.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from enum import StrEnum
from typing import Any, NamedTuple

from meterstream.credits.money import EXACT, amount_problem, canon, currency_problem
from meterstream.credits.values import (
    id_problem,
    int_problem,
    ms_problem,
    raise_problems,
    stable_id,
)
from meterstream.errors import CreditsError


class EntryKind(StrEnum):
    GRANT = "grant"
    RECHARGE = "recharge"
    BURN = "burn"
    UNCOVERED = "uncovered"
    SETTLE = "settle"
    EXPIRY = "expiry"
    VOID = "void"


# Order of entries at the same instant: what starts, what a start settles, what ends, spends.
_RANK = {
    EntryKind.GRANT: 0,
    EntryKind.RECHARGE: 0,
    EntryKind.SETTLE: 1,
    EntryKind.EXPIRY: 2,
    EntryKind.VOID: 2,
    EntryKind.BURN: 3,
    EntryKind.UNCOVERED: 3,
}


class LedgerKey(NamedTuple):
    """What one ledger line accounts for; ``""`` where there is no grant or no source."""

    at_ms: int
    rank: int
    kind: EntryKind
    grant_id: str
    source: str

    @classmethod
    def of(cls, at_ms: int, kind: EntryKind, grant_id: str = "", source: str = "") -> LedgerKey:
        return cls(at_ms, _RANK[kind], kind, grant_id, source)


@dataclass(frozen=True)
class LedgerEntry:
    """One append-only ledger line (see the module docstring for kinds and signs)."""

    entry_id: str
    customer_id: str
    kind: EntryKind
    amount: Decimal
    currency: str
    at_ms: int
    grant_id: str | None
    source: str | None
    seq: int
    key_total: Decimal
    #: what the engine was processing when it wrote the line (a change id, ``grant:ID``,
    #: ``void:ID``, ``clock:MS``, or ``sync`` for a line a resumed book found missing);
    #: informational: not part of ``entry_id`` nor of equality
    cause: str = field(compare=False)

    def __post_init__(self) -> None:
        raise_problems(
            "ledger entry",
            [
                id_problem(self.entry_id, "entry_id"),
                id_problem(self.customer_id, "customer_id"),
                None if self.kind in EntryKind.__members__.values() else "unknown kind",
                amount_problem(self.amount, "amount"),
                amount_problem(self.key_total, "key_total"),
                currency_problem(self.currency),
                ms_problem(self.at_ms, "at_ms"),
                None if self.grant_id is None else id_problem(self.grant_id, "grant_id"),
                None if self.source is None else id_problem(self.source, "source"),
                int_problem(self.seq, "seq", 0, 2**31),
                None if isinstance(self.cause, str) else "cause must be a string",
            ],
        )

    @property
    def key(self) -> LedgerKey:
        return LedgerKey.of(self.at_ms, self.kind, self.grant_id or "", self.source or "")

    def to_json(self) -> dict[str, Any]:
        """The entry as JSON: amounts as canonical decimal strings, times in epoch ms."""
        return {
            "entry_id": self.entry_id,
            "customer_id": self.customer_id,
            "kind": self.kind.value,
            "amount": canon(self.amount),
            "currency": self.currency,
            "at_ms": self.at_ms,
            "grant_id": self.grant_id,
            "source": self.source,
            "seq": self.seq,
            "key_total": canon(self.key_total),
            "cause": self.cause,
        }

    @classmethod
    def from_json(cls, doc: Any) -> LedgerEntry:
        """An entry from :meth:`to_json`'s shape; the id must match the content."""
        if not isinstance(doc, dict):
            raise CreditsError(f"invalid ledger entry: expected an object, got {type(doc)}")
        try:
            entry = cls(
                entry_id=doc["entry_id"],
                customer_id=doc["customer_id"],
                kind=EntryKind(doc["kind"]),
                amount=Decimal(doc["amount"]),
                currency=doc["currency"],
                at_ms=doc["at_ms"],
                grant_id=doc.get("grant_id"),
                source=doc.get("source"),
                seq=doc["seq"],
                key_total=Decimal(doc["key_total"]),
                cause=doc.get("cause", ""),
            )
        except (KeyError, ValueError, TypeError, ArithmeticError) as exc:
            raise CreditsError(f"invalid ledger entry: {exc!r}") from None
        expected = entry_id(entry.customer_id, entry.key, entry.seq, entry.amount, entry.key_total)
        if entry.entry_id != expected:
            raise CreditsError(f"ledger entry {entry.entry_id!r} does not match its content")
        return entry


def entry_id(customer_id: str, key: LedgerKey, seq: int, amount: Decimal, total: Decimal) -> str:
    """The deterministic id of a ledger entry (``le_`` + 32 hex digits)."""
    return stable_id(
        "le_",
        customer_id,
        key.kind.value,
        key.grant_id,
        key.source,
        str(key.at_ms),
        str(seq),
        canon(amount),
        canon(total),
    )


def make_entry(
    customer_id: str,
    currency: str,
    key: LedgerKey,
    seq: int,
    amount: Decimal,
    total: Decimal,
    cause: str,
) -> LedgerEntry:
    """The ledger entry for ``key``'s ``seq``-th line (id computed from the content)."""
    return LedgerEntry(
        entry_id=entry_id(customer_id, key, seq, amount, total),
        customer_id=customer_id,
        kind=key.kind,
        amount=amount,
        currency=currency,
        at_ms=key.at_ms,
        grant_id=key.grant_id or None,
        source=key.source or None,
        seq=seq,
        key_total=total,
        cause=cause,
    )


def distinct(entries: Iterable[LedgerEntry]) -> list[LedgerEntry]:
    """``entries`` with repeats of an ``entry_id`` dropped (a table read before it merged).

    Ids are hashes of the content, so two rows with one id are the same entry. Every sum
    below counts an id once.
    """
    seen: set[str] = set()
    out = []
    for e in entries:
        if e.entry_id not in seen:
            seen.add(e.entry_id)
            out.append(e)
    return out


def balance(entries: Iterable[LedgerEntry]) -> Decimal:
    """The balance: the sum of every (distinct) entry's amount."""
    with localcontext(EXACT):
        return sum((e.amount for e in distinct(entries)), Decimal(0))


def remaining_by_grant(entries: Iterable[LedgerEntry]) -> dict[str, Decimal]:
    """What is left of each grant: the sum of the entries carrying its id."""
    left: dict[str, Decimal] = {}
    with localcontext(EXACT):
        for e in distinct(entries):
            if e.grant_id is not None:
                left[e.grant_id] = left.get(e.grant_id, Decimal(0)) + e.amount
    return left


@dataclass(frozen=True)
class LedgerTotals:
    """Ledger sums by kind, each as a non-negative magnitude except ``balance``.

    ``granted - burned - settled - expired - voided - uncovered == balance``, and the total
    spend the ledger accounts for is ``burned + settled + uncovered``.
    """

    granted: Decimal
    burned: Decimal
    settled: Decimal
    uncovered: Decimal
    expired: Decimal
    voided: Decimal
    balance: Decimal

    def to_json(self) -> dict[str, str]:
        return {name: canon(getattr(self, name)) for name in self.__dataclass_fields__}


def totals(entries: Iterable[LedgerEntry]) -> LedgerTotals:
    """Sums of ``entries`` by kind (``uncovered`` is what is still owed)."""
    by_kind = {kind: Decimal(0) for kind in EntryKind}
    with localcontext(EXACT):
        for e in distinct(entries):
            by_kind[e.kind] += e.amount
        return LedgerTotals(
            granted=by_kind[EntryKind.GRANT] + by_kind[EntryKind.RECHARGE],
            burned=-by_kind[EntryKind.BURN],
            settled=-by_kind[EntryKind.SETTLE],
            uncovered=-by_kind[EntryKind.UNCOVERED],
            expired=-by_kind[EntryKind.EXPIRY],
            voided=-by_kind[EntryKind.VOID],
            balance=sum(by_kind.values(), Decimal(0)),
        )


def key_sums(entries: Iterable[LedgerEntry]) -> dict[LedgerKey, tuple[Decimal, int]]:
    """Per key: the sum of its entries and how many there are (what a book resumes from)."""
    sums: dict[LedgerKey, tuple[Decimal, int]] = {}
    with localcontext(EXACT):
        for e in distinct(entries):
            total, count = sums.get(e.key, (Decimal(0), 0))
            sums[e.key] = (total + e.amount, count + 1)
    return sums


def grant_kind(origin: str) -> EntryKind:
    """The ledger kind of a grant's opening entry: ``recharge`` for auto-recharge grants."""
    return EntryKind.RECHARGE if origin == "recharge" else EntryKind.GRANT


__all__ = [
    "EntryKind",
    "LedgerEntry",
    "LedgerKey",
    "LedgerTotals",
    "balance",
    "distinct",
    "entry_id",
    "grant_kind",
    "key_sums",
    "make_entry",
    "remaining_by_grant",
    "totals",
]
