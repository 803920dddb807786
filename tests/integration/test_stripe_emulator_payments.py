"""The Stripe emulator's payments side (issue #25 item 2), driven through the real ``stripe``
SDK and raw HTTP: customers, test payment methods, PaymentIntents, idempotent replays,
events, and signed webhooks to a receiver in the test (signatures checked here with
our own HMAC), with the delivery faults and a restart on a state file."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import stripe

from meterstream.embedded.processes import free_port
from meterstream.sinks.stripe.emulator.options import WebhookOption
from meterstream.sinks.stripe.emulator.server import BackgroundEmulator
from meterstream.sinks.stripe.emulator.state import FaultConfig
from tests.support.http import serve_posts

KEY = "sk_test_emulator"
PAY_EVENTS = ["payment_intent.succeeded", "payment_intent.payment_failed"]


class Receiver:
    """A webhook endpoint in the test: records every request; answers from ``script``
    (one status per request, then ``then``)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[int] = []
        self.then = 200
        self.hang = 0.0  # seconds to wait before answering
        self.server, self.url = serve_posts(self._answer, "/stripe")

    def _answer(self, request: BaseHTTPRequestHandler, body: bytes) -> int:
        status = self.script.pop(0) if self.script else self.then
        time.sleep(self.hang)
        self.requests.append(
            {
                "signature": request.headers.get("Stripe-Signature"),
                "content_type": request.headers.get("Content-Type"),
                "body": body,
                "event": json.loads(body),
                "status": status,
                "at": time.monotonic(),
            }
        )
        return status

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def types(self) -> list[str]:
        return [r["event"]["type"] for r in self.requests]


def verify(secret: str, request: dict[str, Any]) -> int:
    """Check the Stripe-Signature of ``request`` with our own HMAC; its timestamp."""
    parts = [p.split("=", 1) for p in request["signature"].split(",")]
    assert [name for name, _ in parts] == ["t", "v1"], request["signature"]
    t, v1 = parts[0][1], parts[1][1]
    mac = hmac.new(secret.encode(), t.encode() + b"." + request["body"], hashlib.sha256)
    assert hmac.compare_digest(mac.hexdigest(), v1), "signature does not match the body"
    return int(t)


def wait_for(what: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s")


def call(
    base: str, method: str, path: str, params: dict[str, str] | None = None, key: str | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A raw form-encoded Stripe request: (status, JSON body, headers)."""
    data = None if params is None else urllib.parse.urlencode(params).encode()
    headers = {"Authorization": f"Bearer {KEY}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


@pytest.fixture(scope="module")
def running() -> Iterator[BackgroundEmulator]:
    """One emulator for the module, retrying webhooks after 100 ms (then doubling)."""
    with BackgroundEmulator(faults=FaultConfig(webhook_retry_base_ms=100)) as emu:
        yield emu


@pytest.fixture
def emulator(running: BackgroundEmulator) -> BackgroundEmulator:
    running.reset()  # back to the faults it started with
    return running


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def sdk_for(url: str) -> stripe.StripeClient:
    return stripe.StripeClient(KEY, base_addresses={"api": url}, max_network_retries=0)


@pytest.fixture
def sdk(emulator: BackgroundEmulator) -> stripe.StripeClient:
    return sdk_for(emulator.url)


def paying_customer(sdk: stripe.StripeClient, card: str = "pm_card_visa") -> Any:
    return sdk.v1.customers.create(
        {"metadata": {"meterstream_customer_id": "acme"}, "payment_method": card,
         "invoice_settings": {"default_payment_method": card}}
    )  # fmt: skip


def purchase_params(customer: Any, amount: int = 2000, pm: str | None = None) -> dict[str, Any]:
    """What the worker sends (pipeline/credits/purchases.py ``payment_intent_params``)."""
    return {
        "amount": amount,
        "currency": "usd",
        "customer": customer.id,
        "payment_method": pm or customer.invoice_settings.default_payment_method,
        "confirm": True,
        "off_session": True,
        "description": "meterstream credits 20.00 usd",
        "metadata": {"meterstream_purchase_id": "pur_1", "meterstream_customer_id": "acme"},
    }


def endpoint(sdk: stripe.StripeClient, url: str, events: list[str] | None = None) -> Any:
    return sdk.v1.webhook_endpoints.create({"url": url, "enabled_events": events or PAY_EVENTS})


# ------------------------------------------------------------------ PaymentIntents


def test_customer_default_payment_method_and_a_succeeding_confirm(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator
) -> None:
    customer = paying_customer(sdk)
    default = customer.invoice_settings.default_payment_method
    assert customer.id.startswith("cus_") and default.startswith("pm_")
    assert default != "pm_card_visa"  # attached: a new payment method, as Stripe does
    fetched = sdk.v1.customers.retrieve(customer.id)
    assert fetched.invoice_settings.default_payment_method == default
    assert fetched.metadata.to_dict() == {"meterstream_customer_id": "acme"}
    pm = sdk.v1.payment_methods.retrieve(default)
    assert (pm.customer, pm.card.last4) == (customer.id, "4242")

    intent = sdk.v1.payment_intents.create(purchase_params(customer), {"idempotency_key": "pur_1"})
    assert intent.status == "succeeded"
    assert (intent.amount, intent.amount_received, intent.currency) == (2000, 2000, "usd")
    assert intent.payment_method == default and intent.customer == customer.id
    assert intent.metadata["meterstream_purchase_id"] == "pur_1"
    assert intent.last_payment_error is None and intent.latest_charge.startswith("ch_")
    assert sdk.v1.payment_intents.retrieve(intent.id).to_dict() == intent.to_dict()

    # another customer's payment method is refused; an update sets or clears the default
    other = sdk.v1.customers.create({})
    status, body, _ = call(
        emulator.url, "POST", "/v1/payment_intents",
        {"amount": "2000", "currency": "usd", "customer": other.id, "payment_method": default,
         "confirm": "true"},
    )  # fmt: skip
    assert (status, body["error"]["param"]) == (400, "payment_method")
    updated = sdk.v1.customers.update(
        other.id, {"invoice_settings": {"default_payment_method": "pm_card_mastercard"}}
    )
    assert updated.invoice_settings.default_payment_method.startswith("pm_")
    cleared = sdk.v1.customers.update(
        other.id, {"invoice_settings": {"default_payment_method": ""}}
    )
    assert cleared.invoice_settings.default_payment_method is None
    status, body, _ = call(emulator.url, "GET", "/v1/customers/cus_nobody")
    assert (status, body["error"]["code"]) == (404, "resource_missing")


@pytest.mark.parametrize(
    ("card", "decline_code", "message"),
    [
        ("pm_card_chargeDeclined", "generic_decline", "Your card was declined."),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds",
         "Your card has insufficient funds."),
    ],
)  # fmt: skip
def test_a_declined_confirm_answers_402_with_the_payment_intent(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, card: str, decline_code: str,
    message: str,
) -> None:  # fmt: skip
    customer = paying_customer(sdk, card)
    params = purchase_params(customer)
    form = {
        "amount": "2000", "currency": "usd", "customer": customer.id,
        "payment_method": params["payment_method"], "confirm": "true", "off_session": "true",
        "metadata[meterstream_purchase_id]": "pur_1",
    }  # fmt: skip
    status, body, headers = call(emulator.url, "POST", "/v1/payment_intents", form)
    assert status == 402
    assert headers["Stripe-Should-Retry"] == "false"
    error = body["error"]
    assert (error["type"], error["code"], error["decline_code"]) == (
        "card_error", "card_declined", decline_code,
    )  # fmt: skip
    assert error["message"] == message
    intent = error["payment_intent"]
    assert intent["status"] == "requires_payment_method"
    assert intent["payment_method"] is None and intent["amount_received"] == 0
    assert intent["last_payment_error"]["decline_code"] == decline_code
    assert intent["last_payment_error"]["payment_method"]["id"] == params["payment_method"]
    assert intent["metadata"] == {"meterstream_purchase_id": "pur_1"}
    # the PaymentIntent exists, as on Stripe, and the SDK raises CardError with it
    assert sdk.v1.payment_intents.retrieve(intent["id"]).status == "requires_payment_method"
    with pytest.raises(stripe.CardError) as raised:
        sdk.v1.payment_intents.create(params)
    assert raised.value.http_status == 402 and raised.value.code == "card_declined"
    assert raised.value.error.payment_intent.status == "requires_payment_method"
    # a declined PaymentIntent can be confirmed again on a card that works
    retried = sdk.v1.payment_intents.confirm(intent["id"], {"payment_method": "pm_card_visa"})
    assert (retried.status, retried.amount_received) == ("succeeded", 2000)
    with pytest.raises(stripe.InvalidRequestError) as again:
        sdk.v1.payment_intents.confirm(intent["id"], {"payment_method": "pm_card_visa"})
    assert again.value.code == "payment_intent_unexpected_state"


def test_idempotency_key_replays_the_answer_and_charges_once(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator
) -> None:
    customer = paying_customer(sdk)
    pm = customer.invoice_settings.default_payment_method
    form = {
        "amount": "2000", "currency": "usd", "customer": customer.id, "payment_method": pm,
        "confirm": "true", "off_session": "true", "metadata[meterstream_purchase_id]": "pur_9",
    }  # fmt: skip
    first = call(emulator.url, "POST", "/v1/payment_intents", form, key="pur_9")
    second = call(emulator.url, "POST", "/v1/payment_intents", form, key="pur_9")
    assert first[0] == second[0] == 200
    assert first[1] == second[1]
    assert second[2].get("Idempotent-Replayed") == "true"
    changed = call(emulator.url, "POST", "/v1/payment_intents", {**form, "amount": "3000"}, "pur_9")
    assert changed[0] == 400 and changed[1]["error"]["type"] == "idempotency_error"
    # a declined charge is executed too: its 402 is replayed, not charged again
    declined = {**form, "payment_method": "pm_card_chargeDeclined"}
    d1 = call(emulator.url, "POST", "/v1/payment_intents", declined, key="pur_10")
    d2 = call(emulator.url, "POST", "/v1/payment_intents", declined, key="pur_10")
    assert d1[0] == d2[0] == 402 and d1[1] == d2[1]
    assert d2[2].get("Idempotent-Replayed") == "true"
    intents = sdk.v1.payment_intents.list({"customer": customer.id}).data
    assert len(intents) == 2
    events = sdk.v1.events.list({"type": "payment_intent.*"}).data
    assert sorted(e.type for e in events) == [
        "payment_intent.created", "payment_intent.created",
        "payment_intent.payment_failed", "payment_intent.succeeded",
    ]  # fmt: skip
    assert {e.request.idempotency_key for e in events} == {"pur_9", "pur_10"}


def test_a_lost_answer_is_recovered_by_its_idempotency_key_only(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator
) -> None:
    customer = paying_customer(sdk)
    emulator.set_faults(lost_answer_rate=1.0)
    lost = call(emulator.url, "POST", "/v1/payment_intents", _valid(customer), key="pur_lost")
    assert lost[0] == 500 and lost[2]["Stripe-Should-Retry"] == "true"
    retried = call(emulator.url, "POST", "/v1/payment_intents", _valid(customer), key="pur_lost")
    assert retried[0] == 200 and retried[2].get("Idempotent-Replayed") == "true"
    # the SDK retries the 500 by itself, with its own idempotency key: one charge
    emulator.set_faults(lost_answer_rate=0.5, seed=7)
    retrying = stripe.StripeClient(KEY, base_addresses={"api": emulator.url}, max_network_retries=8)
    for _ in range(4):
        assert retrying.v1.payment_intents.create(purchase_params(customer)).status == "succeeded"
    emulator.set_faults(lost_answer_rate=0.0)
    assert len(sdk.v1.payment_intents.list({"limit": 100}).data) == 5
    assert emulator.stats()["faults_injected"] >= 2
    # without a key, a lost answer's retry charges again (what the key is for)
    emulator.set_faults(lost_answer_rate=1.0)
    for _ in range(2):
        assert call(emulator.url, "POST", "/v1/payment_intents", _valid(customer))[0] == 500
    emulator.set_faults(lost_answer_rate=0.0)
    assert len(sdk.v1.payment_intents.list({"limit": 100}).data) == 7


@pytest.mark.parametrize(
    ("change", "status", "code", "param"),
    [
        ({"amount": "49"}, 400, "amount_too_small", "amount"),
        ({"amount": "0"}, 400, "amount_too_small", "amount"),
        ({"amount": "12.5"}, 400, "parameter_invalid_integer", "amount"),
        ({"amount": "100000000"}, 400, "amount_too_large", "amount"),
        ({"currency": "xyz"}, 400, None, "currency"),
        ({"customer": "cus_nobody"}, 400, "resource_missing", "customer"),
        ({"payment_method": "pm_nothing"}, 400, "resource_missing", "payment_method"),
        ({"payment_method": None}, 400, "payment_intent_unexpected_state", "payment_method"),
        ({"confirm": "false"}, 400, None, "off_session"),
        ({"surprise": "1"}, 400, "parameter_unknown", "surprise"),
    ],
)
def test_refused_payment_intents_make_nothing(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, change: dict[str, Any], status: int,
    code: str | None, param: str,
) -> None:  # fmt: skip
    customer = paying_customer(sdk)
    form = {k: v for k, v in {**_valid(customer), **change}.items() if v is not None}
    got, body, _ = call(emulator.url, "POST", "/v1/payment_intents", form, key="refused")
    assert got == status, body
    assert body["error"].get("code") == code and body["error"]["param"] == param
    if code == "amount_too_small":
        assert body["error"]["message"] == "Amount must be at least $0.50 usd"  # Stripe's words
    assert sdk.v1.payment_intents.list().data == []
    assert sdk.v1.events.list().data == []
    # a refused request is not saved: the key works for a valid request afterwards
    ok = call(emulator.url, "POST", "/v1/payment_intents", _valid(customer), "refused")
    assert ok[0] == 200, ok[1]


def _valid(customer: Any) -> dict[str, str]:
    return {
        "amount": "2000", "currency": "usd", "customer": customer.id,
        "payment_method": customer.invoice_settings.default_payment_method, "confirm": "true",
        "off_session": "true",
    }  # fmt: skip


def test_customers_made_through_the_api_pass_the_meter_event_customer_check(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator
) -> None:
    emulator.register_customers("cus_registered")
    meter = sdk.v1.billing.meters.create(
        {"display_name": "Tokens", "event_name": "tokens_pay",
         "default_aggregation": {"formula": "sum"},
         "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
         "value_settings": {"event_payload_key": "value"}}
    )  # fmt: skip
    customer = sdk.v1.customers.create({})
    for who in ("cus_registered", customer.id):
        sdk.v1.billing.meter_events.create(
            {"event_name": meter.event_name, "payload": {"stripe_customer_id": who, "value": "3"}}
        )
    with pytest.raises(stripe.InvalidRequestError) as refused:
        sdk.v1.billing.meter_events.create(
            {
                "event_name": meter.event_name,
                "payload": {"stripe_customer_id": "cus_x", "value": "1"},
            }
        )
    assert refused.value.code == "resource_missing"
    assert len(emulator.events()) == 2


@pytest.mark.parametrize(
    ("path", "form", "param"),
    [
        ("/v1/customers", {"metadata[k]": "v" * 501}, "metadata[k]"),
        ("/v1/customers", {"metadata[a][b]": "c"}, "metadata[a]"),
        ("/v1/customers", {"invoice_settings": "pm_card_visa"}, "invoice_settings"),
        ("/v1/customers", {"invoice_settings[default_payment_method]": "pm_bogus"},
         "invoice_settings[default_payment_method]"),
        ("/v1/customers", {"payment_method": "pm_card_visa",
                           "invoice_settings[default_payment_method]": "pm_bogus"},
         "invoice_settings[default_payment_method]"),
        ("/v1/customers", {"id": "cus_mine"}, "id"),
        ("/v1/customers", {"payment_method[x]": "1"}, "payment_method"),
        ("/v1/payment_intents", {"amount[]": "1", "currency": "usd"}, "amount"),
        ("/v1/payment_intents", {"amount": "100", "currency": "usd", "confirm": "maybe"},
         "confirm"),
        ("/v1/payment_intents", {"amount": "100", "currency": "usd", "customer[a]": "b"},
         "customer"),
        ("/v1/webhook_endpoints", {"url": "ftp://x/", "enabled_events[]": "*"}, "url"),
        ("/v1/webhook_endpoints", {"url": "http://x/", "enabled_events[]": "payment_intent.*"},
         "enabled_events"),
        ("/v1/webhook_endpoints", {"url": "http://x/", "enabled_events[a]": "*"},
         "enabled_events"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_with_the_parameter_named(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, path: str, form: dict[str, str],
    param: str,
) -> None:  # fmt: skip
    status, body, _ = call(emulator.url, "POST", path, form)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param
    assert sdk.v1.customers.list().data == []
    assert sdk.v1.webhook_endpoints.list().data == []


# ------------------------------------------------------------------------ webhooks


def test_a_succeeded_payment_arrives_signed_at_the_endpoint(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, receiver: Receiver
) -> None:
    hook = endpoint(sdk, receiver.url)
    assert hook.id.startswith("we_") and hook.secret.startswith("whsec_")
    customer = paying_customer(sdk)
    intent = sdk.v1.payment_intents.create(purchase_params(customer), {"idempotency_key": "pur_1"})
    request = wait_for(lambda: receiver.requests and receiver.requests[0])
    assert abs(verify(hook.secret, request) - time.time()) < 300
    assert request["content_type"].startswith("application/json")
    event = request["event"]
    assert event["id"].startswith("evt_") and event["object"] == "event"
    assert (event["type"], event["livemode"]) == ("payment_intent.succeeded", False)
    assert event["api_version"] and isinstance(event["created"], int)
    assert event["data"]["object"] == intent.to_dict()
    assert event["request"]["idempotency_key"] == "pur_1"
    # Stripe's own verifier accepts it too
    parsed = stripe.Webhook.construct_event(
        request["body"].decode(), request["signature"], hook.secret
    )
    assert parsed.id == event["id"]
    assert sdk.v1.events.retrieve(event["id"]).to_dict() == event
    time.sleep(0.5)
    assert receiver.types() == ["payment_intent.succeeded"]  # created is not enabled
    deliveries = emulator.webhook_deliveries()
    assert [(d["event"], d["outcome"], d["status"]) for d in deliveries["data"]] == [
        (event["id"], "delivered", 200)
    ]
    assert deliveries["owed"] == 0


def test_delivery_never_holds_up_the_api_answer(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, receiver: Receiver
) -> None:
    receiver.hang = 5.0
    endpoint(sdk, receiver.url)
    customer = paying_customer(sdk)
    started = time.monotonic()
    sdk.v1.payment_intents.create(purchase_params(customer))
    sdk.v1.payment_intents.create(purchase_params(customer))
    assert time.monotonic() - started < 4.0  # the receiver takes 5 s per webhook
    wait_for(lambda: receiver.requests)


def test_a_failed_delivery_is_retried_with_the_same_event_and_a_fresh_signature(
    receiver: Receiver,
) -> None:
    ticks = iter(range(10**6))
    with BackgroundEmulator(clock=lambda: 1_800_000_000 + next(ticks)) as emu:
        emu.set_faults(webhook_retry_base_ms=100)
        sdk = sdk_for(emu.url)
        hook = endpoint(sdk, receiver.url)
        receiver.script = [500, 503]
        customer = paying_customer(sdk)
        sdk.v1.payment_intents.create(purchase_params(customer))
        wait_for(lambda: len(receiver.requests) >= 3)
        time.sleep(0.5)
        attempts = emu.webhook_deliveries()["data"]
    assert [r["status"] for r in receiver.requests] == [500, 503, 200]
    assert len({r["event"]["id"] for r in receiver.requests}) == 1
    assert len({r["body"] for r in receiver.requests}) == 1  # the same bytes each time
    stamps = [verify(hook.secret, r) for r in receiver.requests]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3  # re-signed at each attempt
    assert len({r["signature"] for r in receiver.requests}) == 3
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [
        (1, "failed"), (2, "failed"), (3, "delivered"),
    ]  # fmt: skip


def test_retries_back_off_and_give_up_after_max_attempts(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, receiver: Receiver
) -> None:
    emulator.set_faults(webhook_retry_base_ms=200, webhook_max_attempts=3)
    receiver.then = 500
    endpoint(sdk, receiver.url)
    sdk.v1.payment_intents.create(purchase_params(paying_customer(sdk)))
    wait_for(lambda: emulator.webhook_deliveries()["owed"] == 0)
    time.sleep(0.5)
    assert len(receiver.requests) == 3
    at = [r["at"] for r in receiver.requests]
    gaps = [at[1] - at[0], at[2] - at[1]]
    assert gaps[0] >= 0.18 and gaps[1] >= 0.38  # 200 ms, then 400 ms
    attempts = emulator.webhook_deliveries()["data"]
    assert attempts[-1].get("gave_up") is True
    # what was missed can be caught up through the events list
    assert [e.type for e in sdk.v1.events.list({"type": "payment_intent.succeeded"}).data] == [
        "payment_intent.succeeded"
    ]


def test_drop_first_attempts_then_deliver(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, receiver: Receiver
) -> None:
    emulator.set_faults(webhook_drop_first=2)
    hook = endpoint(sdk, receiver.url)
    sdk.v1.payment_intents.create(purchase_params(paying_customer(sdk)))
    wait_for(lambda: receiver.requests)
    time.sleep(0.3)
    assert len(receiver.requests) == 1
    verify(hook.secret, receiver.requests[0])
    assert [a["outcome"] for a in emulator.webhook_deliveries()["data"]] == [
        "dropped", "dropped", "delivered",
    ]  # fmt: skip


def test_duplicates_deliver_each_event_twice(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, receiver: Receiver
) -> None:
    emulator.set_faults(webhook_duplicates=True)
    hook = endpoint(sdk, receiver.url)
    sdk.v1.payment_intents.create(purchase_params(paying_customer(sdk)))
    wait_for(lambda: len(receiver.requests) >= 2)
    time.sleep(0.3)
    assert len(receiver.requests) == 2
    assert receiver.requests[0]["event"]["id"] == receiver.requests[1]["event"]["id"]
    for request in receiver.requests:
        verify(hook.secret, request)
    assert sorted(a["duplicate"] for a in emulator.webhook_deliveries()["data"]) == [False, True]


def test_out_of_order_sends_the_later_event_first(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, receiver: Receiver
) -> None:
    emulator.set_faults(webhook_out_of_order=True)
    endpoint(sdk, receiver.url)
    customer = paying_customer(sdk, "pm_card_chargeDeclined")
    with pytest.raises(stripe.CardError) as declined:
        sdk.v1.payment_intents.create(purchase_params(customer))
    time.sleep(0.5)
    assert receiver.requests == []  # held until the PaymentIntent is final
    assert emulator.webhook_deliveries()["held"] == 1
    intent_id = declined.value.error.payment_intent.id
    sdk.v1.payment_intents.confirm(intent_id, {"payment_method": "pm_card_visa"})
    wait_for(lambda: len(receiver.requests) >= 2)
    assert receiver.types() == ["payment_intent.succeeded", "payment_intent.payment_failed"]
    # a PaymentIntent that stays failed is held until released (or the fault is off)
    for _ in range(2):
        with pytest.raises(stripe.CardError):
            sdk.v1.payment_intents.create(purchase_params(customer))
    time.sleep(0.3)
    assert len(receiver.requests) == 2
    assert emulator.release_webhooks() == 2
    wait_for(lambda: len(receiver.requests) == 4)
    with pytest.raises(stripe.CardError) as last:
        sdk.v1.payment_intents.create(purchase_params(customer))
    assert emulator.webhook_deliveries()["held"] == 1
    emulator.set_faults(webhook_out_of_order=False)
    wait_for(lambda: len(receiver.requests) == 5)
    newest_first = [r["event"]["data"]["object"]["created"] for r in receiver.requests[2:4]]
    assert newest_first == sorted(newest_first, reverse=True)
    assert receiver.requests[4]["event"]["data"]["object"]["id"] == (
        last.value.error.payment_intent.id
    )


def test_under_every_fault_at_once_each_event_arrives_signed(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, receiver: Receiver
) -> None:
    """Duplicates, dropped attempts, reordering and a receiver failing a third of its
    requests: every event of an enabled type still arrives (answered 200) at least once,
    correctly signed, and nothing else arrives."""
    emulator.set_faults(
        webhook_duplicates=True, webhook_drop_first=1, webhook_out_of_order=True,
        webhook_max_attempts=20,
    )  # fmt: skip
    receiver.script = [500, 200, 200] * 20
    hook = endpoint(sdk, receiver.url)
    good, bad = paying_customer(sdk), paying_customer(sdk, "pm_card_chargeDeclined")
    for i in range(4):
        sdk.v1.payment_intents.create(purchase_params(good, 1000 + i))
        with pytest.raises(stripe.CardError) as declined:
            sdk.v1.payment_intents.create(purchase_params(bad, 1000 + i))
        if i % 2:  # half of the declined ones are paid later on another card
            sdk.v1.payment_intents.confirm(
                declined.value.error.payment_intent.id, {"payment_method": "pm_card_visa"}
            )
    emulator.release_webhooks()
    expected = {e.id for e in sdk.v1.events.list({"types": PAY_EVENTS, "limit": 100}).data}
    assert len(expected) == 4 + 4 + 2

    def delivered() -> set[str]:
        return {r["event"]["id"] for r in receiver.requests if r["status"] == 200}

    wait_for(lambda: delivered() == expected and emulator.webhook_deliveries()["queued"] == 0)
    for request in receiver.requests:
        verify(hook.secret, request)
    assert {r["event"]["id"] for r in receiver.requests} == expected


def test_delay_holds_back_the_first_attempt(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, receiver: Receiver
) -> None:
    emulator.set_faults(webhook_delay_ms=1500)
    endpoint(sdk, receiver.url)
    started = time.monotonic()
    sdk.v1.payment_intents.create(purchase_params(paying_customer(sdk)))
    request = wait_for(lambda: receiver.requests and receiver.requests[0])
    assert request["at"] - started >= 1.4


def test_endpoints_list_delete_and_enabled_events(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator, receiver: Receiver
) -> None:
    everything = endpoint(sdk, receiver.url + "/all", ["*"])
    failures = endpoint(sdk, receiver.url + "/failed", ["payment_intent.payment_failed"])
    listed = sdk.v1.webhook_endpoints.list().data
    assert {e.id for e in listed} == {everything.id, failures.id}
    assert all("secret" not in e for e in listed)  # shown once, at creation
    sdk.v1.payment_intents.create(purchase_params(paying_customer(sdk)))
    wait_for(lambda: len(receiver.requests) >= 2)
    time.sleep(0.3)
    assert sorted(receiver.types()) == ["payment_intent.created", "payment_intent.succeeded"]
    deleted = sdk.v1.webhook_endpoints.delete(everything.id)
    assert deleted.deleted is True
    with pytest.raises(stripe.CardError):
        sdk.v1.payment_intents.create(
            purchase_params(paying_customer(sdk, "pm_card_chargeDeclined"))
        )
    wait_for(lambda: len(receiver.requests) >= 3)
    time.sleep(0.3)
    assert receiver.types()[2:] == ["payment_intent.payment_failed"]
    verify(failures.secret, receiver.requests[2])
    status, body, _ = call(emulator.url, "POST", "/v1/webhook_endpoints", {"url": receiver.url})
    assert (status, body["error"]["code"]) == (400, "parameter_missing")


def test_events_list_newest_first_filtered_and_paged(
    sdk: stripe.StripeClient, emulator: BackgroundEmulator
) -> None:
    customer = paying_customer(sdk)
    for _ in range(3):
        sdk.v1.payment_intents.create(purchase_params(customer))
    succeeded = sdk.v1.events.list({"type": "payment_intent.succeeded"}).data
    assert len(succeeded) == 3
    everything = sdk.v1.events.list({"limit": 100}).data
    assert len(everything) == 6
    assert [e.id for e in everything if e.type == "payment_intent.succeeded"] == [
        e.id for e in succeeded
    ]
    created = [e.data.object.created for e in everything]
    assert created == sorted(created, reverse=True)
    page1 = sdk.v1.events.list({"limit": 4})
    page2 = sdk.v1.events.list({"limit": 4, "starting_after": page1.data[-1].id})
    assert page1.has_more and not page2.has_more
    assert [e.id for e in page1.data + page2.data] == [e.id for e in everything]
    both = sdk.v1.events.list({"types": ["payment_intent.created", "payment_intent.succeeded"]})
    assert len(both.data) == 6
    status, body, _ = call(emulator.url, "GET", "/v1/events/evt_nothing")
    assert (status, body["error"]["code"]) == (404, "resource_missing")


# ------------------------------------------------------------- restart, command line


def test_state_file_keeps_payments_and_owed_webhooks_across_a_restart(
    tmp_path: Path, receiver: Receiver
) -> None:
    state_file = tmp_path / "stripe.jsonl"
    receiver.then = 503  # down while the first emulator runs
    with BackgroundEmulator(state_file=state_file) as first:
        first.set_faults(webhook_retry_base_ms=100, webhook_max_attempts=1000)
        sdk = sdk_for(first.url)
        hook = endpoint(sdk, receiver.url)
        customer = paying_customer(sdk)
        intent = sdk.v1.payment_intents.create(purchase_params(customer))
        wait_for(lambda: receiver.requests)
    refused = len(receiver.requests)
    assert {r["status"] for r in receiver.requests} == {503}
    receiver.then = 200
    with BackgroundEmulator(state_file=state_file) as second:
        sdk = sdk_for(second.url)
        wait_for(lambda: any(r["status"] == 200 for r in receiver.requests))
        assert sdk.v1.customers.retrieve(customer.id).invoice_settings.default_payment_method == (
            customer.invoice_settings.default_payment_method
        )
        assert sdk.v1.payment_intents.retrieve(intent.id).status == "succeeded"
        events = sdk.v1.events.list().data
        assert [e.type for e in events] == ["payment_intent.succeeded", "payment_intent.created"]
        assert [e.id for e in sdk.v1.webhook_endpoints.list().data] == [hook.id]
        delivered = receiver.requests[refused]
        assert delivered["event"]["id"] == events[0].id
        verify(hook.secret, delivered)
        wait_for(lambda: second.webhook_deliveries()["owed"] == 0)
        declined_form = {**_valid(customer), "payment_method": "pm_card_chargeDeclined"}
        declined = call(second.url, "POST", "/v1/payment_intents", declined_form, "pur_d")
        assert declined[0] == 402
        # stopped at once: the payment_failed delivery under way ends before the stop
    with BackgroundEmulator(state_file=state_file) as third:
        time.sleep(0.5)
        # the payment_failed event was delivered or is owed; the succeeded one is not resent
        assert [r["event"]["type"] for r in receiver.requests if r["status"] == 200].count(
            "payment_intent.succeeded"
        ) == 1
        again = call(third.url, "POST", "/v1/payment_intents", declined_form, "pur_d")
        assert again[:2] == declined[:2] and again[2].get("Idempotent-Replayed") == "true"
        assert len(sdk_for(third.url).v1.payment_intents.list().data) == 2
        wait_for(lambda: third.webhook_deliveries()["owed"] == 0)
    assert sum(r["status"] == 200 for r in receiver.requests) == 2


def test_command_line_webhook_endpoint(tmp_path: Path, receiver: Receiver) -> None:
    port = free_port()
    env = {**os.environ, "STRIPE_EMULATOR_WEBHOOK_SECRET": "whsec_from_env"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterstream.cli", "stripe-emulator", "--port", str(port),
         "--webhook-url", receiver.url, "--webhook-events", ",".join(PAY_EVENTS),
         "--webhook-retry-base-ms", "100"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return call(url, "GET", "/v1/webhook_endpoints")[0] == 200
            except OSError:
                return False

        wait_for(up)
        receiver.script = [500]
        sdk = sdk_for(url)
        sdk.v1.payment_intents.create(purchase_params(paying_customer(sdk)))
        wait_for(lambda: len(receiver.requests) >= 2)
        assert receiver.types() == ["payment_intent.succeeded"] * 2
        for request in receiver.requests:
            verify("whsec_from_env", request)
        # the configured endpoint outlives a reset
        req = urllib.request.Request(
            url + "/_emulator/reset", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        urllib.request.urlopen(req, timeout=10).close()
        listed = call(url, "GET", "/v1/webhook_endpoints")[1]["data"]
        assert [e["url"] for e in listed] == [receiver.url]
        assert listed[0]["id"] == WebhookOption(receiver.url, "whsec_x").endpoint_id
    finally:
        proc.terminate()
        proc.wait(timeout=10)
