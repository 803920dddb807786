"""Alert thresholds: fire once per crossing, re-arm only after the value has gone back.

Kinds and when they fire (every comparison inclusive: a threshold is *reached*):

=================== ============================================ ==========================
kind                fires when                                   re-arms when
=================== ============================================ ==========================
balance_below       ``balance <= amount``                        ``balance > amount + margin``
balance_exhausted   ``balance <= 0``                             ``balance > margin``
usage_above         ``usage(meter) >= amount`` (this period)     ``usage < amount - margin``
usage_percent       ``usage(meter) >= percent% of limit(meter)`` ``usage < (percent - margin)%``
grant_expiring      a usable grant with credit left expires      never (once per grant)
                    within ``within_ms``
payment_failed      a credit purchase failed                     never (once per purchase)
=================== ============================================ ==========================

Each value threshold is a two-state machine per customer, ``armed`` -> ``fired`` -> ``armed``.
Usage thresholds belong to a period: the first status of a new period re-arms them (the
usage starts again from zero). A ``usage_percent`` threshold on a meter without a limit is
not evaluated (its state is kept).

Hysteresis: ``margin`` (default 0) is how far past the threshold the value must come back
before the threshold re-arms. Zero is the default because these values do not jitter: a
balance only falls with usage and rises with a grant, usage only rises within a period; a
value that goes back has really gone back. A customer whose balance hovers at a threshold
(an auto-recharge target just above an alert) can set a margin.

Alert ids are deterministic: a hash of the customer, the threshold, and what caused the
crossing (the status ``cause``: the ledger entry or usage change that crossed; the grant
for ``grant_expiring``; the purchase for ``payment_failed``). A replay after a restart
derives the same id, so the topic consumer and webhook receivers deduplicate it.

Alert JSON (the topic ``billing-alerts`` value, keyed by customer, and the webhook body)::

    {"id": "alrt_...", "object": "billing_alert", "type": "balance_below",
     "customer_id": "acme", "threshold_id": "low-balance", "at_ms": 1735689600000,
     "cause": "le_...", "value": "4.5", "threshold": "5", "currency": "usd",
     "meter": null, "period": null, "limit": null, "grant_id": null, "expires_ms": null,
     "purchase_id": null, "failure_code": null}

``value`` is the balance (balance kinds), the usage (usage kinds), what is left of the
grant (grant_expiring) or the purchase amount (payment_failed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, localcontext
from enum import StrEnum
from typing import Any

from meterstream.credits.grants import Grant
from meterstream.credits.money import EXACT, amount_problem, canon
from meterstream.credits.status import CustomerStatus
from meterstream.credits.values import (
    id_problem,
    int_problem,
    ms_problem,
    raise_problems,
    stable_id,
)
from meterstream.credits.webhooks import WebhookRequest, build_request


class AlertKind(StrEnum):
    BALANCE_BELOW = "balance_below"
    BALANCE_EXHAUSTED = "balance_exhausted"
    USAGE_ABOVE = "usage_above"
    USAGE_PERCENT = "usage_percent"
    GRANT_EXPIRING = "grant_expiring"
    PAYMENT_FAILED = "payment_failed"


_BALANCE_KINDS = (AlertKind.BALANCE_BELOW, AlertKind.BALANCE_EXHAUSTED)
_USAGE_KINDS = (AlertKind.USAGE_ABOVE, AlertKind.USAGE_PERCENT)
_AMOUNT_KINDS = (AlertKind.BALANCE_BELOW, AlertKind.USAGE_ABOVE)


def _kind_field(
    kind: AlertKind, name: str, value: Any, needed: bool, check: Callable[[Any], str | None]
) -> str | None:
    """The problem with an optional field of a threshold of ``kind``: required where
    ``needed`` (then ``check`` judges it), absent elsewhere; ``None`` if there is none."""
    if needed:
        return f"{name} is required" if value is None else check(value)
    return None if value is None else f"{kind} takes no {name}"


@dataclass(frozen=True)
class Threshold:
    """One alert a customer asked for (see the module docstring for each kind's fields)."""

    threshold_id: str
    kind: AlertKind
    amount: Decimal | None = None  # balance_below, usage_above
    percent: Decimal | None = None  # usage_percent, e.g. Decimal(80)
    meter: str | None = None  # usage kinds
    within_ms: int | None = None  # grant_expiring
    margin: Decimal = Decimal(0)  # hysteresis (percentage points for usage_percent)

    def __post_init__(self) -> None:
        kind = self.kind
        problems = [
            id_problem(self.threshold_id, "threshold_id"),
            None if kind in AlertKind.__members__.values() else f"unknown kind {kind!r}",
            amount_problem(self.margin, "margin", non_negative=True),
        ]
        problems += [
            _kind_field(
                kind, "amount", self.amount, kind in _AMOUNT_KINDS,
                lambda v: amount_problem(v, "amount", non_negative=kind != "balance_below"),
            ),
            _kind_field(
                kind, "percent", self.percent, kind == AlertKind.USAGE_PERCENT,
                lambda v: amount_problem(v, "percent", positive=True),
            ),
            _kind_field(
                kind, "meter", self.meter, kind in _USAGE_KINDS, lambda v: id_problem(v, "meter")
            ),
            _kind_field(
                kind, "within_ms", self.within_ms, kind == AlertKind.GRANT_EXPIRING,
                lambda v: int_problem(v, "within_ms", 1, 10 * 366 * 86_400_000),
            ),
        ]  # fmt: skip
        raise_problems(f"threshold {self.threshold_id!r}", problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold_id": self.threshold_id,
            "kind": self.kind.value,
            "amount": None if self.amount is None else canon(self.amount),
            "percent": None if self.percent is None else canon(self.percent),
            "meter": self.meter,
            "within_ms": self.within_ms,
            "margin": canon(self.margin),
        }


@dataclass(frozen=True)
class ThresholdState:
    """``fired`` (value kinds); the period it belongs to (usage kinds); grants alerted.

    ``grants`` holds ``(grant_id, expires_ms)`` of the grants a ``grant_expiring`` threshold
    has alerted; a pair is forgotten once its expiry has passed.
    """

    fired: bool = False
    period: str = ""
    grants: frozenset[tuple[str, int]] = frozenset()

    def to_json(self) -> dict[str, Any]:
        return {
            "fired": self.fired,
            "period": self.period,
            "grants": [list(pair) for pair in sorted(self.grants)],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ThresholdState:
        return cls(
            bool(doc["fired"]),
            str(doc["period"]),
            frozenset((str(g), int(ms)) for g, ms in doc["grants"]),
        )


@dataclass(frozen=True)
class Alert:
    """One alert event; ``alert_id`` is deterministic (see the module docstring)."""

    alert_id: str
    kind: AlertKind
    customer_id: str
    threshold_id: str
    at_ms: int
    cause: str
    value: Decimal | None = None
    threshold: Decimal | None = None
    currency: str | None = None
    meter: str | None = None
    period: str | None = None
    limit: Decimal | None = None
    grant_id: str | None = None
    expires_ms: int | None = None
    purchase_id: str | None = None
    failure_code: str | None = None

    def to_json(self) -> dict[str, Any]:
        def dec(value: Decimal | None) -> str | None:
            return None if value is None else canon(value)

        return {
            "id": self.alert_id,
            "object": "billing_alert",
            "type": self.kind.value,
            "customer_id": self.customer_id,
            "threshold_id": self.threshold_id,
            "at_ms": self.at_ms,
            "cause": self.cause,
            "value": dec(self.value),
            "threshold": dec(self.threshold),
            "currency": self.currency,
            "meter": self.meter,
            "period": self.period,
            "limit": dec(self.limit),
            "grant_id": self.grant_id,
            "expires_ms": self.expires_ms,
            "purchase_id": self.purchase_id,
            "failure_code": self.failure_code,
        }

    def webhook(self, secrets: str | Sequence[str], *, now_ms: int) -> WebhookRequest:
        """This alert as a signed webhook request (re-signed at each attempt, same body)."""
        return build_request(self.alert_id, self.to_json(), secrets, now_ms=now_ms)


@dataclass(frozen=True)
class AlertStep:
    """The thresholds' new states and the alerts that fired, in threshold order."""

    states: Mapping[str, ThresholdState]
    alerts: tuple[Alert, ...] = field(default=())


def evaluate(
    thresholds: Iterable[Threshold],
    states: Mapping[str, ThresholdState],
    status: CustomerStatus,
    *,
    live_grants: Iterable[tuple[Grant, Decimal]] = (),
) -> AlertStep:
    """Evaluate every threshold against ``status`` (and the usable grants, for expiry).

    ``states`` is the previous result's ``states`` (empty at first: everything armed);
    thresholds missing from it start armed, states of removed thresholds are dropped.
    ``payment_failed`` thresholds are not evaluated here (see :func:`payment_failed`).
    """
    grants = list(live_grants)
    new_states: dict[str, ThresholdState] = {}
    alerts: list[Alert] = []
    for threshold in thresholds:
        state = states.get(threshold.threshold_id, ThresholdState())
        if threshold.kind == AlertKind.PAYMENT_FAILED:
            new_states[threshold.threshold_id] = state
            continue
        if threshold.kind == AlertKind.GRANT_EXPIRING:
            state, fired = _expiring(threshold, state, status, grants)
        else:
            state, fired = _crossing(threshold, state, status)
        new_states[threshold.threshold_id] = state
        alerts.extend(fired)
    return AlertStep(new_states, tuple(alerts))


def payment_failed(
    thresholds: Iterable[Threshold],
    *,
    customer_id: str,
    purchase_id: str,
    amount: Decimal,
    currency: str,
    at_ms: int,
    failure_code: str | None,
) -> tuple[Alert, ...]:
    """The ``payment_failed`` alerts for one failed purchase (its id makes them unique).

    Called once, when the purchase's state machine moves to ``failed``
    (:func:`meterstream.credits.purchases.apply_event` reports it).
    """
    raise_problems(
        "payment failure",
        [id_problem(purchase_id, "purchase_id"), ms_problem(at_ms, "at_ms")],
    )
    return tuple(
        Alert(
            alert_id=stable_id(
                "alrt_", customer_id, t.threshold_id, t.kind.value, f"purchase:{purchase_id}"
            ),
            kind=t.kind,
            customer_id=customer_id,
            threshold_id=t.threshold_id,
            at_ms=at_ms,
            cause=f"purchase:{purchase_id}",
            value=amount,
            currency=currency,
            purchase_id=purchase_id,
            failure_code=failure_code,
        )
        for t in thresholds
        if t.kind == AlertKind.PAYMENT_FAILED
    )


def _crossing(
    threshold: Threshold, state: ThresholdState, status: CustomerStatus
) -> tuple[ThresholdState, list[Alert]]:
    kind = threshold.kind
    if kind in _USAGE_KINDS and state.period != status.period:
        state = ThresholdState(fired=False, period=status.period)
    reached, back, value, limit = _compare(threshold, status)
    if reached is None:  # usage_percent without a limit: nothing to compare
        return state, []
    if state.fired and back:
        state = replace(state, fired=False)
    if state.fired or not reached:
        return state, []
    usage = kind in _USAGE_KINDS
    alert = Alert(
        alert_id=stable_id(
            "alrt_", status.customer_id, threshold.threshold_id, kind.value, status.cause
        ),
        kind=kind,
        customer_id=status.customer_id,
        threshold_id=threshold.threshold_id,
        at_ms=status.at_ms,
        cause=status.cause,
        value=value,
        threshold=threshold.percent if kind == AlertKind.USAGE_PERCENT else threshold.amount,
        currency=None if usage else status.currency,
        meter=threshold.meter,
        period=status.period if usage else None,
        limit=limit,
    )
    return replace(state, fired=True), [alert]


def _compare(
    threshold: Threshold, status: CustomerStatus
) -> tuple[bool | None, bool, Decimal, Decimal | None]:
    """(reached, gone back past the margin, observed value, limit) for a value threshold."""
    margin = threshold.margin
    with localcontext(EXACT):
        if threshold.kind in _BALANCE_KINDS:
            level = Decimal(0) if threshold.amount is None else threshold.amount
            balance = status.balance
            return balance <= level, balance > level + margin, balance, None
        assert threshold.meter is not None
        used = status.used(threshold.meter)
        if threshold.kind == AlertKind.USAGE_ABOVE:
            assert threshold.amount is not None
            return used >= threshold.amount, used < threshold.amount - margin, used, None
        limit = status.limits.get(threshold.meter)
        if limit is None:
            return None, False, used, None
        assert threshold.percent is not None
        scaled = used * 100
        reached = scaled >= threshold.percent * limit
        back = scaled < (threshold.percent - margin) * limit
        return reached, back, used, Decimal(limit)


def _expiring(
    threshold: Threshold,
    state: ThresholdState,
    status: CustomerStatus,
    grants: list[tuple[Grant, Decimal]],
) -> tuple[ThresholdState, list[Alert]]:
    assert threshold.within_ms is not None
    now = status.at_ms
    alerted = {pair for pair in state.grants if pair[1] > now}  # forget expired grants
    done = {grant_id for grant_id, _ in alerted}
    alerts = []
    for grant, left in sorted(grants, key=lambda pair: pair[0].grant_id):
        if grant.expires_ms is None or left <= 0 or grant.grant_id in done:
            continue
        if not grant.expires_ms - threshold.within_ms <= now < grant.expires_ms:
            continue
        alerted.add((grant.grant_id, grant.expires_ms))
        done.add(grant.grant_id)
        alerts.append(
            Alert(
                alert_id=stable_id(
                    "alrt_",
                    status.customer_id,
                    threshold.threshold_id,
                    threshold.kind.value,
                    f"grant:{grant.grant_id}",
                ),
                kind=threshold.kind,
                customer_id=status.customer_id,
                threshold_id=threshold.threshold_id,
                at_ms=now,
                cause=f"grant:{grant.grant_id}",
                value=left,
                currency=grant.currency,
                grant_id=grant.grant_id,
                expires_ms=grant.expires_ms,
            )
        )
    return replace(state, grants=frozenset(alerted)), alerts
