"""Auto-recharge: "when my balance reaches $5, recharge me back to $20".

The decision (:func:`evaluate`), per customer status:

1. **Re-arm** when the balance has gone back above the threshold (``balance > threshold``):
   one purchase per crossing, like an alert with no margin.
2. **Buy** when auto-recharge is enabled, armed, no recharge purchase is pending, and
   ``balance <= threshold``: ``target - balance`` rounded **up** to the currency's minor
   unit (to 0.010 for three-decimal currencies, whose charges Stripe wants to end in 0;
   a negative balance is bought back too, so the customer lands on the target once
   the grant pays the uncovered spend). The state becomes disarmed with the purchase
   pending; nothing more is bought until that crossing ends.
3. The purchase id (also Stripe's idempotency key) is ``rch_`` + a hash of the customer,
   the enable generation and the status ``cause`` (the ledger entry that crossed): a replay
   of the same step after a restart derives the same id, so Stripe never charges twice.

On the purchase's outcome (:func:`purchase_result`): success clears ``pending`` (the grant
lifts the balance above the threshold, which re-arms); **failure turns auto-recharge off**
(``enabled=False``, Metronome's behaviour) and the caller fires the ``payment_failed``
alert. :func:`enable` (the customer fixed their card) turns it back on, armed, with a new
generation: if the balance is still at or below the threshold, the next status buys again,
under a new id.

A successful recharge whose grant is eaten by usage before the balance ever rises above
the threshold does not buy again (the crossing has not ended); a larger ``target`` is the
remedy. Stripe refuses charges below its minimum (0.50 usd): keep ``target - threshold``
above it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal, localcontext
from typing import Any

from meterstream.credits.grants import DEFAULT_PRIORITY, MAX_PRIORITY
from meterstream.credits.money import (
    EXACT,
    amount_problem,
    canon,
    ceil_to_charge,
    currency_problem,
    in_minor_units_problem,
)
from meterstream.credits.purchases import Purchase
from meterstream.credits.status import CustomerStatus
from meterstream.credits.values import (
    MAX_MS,
    JsonFields,
    id_problem,
    int_problem,
    raise_problems,
    stable_id,
)
from meterstream.errors import CreditsError


@dataclass(frozen=True)
class AutoRecharge(JsonFields):
    """A customer's recharge rule: at ``balance <= threshold``, buy back up to ``target``."""

    customer_id: str
    currency: str
    threshold: Decimal
    target: Decimal
    priority: int = DEFAULT_PRIORITY  # terms of the grants it buys
    expires_after_ms: int | None = None

    def __post_init__(self) -> None:
        problems = [
            id_problem(self.customer_id, "customer_id"),
            currency_problem(self.currency),
            amount_problem(self.threshold, "threshold", non_negative=True),
            amount_problem(self.target, "target", positive=True),
            int_problem(self.priority, "priority", 0, MAX_PRIORITY),
        ]
        if self.expires_after_ms is not None:
            problems.append(int_problem(self.expires_after_ms, "expires_after_ms", 1, MAX_MS))
        raise_problems("auto-recharge", problems)
        raise_problems(
            "auto-recharge",
            [
                in_minor_units_problem(Decimal(self.threshold), self.currency, "threshold"),
                in_minor_units_problem(Decimal(self.target), self.currency, "target"),
            ],
        )
        if self.target <= self.threshold:
            raise CreditsError(
                f"invalid auto-recharge: target ({canon(Decimal(self.target))}) must be above "
                f"the threshold ({canon(Decimal(self.threshold))})"
            )


@dataclass(frozen=True)
class RechargeState(JsonFields):
    """``enabled`` (off after a failed payment), ``armed``, the purchase ``pending``."""

    enabled: bool = True
    armed: bool = True
    pending: str | None = None
    generation: int = 0
    disabled_reason: str | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RechargeState:
        return cls(
            enabled=bool(doc["enabled"]),
            armed=bool(doc["armed"]),
            pending=doc.get("pending"),
            generation=int(doc.get("generation", 0)),
            disabled_reason=doc.get("disabled_reason"),
        )


def evaluate(
    rule: AutoRecharge, state: RechargeState, status: CustomerStatus
) -> tuple[RechargeState, Purchase | None]:
    """The new state and, at most once per crossing, the purchase to make."""
    if status.customer_id != rule.customer_id or status.currency != rule.currency:
        raise CreditsError(
            f"status of {status.customer_id!r} in {status.currency} does not match the "
            f"auto-recharge of {rule.customer_id!r} in {rule.currency}"
        )
    balance = status.balance
    if balance > rule.threshold and not state.armed:
        state = replace(state, armed=True)
    if not (state.enabled and state.armed and state.pending is None):
        return state, None
    if balance > rule.threshold:
        return state, None
    with localcontext(EXACT):
        amount = ceil_to_charge(rule.target - balance, rule.currency)
    purchase = Purchase(
        purchase_id=stable_id("rch_", rule.customer_id, str(state.generation), status.cause),
        customer_id=rule.customer_id,
        amount=amount,
        currency=rule.currency,
        created_ms=status.at_ms,
        origin="recharge",
        priority=rule.priority,
        expires_after_ms=rule.expires_after_ms,
    )
    return replace(state, armed=False, pending=purchase.purchase_id), purchase


def purchase_result(
    state: RechargeState, purchase_id: str, *, succeeded: bool, failure_code: str | None = None
) -> RechargeState:
    """Record the pending purchase's outcome; a failure turns auto-recharge off.

    An outcome for any other purchase (already recorded, or a manual purchase) changes
    nothing, so a redelivered webhook is harmless.
    """
    if state.pending != purchase_id:
        return state
    if succeeded:
        return replace(state, pending=None)
    return replace(
        state, pending=None, enabled=False, disabled_reason=failure_code or "payment_failed"
    )


def enable(state: RechargeState) -> RechargeState:
    """Turn auto-recharge back on (armed, new generation: the next crossing buys anew)."""
    return RechargeState(
        enabled=True, armed=True, pending=state.pending, generation=state.generation + 1
    )


def disable(state: RechargeState, reason: str = "disabled") -> RechargeState:
    """Turn auto-recharge off (a pending purchase still completes)."""
    return replace(state, enabled=False, disabled_reason=reason)
