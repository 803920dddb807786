"""Credit purchases paid before granted, and auto-recharge (issue #25, items 2 and 6), on the
real stack: a worker, the session broker, and the Stripe emulator acting as Stripe (its
customers, test payment methods, PaymentIntents and signed webhooks to the worker, with
duplicate and out-of-order deliveries turned on). The Stripe objects are made with the
official ``stripe`` SDK, as a user would against Stripe.

What is checked is what a user sees: the balance, the ledger lines in ClickHouse, the
purchases' status, and the ``payment_failed`` alerts a webhook receiver here gets (each
signature checked with the receiver's secret).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe

from meterstream.api.keys import KeyStore
from meterstream.embedded.processes import free_port
from tests.harness import AFTER_SIGKILL, REPO, StackSlice, Worker, http_json, wait_until
from tests.integration.test_credits_end_to_end import (
    HOUR,
    METERS,
    PLANS,
    Receiver,
    _iso,
)
from tests.support.http import request_json, status_of
from tests.support.meters import chat

pytestmark = pytest.mark.integration

PAID = ["payment_intent.succeeded", "payment_intent.payment_failed"]


def _stripe(emulator: str) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_emulator", base_addresses={"api": emulator}, max_network_retries=0
    )


class Shop:
    """A worker whose Stripe webhook is registered at the emulator (Stripe's API), an
    operator key, and the customers' Stripe side."""

    def __init__(self, stack: StackSlice, receiver: Receiver, **env: str) -> None:
        self.stack = stack
        self.receiver = receiver
        self.stripe = _stripe(stack.stripe_url)
        port = free_port()
        endpoint = self.stripe.v1.webhook_endpoints.create(
            {"url": f"http://127.0.0.1:{port}/v1/stripe/webhooks", "enabled_events": PAID}
        )
        self.secret = str(endpoint.secret)
        assert self.secret.startswith("whsec_")
        plans_file = stack.tmp / "plans.yaml"
        plans_file.write_text(PLANS)
        self.env = {
            "METERSTREAM_WEB_PORT": str(port),
            "METERSTREAM_PLANS_FILE": str(plans_file),
            "METERSTREAM_CREDITS_BURN_SECONDS": "0.5",
            "METERSTREAM_CREDITS_WEBHOOK_URL": receiver.url,
            "METERSTREAM_CREDITS_WEBHOOK_SECRET": "whsec_test_credits",
            "METERSTREAM_STRIPE_WEBHOOK_SECRET": self.secret,
            "METERSTREAM_STRIPE_API_BASE": stack.stripe_url,
            **env,
        }
        keys = KeyStore(stack.tmp / "state" / "api_keys.json")
        _, self.operator = keys.create("operator")
        self.worker: Worker = stack.start_worker(stack.meters_file(METERS), **self.env)
        self.url = self.worker.web_url
        wait_until(
            lambda: status_of(f"{self.url}/v1/customers/x/entitlements", self.operator) == 200,
            what="credits ready",
        )

    def customer(self, customer: str, payment_method: str) -> str:
        """A Stripe customer paying with ``payment_method``, mapped to ``customer``."""
        made = self.stripe.v1.customers.create(
            {"name": customer, "invoice_settings": {"default_payment_method": payment_method}}
        )
        self.call("PUT", f"/v1/stripe/customers/{customer}", {"stripe_customer_id": made.id})
        return str(made.id)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return request_json(f"{self.url}{path}", self.operator, method, body)

    def status(self, method: str, path: str, body: Any = None) -> int:
        return status_of(f"{self.url}{path}", self.operator, method, body)

    def balance(self, customer: str) -> Decimal | None:
        if self.status("GET", f"/v1/customers/{customer}/credits") == 404:
            return None
        return Decimal(self.call("GET", f"/v1/customers/{customer}/credits")["balance"])

    def purchases(self, customer: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call(
            "GET", f"/v1/customers/{customer}/credits/purchases"
        )["purchases"]
        return found

    def ledger(self, customer: str) -> list[dict[str, Any]]:
        return self.worker.sql(
            "SELECT kind, grant_id, toString(amount) AS amount FROM credit_ledger FINAL"
            f" WHERE customer_id = '{customer}' ORDER BY at, kind"
        )


def _faults(stack: StackSlice, on: bool) -> None:
    """The emulator's webhook delivery faults (``/_emulator/faults``): every event
    delivered twice, and held until its PaymentIntent is final, then sent newest first."""
    faults = {"webhook_duplicates": on, "webhook_out_of_order": on}
    http_json(f"{stack.stripe_url}/_emulator/faults", faults)


@pytest.fixture
def faulty(stack: StackSlice) -> Iterator[StackSlice]:
    """``stack`` with the webhook faults on (off again after the test)."""
    _faults(stack, True)
    try:
        yield stack
    finally:
        _faults(stack, False)


@pytest.fixture
def faulty_shop(faulty: StackSlice) -> Shop:
    """A shop on the stack with the webhook faults on, its alerts to a fresh receiver."""
    return Shop(faulty, Receiver())


def _metric(shop: Shop, sample: str) -> float:
    text = urllib.request.urlopen(f"{shop.url}/metrics", timeout=30).read().decode()
    found = [line for line in text.splitlines() if line.startswith(sample + " ")]
    return float(found[0].split()[-1]) if found else 0.0


def _statuses(shop: Shop, customer: str = "acme") -> list[str]:
    return [p["status"] for p in shop.purchases(customer)]


def _payment_failed(receiver: Receiver) -> list[dict[str, Any]]:
    return [d for d in receiver.accepted().values() if d["type"] == "payment_failed"]


def _now() -> int:
    return time.time_ns() // 1_000_000


def test_a_paid_purchase_grants_once_and_a_declined_one_grants_nothing(
    faulty_shop: Shop,
) -> None:
    shop = faulty_shop
    stack, receiver = shop.stack, shop.receiver
    shop.customer("acme", "pm_card_visa")
    shop.customer("bob", "pm_card_chargeDeclined")

    # no Stripe customer: refused, nothing recorded or charged
    assert shop.status("POST", "/v1/customers/nobody/credits/purchases", {"amount": "5"}) == 409
    assert shop.purchases("nobody") == []
    # a restricted key cannot buy; a float is refused
    keys = KeyStore(stack.tmp / "state" / "api_keys.json")
    _, acme_key = keys.create("acme only", "acme")
    path = f"{shop.url}/v1/customers/acme/credits/purchases"
    assert status_of(path, acme_key, "POST", {"amount": "20.00"}) == 403
    assert shop.status("POST", "/v1/customers/acme/credits/purchases", {"amount": 1.5}) == 400

    # acme pays 20.00 on a good card: granted once, whatever the deliveries
    made = shop.call(
        "POST", "/v1/customers/acme/credits/purchases",
        {"amount": "20.00", "purchase_id": "pur-acme-1", "priority": 10},
    )  # fmt: skip
    assert made["purchase_id"] == "pur-acme-1" and made["status"] in ("created", "succeeded")
    assert made["payment_intent_id"].startswith("pi_")
    wait_until(lambda: shop.balance("acme") == Decimal(20), timeout=60, what="acme granted")
    wait_until(lambda: _statuses(shop) == ["succeeded"], what="recorded")
    # a retried request is the same purchase (Stripe's idempotency key), not a second charge
    again = shop.call(
        "POST", "/v1/customers/acme/credits/purchases",
        {"amount": "20.00", "purchase_id": "pur-acme-1", "priority": 10},
    )  # fmt: skip
    assert again["payment_intent_id"] == made["payment_intent_id"]
    assert shop.status("POST", "/v1/customers/acme/credits/purchases",
                       {"amount": "30.00", "purchase_id": "pur-acme-1"}) == 409  # fmt: skip
    time.sleep(3)  # the duplicate and reordered deliveries land
    assert shop.balance("acme") == Decimal(20)
    lines = [r for r in shop.ledger("acme") if r["kind"] in ("grant", "recharge")]
    assert lines == [{"kind": "grant", "grant_id": "pur-acme-1", "amount": "20"}]
    (bought,) = shop.purchases("acme")
    assert bought["status"] == "succeeded"
    assert any(e.startswith("evt_") for e in bought["stripe_event_ids"])
    intent = shop.stripe.v1.payment_intents.retrieve(made["payment_intent_id"])
    assert (intent.status, intent.amount, intent.currency) == ("succeeded", 2000, "usd")
    assert intent.metadata["meterstream_purchase_id"] == "pur-acme-1"
    # the emulator did deliver the success twice, and the worker answered both 2xx
    sent = http_json(
        f"{stack.stripe_url}/_emulator/webhook_deliveries?type=payment_intent.succeeded"
    )["data"]
    assert len(sent) >= 2 and all(a["outcome"] == "delivered" for a in sent)
    assert _metric(shop, 'meterstream_stripe_webhooks_total{result="duplicate"}') >= 1
    assert _metric(shop, 'meterstream_credit_purchases_total{outcome="succeeded"}') == 1

    # bob's card is declined: failed at once, nothing granted, payment_failed once
    failed = shop.call("POST", "/v1/customers/bob/credits/purchases", {"amount": "15.00"})
    assert failed["status"] == "failed"
    wait_until(lambda: len(_payment_failed(receiver)) == 1, timeout=60, what="payment_failed")
    time.sleep(3)  # Stripe's failure webhooks (duplicated) arrive: still one alert
    (alert,) = _payment_failed(receiver)
    assert alert["customer_id"] == "bob" and alert["purchase_id"] == failed["purchase_id"]
    assert Decimal(alert["value"]) == Decimal(15) and alert["failure_code"]
    assert len({e for e, _, _ in receiver.calls}) == 1
    assert shop.balance("bob") is None  # no grant, no book
    assert shop.purchases("bob")[0]["status"] == "failed"
    rows = shop.worker.sql("SELECT count() AS n FROM credit_grants FINAL WHERE customer_id = 'bob'")
    assert rows[0]["n"] == 0

    # the purchases survive a restart: read back, and nothing is granted again
    assert shop.worker.stop() == 0
    shop.worker = stack.start_worker(stack.meters_file(METERS), **shop.env)
    wait_until(lambda: shop.status("GET", "/v1/customers/acme/credits") == 200, what="resumed")
    assert [p["status"] for p in shop.purchases("acme")] == ["succeeded"]
    assert shop.balance("acme") == Decimal(20)
    receiver.server.shutdown()


def _signed(secret: str, body: bytes, t: int) -> str:
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def _post_webhook(url: str, body: bytes, signature: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    req = urllib.request.Request(f"{url}/v1/stripe/webhooks", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_webhook_with_a_bad_signature_or_an_old_timestamp_is_refused(stack: StackSlice) -> None:
    receiver = Receiver()
    shop = Shop(stack, receiver)
    shop.customer("acme", "pm_card_chargeDeclined")
    made = shop.call("POST", "/v1/customers/acme/credits/purchases", {"amount": "7.00"})
    assert made["status"] == "failed"
    # a forged success for that purchase: the right shape, signed wrongly or too long ago
    forged = json.dumps({
        "id": "evt_forged", "object": "event", "type": "payment_intent.succeeded",
        "created": int(time.time()),
        "data": {"object": {
            "id": made["payment_intent_id"] or "pi_forged", "object": "payment_intent",
            "amount": 700, "amount_received": 700, "currency": "usd", "status": "succeeded",
            "metadata": {"meterstream_purchase_id": made["purchase_id"],
                         "meterstream_customer_id": "acme"},
        }},
    }).encode()  # fmt: skip
    now = int(time.time())
    assert _post_webhook(shop.url, forged, None) == 400
    assert _post_webhook(shop.url, forged, _signed("whsec_wrong", forged, now)) == 400
    assert _post_webhook(shop.url, forged, _signed(shop.secret, forged, now - 400)) == 400
    assert _post_webhook(shop.url, forged, f"t={now},v1=00") == 400
    tampered = forged.replace(b"700", b"900")
    assert _post_webhook(shop.url, tampered, _signed(shop.secret, forged, now)) == 400
    time.sleep(1)
    assert shop.balance("acme") is None
    (purchase,) = shop.purchases("acme")
    assert purchase["status"] == "failed" and "evt_forged" not in purchase["stripe_event_ids"]
    assert _metric(shop, 'meterstream_stripe_webhooks_total{result="rejected"}') == 5
    # the same bytes, signed with the secret: accepted (the signature was the only problem)
    assert _post_webhook(shop.url, forged, _signed(shop.secret, forged, now)) == 200
    wait_until(lambda: shop.balance("acme") == Decimal(7), timeout=30, what="granted")
    receiver.server.shutdown()


def test_auto_recharge_buys_once_per_crossing_and_a_decline_turns_it_off(
    faulty_shop: Shop,
) -> None:
    shop = faulty_shop
    stack, receiver = shop.stack, shop.receiver
    stripe_id = shop.customer("acme", "pm_card_visa")
    start = {"amount": "10.00", "grant_id": "start", "effective": _iso(_now() - HOUR)}
    shop.call("POST", "/v1/customers/acme/credits/grants", start)
    rule = {"threshold": "5", "target": "20"}
    doc = shop.call("PUT", "/v1/customers/acme/credits/recharge", rule)
    assert doc["enabled"] is True and doc["rule"]["target"] == "20"
    assert shop.purchases("acme") == []  # 10 > 5: nothing to buy

    # 6.00 of usage: 10 -> 4, at or below 5: one purchase of 16.00 back to 20
    stack.produce([chat("acme", f"u1-{i}", 3000, _now()) for i in range(2)])
    wait_until(lambda: shop.balance("acme") == Decimal(20), timeout=90, what="recharged to 20")
    wait_until(lambda: _statuses(shop) == ["succeeded"], what="recorded")  # after the grant
    (first,) = shop.purchases("acme")
    assert first["origin"] == "recharge" and first["status"] == "succeeded"
    assert Decimal(first["amount"]) == Decimal(16)
    time.sleep(3)  # duplicated deliveries: no second grant, no second purchase
    assert shop.balance("acme") == Decimal(20)
    assert len(shop.purchases("acme")) == 1
    recharges = [r for r in shop.ledger("acme") if r["kind"] == "recharge"]
    assert recharges == [{"kind": "recharge", "grant_id": first["purchase_id"], "amount": "16"}]

    # a second crossing: 17.00 more -> 3; one more purchase, of 17.00
    stack.produce([chat("acme", f"u2-{i}", 8500, _now()) for i in range(2)])
    wait_until(lambda: len(shop.purchases("acme")) == 2, timeout=90, what="second recharge")
    wait_until(lambda: shop.balance("acme") == Decimal(20), timeout=90, what="back to 20")
    wait_until(lambda: _statuses(shop) == ["succeeded"] * 2, what="recorded")
    second = shop.purchases("acme")[1]
    assert Decimal(second["amount"]) == Decimal(17) and second["status"] == "succeeded"

    # the card now declines: the next crossing's purchase fails, auto-recharge goes off,
    # one payment_failed alert (signed) reaches the receiver; no purchase after that
    shop.stripe.v1.customers.update(
        stripe_id, {"invoice_settings": {"default_payment_method": "pm_card_chargeDeclined"}}
    )
    stack.produce([chat("acme", f"u3-{i}", 8000, _now()) for i in range(2)])
    wait_until(lambda: len(_payment_failed(receiver)) == 1, timeout=90, what="payment_failed")
    recharge = "/v1/customers/acme/credits/recharge"
    wait_until(lambda: shop.call("GET", recharge)["enabled"] is False, what="turned off")
    assert shop.call("GET", recharge)["state"]["disabled_reason"]
    third = shop.purchases("acme")[2]
    assert third["status"] == "failed" and third["origin"] == "recharge"
    (alert,) = _payment_failed(receiver)
    assert alert["purchase_id"] == third["purchase_id"] and alert["customer_id"] == "acme"
    assert shop.balance("acme") == Decimal(4)
    stack.produce([chat("acme", "u4", 1000, _now())])
    wait_until(lambda: shop.balance("acme") == Decimal(3), timeout=60, what="burned on")
    time.sleep(3)
    assert len(shop.purchases("acme")) == 3
    assert len(_payment_failed(receiver)) == 1

    # off is durable: a restart keeps it off
    assert shop.worker.stop() == 0
    shop.worker = stack.start_worker(stack.meters_file(METERS), **shop.env)
    wait_until(lambda: shop.status("GET", "/v1/customers/acme/credits") == 200, what="resumed")
    doc = shop.call("GET", "/v1/customers/acme/credits/recharge")
    assert doc["enabled"] is False
    time.sleep(2)
    assert len(shop.purchases("acme")) == 3
    receiver.server.shutdown()


def test_a_lost_webhook_loses_no_paid_purchase(stack: StackSlice) -> None:
    """Every delivery dropped (Stripe gives up): the worker's catch-up reads the
    PaymentIntent back (METERSTREAM_CREDITS_PURCHASE_CATCH_UP_SECONDS after the purchase,
    here 8 s rather than a minute) and grants it, once."""
    http_json(f"{stack.stripe_url}/_emulator/faults", {"webhook_drop_first": 100})
    try:
        receiver = Receiver()
        shop = Shop(stack, receiver, METERSTREAM_CREDITS_PURCHASE_CATCH_UP_SECONDS="8")
        shop.customer("acme", "pm_card_visa")
        made = shop.call("POST", "/v1/customers/acme/credits/purchases", {"amount": "12.50"})
        assert made["status"] == "created"
        time.sleep(4)
        assert shop.balance("acme") is None  # no webhook reached the worker
        wait_until(lambda: shop.balance("acme") == Decimal("12.5"), timeout=150,
                   what="granted by the catch-up")  # fmt: skip
        wait_until(lambda: _statuses(shop) == ["succeeded"], what="recorded")
        (bought,) = shop.purchases("acme")
        assert bought["status"] == "succeeded"
        assert bought["stripe_event_ids"] == [f"pi:{made['payment_intent_id']}:succeeded"]
        time.sleep(12)  # another catch-up round changes nothing
        assert shop.balance("acme") == Decimal("12.5")
        receiver.server.shutdown()
    finally:
        http_json(f"{stack.stripe_url}/_emulator/faults", {"webhook_drop_first": 0})


def test_meterstream_run_buys_credits_out_of_the_box(tmp_path: Path) -> None:
    """``meterstream run`` (no Stripe key): its emulator sends the payment webhooks to the
    worker with a secret both got at start; a purchase is granted with nothing configured."""
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    env |= {"METERSTREAM_STATE_DIR": str(state), "METERSTREAM_EMBEDDED_BROKER": "tansu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterstream.cli", "run", "--meters", "meters.example.yaml"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: (state / "endpoints.json").exists(), timeout=180, what="the stack")
        emulator = json.loads((state / "endpoints.json").read_text())["stripe_api_base"]
        made = _stripe(emulator).v1.customers.create(
            {"invoice_settings": {"default_payment_method": "pm_card_visa"}}
        )

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "meterstream.cli", *args], cwd=REPO, env=env,
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip

        assert cli("customers", "set", "acme", made.id).returncode == 0
        bought = cli("credits", "purchase", "acme", "20.00", "--format", "json")
        assert bought.returncode == 0, bought.stderr
        assert json.loads(bought.stdout)["payment_intent_id"].startswith("pi_")

        def balance() -> str:
            shown = cli("credits", "balance", "acme", "--format", "json")
            return str(json.loads(shown.stdout)["balance"]) if shown.returncode == 0 else ""

        wait_until(lambda: balance() == "20", timeout=60, what="granted")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def test_a_worker_killed_while_stripe_is_paying_grants_once(faulty: StackSlice) -> None:
    """SIGKILL right after the purchase, before Stripe's webhooks (delayed, duplicated,
    retried) reach the worker: once restarted it is granted exactly once."""
    stack = faulty
    # Duplicated and held 8 s, in order: an out-of-order hold is released the moment the
    # PaymentIntent succeeds (the delay does not apply), which could beat the answer.
    held = {"webhook_duplicates": True, "webhook_out_of_order": False, "webhook_delay_ms": 8000}
    http_json(f"{stack.stripe_url}/_emulator/faults", held)
    receiver = Receiver()
    shop = Shop(stack, receiver)
    shop.customer("acme", "pm_card_visa")
    made = shop.call("POST", "/v1/customers/acme/credits/purchases", {"amount": "9.99"})
    assert made["status"] == "created"
    shop.worker.kill()
    shop.worker = stack.start_worker(stack.meters_file(METERS), **shop.env)
    wait_until(
        lambda: shop.balance("acme") == Decimal("9.99"), timeout=AFTER_SIGKILL, what="granted"
    )
    wait_until(lambda: _statuses(shop) == ["succeeded"], what="recorded")
    time.sleep(5)  # what is still owed or duplicated lands
    assert shop.balance("acme") == Decimal("9.99")
    grants = [r for r in shop.ledger("acme") if r["kind"] == "grant"]
    assert grants == [{"kind": "grant", "grant_id": made["purchase_id"], "amount": "9.99"}]
    http_json(f"{stack.stripe_url}/_emulator/faults", {"webhook_delay_ms": 0})
    receiver.server.shutdown()


def test_a_purchase_stripe_refuses_for_good_fails_at_once(stack: StackSlice) -> None:
    """Below Stripe's minimum charge (0.50 usd): Stripe's 400 ``amount_too_small`` fails
    the purchase at once (a retry under the same key gets the same answer)."""
    receiver = Receiver()
    shop = Shop(stack, receiver)
    shop.customer("acme", "pm_card_visa")
    made = shop.call("POST", "/v1/customers/acme/credits/purchases", {"amount": "0.10"})
    assert (made["status"], made["failure_code"]) == ("failed", "amount_too_small")
    assert made["payment_intent_id"] in (None, "")
    wait_until(lambda: len(_payment_failed(receiver)) == 1, timeout=60, what="payment_failed")
    assert shop.balance("acme") is None
    receiver.server.shutdown()
