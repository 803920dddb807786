"""A customer's standing at one moment: what entitlements, alerts and auto-recharge read.

The wiring builds one :class:`CustomerStatus` after each step that changed the customer
(a ledger step, a usage change, a plan change) and hands it to
:func:`~meterstream.credits.entitlements.decide`,
:func:`~meterstream.credits.alerts.evaluate` and
:func:`~meterstream.credits.recharge.evaluate`. ``cause`` names what produced the status
deterministically (the last ledger entry id of the step, or the usage change id): alert ids
and recharge purchase ids are derived from it, so a replay after a restart derives the
same ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType

from meterstream.credits.money import amount_problem, currency_problem
from meterstream.credits.values import id_problem, ms_problem, raise_problems


@dataclass(frozen=True)
class CustomerStatus:
    """Balance, this period's usage per meter, and the plan's limits per meter."""

    customer_id: str
    currency: str
    at_ms: int
    cause: str
    balance: Decimal
    period: str = ""  # the usage period label, e.g. "2025-01"
    usage: Mapping[str, Decimal] = field(default_factory=dict)
    limits: Mapping[str, Decimal] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = [
            id_problem(self.customer_id, "customer_id"),
            currency_problem(self.currency),
            ms_problem(self.at_ms, "at_ms"),
            id_problem(self.cause, "cause"),
            amount_problem(self.balance, "balance"),
            None if isinstance(self.period, str) and len(self.period) <= 50 else "bad period",
        ]
        for meter, used in self.usage.items():
            problems.append(id_problem(meter, "usage meter"))
            # any exact amount: a min or latest meter (a balance gauge) may be negative
            problems.append(amount_problem(used, f"usage[{meter!r}]"))
        for meter, limit in self.limits.items():
            problems.append(id_problem(meter, "limit meter"))
            problems.append(amount_problem(limit, f"limits[{meter!r}]", non_negative=True))
        raise_problems("customer status", problems)
        object.__setattr__(self, "usage", MappingProxyType(dict(self.usage)))
        object.__setattr__(self, "limits", MappingProxyType(dict(self.limits)))

    def used(self, meter: str) -> Decimal:
        """This period's usage of ``meter`` (zero if none)."""
        return Decimal(self.usage.get(meter, 0))
