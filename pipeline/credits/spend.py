"""What burns credits: a spend change, "the cost of SOURCE is now Y".

A **source** is one thing that costs money, identified by a string the wiring chooses: a
priced meter window (:func:`window_source`), a one-off charge, ... Its cost is a *level*,
not an increment: :class:`SpendChange` says "the cost of ``source`` changed from
``previous`` (X) to ``amount`` (Y)", so the change it stands for is the delta ``Y - X``,
and it carries a ``revision`` that grows with every change of that source.

That makes each change idempotent by construction:

- a repeated change (same source, same revision) changes nothing (``duplicate``);
- an older change arriving after a newer one (a replay after a restart) is ignored
  (``stale``): the newer level already holds it;
- a change whose ``previous`` is not the level the book holds (a change was lost, or the
  window was recomputed from the record) still sets the level to ``amount`` and reports
  the difference as ``drift``, so the ledger follows the verified total, never a sum of
  deltas that missed one.

The wiring sends, per changed window and batch, ``SpendChange(source=window_source(...),
event_ms=<window start>, previous=X, amount=Y, revision=<the highest input offset folded
into the window>)``; offsets grow per partition and a customer's events share one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meterstream.credits.money import EXACT, amount_problem, currency_problem, json_decimal
from meterstream.credits.values import (
    MAX_ID_CHARS,
    JsonFields,
    id_problem,
    int_problem,
    ms_problem,
    raise_problems,
)
from meterstream.errors import CreditsError

MAX_REVISION = 2**63 - 1


@dataclass(frozen=True)
class SpendChange(JsonFields):
    """The cost of ``source`` (usage at ``event_ms``) changed from ``previous`` to ``amount``."""

    customer_id: str
    source: str
    event_ms: int
    amount: Decimal
    currency: str
    revision: int
    previous: Decimal | None = None

    def __post_init__(self) -> None:
        raise_problems(
            "spend change",
            [
                id_problem(self.customer_id, "customer_id"),
                id_problem(self.source, "source"),
                ms_problem(self.event_ms, "event_ms"),
                amount_problem(self.amount, "amount", non_negative=True),
                currency_problem(self.currency),
                int_problem(self.revision, "revision", 0, MAX_REVISION),
                None
                if self.previous is None
                else amount_problem(self.previous, "previous", non_negative=True),
            ],
        )
        object.__setattr__(self, "amount", Decimal(self.amount))
        if self.previous is not None:
            object.__setattr__(self, "previous", Decimal(self.previous))

    @property
    def change_id(self) -> str:
        """``source@revision``: what makes a repeated change recognisable."""
        return f"{self.source}@{self.revision}"

    @property
    def delta(self) -> Decimal | None:
        """``amount - previous`` (what the sender meant to add), if ``previous`` is known."""
        return None if self.previous is None else EXACT.subtract(self.amount, self.previous)

    def same_level(self, other: SpendChange) -> bool:
        """Both say the same thing about the source (time, amount, currency)."""
        return (self.event_ms, self.amount, self.currency) == (
            other.event_ms,
            other.amount,
            other.currency,
        )

    @classmethod
    def from_json(cls, doc: Any) -> SpendChange:
        if not isinstance(doc, dict):
            raise CreditsError(f"invalid spend change: expected an object, got {type(doc)}")
        try:
            previous = doc.get("previous")
            return cls(
                customer_id=doc["customer_id"],
                source=doc["source"],
                event_ms=doc["event_ms"],
                amount=json_decimal(doc["amount"], "amount"),
                currency=doc["currency"],
                revision=doc["revision"],
                previous=None if previous is None else json_decimal(previous, "previous"),
            )
        except KeyError as exc:
            raise CreditsError(f"invalid spend change: missing {exc}") from None


def window_source(meter: str, window_start_ms: int, group_key: str = "") -> str:
    """The source name of a priced meter window: ``meter|start_ms|group`` (at most 200 chars).

    A name too long to fit keeps the meter's first 100 characters and the start, and
    replaces the rest by ``#`` and a hash of the whole name, so it stays unique and
    deterministic.
    """
    name = f"{meter}|{window_start_ms}|{group_key}"
    if len(name) > MAX_ID_CHARS:
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        name = f"{meter[:100]}|{window_start_ms}|#{digest}"
    return name
