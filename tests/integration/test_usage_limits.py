"""A plan's usage limit per period end to end (issue #25, item 4): a free-tier customer with
no credit grant sends events one at a time; its entitlement (the API and the compacted
``entitlements`` topic) flips to no access exactly at the event that brings the month's usage
to the limit (``usage >= limit``), with ``limit`` and ``remaining`` equal to a reference
computed here; a ``usage_percent`` alert fires against that limit. A customer with credits
on the same plan is cut at the limit with a balance left; a customer assigned to a plan
without limits keeps access past it (``limit`` null).
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import pytest

from meterstream.api.keys import KeyStore
from tests.harness import StackSlice, wait_until
from tests.integration.test_credits_end_to_end import METERS, _records
from tests.support.http import read_latencies, request_json, status_of
from tests.support.meters import chat

pytestmark = pytest.mark.integration

LIMIT = Decimal(1000)

# a free tier (no price, a limit on a meter it does not price) as the default plan
PLANS = """
plans:
  - name: free_tier
    currency: usd
    limits: {tokens: 1000}
  - name: pro
    currency: usd
    prices: [{meter: tokens, unit_price: 0.001}]
default_plan: free_tier
"""


def test_a_free_tier_loses_access_at_the_event_that_reaches_its_limit(stack: StackSlice) -> None:
    operator = KeyStore(stack.tmp / "state" / "api_keys.json").create("operator")[1]
    env = {"METERSTREAM_PLANS_FILE": str(stack.tmp / "plans.yaml"),
           "METERSTREAM_CREDITS_BURN_SECONDS": "0.5"}  # fmt: skip
    (stack.tmp / "plans.yaml").write_text(PLANS)
    worker = stack.start_worker(stack.meters_file(METERS), **env)
    base = f"{worker.web_url}/v1/customers/acme"
    wait_until(lambda: status_of(f"{base}/entitlements", operator) == 200, what="worker ready")
    assert status_of(f"{base}/credits", operator) == 404  # no grant, ever

    first = request_json(f"{base}/entitlements", operator)
    assert first["has_access"] is True
    assert first["usage"] == {
        "tokens": {"used": "0", "limit": "1000", "remaining": "1000", "limit_reached": False}
    }
    # a usage_percent alert at 90% of the plan's limit (900 tokens)
    ninety = {"thresholds": [{"threshold_id": "p90", "kind": "usage_percent", "meter": "tokens",
                              "percent": "90"}]}  # fmt: skip
    request_json(f"{base}/credits/alerts", operator, "PUT", ninety)

    def p90_fired() -> bool:
        states = request_json(f"{base}/credits/alerts", operator)["states"]
        return bool(states.get("p90", {}).get("fired"))

    # 300 + 300 + 300 + 99 = 999 (access), + 1 = 1000 (the limit: no access), + 50 = 1050
    steps = [300, 300, 300, 99, 1, 50]
    used = Decimal(0)
    start = time.time_ns() // 1_000_000 - 5_000
    seen: list[dict[str, Any]] = []
    for i, tokens in enumerate(steps):
        stack.produce(
            [
                {
                    "event_name": "chat",
                    "customer_id": "acme",
                    "idempotency_key": f"lim-{i}",
                    "timestamp": start + i,
                    "properties": {"tokens": tokens},
                }
            ]
        )
        used += tokens

        def answer(want: Decimal = used) -> dict[str, Any] | None:
            doc = request_json(f"{base}/entitlements", operator)
            return doc if Decimal(doc["usage"]["tokens"]["used"]) == want else None

        doc = wait_until(answer, timeout=60, what=f"usage {used} seen")
        assert doc is not None
        seen.append(doc)
        reference_remaining = max(LIMIT - used, Decimal(0))
        tokens_doc = doc["usage"]["tokens"]
        assert Decimal(tokens_doc["limit"]) == LIMIT
        assert Decimal(tokens_doc["remaining"]) == reference_remaining
        assert tokens_doc["limit_reached"] is (used >= LIMIT)
        assert doc["has_access"] is (used < LIMIT), (used, doc)
        assert doc["reasons"] == ([] if used < LIMIT else ["usage_limit"])
        assert doc["requires_balance"] is False
        if used >= LIMIT * Decimal("0.9"):
            wait_until(p90_fired, timeout=30, what="usage_percent fired")
        else:
            assert not p90_fired()

    # the flip is on the compacted topic: access while under the limit, then no access from
    # the record whose usage is exactly the limit on
    def flipped() -> list[dict[str, Any]] | None:
        records = _records(stack, "entitlements")
        return records if records and records[-1]["usage"]["tokens"]["used"] == "1050" else None

    records = wait_until(flipped, timeout=60, what="entitlements published")
    assert records is not None
    first_off = next(r for r in records if r["has_access"] is False)
    assert Decimal(first_off["usage"]["tokens"]["used"]) == LIMIT
    assert first_off["reasons"] == ["usage_limit"]
    assert first_off["usage"]["tokens"]["remaining"] == "0"
    for record in records:
        assert record["has_access"] is (Decimal(record["usage"]["tokens"]["used"]) < LIMIT)
    assert any(r["has_access"] for r in records)  # it had access before the flip

    def chat_seen(customer: str, tokens: int) -> dict[str, Any]:
        """Produce one chat event of ``tokens`` for ``customer`` (key ``CUSTOMER-1``); its
        entitlements once the worker has counted it."""
        stack.produce([chat(customer, f"{customer}-1", tokens, start)])
        url = f"{worker.web_url}/v1/customers/{customer}/entitlements"

        def seen() -> dict[str, Any] | None:
            doc = request_json(url, operator)
            return doc if doc["usage"].get("tokens", {}).get("used") == str(tokens) else None

        doc = wait_until(seen, timeout=60, what=f"{customer}'s usage seen")
        assert doc is not None
        return doc

    # a customer with credits on the same plan: a balance left, and still cut at the limit
    bob = f"{worker.web_url}/v1/customers/bob"
    grant = {"amount": "5", "grant_id": "bob-1"}
    request_json(f"{bob}/credits/grants", operator, "POST", grant)
    doc = chat_seen("bob", 1000)
    assert doc["has_access"] is False and doc["reasons"] == ["usage_limit"]
    assert doc["requires_balance"] is True and Decimal(doc["balance"]) == 5
    assert doc["usage"]["tokens"]["limit"] == "1000" and doc["usage"]["tokens"]["remaining"] == "0"

    # a customer assigned to a plan without limits (the assignment in force, not the
    # default plan): past 1000 tokens it keeps access, and its limit is null
    dave = f"{worker.web_url}/v1/customers/dave"
    month = time.strftime("%Y-%m-01", time.gmtime(start / 1000))
    request_json(f"{dave}/plans", operator, "PUT", {"plan": "pro", "from": month})
    doc = chat_seen("dave", 1500)
    assert doc is not None and doc["has_access"] is True and doc["reasons"] == []
    assert doc["usage"]["tokens"]["limit"] is None and doc["usage"]["tokens"]["remaining"] is None

    # served from the worker's state for a free-tier customer that has used it this month;
    # read from the record for one never seen (printed, not asserted: 2 shared cores)
    for who in ("acme", "carol"):
        url = f"{worker.web_url}/v1/customers/{who}/entitlements"
        print(f"entitlements GET over HTTP ({who}): {read_latencies(url, operator, 200)}")


def test_a_plan_change_takes_effect_without_new_usage(stack: StackSlice) -> None:
    """A free-tier customer at its limit moved to an unlimited plan gets access back (API and
    topic), and a customer with credits moved to a priced plan has its month's usage burned,
    both with no event after the change (on the old worker: only at the next usage)."""
    operator = KeyStore(stack.tmp / "state" / "api_keys.json").create("operator")[1]
    (stack.tmp / "plans.yaml").write_text(PLANS)
    worker = stack.start_worker(
        stack.meters_file(METERS), METERSTREAM_PLANS_FILE=str(stack.tmp / "plans.yaml")
    )
    acme, bob = (f"{worker.web_url}/v1/customers/{c}" for c in ("acme", "bob"))
    wait_until(lambda: status_of(f"{acme}/entitlements", operator) == 200, what="worker ready")
    request_json(f"{bob}/credits/grants", operator, "POST", {"amount": "5", "grant_id": "b-1"})
    start = time.time_ns() // 1_000_000 - 5_000
    stack.produce([chat("acme", "a-1", 1000, start), chat("bob", "b-1", 1000, start)])

    def used(base: str, want: str) -> dict[str, Any] | None:
        doc = request_json(f"{base}/entitlements", operator)
        return doc if doc["usage"].get("tokens", {}).get("used") == want else None

    off = wait_until(lambda: used(acme, "1000"), timeout=60, what="acme at its limit")
    assert off is not None and off["has_access"] is False and off["reasons"] == ["usage_limit"]
    assert wait_until(lambda: used(bob, "1000"), timeout=60, what="bob's usage seen")
    assert Decimal(request_json(f"{bob}/credits", operator)["balance"]) == 5  # free: no burn

    month = time.strftime("%Y-%m-01", time.gmtime(start / 1000))
    for base in (acme, bob):
        request_json(f"{base}/plans", operator, "PUT", {"plan": "pro", "from": month})

    def acme_back() -> dict[str, Any] | None:
        doc = request_json(f"{acme}/entitlements", operator)
        return doc if doc["has_access"] else None

    doc = wait_until(acme_back, timeout=30, what="acme's access back after the plan change")
    assert doc is not None and doc["reasons"] == [] and doc["usage"]["tokens"]["limit"] is None

    def acme_published() -> dict[str, Any] | None:
        mine = [r for r in _records(stack, "entitlements") if r["customer_id"] == "acme"]
        return mine[-1] if mine and mine[-1]["has_access"] else None

    last = wait_until(acme_published, timeout=30, what="acme's access on the topic")
    assert last is not None and last["usage"]["tokens"]["used"] == "1000"

    # 1000 tokens at 0.001 usd burned from bob's 5 usd, with no new event
    expected = Decimal(5) - Decimal(1000) * Decimal("0.001")
    wait_until(
        lambda: Decimal(request_json(f"{bob}/credits", operator)["balance"]) == expected,
        timeout=30,
        what="bob's usage priced on the new plan",
    )


UNLIMITED = """
plans:
  - name: pro
    currency: usd
    prices: [{meter: tokens, unit_price: 0.001}]
default_plan: pro
"""


def test_a_customer_read_once_is_followed_from_the_worker_state(stack: StackSlice) -> None:
    """A customer without credits or limits: its first entitlement read comes from the record,
    and from then on the worker follows its usage, so later reads (from memory) include the
    events sent after the first read, exactly."""
    operator = KeyStore(stack.tmp / "state" / "api_keys.json").create("operator")[1]
    (stack.tmp / "plans.yaml").write_text(UNLIMITED)
    worker = stack.start_worker(
        stack.meters_file(METERS), METERSTREAM_PLANS_FILE=str(stack.tmp / "plans.yaml")
    )
    erin = f"{worker.web_url}/v1/customers/erin/entitlements"
    wait_until(lambda: status_of(erin, operator) == 200, what="worker ready")
    start = time.time_ns() // 1_000_000 - 5_000
    stack.produce([chat("erin", "e-0", 100, start)])

    def used(want: str) -> dict[str, Any] | None:
        doc = request_json(erin, operator)
        return doc if doc["usage"].get("tokens", {}).get("used") == want else None

    assert wait_until(lambda: used("100"), timeout=60, what="erin's first usage")
    total = 100
    for i, tokens in enumerate([7, 30, 200], start=1):  # each seen after the first read
        stack.produce([chat("erin", f"e-{i}", tokens, start + i)])
        stack.produce([chat("erin", f"e-{i}", tokens, start + i)])  # a duplicate: once
        total += tokens
        doc = wait_until(lambda t=total: used(str(t)), timeout=60, what=f"erin at {total}")
        assert doc is not None and doc["has_access"] is True
    time.sleep(1.5)  # a later tick changes nothing: the duplicates counted once
    assert used(str(total)) is not None
    print(f"entitlements GET over HTTP (erin, followed): {read_latencies(erin, operator, 200)}")
    fresh = f"{worker.web_url}/v1/customers/frank/entitlements"
    print(f"entitlements GET over HTTP (frank, first read): {read_latencies(fresh, operator, 1)}")


def test_a_restarted_worker_decides_the_published_entitlements_again(stack: StackSlice) -> None:
    """A free-tier customer cut off at its limit, then the limit raised in the plans file
    while the worker is down: the restarted worker publishes its access back on the topic
    with no new usage (it reads the entitlements the products hold at start). Before, a
    restarted worker knew only the customers with credits, and the stale "no access" stayed
    on the topic until the customer's next usage, which a product gating on the topic would
    not send. A plain restart publishes nothing new."""
    operator = KeyStore(stack.tmp / "state" / "api_keys.json").create("operator")[1]
    plans = stack.tmp / "plans.yaml"
    plans.write_text(PLANS)
    env = {"METERSTREAM_PLANS_FILE": str(plans), "METERSTREAM_CREDITS_BURN_SECONDS": "0.5"}
    meters = stack.meters_file(METERS)
    worker = stack.start_worker(meters, **env)
    acme = f"{worker.web_url}/v1/customers/acme/entitlements"
    wait_until(lambda: status_of(acme, operator) == 200, what="worker ready")
    stack.produce([chat("acme", "a-1", 1000, time.time_ns() // 1_000_000 - 5_000)])

    def last_published() -> dict[str, Any] | None:
        mine = [r for r in _records(stack, "entitlements") if r["customer_id"] == "acme"]
        return mine[-1] if mine else None

    def published(has_access: bool, limit: str) -> dict[str, Any] | None:
        last = last_published()
        ok = last and last["has_access"] is has_access and last["usage"]["tokens"]["limit"] == limit
        return last if ok else None

    off = wait_until(lambda: published(False, "1000"), timeout=60, what="acme cut off")
    assert off is not None and off["usage"]["tokens"]["used"] == "1000"
    count = len(_records(stack, "entitlements"))

    def restarted() -> str:
        nonlocal worker
        assert worker.stop() == 0
        worker = stack.start_worker(meters, **env)
        wait_until(lambda: "published entitlement(s) to decide again" in worker.log(),
                   timeout=60, what="the topic read at start")  # fmt: skip
        return worker.web_url

    # a plain restart: acme is decided again (one burn tick) and nothing changed
    base = restarted()
    assert "credits: 1 published entitlement(s) to decide again" in worker.log()
    wait_until(lambda: status_of(f"{base}/v1/customers/acme/entitlements", operator) == 200,
               what="credits resumed")  # fmt: skip
    time.sleep(2.0)  # four burn intervals
    assert len(_records(stack, "entitlements")) == count

    # the limit raised while the worker is down: access back on the topic, no new usage
    plans.write_text(PLANS.replace("limits: {tokens: 1000}", "limits: {tokens: 5000}"))
    restarted()
    back = wait_until(lambda: published(True, "5000"), timeout=30, what="acme's access back")
    assert back is not None and back["usage"]["tokens"]["used"] == "1000"
    assert back["usage"]["tokens"]["remaining"] == "4000"
