"""Request bodies of the purchase and auto-recharge routes (pipeline/api/credits.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterstream.api.credits import purchase_from_body, recharge_from_body
from meterstream.errors import CreditsError


def test_a_purchase_body() -> None:
    made = purchase_from_body(
        "acme", {"amount": "20.00", "priority": 3, "expires": "2099-01-01", "purchase_id": "p1"},
        "usd",
    )  # fmt: skip
    assert (made.purchase_id, made.amount, made.currency, made.priority) == (
        "p1", Decimal("20.00"), "usd", 3)  # fmt: skip
    assert made.expires_ms == 4_070_908_800_000 and made.origin == "purchase"
    fresh = purchase_from_body("acme", {"amount": "5"}, "usd")
    assert fresh.purchase_id.startswith("pur_") and fresh.expires_ms is None
    assert fresh.purchase_id != purchase_from_body("acme", {"amount": "5"}, "usd").purchase_id


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"amount": 1.5}, "never a float"),
        ({"amount": "x"}, "not a decimal"),
        ({"amount": "0"}, "amount"),
        ({"amount": "1.001"}, "whole number of 0.01"),
        ({"amount": "5", "currency": "eur"}, "unknown field"),
        ({"amount": "5", "expires": "tomorrow"}, "RFC 3339"),
        ({"amount": "5", "expires": "2001-01-01"}, "after the purchase"),
        ({"amount": "5", "purchase_id": "x" * 101}, "purchase_id"),
        ([], "body must be JSON"),
    ],
)
def test_a_bad_purchase_body_is_refused_with_why(body: object, why: str) -> None:
    with pytest.raises(CreditsError, match=why):
        purchase_from_body("acme", body, "usd")


def test_a_recharge_body() -> None:
    rule = recharge_from_body("acme", {"threshold": "5", "target": "20"}, "usd")
    assert rule is not None and (rule.threshold, rule.target) == (Decimal(5), Decimal(20))
    assert recharge_from_body("acme", {"enabled": False}, "usd") is None
    with pytest.raises(CreditsError, match="takes no other field"):
        recharge_from_body("acme", {"enabled": False, "target": "20"}, "usd")
    with pytest.raises(CreditsError, match="above the threshold"):
        recharge_from_body("acme", {"threshold": "20", "target": "5"}, "usd")
    with pytest.raises(CreditsError, match="threshold"):
        recharge_from_body("acme", {"target": "5"}, "usd")
