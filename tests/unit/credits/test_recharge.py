"""Auto-recharge: one purchase per crossing, rounded up, off after a failed payment."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterstream.credits.burn import CreditBook
from meterstream.credits.grants import Grant
from meterstream.credits.recharge import (
    AutoRecharge,
    RechargeState,
    enable,
    evaluate,
    purchase_result,
)
from meterstream.credits.spend import SpendChange
from meterstream.credits.status import CustomerStatus
from meterstream.errors import CreditsError

D = Decimal
RULE = AutoRecharge("acme", "usd", threshold=D(5), target=D(20))


def status(balance: str, cause: str, at: int = 0) -> CustomerStatus:
    return CustomerStatus("acme", "usd", at, cause, D(balance))


def test_one_purchase_per_crossing_for_target_minus_balance_rounded_up() -> None:
    state = RechargeState()
    state, none = evaluate(RULE, state, status("5.01", "le_a"))
    assert none is None
    state, purchase = evaluate(RULE, state, status("4.996", "le_b", 7))
    assert purchase is not None
    assert purchase.amount == D("15.01")  # 20 - 4.996 = 15.004, rounded up
    assert (purchase.origin, purchase.created_ms, purchase.customer_id) == ("recharge", 7, "acme")
    assert purchase.purchase_id.startswith("rch_") and state.pending == purchase.purchase_id
    # still below while the payment runs, and after it succeeded: no second purchase
    state, again = evaluate(RULE, state, status("3", "le_c"))
    assert again is None
    state = purchase_result(state, purchase.purchase_id, succeeded=True)
    state, again = evaluate(RULE, state, status("2", "le_d"))
    assert again is None
    # the grant lifts the balance: re-armed; the next crossing buys again, under a new id
    state, _ = evaluate(RULE, state, status("17.01", "le_e"))
    state, second = evaluate(RULE, state, status("-1.5", "le_f"))
    assert second is not None and second.amount == D("21.50")
    assert second.purchase_id != purchase.purchase_id


def test_the_same_step_replayed_derives_the_same_purchase() -> None:
    first = evaluate(RULE, RechargeState(), status("4", "le_x"))[1]
    replay = evaluate(RULE, RechargeState(), status("4", "le_x"))[1]
    assert first == replay and first is not None


def test_a_failed_payment_turns_auto_recharge_off_until_enabled() -> None:
    state, purchase = evaluate(RULE, RechargeState(), status("4", "le_x"))
    assert purchase is not None
    # an outcome for another purchase changes nothing
    assert purchase_result(state, "rch_other", succeeded=False) == state
    state = purchase_result(state, purchase.purchase_id, succeeded=False, failure_code="declined")
    assert not state.enabled and state.disabled_reason == "declined" and state.pending is None
    assert evaluate(RULE, state, status("0", "le_y"))[1] is None
    # the customer fixed their card: on, armed, and the same situation buys under a new id
    state = enable(state)
    state, retry = evaluate(RULE, state, status("4", "le_x"))
    assert retry is not None and retry.purchase_id != purchase.purchase_id
    assert retry.amount == D(16)


def test_the_rule_is_checked() -> None:
    with pytest.raises(CreditsError, match="above the threshold"):
        AutoRecharge("acme", "usd", threshold=D(20), target=D(20))
    with pytest.raises(CreditsError, match=r"whole number of 0\.01 usd"):
        AutoRecharge("acme", "usd", threshold=D("5.001"), target=D(20))
    with pytest.raises(CreditsError, match="does not match"):
        evaluate(RULE, RechargeState(), CustomerStatus("acme", "eur", 0, "c", D(0)))


def test_recharge_with_the_burn_engine_lands_on_the_target() -> None:
    book = CreditBook("acme", "usd")
    book.add_grant(Grant("g", "acme", D(20), "usd", 0), 0)
    state = RechargeState()
    purchases = []
    for i, cost in enumerate(["6", "10", "6.25"]):
        step = book.apply(SpendChange("acme", f"w{i}", i, D(cost), "usd", i), i)
        cause = step.entries[-1].entry_id
        state, purchase = evaluate(RULE, state, status(str(step.balance), cause, i))
        if purchase is not None:
            purchases.append(purchase)
    # 20 - 6 - 10 = 4 crosses; 20 - 4 = 16 is bought; the $6.25 spend runs during payment
    assert [p.amount for p in purchases] == [D(16)]
    assert book.balance == D("-2.25")
    state = purchase_result(state, purchases[0].purchase_id, succeeded=True)
    book.add_grant(purchases[0].grant(10), 10)
    assert book.balance == D("13.75")  # the grant paid the uncovered $2.25 first
    state, none = evaluate(RULE, state, status(str(book.balance), "le_next", 10))
    assert none is None and state.armed


@given(st.lists(st.integers(-3000, 3000), min_size=1, max_size=40), st.data())
def test_never_two_purchases_in_one_crossing(balances: list[int], data: st.DataObject) -> None:
    state = RechargeState()
    bought_in_crossing = False
    for i, cents in enumerate(balances):
        balance = D(cents) / 100
        if balance > RULE.threshold:
            bought_in_crossing = False
        state, purchase = evaluate(RULE, state, status(str(balance), f"le_{i}", i))
        if purchase is not None:
            assert not bought_in_crossing and balance <= RULE.threshold
            assert purchase.amount >= RULE.target - balance
            assert purchase.amount - (RULE.target - balance) < D("0.01")
            bought_in_crossing = True
            state = purchase_result(state, purchase.purchase_id, succeeded=data.draw(st.booleans()))
            if not state.enabled:
                state = enable(state) if data.draw(st.booleans()) else state
                bought_in_crossing = False if state.enabled else bought_in_crossing
