"""How the bench matches credit balances to the events they include (bench/credit_latency.py;
the measuring itself runs with `make bench`)."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from bench.credit_latency import (
    UNIT_PRICE,
    balance_latencies,
    event_cost,
    first_including,
    tick_start_ms,
)
from bench.run import parse_args


def chat(customer: str, tokens: int) -> bytes:
    return orjson.dumps(
        {"customer_id": customer, "event_name": "ai_chat", "properties": {"tokens": tokens}}
    )


def test_each_event_matches_the_first_balance_at_or_below_its_cumulative_cost() -> None:
    events = [("a", 1000, Decimal("1.5")), ("b", 1100, Decimal("2")), ("c", 1200, Decimal("0.5"))]
    # 100 -> 98.5 (a), then a balance that includes b and c at once
    balances = [(1500.0, Decimal("100")), (1700.0, Decimal("98.5")), (2600.0, Decimal("96"))]
    assert first_including(events, Decimal(100), balances) == {
        "a": 1700.0,
        "b": 2600.0,
        "c": 2600.0,
    }


def test_a_balance_short_of_an_event_does_not_include_it() -> None:
    events = [("a", 0, Decimal("1.000")), ("b", 0, Decimal("0.001"))]
    # 0.999 fell: a is in, b (0.001 more) is not yet
    assert first_including(events, Decimal(10), [(5.0, Decimal("9.000"))]) == {"a": 5.0}
    assert first_including(events, Decimal(10), []) == {}


def test_only_priced_events_of_sampled_customers_count_and_the_end_balance_is_checked() -> None:
    sent = {"k1": 1000, "k2": 1100, "k3": 1200, "k4": 1300}
    payloads = {
        "k1": chat("acme", 1000),  # 1.000 usd
        "k2": orjson.dumps({"customer_id": "acme", "event_name": "api_request"}),
        "k3": chat("other", 5),  # not sampled
        "k4": chat("acme", 500),  # 0.500 usd
    }
    assert event_cost(payloads["k1"]) == ("acme", Decimal(1000) * UNIT_PRICE)
    assert event_cost(payloads["k2"]) is None
    start = {"acme": Decimal(50)}
    seen = {"acme": [(1400.0, Decimal("49")), (2300.0, Decimal("48.5"))]}
    waits, missing, problems = balance_latencies(sent, payloads, start, seen)
    assert sorted(waits) == [0.4, 1.0]
    assert (missing, problems) == (0, [])

    # a balance that fell further than the events sent is reported, not matched silently
    too_far = {"acme": [(1400.0, Decimal("48"))]}
    _, missing, problems = balance_latencies(sent, payloads, start, too_far)
    assert missing == 0
    assert problems == ["acme: balance 48, expected 48.500"]

    _, missing, problems = balance_latencies(sent, payloads, start, {})
    assert missing == 2
    assert problems == ["acme: balance 50, expected 48.500"]


def test_the_burn_tick_of_an_entitlement_is_read_from_its_cause() -> None:
    assert tick_start_ms("usage:1733470000123") == 1733470000123
    assert tick_start_ms("grant:bench-c1") is None
    assert tick_start_ms("usage:") is None
    assert tick_start_ms(None) is None


def test_credit_customers_default_and_off() -> None:
    assert parse_args([]).credit_customers == 25
    assert parse_args(["--credit-customers", "0"]).credit_customers == 0
    with pytest.raises(SystemExit):
        parse_args(["--credit-customers", "-1"])
