"""The Stripe emulator's webhook signature, its webhook fault settings and its command-line
webhook options (pure, no server)."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import time

import pytest
import stripe
from hypothesis import given
from hypothesis import strategies as st

from meterstream.credits.webhooks import verify_header
from meterstream.errors import WebhookSignatureError
from meterstream.sinks.stripe.emulator.options import add_webhook_arguments, webhook_options
from meterstream.sinks.stripe.emulator.state import FaultConfig
from meterstream.sinks.stripe.emulator.webhooks import new_secret, signature_header

SECRET = "whsec_0123456789abcdef"


def test_signature_header_is_stripes_scheme() -> None:
    body = b'{\n  "id": "evt_1",\n  "type": "payment_intent.succeeded"\n}'
    header = signature_header(SECRET, 1_800_000_000, body)
    # computed here independently: HMAC-SHA256 keyed by the whole secret over "<t>.<body>"
    expected = hmac.new(
        b"whsec_0123456789abcdef", b"1800000000." + body, hashlib.sha256
    ).hexdigest()
    assert header == f"t=1800000000,v1={expected}"


def test_stripes_sdk_and_meterstreams_verifier_accept_it() -> None:
    body = b'{"id": "evt_2", "object": "event"}'
    now = int(time.time())
    header = signature_header(SECRET, now, body)
    assert stripe.WebhookSignature.verify_header(body.decode(), header, SECRET, tolerance=300)
    assert verify_header(body, header, SECRET, now_ms=now * 1000) == now


@given(body=st.binary(max_size=200), flip=st.integers(min_value=0, max_value=199))
def test_any_changed_byte_or_other_secret_fails(body: bytes, flip: int) -> None:
    now = 1_800_000_000
    header = signature_header(SECRET, now, body)
    assert verify_header(body, header, SECRET, now_ms=now * 1000) == now
    with pytest.raises(WebhookSignatureError):
        verify_header(body, header, SECRET + "x", now_ms=now * 1000)
    if body:
        i = flip % len(body)
        changed = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
        with pytest.raises(WebhookSignatureError):
            verify_header(changed, header, SECRET, now_ms=now * 1000)


def test_a_new_secret_is_stripe_shaped_and_random() -> None:
    secrets = {new_secret() for _ in range(20)}
    assert len(secrets) == 20 and all(s.startswith("whsec_") and len(s) > 30 for s in secrets)


@pytest.mark.parametrize(
    "bad",
    [
        {"webhook_drop_first": -1},
        {"webhook_delay_ms": -5},
        {"webhook_retry_base_ms": 0},
        {"webhook_max_attempts": 0},
        {"webhook_timeout_ms": 0},
        {"webhook_duplicates": "yes"},
        {"webhook_out_of_order": 1},
        {"webhook_max_attempts": True},
    ],
)
def test_webhook_fault_settings_are_checked(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        FaultConfig(**bad)  # type: ignore[arg-type]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_webhook_arguments(parser)
    return parser.parse_args(argv)


def test_webhook_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRIPE_EMULATOR_WEBHOOK_SECRET", raising=False)
    assert webhook_options(_parse(), new_secret) == (500, 5, [])
    base, attempts, [hook] = webhook_options(
        _parse(
            "--webhook-url", "http://127.0.0.1:9/hook", "--webhook-secret", SECRET,
            "--webhook-events", "payment_intent.succeeded, payment_intent.payment_failed",
            "--webhook-retry-base-ms", "50", "--webhook-max-attempts", "9",
        ),
        new_secret,
    )  # fmt: skip
    assert (base, attempts) == (50, 9)
    assert (hook.url, hook.secret) == ("http://127.0.0.1:9/hook", SECRET)
    assert hook.enabled_events == ("payment_intent.succeeded", "payment_intent.payment_failed")
    assert hook.endpoint_id.startswith("we_cli_")
    monkeypatch.setenv("STRIPE_EMULATOR_WEBHOOK_SECRET", "whsec_env")
    assert webhook_options(_parse("--webhook-url", "http://h/"), new_secret)[2][0].secret == (
        "whsec_env"
    )
    monkeypatch.delenv("STRIPE_EMULATOR_WEBHOOK_SECRET")
    made = webhook_options(_parse("--webhook-url", "http://h/"), lambda: "whsec_new")[2][0]
    assert (made.secret, made.enabled_events) == ("whsec_new", ("*",))
    with pytest.raises(ValueError, match="whsec_"):
        webhook_options(_parse("--webhook-url", "http://h/", "--webhook-secret", "s3"), new_secret)
    with pytest.raises(ValueError, match=">= 1"):
        webhook_options(_parse("--webhook-max-attempts", "0"), new_secret)
