"""Signed webhooks: Stripe's signature scheme, request bodies, and the retry schedule.

Signature (the same scheme Stripe uses, so one verifier serves both directions)
------------------------------------------------------------------------------
``signature = hex(HMAC-SHA256(secret, f"{t}.".encode() + body))`` where ``t`` is the send
time in epoch **seconds** and ``body`` the exact bytes sent. The header is
``t=<t>,v1=<signature>`` (one ``v1`` per secret while a secret is being rotated). Stripe
sends it as ``Stripe-Signature``; meterstream's alert webhooks as
``Meterstream-Signature``.

:func:`verify_header` accepts a request only if the header parses, carries exactly one
``t``, its time is within ``tolerance_s`` of now (either way: an old request may be a
replay), and one ``v1`` equals the HMAC of the exact body bytes under one of the secrets
(compared in constant time). Anything else raises
:class:`~meterstream.errors.WebhookSignatureError` with the reason. Verify the raw body,
never a re-serialised JSON.

Retries
-------
Every attempt sends the same body (the same event id) with a fresh ``t``. A 2xx answer is a
delivery; anything else (including no answer) is retried after :func:`retry_delay_ms`:
exponential from ``base_ms``, capped at ``cap_ms``, with "equal jitter" taken from a hash of
the event id and attempt number (deterministic: a restarted sender waits the same), until
``give_up_after_ms`` from the first attempt; then the delivery is dead (recorded, not lost).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meterstream.credits.money import canon
from meterstream.errors import CreditsError, WebhookSignatureError

SIGNATURE_HEADER = "Meterstream-Signature"
EVENT_ID_HEADER = "Meterstream-Event-Id"
STRIPE_SIGNATURE_HEADER = "Stripe-Signature"
DEFAULT_TOLERANCE_S = 300
SCHEME = "v1"
MAX_HEADER_CHARS = 4096
_MAX_T_DIGITS = 12


def compute_signature(secret: str, timestamp_s: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``f"{timestamp_s}." + body`` under ``secret``."""
    key = _secret_bytes(secret)
    return hmac.new(key, f"{timestamp_s}.".encode() + body, hashlib.sha256).hexdigest()


def sign_header(body: bytes, secrets: str | Sequence[str], timestamp_s: int) -> str:
    """The signature header value ``t=...,v1=...`` (one ``v1`` per secret)."""
    if isinstance(timestamp_s, bool) or not isinstance(timestamp_s, int) or timestamp_s < 0:
        raise CreditsError(f"timestamp_s must be a non-negative integer, got {timestamp_s!r}")
    keys = _secrets(secrets)
    parts = [f"t={timestamp_s}"]
    parts.extend(f"{SCHEME}={compute_signature(k, timestamp_s, body)}" for k in keys)
    return ",".join(parts)


def verify_header(
    body: bytes,
    header: str | None,
    secrets: str | Sequence[str],
    *,
    now_ms: int,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> int:
    """Check ``header`` signs ``body``; returns its timestamp (s) or raises why not."""
    keys = _secrets(secrets)
    if tolerance_s <= 0:
        raise CreditsError("tolerance_s must be positive")
    if not isinstance(body, bytes | bytearray):
        raise WebhookSignatureError("the body must be the raw bytes received")
    if not header:
        raise WebhookSignatureError("no signature header")
    if not isinstance(header, str) or len(header) > MAX_HEADER_CHARS:
        raise WebhookSignatureError("signature header too long or not text")
    timestamps: list[str] = []
    signatures: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise WebhookSignatureError("malformed signature header")
        if name == "t":
            timestamps.append(value)
        elif name == SCHEME:
            signatures.append(value)
    if len(timestamps) != 1:
        raise WebhookSignatureError("the signature header must carry exactly one timestamp")
    raw = timestamps[0]
    if not raw.isascii() or not raw.isdigit() or len(raw) > _MAX_T_DIGITS:
        raise WebhookSignatureError("the signature timestamp is not a number")
    timestamp = int(raw)
    if abs(now_ms // 1000 - timestamp) > tolerance_s:
        raise WebhookSignatureError(
            f"the signature timestamp is outside the tolerance ({tolerance_s} s)"
        )
    if not signatures:
        raise WebhookSignatureError(f"no {SCHEME} signature in the header")
    payload = bytes(body)
    expected = [compute_signature(k, timestamp, payload) for k in keys]
    # compare every pair (no early exit) in constant time
    matched = False
    for given in signatures:
        for want in expected:
            matched |= hmac.compare_digest(given.encode(), want.encode())
    if not matched:
        raise WebhookSignatureError("no signature matches the body")
    return timestamp


def canonical_body(doc: Mapping[str, Any]) -> bytes:
    """Compact JSON with sorted keys (Decimals as canonical strings): the bytes that are signed.

    One document always gives the same bytes, so a retry resends exactly what was signed
    and a receiver can compare a redelivery byte for byte.
    """
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=_json_default).encode()


@dataclass(frozen=True)
class WebhookRequest:
    """One attempt's POST: the body and headers to send."""

    event_id: str
    body: bytes
    headers: dict[str, str]


def build_request(
    event_id: str, doc: Mapping[str, Any], secrets: str | Sequence[str], *, now_ms: int
) -> WebhookRequest:
    """The signed request for ``doc`` (an alert's JSON), signed at ``now_ms``."""
    body = canonical_body(doc)
    return WebhookRequest(
        event_id=event_id,
        body=body,
        headers={
            "Content-Type": "application/json",
            EVENT_ID_HEADER: event_id,
            SIGNATURE_HEADER: sign_header(body, secrets, now_ms // 1000),
        },
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with deterministic equal jitter, and when to give up."""

    base_ms: int = 1_000
    cap_ms: int = 3_600_000
    give_up_after_ms: int = 3 * 24 * 3_600_000

    def __post_init__(self) -> None:
        if not 0 < self.base_ms <= self.cap_ms or self.give_up_after_ms <= 0:
            raise CreditsError("retry policy needs 0 < base_ms <= cap_ms and give_up_after_ms > 0")


def retry_delay_ms(attempt: int, event_id: str, policy: RetryPolicy | None = None) -> int:
    """How long to wait after failed attempt number ``attempt`` (1 = the first send).

    ``d = min(cap, base * 2**(attempt-1))``; the wait is ``d/2 + j`` with ``j`` in
    ``[0, d/2]`` from SHA-256 of ``(event_id, attempt)``: always in ``[d/2, d]``, never the
    same for every event (no thundering herd after an outage), the same after a restart.
    """
    policy = policy or RetryPolicy()
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise CreditsError(f"attempt must be an integer >= 1, got {attempt!r}")
    exponent = min(attempt - 1, 62)
    full = min(policy.cap_ms, policy.base_ms * (1 << exponent))
    half = full // 2
    digest = hashlib.sha256(f"{event_id}\x1f{attempt}".encode()).digest()
    jitter = int.from_bytes(digest[:8], "big") % (full - half + 1)
    return half + jitter


def next_attempt_ms(
    attempt: int,
    first_attempt_ms: int,
    failed_at_ms: int,
    event_id: str,
    policy: RetryPolicy | None = None,
) -> int | None:
    """When to send attempt ``attempt + 1`` after attempt ``attempt`` failed at ``failed_at_ms``.

    ``None`` once that time would be past ``first_attempt_ms + give_up_after_ms``: the
    delivery is dead and must be recorded as such.
    """
    policy = policy or RetryPolicy()
    when = failed_at_ms + retry_delay_ms(attempt, event_id, policy)
    if when > first_attempt_ms + policy.give_up_after_ms:
        return None
    return when


def delivered(status: int | None) -> bool:
    """A 2xx answer is a delivery; anything else (or no answer) is retried."""
    return status is not None and 200 <= status < 300


def _secrets(secrets: str | Sequence[str]) -> list[str]:
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    if not keys:
        raise CreditsError("no webhook secret")
    for key in keys:
        _secret_bytes(key)
    return keys


def _secret_bytes(secret: str) -> bytes:
    if not isinstance(secret, str) or not secret:
        raise CreditsError("a webhook secret must be a non-empty string")
    return secret.encode()


def _json_default(value: object) -> str:
    if isinstance(value, Decimal):
        return canon(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
