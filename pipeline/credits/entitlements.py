"""Entitlements: may this customer use the product right now, and why not.

Access ends when **the balance reaches zero** (``balance <= 0``, for a prepaid plan) or when
**a usage limit per period is reached** (``usage >= limit`` for any limited meter: a free
tier of 10,000 tokens a month allows the event that reaches 10,000 and nothing after it).
Both are checked; ``reasons`` lists every one that applies, so a customer out of credit
*and* over a limit is told both.

JSON (what the worker serves and publishes on topic ``entitlements``, keyed by customer)::

    {"customer_id": "acme", "has_access": false,
     "reasons": ["balance_exhausted", "usage_limit"],
     "balance": "-0.25", "currency": "usd", "period": "2025-01",
     "usage": {"ai_tokens": {"used": "10020", "limit": "10000", "remaining": "0",
                             "limit_reached": true}},
     "requires_balance": true, "at_ms": 1735689600000, "cause": "le_..."}

``usage`` lists every meter with usage or a limit; ``limit`` and ``remaining`` are ``null``
for a meter without a limit. Amounts are canonical decimal strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meterstream.credits.money import EXACT, canon
from meterstream.credits.status import CustomerStatus

BALANCE_EXHAUSTED = "balance_exhausted"
USAGE_LIMIT = "usage_limit"


@dataclass(frozen=True)
class MeterUsage:
    meter: str
    used: Decimal
    limit: Decimal | None

    @property
    def limit_reached(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    @property
    def remaining(self) -> Decimal | None:
        if self.limit is None:
            return None
        return max(EXACT.subtract(self.limit, self.used), Decimal(0))


@dataclass(frozen=True)
class Entitlement:
    customer_id: str
    has_access: bool
    reasons: tuple[str, ...]
    balance: Decimal
    currency: str
    period: str
    usage: tuple[MeterUsage, ...]
    requires_balance: bool
    at_ms: int
    cause: str

    def same_access(self, other: Entitlement | None) -> bool:
        """Whether ``other`` grants the same access for the same reasons (no flip to publish)."""
        return other is not None and (self.has_access, self.reasons) == (
            other.has_access,
            other.reasons,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "has_access": self.has_access,
            "reasons": list(self.reasons),
            "balance": canon(self.balance),
            "currency": self.currency,
            "period": self.period,
            "usage": {
                u.meter: {
                    "used": canon(u.used),
                    "limit": None if u.limit is None else canon(u.limit),
                    "remaining": None if u.remaining is None else canon(u.remaining),
                    "limit_reached": u.limit_reached,
                }
                for u in self.usage
            },
            "requires_balance": self.requires_balance,
            "at_ms": self.at_ms,
            "cause": self.cause,
        }


def decide(status: CustomerStatus, *, requires_balance: bool = True) -> Entitlement:
    """The entitlement for ``status``.

    ``requires_balance`` is the plan's: a prepaid plan (``True``) cuts access at zero
    balance; a plan without credits (a free tier) only at its usage limits.
    """
    meters = sorted(set(status.usage) | set(status.limits))
    usage = tuple(
        MeterUsage(
            meter,
            status.used(meter),
            None if meter not in status.limits else Decimal(status.limits[meter]),
        )
        for meter in meters
    )
    reasons = []
    if requires_balance and status.balance <= 0:
        reasons.append(BALANCE_EXHAUSTED)
    if any(u.limit_reached for u in usage):
        reasons.append(USAGE_LIMIT)
    return Entitlement(
        customer_id=status.customer_id,
        has_access=not reasons,
        reasons=tuple(reasons),
        balance=status.balance,
        currency=status.currency,
        period=status.period,
        usage=usage,
        requires_balance=requires_balance,
        at_ms=status.at_ms,
        cause=status.cause,
    )
