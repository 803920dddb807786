from decimal import Decimal

from meterstream.credits.entitlements import decide
from meterstream.credits.status import CustomerStatus

D = Decimal
FREE_TIER = {"tokens": D(10_000)}


def status(balance: str, used: int | None = None, limits=FREE_TIER) -> CustomerStatus:
    usage = {} if used is None else {"tokens": D(used)}
    return CustomerStatus("acme", "usd", 5, "le_1", D(balance), "2025-01", usage, limits)


def test_access_ends_at_zero_balance_or_at_the_usage_limit() -> None:
    assert decide(status("0.01", 9_999)).has_access
    assert decide(status("0", 0)).reasons == ("balance_exhausted",)
    assert decide(status("5", 10_000)).reasons == ("usage_limit",)
    both = decide(status("-1", 10_020))
    assert not both.has_access and both.reasons == ("balance_exhausted", "usage_limit")
    # a free plan (no credits) ends only at its limit
    assert decide(status("0", 9_999), requires_balance=False).has_access
    assert not decide(status("0", 10_000), requires_balance=False).has_access


def test_the_json_shape() -> None:
    doc = decide(status("-0.25", 10_020, {"tokens": D(10_000), "images": D(5)})).to_json()
    assert doc == {
        "customer_id": "acme",
        "has_access": False,
        "reasons": ["balance_exhausted", "usage_limit"],
        "balance": "-0.25",
        "currency": "usd",
        "period": "2025-01",
        "usage": {
            "images": {"used": "0", "limit": "5", "remaining": "5", "limit_reached": False},
            "tokens": {"used": "10020", "limit": "10000", "remaining": "0", "limit_reached": True},
        },
        "requires_balance": True,
        "at_ms": 5,
        "cause": "le_1",
    }
    no_limit = decide(status("3", 7, {})).to_json()["usage"]["tokens"]
    assert no_limit == {"used": "7", "limit": None, "remaining": None, "limit_reached": False}


def test_a_flip_is_a_change_of_access_or_reasons() -> None:
    a, b = decide(status("5", 1)), decide(status("4", 2))
    assert a.same_access(b) and not a.same_access(None)
    assert not a.same_access(decide(status("0", 2)))


def test_a_meter_with_negative_usage_is_a_valid_status() -> None:
    # a min or latest meter (a balance gauge) can be negative: the status (and with it
    # the burn and every grant of the customer) must not be refused for it
    found = decide(
        CustomerStatus("acme", "usd", 5, "le_1", D(5), "2025-01", {"min_balance": D("-588.88")})
    )
    assert found.has_access
    assert found.to_json()["usage"]["min_balance"]["used"] == "-588.88"
