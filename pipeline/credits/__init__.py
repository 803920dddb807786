"""Prepaid credits, pure: grants, the burn engine and its ledger, purchases, entitlements,
alerts, auto-recharge and signed webhooks.

Nothing here does I/O or imports Faust, Kafka, ClickHouse, Stripe or an HTTP library; every
time is epoch milliseconds (UTC), every amount a Decimal, every currency an ISO code. The
worker wires it (a later change): spend changes from priced windows into a
:class:`~meterstream.credits.burn.CreditBook` per customer, its entries into the ledger table,
a :class:`~meterstream.credits.status.CustomerStatus` after each step into
:func:`~meterstream.credits.entitlements.decide`, :func:`~meterstream.credits.alerts.evaluate`
and :func:`~meterstream.credits.recharge.evaluate`, Stripe's webhooks through
:func:`~meterstream.credits.webhooks.verify_header` and
:func:`~meterstream.credits.purchases.apply_event`.

Modules: ``money`` (currencies, minor units, exact arithmetic), ``grants``, ``spend``,
``ledger`` (entries, ids, sums), ``burn`` (the engine), ``purchases``, ``status``,
``entitlements``, ``alerts``, ``recharge``, ``webhooks``.
"""

from meterstream.credits.alerts import Alert, AlertKind, AlertStep, Threshold, ThresholdState
from meterstream.credits.burn import CreditBook, Step, compute_ledger
from meterstream.credits.entitlements import Entitlement, decide
from meterstream.credits.grants import Grant, Void, burn_order
from meterstream.credits.ledger import EntryKind, LedgerEntry, LedgerTotals
from meterstream.credits.purchases import PaymentEvent, Purchase, PurchaseState, PurchaseStatus
from meterstream.credits.recharge import AutoRecharge, RechargeState
from meterstream.credits.spend import SpendChange, window_source
from meterstream.credits.status import CustomerStatus

__all__ = [
    "Alert",
    "AlertKind",
    "AlertStep",
    "AutoRecharge",
    "CreditBook",
    "CustomerStatus",
    "Entitlement",
    "EntryKind",
    "Grant",
    "LedgerEntry",
    "LedgerTotals",
    "PaymentEvent",
    "Purchase",
    "PurchaseState",
    "PurchaseStatus",
    "RechargeState",
    "SpendChange",
    "Step",
    "Threshold",
    "ThresholdState",
    "Void",
    "burn_order",
    "compute_ledger",
    "decide",
    "window_source",
]
