"""Corrections of periods already forwarded to Stripe, pure: when a meter event is stamped,
which superseded ones to cancel, and what can no longer be corrected (the report).
No I/O; pipeline/billing/forwarding.py does the reads, sends and writes.

**The winner of a `last` meter is defined.** Stripe's ``last`` formula bills the value
of the event with the latest timestamp and does not say which of several events with
the same timestamp wins. Every send of a (meter, customer, period) is therefore stamped
strictly later than every earlier one (:func:`next_timestamp`): the forward time,
clamped into the period, and at least one second after the previous stamp. To leave
room for the corrections sent after the month has ended, sends made while the month
is open are stamped no later than its last ``RESERVED_SECONDS``; corrections take the
seconds after that, one each. Only if those run out (more than ``RESERVED_SECONDS``
sends after the cut), or for events an older version stamped at the month's last second,
does a new event share its timestamp with an earlier one; then the earlier ones are
cancelled with a meter event adjustment (:func:`ties_to_cancel`), which Stripe allows
within 24 hours of receiving them. A tie that can no longer be cancelled is reported
(reason ``tie``), never left to chance silently.

Why timestamps first and cancellations only as the fallback: a timestamp decides at
once and for good, needs no second request and has no time limit; an adjustment is
applied asynchronously by Stripe, only within 24 hours, and is one more request that
can fail.

**Sum and count meters** send the whole-number delta, negative when the period total
went down (Stripe accepts negative values to correct usage and bills a negative cycle
total as 0), so no cancellation is needed for them.

**What cannot be corrected.** A period is corrected while ``now`` is before its end plus
the correction horizon (``METERSTREAM_STRIPE_CORRECTION_DAYS``, which stands for "Stripe's
invoice of the period is not final yet"). After it, a change of the period's record is
not sent: :func:`uncorrectable` computes, per customer, what Stripe holds and what it
should hold, and the difference (in the meter's units, as Stripe bills them) is the
amount to credit (negative difference: billed too much) or to bill by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meterstream.meters.windows import DAY_MS, month_bounds
from meterstream.sinks.stripe.ledger import LedgerRow
from meterstream.sinks.stripe.payloads import StripeFormula

RESERVED_SECONDS = 3600
"""The last hour of a period is kept for the corrections sent after it ends."""
CANCEL_WINDOW_SECONDS = 24 * 3600
"""Stripe cancels a meter event only within 24 hours of receiving it."""
CANCEL_MARGIN_SECONDS = 600
"""A cancellation is tried only while the event is younger than the window minus this
(the event's receipt at Stripe is a little later than our ``sent_at``, never earlier)."""
CANCEL_REFUSED = "cancel_refused"
"""``error_code`` of a ``sent`` row whose cancellation Stripe refused (not tried again)."""


def correctable(period: str, now_ms: int, horizon_days: int) -> bool:
    """Whether ``period`` is still corrected at Stripe at ``now_ms``: before its end plus
    ``horizon_days``."""
    return now_ms < month_bounds(period)[1] + horizon_days * DAY_MS


def stamped_at(row: LedgerRow) -> int:
    """The timestamp (epoch s) ``row`` was or will be sent with. Rows written before the
    ledger kept it (``timestamp_s`` 0) were stamped at the send time clamped to the
    period's last second: estimated from ``sent_at`` (an upper bound), or that last
    second when unknown."""
    if row.timestamp_s:
        return row.timestamp_s
    last_second = month_bounds(row.period)[1] // 1000 - 1
    if row.sent_at_ms:
        return min(row.sent_at_ms // 1000, last_second)
    return last_second


def next_timestamp(period: str, now_ms: int, previous_s: int | None) -> int:
    """The timestamp of a new send for ``period``: the forward time minus one second,
    no later than the period's last ``RESERVED_SECONDS`` while it is open, and at least
    one second after ``previous_s`` (the latest earlier stamp); never outside the period
    (at its last second when the reserve is used up)."""
    start_ms, end_ms = month_bounds(period)
    last_second = end_ms // 1000 - 1
    stamp = min(now_ms // 1000 - 1, last_second - RESERVED_SECONDS)
    if previous_s is not None:
        stamp = max(stamp, previous_s + 1)
    return max(start_ms // 1000, min(stamp, last_second))


def cancellable(row: LedgerRow, now_ms: int) -> bool:
    """Whether Stripe still cancels ``row``'s event (sent less than 24 hours ago, with a
    margin) and has not refused to."""
    if row.status != "sent" or row.error_code == CANCEL_REFUSED or not row.sent_at_ms:
        return False
    return now_ms - row.sent_at_ms < (CANCEL_WINDOW_SECONDS - CANCEL_MARGIN_SECONDS) * 1000


def ties_to_cancel(
    history: list[LedgerRow], now_ms: int
) -> tuple[list[LedgerRow], list[LedgerRow]]:
    """For one (meter, customer, period) of a ``last`` meter, its rows in sequence order
    (the newest last, the one that must win): the live earlier rows stamped at or after
    the newest one's timestamp, split into those Stripe still cancels and those it no
    longer does (a tie that stays: reported)."""
    live = [r for r in history if r.status in ("sent", "pending")]
    if len(live) < 2:
        return [], []
    newest = live[-1]
    at = stamped_at(newest)
    rivals = [r for r in live[:-1] if stamped_at(r) >= at and r.value != newest.value]
    cancel = [r for r in rivals if cancellable(r, now_ms)]
    return cancel, [r for r in rivals if r not in cancel]


def stripe_holds(formula: StripeFormula, rows: Iterable[LedgerRow]) -> int | None:
    """What Stripe bills from the rows it accepted (``sent``): their sum (``sum``), or the
    value of the latest stamped one (``last``); None for a ``last`` tie between different
    values (Stripe leaves the winner undefined)."""
    sent = [r for r in rows if r.status == "sent"]
    if formula == "sum":
        return sum(r.value for r in sent)
    if not sent:
        return 0
    latest = max(stamped_at(r) for r in sent)
    values = {r.value for r in sent if stamped_at(r) == latest}
    return values.pop() if len(values) == 1 else None


@dataclass(frozen=True)
class Uncorrectable:
    """One (meter, customer, period) Stripe holds wrong and meterstream no longer corrects.

    ``difference`` = ``expected`` - ``stripe``, in the meter's units as Stripe bills them:
    negative, the customer was billed that much too much (the amount to credit);
    positive, too little. ``stripe`` is None for a ``last`` tie (undefined at Stripe).
    """

    meter: str
    customer_id: str
    stripe_customer_id: str
    period: str
    formula: StripeFormula
    stripe: int | None
    expected: int
    exact_total: Decimal
    reason: str  # past_correction_horizon | tie

    @property
    def difference(self) -> int:
        return self.expected - (self.stripe or 0)

    @property
    def to_credit(self) -> int:
        """The amount to credit the customer (units), 0 when it was billed too little."""
        return max(0, -self.difference)

    def as_dict(self) -> dict[str, Any]:
        return {
            "meter": self.meter,
            "customer_id": self.customer_id,
            "stripe_customer_id": self.stripe_customer_id,
            "period": self.period,
            "formula": self.formula,
            "stripe_value": self.stripe,
            "expected": self.expected,
            "exact_total": str(self.exact_total),
            "difference": self.difference,
            "to_credit": self.to_credit,
            "reason": self.reason,
        }

    def describe(self) -> str:
        held = "undefined (tie)" if self.stripe is None else str(self.stripe)
        return (
            f"{self.meter} {self.period} customer={self.customer_id} "
            f"stripe_customer={self.stripe_customer_id or '-'}: Stripe bills {held}, "
            f"meterstream {self.expected} (exact {self.exact_total}); difference "
            f"{self.difference:+d}, credit {self.to_credit} ({self.reason})"
        )


def uncorrectable(
    meter: str,
    formula: StripeFormula,
    period: str,
    expected: Mapping[str, tuple[Decimal, int]],
    rows: Iterable[LedgerRow],
    stripe_ids: Mapping[str, str],
    reason: str = "past_correction_horizon",
) -> list[Uncorrectable]:
    """Per customer of a period no longer corrected: Stripe's value (from the ledger's
    ``sent`` rows) against ``expected`` (customer -> (exact total, whole number Stripe
    should bill); a customer absent from it should be billed 0). Only the customers
    that differ, or whose ``last`` value is a tie, are returned."""
    by_customer: dict[str, list[LedgerRow]] = {}
    for row in rows:
        by_customer.setdefault(row.customer_id, []).append(row)
    out = []
    for customer in sorted(set(expected) | set(by_customer)):
        history = by_customer.get(customer, [])
        exact, whole = expected.get(customer, (Decimal(0), 0))
        held = stripe_holds(formula, history)
        if held is not None and held == whole:
            continue
        sent_to = next((r.stripe_customer_id for r in history if r.status == "sent"), "")
        out.append(
            Uncorrectable(
                meter,
                customer,
                sent_to or stripe_ids.get(customer, ""),
                period,
                formula,
                held,
                whole,
                exact,
                "tie" if held is None else reason,
            )
        )
    return out
