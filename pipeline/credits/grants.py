"""Credit grants, voids, and the order in which grants are burned.

A :class:`Grant` gives a customer ``amount`` of credit in the plan's currency, usable on
``[effective_ms, expires_ms)`` (epoch ms, UTC; an expiry of ``None`` never expires). A
grant is immutable; the one change it accepts is a :class:`Void`, which removes whatever
is left of it at ``voided_ms`` (or at ``effective_ms``, for a grant voided before it
starts). The earliest void of a grant wins, so voids commute.

Burn order (:func:`burn_order`): **lowest priority number first** (Stripe's and
Metronome's convention: priority 0 burns before priority 50), then the **soonest expiry**
(a grant that never expires comes last), then the **oldest** (earliest ``effective_ms``),
then ``grant_id`` so that the order is total and never depends on arrival.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meterstream.credits.money import (
    amount_problem,
    currency_problem,
    in_minor_units_problem,
    json_decimal,
)
from meterstream.credits.values import (
    MAX_MS,
    JsonFields,
    id_problem,
    int_problem,
    ms_problem,
    raise_problems,
)
from meterstream.errors import CreditsError

ORIGINS = ("manual", "promotion", "purchase", "recharge")
DEFAULT_PRIORITY = 50
MAX_PRIORITY = 1_000_000
_NEVER = MAX_MS + 1  # sorts after every real expiry


@dataclass(frozen=True)
class Grant(JsonFields):
    """``amount`` of credit for ``customer_id``, usable on ``[effective_ms, expires_ms)``.

    ``origin`` says where it came from (``manual``, ``promotion``, ``purchase`` or
    ``recharge``); a recharge grant is recorded in the ledger with kind ``recharge``.
    ``amount`` is a whole number of the currency's minor unit (it is money paid or given).
    """

    grant_id: str
    customer_id: str
    amount: Decimal
    currency: str
    effective_ms: int
    expires_ms: int | None = None
    priority: int = DEFAULT_PRIORITY
    origin: str = "manual"

    def __post_init__(self) -> None:
        problems = [
            id_problem(self.grant_id, "grant_id"),
            id_problem(self.customer_id, "customer_id"),
            currency_problem(self.currency),
            amount_problem(self.amount, "amount", positive=True),
            ms_problem(self.effective_ms, "effective_ms"),
            int_problem(self.priority, "priority", 0, MAX_PRIORITY),
            None if self.origin in ORIGINS else f"origin must be one of {', '.join(ORIGINS)}",
        ]
        if self.expires_ms is not None:
            problems.append(ms_problem(self.expires_ms, "expires_ms"))
        raise_problems("grant", problems)
        if self.expires_ms is not None and self.expires_ms <= self.effective_ms:
            raise CreditsError(
                f"invalid grant {self.grant_id!r}: expires_ms ({self.expires_ms}) must be "
                f"after effective_ms ({self.effective_ms})"
            )
        problem = in_minor_units_problem(Decimal(self.amount), self.currency, "amount")
        raise_problems("grant", [problem])
        object.__setattr__(self, "amount", Decimal(self.amount))

    @classmethod
    def from_json(cls, doc: Any) -> Grant:
        """A grant from :meth:`to_json`'s shape; raises :class:`CreditsError` on anything else."""
        fields = _fields(
            doc, "grant", required=("grant_id", "customer_id", "amount", "currency", "effective_ms")
        )
        return cls(
            grant_id=fields["grant_id"],
            customer_id=fields["customer_id"],
            amount=json_decimal(fields["amount"], "amount"),
            currency=fields["currency"],
            effective_ms=fields["effective_ms"],
            expires_ms=fields.get("expires_ms"),
            priority=fields.get("priority", DEFAULT_PRIORITY),
            origin=fields.get("origin", "manual"),
        )


@dataclass(frozen=True)
class Void(JsonFields):
    """Removes what is left of ``grant_id`` at ``voided_ms``; the earliest void wins."""

    grant_id: str
    customer_id: str
    voided_ms: int
    reason: str = ""

    def __post_init__(self) -> None:
        raise_problems(
            "void",
            [
                id_problem(self.grant_id, "grant_id"),
                id_problem(self.customer_id, "customer_id"),
                ms_problem(self.voided_ms, "voided_ms"),
                None
                if isinstance(self.reason, str) and len(self.reason) <= 500
                else "reason must be a string of at most 500 characters",
            ],
        )

    @classmethod
    def from_json(cls, doc: Any) -> Void:
        fields = _fields(doc, "void", required=("grant_id", "customer_id", "voided_ms"))
        return cls(
            grant_id=fields["grant_id"],
            customer_id=fields["customer_id"],
            voided_ms=fields["voided_ms"],
            reason=fields.get("reason", ""),
        )


def burn_order(grant: Grant) -> tuple[int, int, int, str]:
    """Sort key: priority (low first), soonest expiry (never last), oldest, then grant_id."""
    expires = _NEVER if grant.expires_ms is None else grant.expires_ms
    return (grant.priority, expires, grant.effective_ms, grant.grant_id)


def grant_end(grant: Grant, voided_ms: int | None) -> tuple[int | None, str]:
    """When ``grant`` stops being usable and why: ``(ms, "expiry" | "void")``, or ``(None, "")``.

    A void before the grant starts ends it at ``effective_ms`` (it is never usable); a void
    at or after its expiry changes nothing (the expiry came first).
    """
    if voided_ms is not None:
        void_at = max(voided_ms, grant.effective_ms)
        if grant.expires_ms is None or void_at < grant.expires_ms:
            return void_at, "void"
    if grant.expires_ms is not None:
        return grant.expires_ms, "expiry"
    return None, ""


def _fields(doc: Any, what: str, required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise CreditsError(f"invalid {what}: expected a JSON object, got {type(doc).__name__}")
    missing = [name for name in required if name not in doc]
    if missing:
        raise CreditsError(f"invalid {what}: missing {', '.join(missing)}")
    return doc
