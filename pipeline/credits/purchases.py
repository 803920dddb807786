"""Credit purchases: paid before granted, from Stripe's webhooks in any order.

How a purchase is paid (the wiring's Stripe call; the payload is built here): a
**PaymentIntent** created and confirmed at once (``confirm=true, off_session=true``) on the
customer's default payment method, with the purchase id as Stripe's idempotency key and in
``metadata``. Not an invoice: an invoice adds a draft that Stripe finalizes up to an hour
later, e-mails, and several more states, while a prepaid purchase must settle now; a
PaymentIntent has one success signal (``payment_intent.succeeded``) and one failure signal
(``payment_intent.payment_failed``), and a retried create with the same key never charges
twice. (Stripe does not apply a customer's default payment method to a PaymentIntent by
itself: the wiring reads ``invoice_settings.default_payment_method`` and passes it.)

The state machine (:func:`apply_event`): ``created`` -> ``succeeded`` | ``failed``.

- Events are deduplicated by Stripe event id.
- The outcome depends on the *set* of events, not their order: ``succeeded`` wins over
  ``failed``/``canceled`` whichever arrives first (a PaymentIntent that failed once can be
  retried and succeed; one that succeeded cannot fail afterwards, so a failure delivered
  late is stale). ``processing`` changes nothing.
- The transition into ``succeeded`` returns the grant, once; its ``grant_id`` is the
  purchase id, so even a grant issued twice (a crash between grant and state) is one grant
  to the book. The grant starts at the success event's time (Stripe's ``created``), never
  before the purchase was made: deterministic on replay.
- The transition into ``failed`` reports ``newly_failed`` once (the ``payment_failed`` alert
  and, for a recharge, auto-recharge off).
- A success whose amount, currency or PaymentIntent differ from the purchase grants nothing
  and is reported as ``mismatch`` (money moved that the purchase did not ask for: an
  operator must look).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from typing import Any

from meterstream.credits.grants import DEFAULT_PRIORITY, MAX_PRIORITY, Grant
from meterstream.credits.money import (
    amount_problem,
    canon,
    charge_unit,
    currency_problem,
    in_minor_units_problem,
    to_stripe_amount,
)
from meterstream.credits.values import (
    MAX_MS,
    JsonFields,
    id_problem,
    int_problem,
    ms_problem,
    raise_problems,
    stable_id,
)
from meterstream.errors import CreditsError

METADATA_PURCHASE = "meterstream_purchase_id"
METADATA_CUSTOMER = "meterstream_customer_id"
MAX_PURCHASE_ID_CHARS = 100


class PurchaseStatus(StrEnum):
    CREATED = "created"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class PaymentOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    PROCESSING = "processing"


_STRIPE_TYPES = {
    "payment_intent.succeeded": PaymentOutcome.SUCCEEDED,
    "payment_intent.payment_failed": PaymentOutcome.FAILED,
    "payment_intent.canceled": PaymentOutcome.CANCELED,
    "payment_intent.processing": PaymentOutcome.PROCESSING,
}
#: The Stripe event types a purchase listens to (a webhook endpoint's ``enabled_events``).
STRIPE_EVENT_TYPES = tuple(_STRIPE_TYPES)


@dataclass(frozen=True)
class Purchase(JsonFields):
    """A request to buy ``amount`` of credit; the grant it leads to has these terms."""

    purchase_id: str
    customer_id: str
    amount: Decimal
    currency: str
    created_ms: int
    origin: str = "purchase"  # or "recharge"
    priority: int = DEFAULT_PRIORITY
    expires_after_ms: int | None = None
    expires_ms: int | None = None  # a fixed expiry (wins over ``expires_after_ms``)

    def __post_init__(self) -> None:
        problems = [
            id_problem(self.purchase_id, "purchase_id", max_chars=MAX_PURCHASE_ID_CHARS),
            id_problem(self.customer_id, "customer_id"),
            amount_problem(self.amount, "amount", positive=True),
            currency_problem(self.currency),
            ms_problem(self.created_ms, "created_ms"),
            None if self.origin in ("purchase", "recharge") else "origin: purchase or recharge",
            int_problem(self.priority, "priority", 0, MAX_PRIORITY),
        ]
        if self.expires_after_ms is not None:
            problems.append(int_problem(self.expires_after_ms, "expires_after_ms", 1, MAX_MS))
        if self.expires_ms is not None:
            problems.append(ms_problem(self.expires_ms, "expires_ms"))
            if isinstance(self.expires_ms, int) and self.expires_ms <= self.created_ms:
                problems.append("expires_ms must be after the purchase is made")
        raise_problems("purchase", problems)
        unit = charge_unit(self.currency)
        raise_problems(
            "purchase",
            [in_minor_units_problem(Decimal(self.amount), self.currency, "amount", unit=unit)],
        )
        object.__setattr__(self, "amount", Decimal(self.amount))

    def grant(self, effective_ms: int) -> Grant:
        """The grant this purchase gives once paid (``grant_id`` = ``purchase_id``).

        A fixed ``expires_ms`` that the payment came too late for gives a grant that
        expires at once (it stays in the ledger: the money was taken).
        """
        expires = None
        if self.expires_ms is not None:
            expires = max(self.expires_ms, effective_ms + 1)
        elif self.expires_after_ms is not None:
            expires = min(effective_ms + self.expires_after_ms, MAX_MS)
        return Grant(
            grant_id=self.purchase_id,
            customer_id=self.customer_id,
            amount=self.amount,
            currency=self.currency,
            effective_ms=effective_ms,
            expires_ms=expires,
            priority=self.priority,
            origin=self.origin,
        )

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Purchase:
        """The inverse of :meth:`to_json` (checked like any purchase)."""
        return cls(
            purchase_id=doc["purchase_id"],
            customer_id=doc["customer_id"],
            amount=Decimal(str(doc["amount"])),
            currency=doc["currency"],
            created_ms=doc["created_ms"],
            origin=doc.get("origin", "purchase"),
            priority=doc.get("priority", DEFAULT_PRIORITY),
            expires_after_ms=doc.get("expires_after_ms"),
            expires_ms=doc.get("expires_ms"),
        )


def purchase_id(customer_id: str, request_key: str) -> str:
    """A purchase id (``pur_`` + hash) from the caller's request key: one purchase per key.

    The CLI and API take an idempotency key from the caller (or make one), so a retried
    request finds the same purchase and Stripe the same idempotency key.
    """
    return stable_id("pur_", customer_id, request_key)


def payment_intent_params(
    purchase: Purchase, *, stripe_customer_id: str, payment_method: str
) -> dict[str, Any]:
    """The ``PaymentIntent.create`` parameters (send with ``idempotency_key=purchase_id``)."""
    raise_problems(
        "payment intent",
        [
            id_problem(stripe_customer_id, "stripe_customer_id"),
            id_problem(payment_method, "payment_method"),
        ],
    )
    return {
        "amount": to_stripe_amount(purchase.amount, purchase.currency),
        "currency": purchase.currency.lower(),
        "customer": stripe_customer_id,
        "payment_method": payment_method,
        "confirm": True,
        "off_session": True,
        "description": f"meterstream credits {canon(purchase.amount)} {purchase.currency}",
        "metadata": {
            METADATA_PURCHASE: purchase.purchase_id,
            METADATA_CUSTOMER: purchase.customer_id,
        },
    }


@dataclass(frozen=True)
class PaymentEvent:
    """The part of a Stripe ``payment_intent.*`` event a purchase needs."""

    event_id: str
    outcome: PaymentOutcome
    purchase_id: str
    customer_id: str
    payment_intent_id: str
    amount_minor: int
    currency: str
    created_ms: int
    failure_code: str | None = None


def parse_stripe_event(event: Any) -> PaymentEvent | None:
    """A verified Stripe event as a :class:`PaymentEvent`; ``None`` for other event types.

    Raises :class:`CreditsError` for a payment event that is malformed or does not name a
    meterstream purchase in its metadata (dead-letter it with the message).
    """
    if not isinstance(event, Mapping):
        raise CreditsError("a Stripe event must be a JSON object")
    outcome = _STRIPE_TYPES.get(event.get("type"))  # type: ignore[arg-type]
    if outcome is None:
        return None
    obj = _at(event, "data", "object")
    metadata = obj.get("metadata") or {}
    error = obj.get("last_payment_error") or {}
    if not isinstance(metadata, Mapping) or not isinstance(error, Mapping):
        raise CreditsError("malformed Stripe payment event: metadata or last_payment_error")
    received = "amount_received" if outcome == PaymentOutcome.SUCCEEDED else "amount"
    created = _at(event, "created")
    parsed = PaymentEvent(
        event_id=_at(event, "id"),
        outcome=outcome,
        purchase_id=_at(metadata, METADATA_PURCHASE, path="data.object.metadata"),
        customer_id=_at(metadata, METADATA_CUSTOMER, path="data.object.metadata"),
        payment_intent_id=_at(obj, "id", path="data.object"),
        amount_minor=_at(obj, received, path="data.object"),
        currency=str(_at(obj, "currency", path="data.object")),
        created_ms=created * 1000 if isinstance(created, int) else created,
        failure_code=error.get("decline_code") or error.get("code"),
    )
    raise_problems(
        "Stripe payment event",
        [
            id_problem(parsed.event_id, "id"),
            id_problem(parsed.purchase_id, "metadata.purchase_id", max_chars=MAX_PURCHASE_ID_CHARS),
            id_problem(parsed.customer_id, "metadata.customer_id"),
            id_problem(parsed.payment_intent_id, "data.object.id"),
            int_problem(parsed.amount_minor, "amount", 0, 10**18),
            currency_problem(parsed.currency),
            ms_problem(parsed.created_ms, "created"),
            None
            if parsed.failure_code is None or isinstance(parsed.failure_code, str)
            else "last_payment_error.code must be a string",
        ],
    )
    return parsed


def _at(doc: Any, *keys: str, path: str = "") -> Any:
    """``doc[k1][k2]...``, or a :class:`CreditsError` naming the missing path."""
    for key in keys:
        path = f"{path}.{key}" if path else key
        if not isinstance(doc, Mapping) or key not in doc:
            raise CreditsError(f"malformed Stripe payment event: no {path}")
        doc = doc[key]
    return doc


@dataclass(frozen=True)
class PurchaseState(JsonFields):
    purchase: Purchase
    status: PurchaseStatus = PurchaseStatus.CREATED
    payment_intent_id: str | None = None
    seen_event_ids: frozenset[str] = frozenset()
    granted_ms: int | None = None  # when the grant starts (set on success)
    failure_code: str | None = None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> PurchaseState:
        """The inverse of :meth:`to_json`."""
        return cls(
            purchase=Purchase.from_json(doc["purchase"]),
            status=PurchaseStatus(doc["status"]),
            payment_intent_id=doc.get("payment_intent_id"),
            seen_event_ids=frozenset(doc.get("seen_event_ids") or ()),
            granted_ms=doc.get("granted_ms"),
            failure_code=doc.get("failure_code"),
        )


def event_of_payment_intent(intent: Mapping[str, Any], *, seen_ms: int) -> PaymentEvent | None:
    """A :class:`PaymentEvent` from a PaymentIntent object read from Stripe (the create
    answer, a decline's error, or ``GET /v1/payment_intents/{id}``), ``None`` while it has
    no outcome yet (``requires_*``, ``processing``).

    Its event id, ``pi:<id>:<status>``, is ours (Stripe's event ids start ``evt_``): the
    same read twice is one event, and a webhook for the same outcome later is
    ``unchanged``. ``seen_ms`` dates it (a PaymentIntent has no time of its outcome).
    """
    status = intent.get("status")
    if status == "succeeded":
        kind = "payment_intent.succeeded"
    elif status == "canceled":
        kind = "payment_intent.canceled"
    elif status == "requires_payment_method" and intent.get("last_payment_error"):
        kind = "payment_intent.payment_failed"  # a declined confirmation
    else:
        return None
    return parse_stripe_event(
        {
            "id": f"pi:{intent.get('id')}:{status}",
            "type": kind,
            "created": seen_ms // 1000,
            "data": {"object": intent},
        }
    )


@dataclass(frozen=True)
class PurchaseEffects:
    """What one event did: ``outcome`` and, at most once per purchase, a grant or a failure.

    ``outcome``: ``applied``, ``duplicate`` (event id seen), ``stale`` (a failure after a
    success), ``unchanged`` (a repeat of the current status, ``processing``), ``mismatch``.
    """

    outcome: str
    grant: Grant | None = None
    newly_failed: bool = False
    problem: str | None = field(default=None)


def apply_event(state: PurchaseState, event: PaymentEvent) -> tuple[PurchaseState, PurchaseEffects]:
    """Move ``state`` by one webhook event (see the module docstring)."""
    purchase = state.purchase
    if event.purchase_id != purchase.purchase_id or event.customer_id != purchase.customer_id:
        raise CreditsError(
            f"event {event.event_id!r} is for purchase {event.purchase_id!r} of "
            f"{event.customer_id!r}, not {purchase.purchase_id!r} of {purchase.customer_id!r}"
        )
    if event.event_id in state.seen_event_ids:
        return state, PurchaseEffects("duplicate")
    seen = replace(state, seen_event_ids=state.seen_event_ids | {event.event_id})
    if state.payment_intent_id not in (None, event.payment_intent_id):
        problem = (
            f"payment intent {event.payment_intent_id!r}, expected {state.payment_intent_id!r}"
        )
        return seen, PurchaseEffects("mismatch", problem=problem)
    if event.outcome == PaymentOutcome.SUCCEEDED:
        expected = to_stripe_amount(purchase.amount, purchase.currency)
        if (event.amount_minor, event.currency) != (expected, purchase.currency):
            problem = (
                f"received amount {event.amount_minor} {event.currency}, "
                f"expected {expected} {purchase.currency} (Stripe's integer amounts)"
            )
            return seen, PurchaseEffects("mismatch", problem=problem)
        if state.status == PurchaseStatus.SUCCEEDED:
            return seen, PurchaseEffects("unchanged")
        effective = max(event.created_ms, purchase.created_ms)
        done = replace(
            seen,
            status=PurchaseStatus.SUCCEEDED,
            payment_intent_id=event.payment_intent_id,
            granted_ms=effective,
            failure_code=None,
        )
        return done, PurchaseEffects("applied", grant=purchase.grant(effective))
    if event.outcome == PaymentOutcome.PROCESSING:
        return replace(seen, payment_intent_id=event.payment_intent_id), PurchaseEffects(
            "unchanged"
        )
    # failed or canceled
    if state.status == PurchaseStatus.SUCCEEDED:
        return seen, PurchaseEffects("stale")
    if state.status == PurchaseStatus.FAILED:
        return seen, PurchaseEffects("unchanged")
    failed = replace(
        seen,
        status=PurchaseStatus.FAILED,
        payment_intent_id=event.payment_intent_id,
        failure_code=event.failure_code or event.outcome.value,
    )
    return failed, PurchaseEffects("applied", newly_failed=True)
