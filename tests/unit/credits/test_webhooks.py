"""Signatures (checked against Stripe's own verifier), bodies and the retry schedule."""

from __future__ import annotations

import json

import pytest
import stripe
from hypothesis import given
from hypothesis import strategies as st

from meterstream.credits.webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    RetryPolicy,
    build_request,
    canonical_body,
    compute_signature,
    delivered,
    next_attempt_ms,
    retry_delay_ms,
    sign_header,
    verify_header,
)
from meterstream.errors import CreditsError, WebhookSignatureError

SECRET = "whsec_test_secret"
NOW_MS = 1_735_689_600_123
NOW_S = NOW_MS // 1000


def test_a_signature_stripe_accepts_and_one_stripe_makes_we_accept() -> None:
    body = b'{"id":"evt_1","type":"payment_intent.succeeded"}'
    header = sign_header(body, SECRET, NOW_S)
    # Stripe's SDK (an independent implementation of the scheme) verifies ours
    assert stripe.WebhookSignature.verify_header(body.decode(), header, SECRET, tolerance=None)
    # and a header built the way Stripe builds it verifies here
    stripe_sig = stripe.WebhookSignature._compute_signature(f"{NOW_S}.{body.decode()}", SECRET)
    assert verify_header(body, f"t={NOW_S},v1={stripe_sig},v0=ignored", SECRET, now_ms=NOW_MS) == (
        NOW_S
    )


def test_a_known_vector() -> None:
    # HMAC-SHA256("whsec_test_secret", "1735689600.{}") computed independently
    import hashlib
    import hmac

    want = hmac.new(SECRET.encode(), b"1735689600.{}", hashlib.sha256).hexdigest()
    assert compute_signature(SECRET, 1735689600, b"{}") == want
    assert sign_header(b"{}", SECRET, 1735689600) == f"t=1735689600,v1={want}"


@given(st.binary(max_size=300), st.text(min_size=1, max_size=40))
def test_verify_of_sign_holds(body: bytes, secret: str) -> None:
    header = sign_header(body, secret, NOW_S)
    assert verify_header(body, header, secret, now_ms=NOW_MS) == NOW_S


@given(st.binary(min_size=1, max_size=200), st.data())
def test_any_byte_changed_in_the_body_fails(body: bytes, data: st.DataObject) -> None:
    header = sign_header(body, SECRET, NOW_S)
    index = data.draw(st.integers(0, len(body) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = body[:index] + bytes([body[index] ^ flip]) + body[index + 1 :]
    with pytest.raises(WebhookSignatureError, match="no signature matches"):
        verify_header(tampered, header, SECRET, now_ms=NOW_MS)
    with pytest.raises(WebhookSignatureError):
        verify_header(body + b" ", header, SECRET, now_ms=NOW_MS)


@given(st.binary(max_size=100), st.data())
def test_any_character_changed_in_the_header_fails(body: bytes, data: st.DataObject) -> None:
    header = sign_header(body, SECRET, NOW_S)
    index = data.draw(st.integers(0, len(header) - 1))
    replacement = data.draw(st.sampled_from("0123456789abcdef=,tv x"))
    tampered = header[:index] + replacement + header[index + 1 :]
    if tampered == header:
        return
    with pytest.raises(WebhookSignatureError):
        verify_header(body, tampered, SECRET, now_ms=NOW_MS)


def test_the_tolerance_secret_and_malformed_headers() -> None:
    body = b"{}"
    header = sign_header(body, SECRET, NOW_S)
    assert verify_header(body, header, SECRET, now_ms=NOW_MS + 300_000)
    with pytest.raises(WebhookSignatureError, match="tolerance"):
        verify_header(body, header, SECRET, now_ms=NOW_MS + 301_000)
    with pytest.raises(WebhookSignatureError, match="tolerance"):
        verify_header(body, header, SECRET, now_ms=NOW_MS - 301_000)
    with pytest.raises(WebhookSignatureError, match="no signature matches"):
        verify_header(body, header, "whsec_other", now_ms=NOW_MS)
    signature = header.split("v1=")[1]
    for bad in (
        None,
        "",
        f"v1={signature}",  # no timestamp
        f"t={NOW_S},t={NOW_S},v1={signature}",  # two timestamps
        f"t=1e9,v1={signature}",
        f"t={NOW_S}",  # no v1
        f"t={NOW_S},v1",
        "t=" + "9" * 5000,
    ):
        with pytest.raises(WebhookSignatureError):
            verify_header(body, bad, SECRET, now_ms=NOW_MS)
    with pytest.raises(CreditsError):
        sign_header(body, "", NOW_S)
    with pytest.raises(CreditsError):
        verify_header(body, header, [], now_ms=NOW_MS)


def test_rotation_signs_with_every_secret_and_verifies_with_any() -> None:
    header = sign_header(b"x", ["old", "new"], NOW_S)
    assert header.count("v1=") == 2
    assert verify_header(b"x", header, "new", now_ms=NOW_MS)
    assert verify_header(b"x", sign_header(b"x", "old", NOW_S), ["new", "old"], now_ms=NOW_MS)


def test_a_request_resigned_later_has_the_same_body_and_event_id() -> None:
    doc = {"id": "alrt_1", "value": "4.5", "b": [1, 2], "a": None}
    first = build_request("alrt_1", doc, SECRET, now_ms=NOW_MS)
    retry = build_request(
        "alrt_1", dict(reversed(list(doc.items()))), SECRET, now_ms=NOW_MS + 60_000
    )
    assert first.body == retry.body == b'{"a":null,"b":[1,2],"id":"alrt_1","value":"4.5"}'
    assert first.headers[EVENT_ID_HEADER] == retry.headers[EVENT_ID_HEADER] == "alrt_1"
    assert first.headers[SIGNATURE_HEADER] != retry.headers[SIGNATURE_HEADER]
    assert verify_header(
        retry.body, retry.headers[SIGNATURE_HEADER], SECRET, now_ms=NOW_MS + 60_000
    )
    assert json.loads(canonical_body(doc)) == doc


@given(st.text(min_size=1, max_size=30), st.integers(1, 40))
def test_backoff_is_deterministic_grows_and_is_capped(event_id: str, attempt: int) -> None:
    policy = RetryPolicy(base_ms=1_000, cap_ms=600_000)
    delay = retry_delay_ms(attempt, event_id, policy)
    full = min(600_000, 1_000 * 2 ** (attempt - 1))
    assert full // 2 <= delay <= full
    assert delay == retry_delay_ms(attempt, event_id, policy)


def test_backoff_schedule_and_giving_up() -> None:
    policy = RetryPolicy(base_ms=1_000, cap_ms=8_000, give_up_after_ms=60_000)
    delays = [retry_delay_ms(n, "alrt_x", policy) for n in range(1, 8)]
    assert [
        d >= f // 2 for d, f in zip(delays, [1000, 2000, 4000, 8000, 8000, 8000, 8000], strict=True)
    ]
    # different events are spread out (jitter), each the same after a restart
    spread = {retry_delay_ms(4, f"alrt_{i}", policy) for i in range(50)}
    assert len(spread) > 10
    t, attempt, first = 0, 1, 0
    sends = [0]
    while (t := next_attempt_ms(attempt, first, t, "alrt_x", policy)) is not None:
        sends.append(t)
        attempt += 1
    assert sends == sorted(sends) and sends[-1] <= 60_000 and len(sends) >= 8
    with pytest.raises(CreditsError):
        retry_delay_ms(0, "x")
    assert delivered(200) and delivered(204)
    assert not any(delivered(s) for s in (None, 199, 300, 301, 400, 410, 429, 500))
