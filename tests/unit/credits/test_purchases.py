"""The purchase state machine: any order, duplicates, one grant; Stripe payloads."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.credits.burn import CreditBook
from meterstream.credits.purchases import (
    PaymentEvent,
    PaymentOutcome,
    Purchase,
    PurchaseState,
    PurchaseStatus,
    apply_event,
    event_of_payment_intent,
    parse_stripe_event,
    payment_intent_params,
    purchase_id,
)
from meterstream.errors import CreditsError

D = Decimal
PURCHASE = Purchase(
    purchase_id("acme", "req-1"),
    "acme",
    D("20.00"),
    "usd",
    created_ms=1_000_000,
    expires_after_ms=86_400_000,
)


def stripe_event(event_id: str, kind: str, created_s: int = 1_001, **obj) -> dict:
    payment_intent = {
        "id": "pi_1",
        "object": "payment_intent",
        "amount": 2000,
        "amount_received": 2000 if kind == "payment_intent.succeeded" else 0,
        "currency": "usd",
        "customer": "cus_1",
        "metadata": {
            "meterstream_purchase_id": PURCHASE.purchase_id,
            "meterstream_customer_id": "acme",
        },
        "last_payment_error": (
            {"code": "card_declined", "decline_code": "insufficient_funds"}
            if kind == "payment_intent.payment_failed"
            else None
        ),
    }
    payment_intent.update(obj)
    return {"id": event_id, "type": kind, "created": created_s, "data": {"object": payment_intent}}


def event(event_id: str, outcome: PaymentOutcome, created_s: int = 1_001) -> PaymentEvent:
    kind = {
        PaymentOutcome.SUCCEEDED: "payment_intent.succeeded",
        PaymentOutcome.FAILED: "payment_intent.payment_failed",
        PaymentOutcome.CANCELED: "payment_intent.canceled",
        PaymentOutcome.PROCESSING: "payment_intent.processing",
    }[outcome]
    parsed = parse_stripe_event(stripe_event(event_id, kind, created_s))
    assert parsed is not None
    return parsed


def test_parse_a_stripe_payment_intent_event() -> None:
    parsed = parse_stripe_event(stripe_event("evt_1", "payment_intent.payment_failed"))
    assert parsed == PaymentEvent(
        event_id="evt_1",
        outcome=PaymentOutcome.FAILED,
        purchase_id=PURCHASE.purchase_id,
        customer_id="acme",
        payment_intent_id="pi_1",
        amount_minor=2000,
        currency="usd",
        created_ms=1_001_000,
        failure_code="insufficient_funds",
    )
    assert parse_stripe_event({"id": "evt_2", "type": "customer.created"}) is None
    with pytest.raises(CreditsError, match="metadata"):
        parse_stripe_event(stripe_event("evt_3", "payment_intent.succeeded", metadata={}))
    with pytest.raises(CreditsError):
        parse_stripe_event(stripe_event("evt_4", "payment_intent.succeeded", amount_received="20"))
    with pytest.raises(CreditsError):
        parse_stripe_event(["not", "an", "object"])


def test_success_grants_once_with_the_purchase_terms() -> None:
    state = PurchaseState(PURCHASE, payment_intent_id="pi_1")
    state, effects = apply_event(state, event("evt_ok", PaymentOutcome.SUCCEEDED))
    assert state.status == PurchaseStatus.SUCCEEDED and effects.outcome == "applied"
    grant = effects.grant
    assert grant is not None
    assert (grant.grant_id, grant.amount, grant.effective_ms, grant.expires_ms) == (
        PURCHASE.purchase_id,
        D(20),
        1_001_000,
        1_001_000 + 86_400_000,
    )
    assert grant.origin == "purchase"
    assert apply_event(state, event("evt_ok", PaymentOutcome.SUCCEEDED))[1].outcome == "duplicate"
    again = apply_event(state, event("evt_ok2", PaymentOutcome.SUCCEEDED))[1]
    assert again.grant is None and again.outcome == "unchanged"
    # a failure delivered after the success is stale
    late = apply_event(state, event("evt_fail", PaymentOutcome.FAILED))
    assert late[0].status == PurchaseStatus.SUCCEEDED and late[1].outcome == "stale"


def test_failure_grants_nothing_and_reports_once() -> None:
    state = PurchaseState(PURCHASE)
    state, effects = apply_event(state, event("evt_f1", PaymentOutcome.FAILED))
    assert state.status == PurchaseStatus.FAILED and effects.newly_failed and not effects.grant
    assert state.failure_code == "insufficient_funds"
    _, again = apply_event(state, event("evt_f2", PaymentOutcome.CANCELED))
    assert not again.newly_failed and again.grant is None


def test_a_success_not_matching_the_purchase_grants_nothing() -> None:
    state = PurchaseState(PURCHASE, payment_intent_id="pi_1")
    wrong = parse_stripe_event(
        stripe_event("evt_x", "payment_intent.succeeded", amount_received=1999)
    )
    assert wrong is not None
    state, effects = apply_event(state, wrong)
    assert (
        effects.outcome == "mismatch" and effects.grant is None and "1999" in str(effects.problem)
    )
    other_pi = parse_stripe_event(stripe_event("evt_y", "payment_intent.succeeded", id="pi_2"))
    assert other_pi is not None
    assert apply_event(state, other_pi)[1].outcome == "mismatch"
    assert state.status == PurchaseStatus.CREATED
    with pytest.raises(CreditsError, match="not"):
        apply_event(PurchaseState(Purchase("pur_other", "acme", D(1), "usd", 0)), wrong)


outcomes = st.sampled_from(list(PaymentOutcome))


@given(
    st.lists(st.tuples(st.integers(0, 5), outcomes, st.integers(1_000, 1_010)), max_size=8),
    st.randoms(use_true_random=False),
)
def test_any_order_and_duplicates_give_one_grant_iff_any_success(history, rnd) -> None:
    # each event id stands for one Stripe event; a redelivery repeats it exactly
    unique = {event_id: (outcome, created) for event_id, outcome, created in history}
    deliveries = [(f"evt_{i}", *unique[i]) for i, _, _ in history]
    rnd.shuffle(deliveries)
    state = PurchaseState(PURCHASE)
    grants, failures = [], 0
    for event_id, outcome, created in deliveries:
        state, effects = apply_event(state, event(event_id, outcome, created))
        grants += [effects.grant] if effects.grant else []
        failures += effects.newly_failed
    outcomes_seen = {outcome for outcome, _ in unique.values()}
    succeeded = PaymentOutcome.SUCCEEDED in outcomes_seen
    failed = bool(outcomes_seen & {PaymentOutcome.FAILED, PaymentOutcome.CANCELED})
    assert len(grants) == (1 if succeeded else 0)
    assert state.status == (
        PurchaseStatus.SUCCEEDED
        if succeeded
        else PurchaseStatus.FAILED
        if failed
        else PurchaseStatus.CREATED
    )
    assert failures <= 1 and (failures == 0 or failed)
    # and a grant issued twice anyway (a crash) is one grant to the book
    if grants:
        book = CreditBook("acme", "usd")
        book.add_grant(grants[0], 2_000_000)
        assert book.add_grant(grants[0], 2_000_000).outcome == "duplicate"
        assert book.balance == D(20)


def test_payment_intent_parameters() -> None:
    params = payment_intent_params(PURCHASE, stripe_customer_id="cus_1", payment_method="pm_1")
    assert params == {
        "amount": 2000,
        "currency": "usd",
        "customer": "cus_1",
        "payment_method": "pm_1",
        "confirm": True,
        "off_session": True,
        "description": "meterstream credits 20 usd",
        "metadata": {
            "meterstream_purchase_id": PURCHASE.purchase_id,
            "meterstream_customer_id": "acme",
        },
    }
    yen = Purchase("pur_y", "acme", D(500), "jpy", 0)
    assert payment_intent_params(yen, stripe_customer_id="c", payment_method="p")["amount"] == 500
    assert purchase_id("acme", "req-1") == PURCHASE.purchase_id != purchase_id("acme", "req-2")
    with pytest.raises(CreditsError, match=r"whole number of 0\.01 usd"):
        Purchase("pur_z", "acme", D("1.001"), "usd", 0)
    with pytest.raises(CreditsError, match=r"whole number of 0\.01 kwd"):
        Purchase("pur_k", "acme", D("1.001"), "kwd", 0)  # Stripe: charges end in 0
    kwd = Purchase("pur_k", "acme", D("1.01"), "kwd", 0)
    assert payment_intent_params(kwd, stripe_customer_id="c", payment_method="p")["amount"] == 1010


# -- what the worker adds: read back from ClickHouse, a PaymentIntent read, a fixed expiry


def test_a_purchase_state_reads_back_from_its_json() -> None:
    state = PurchaseState(PURCHASE)
    state, _ = apply_event(state, event("evt_9", PaymentOutcome.SUCCEEDED))
    assert PurchaseState.from_json(state.to_json()) == state
    fixed = Purchase("pur_x", "acme", D("5.5"), "usd", created_ms=10, origin="recharge",
                     priority=3, expires_ms=5_000)  # fmt: skip
    assert Purchase.from_json(fixed.to_json()) == fixed


def test_a_fixed_expiry_is_the_grants_and_must_follow_the_purchase() -> None:
    fixed = Purchase("pur_x", "acme", D("5"), "usd", created_ms=1_000, expires_ms=9_000)
    assert fixed.grant(2_000).expires_ms == 9_000
    assert fixed.grant(9_500).expires_ms == 9_501  # paid too late: expires at once
    with pytest.raises(CreditsError, match="after the purchase"):
        Purchase("pur_x", "acme", D("5"), "usd", created_ms=1_000, expires_ms=1_000)


def test_a_payment_intent_read_is_an_event_of_its_final_status_only() -> None:
    intent = stripe_event("-", "payment_intent.succeeded")["data"]["object"]
    intent["status"] = "succeeded"
    found = event_of_payment_intent(intent, seen_ms=2_000_500)
    assert found is not None
    assert (found.event_id, found.outcome, found.created_ms) == (
        "pi:pi_1:succeeded", PaymentOutcome.SUCCEEDED, 2_000_000)  # fmt: skip
    declined = stripe_event("-", "payment_intent.payment_failed")["data"]["object"]
    declined["status"] = "requires_payment_method"
    found = event_of_payment_intent(declined, seen_ms=2_000_000)
    assert found is not None and found.outcome == PaymentOutcome.FAILED
    assert found.failure_code == "insufficient_funds"
    for status in ("processing", "requires_confirmation", "requires_action"):
        intent["status"] = status
        assert event_of_payment_intent(intent, seen_ms=2_000_000) is None
    fresh = dict(declined, last_payment_error=None)  # never tried yet: no outcome
    assert event_of_payment_intent(fresh, seen_ms=2_000_000) is None


def test_a_read_then_the_webhook_grant_once() -> None:
    intent = stripe_event("-", "payment_intent.succeeded")["data"]["object"]
    intent["status"] = "succeeded"
    read = event_of_payment_intent(intent, seen_ms=1_002_000)
    assert read is not None
    state, first = apply_event(PurchaseState(PURCHASE), read)
    state, second = apply_event(state, event("evt_late", PaymentOutcome.SUCCEEDED))
    assert first.grant is not None and second.grant is None
    assert second.outcome == "unchanged"
