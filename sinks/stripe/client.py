"""A thin wrapper around the official ``stripe`` SDK for Billing meters.

What it adds to ``stripe.StripeClient``:

* **Retries we control.** The SDK's own retries are off
  (``max_network_retries=0``). 429, 5xx and network failures back off with
  full jitter and retry *the same params*, so the same ``identifier``: Stripe
  counts an identifier once, so a retry can never double-bill.
* **Duplicates are success.** Stripe refuses an identifier it has already
  accepted (400, ``An event already exists with identifier <id>.``, no error
  code). Our identifiers are deterministic, so that refusal proves the event
  was delivered earlier (typically by an attempt whose answer we lost): the
  call returns ``SendResult(status="duplicate")``.
* **Permanent errors keep Stripe's code.** Anything else raises
  :class:`meterstream.errors.StripeError` with Stripe's ``code`` and HTTP
  ``status``; ``retryable`` tells the caller whether a later retry may help.
* **A client-side token bucket** (thread-safe) keeps us under the rate limit.

Calls are synchronous; the worker runs them in a thread executor. The API key
is never logged or shown in ``repr``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar, cast

import stripe
from pydantic import SecretStr

from meterstream.errors import StripeError

log = logging.getLogger(__name__)

EMULATOR_API_KEY = "sk_test_emulator"
"""Used when no key is configured; only the local emulator accepts it."""

DUPLICATE_IDENTIFIER_MESSAGE = "An event already exists with identifier"
"""Prefix of Stripe's answer to a repeated meter event identifier (it carries no error code)."""

MAX_V2_BATCH = 100
_SESSION_REFRESH_MARGIN_S = 60.0

T = TypeVar("T")


@dataclass(frozen=True)
class MeterSpec:
    """A Stripe Billing meter as meterstream creates it (:meth:`StripeMeterClient.ensure_meter`)."""

    display_name: str
    event_name: str
    formula: Literal["sum", "count", "last"]
    customer_key: str = "stripe_customer_id"
    value_key: str = "value"


@dataclass(frozen=True)
class SendResult:
    """Outcome of a delivered meter event (or v2 batch)."""

    status: Literal["sent", "duplicate"]
    attempts: int

    @property
    def duplicate(self) -> bool:
        return self.status == "duplicate"


@dataclass(frozen=True)
class EventSummary:
    """One ``billing.meter_event_summary``, with the value as an exact Decimal."""

    id: str
    meter: str
    start_time: int
    end_time: int
    aggregated_value: Decimal


class TokenBucket:
    """Thread-safe token bucket: ``rate`` tokens per second, bursts up to ``capacity``.

    ``acquire`` reserves a token under the lock and sleeps outside it, so
    waiting threads are served in order and never hold the lock while asleep.
    """

    def __init__(
        self,
        rate: float,
        capacity: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.capacity = max(1.0, capacity if capacity is not None else rate)
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until it is available; returns the time slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1
            wait = 0.0 if self._tokens >= 0 else -self._tokens / self.rate
        if wait > 0:
            self._sleep(wait)
        return wait


class StripeMeterClient:
    """Stripe Billing meters through ``stripe.StripeClient``, with our retries and rate limit."""

    def __init__(
        self,
        api_key: SecretStr | None = None,
        api_base: str | None = None,
        meter_events_base: str | None = None,
        rate_limit_per_second: float | None = 25,
        max_retries: int = 5,
        *,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        """``api_key=None`` uses :data:`EMULATOR_API_KEY` (valid only against the emulator).

        ``meter_events_base`` defaults to ``api_base`` when only that is given
        (the emulator serves both); with neither, Stripe's own hosts are used.
        ``rate_limit_per_second=None`` turns the client-side limit off.
        """
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if backoff_base <= 0 or backoff_cap < backoff_base:
            raise ValueError("need 0 < backoff_base <= backoff_cap")
        bases: dict[str, str] = {}
        if api_base:
            bases["api"] = api_base.rstrip("/")
        if meter_events_base or api_base:
            bases["meter_events"] = (meter_events_base or api_base or "").rstrip("/")
        key = api_key.get_secret_value() if api_key is not None else EMULATOR_API_KEY
        self._stripe = stripe.StripeClient(
            key,
            base_addresses=cast(Any, bases),
            max_network_retries=0,
        )
        self.api_base = bases.get("api", stripe.DEFAULT_API_BASE)
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._bucket = TokenBucket(rate_limit_per_second) if rate_limit_per_second else None
        self._session_lock = threading.Lock()
        self._session: tuple[str, float] | None = None

    def __repr__(self) -> str:
        return f"StripeMeterClient(api_base={self.api_base!r}, max_retries={self.max_retries})"

    # ------------------------------------------------------------ meter events

    def send_meter_event(self, params: Mapping[str, Any]) -> SendResult:
        """``POST /v1/billing/meter_events`` with retries; a duplicate identifier is success.

        ``params`` is what :func:`meterstream.sinks.stripe.payloads.build_meter_event` builds.
        Raises :class:`StripeError` for a permanent error, or for a retryable one
        still failing after ``max_retries`` retries.
        """
        identifier = params.get("identifier")
        create = self._stripe.v1.billing.meter_events.create
        try:
            _, attempts = self._with_retries(
                lambda: create(cast(Any, dict(params))), what=f"meter event {identifier}"
            )
        except _Duplicate as dup:
            log.info("meter event %s was already at Stripe; counted as sent", identifier)
            return SendResult("duplicate", dup.attempts)
        return SendResult("sent", attempts)

    def send_batch_v2(self, events: Sequence[Mapping[str, Any]]) -> SendResult:
        """Up to 100 events through the v2 meter event stream (high throughput).

        ``events`` are v1-shaped params (from ``build_meter_event``); they are
        converted to v2 (RFC 3339 timestamps). A session token is created and
        renewed as needed. The stream validates asynchronously: a repeated
        identifier is dropped by Stripe, and invalid events surface in
        Stripe's error reports, not here.
        """
        if not events:
            return SendResult("sent", 0)
        if len(events) > MAX_V2_BATCH:
            raise ValueError(f"at most {MAX_V2_BATCH} events per v2 batch, got {len(events)}")
        body = {"events": [_to_v2_event(e) for e in events]}
        stream = self._stripe.v2.billing.meter_event_stream

        def send() -> None:
            token = self._session_token()
            try:
                stream.create(cast(Any, body), {"api_key": token})
            except stripe.TemporarySessionExpiredError:
                with self._session_lock:
                    self._session = None
                raise

        _, attempts = self._with_retries(send, what=f"v2 batch of {len(events)}")
        return SendResult("sent", attempts)

    def cancel_meter_event(self, event_name: str, identifier: str) -> dict[str, Any]:
        """Cancel an accepted meter event (``POST /v1/billing/meter_event_adjustments``).

        Stripe only cancels events it received within the past 24 hours; it
        applies the cancellation asynchronously (the answer's ``status`` is
        ``"pending"``). The idempotency key is the event's (an identifier is
        cancelled once), so a retry after a lost answer, or a second call after
        a crash before the first one's outcome was recorded, replays the first
        answer (within Stripe's 24 hours of idempotency, which cover the 24 hours
        a cancellation is allowed) instead of failing as "already canceled".
        Returns the ``billing.meter_event_adjustment`` as a dict; raises
        :class:`StripeError` if Stripe refuses the cancellation.
        """
        params = {"event_name": event_name, "type": "cancel", "cancel": {"identifier": identifier}}
        options = {"idempotency_key": f"meterstream-cancel-{event_name}-{identifier}"}
        create = self._stripe.v1.billing.meter_event_adjustments.create
        adjustment, _ = self._with_retries(
            lambda: create(cast(Any, params), cast(Any, options)),
            what=f"cancel meter event {identifier}",
        )
        return adjustment.to_dict()

    def _session_token(self) -> str:
        with self._session_lock:
            session = self._session
            if session is None or time.time() >= session[1] - _SESSION_REFRESH_MARGIN_S:
                created = self._stripe.v2.billing.meter_event_session.create()
                expires_at = _epoch(created.expires_at)
                session = (created.authentication_token, expires_at)
                self._session = session
            return session[0]

    # ------------------------------------------------------------ meters

    def list_meters(self) -> list[dict[str, Any]]:
        """Every meter (all pages) as plain dicts."""

        def fetch() -> list[dict[str, Any]]:
            page = self._stripe.v1.billing.meters.list({"limit": 100})
            return [m.to_dict() for m in page.auto_paging_iter()]

        return self._with_retries(fetch, what="list meters")[0]

    def create_meter(self, spec: MeterSpec) -> dict[str, Any]:
        """``POST /v1/billing/meters``; returns the meter as a dict."""
        params = {
            "display_name": spec.display_name,
            "event_name": spec.event_name,
            "default_aggregation": {"formula": spec.formula},
            "customer_mapping": {"event_payload_key": spec.customer_key, "type": "by_id"},
            "value_settings": {"event_payload_key": spec.value_key},
        }
        create = self._stripe.v1.billing.meters.create
        meter = self._with_retries(lambda: create(cast(Any, params)), what="create meter")[0]
        return meter.to_dict()

    def ensure_meter(self, spec: MeterSpec) -> dict[str, Any]:
        """The active meter for ``spec.event_name``, created if missing.

        An existing meter with another formula or other payload keys is a
        configuration error Stripe will not fix for us (meters are immutable):
        it raises :class:`StripeError` with code ``meter_mismatch``.
        """
        expected = (spec.formula, spec.customer_key, spec.value_key)
        for meter in self.list_meters():
            if meter["event_name"] != spec.event_name or meter.get("status") != "active":
                continue
            found = (
                meter["default_aggregation"]["formula"],
                meter["customer_mapping"]["event_payload_key"],
                meter["value_settings"]["event_payload_key"],
            )
            if found != expected:
                raise StripeError(
                    f"Stripe meter {meter['id']} for event {spec.event_name!r} has "
                    f"(formula, customer key, value key) = {found}, expected "
                    f"{expected}",
                    code="meter_mismatch",
                    status=400,
                )
            return meter
        return self.create_meter(spec)

    def event_summaries(
        self,
        meter_id: str,
        customer: str,
        start: int,
        end: int,
        value_grouping_window: Literal["hour", "day"] | None = None,
    ) -> list[EventSummary]:
        """Stripe's aggregates for one customer over [start, end) (epoch s, minute-aligned)."""
        params: dict[str, Any] = {
            "customer": customer,
            "start_time": start,
            "end_time": end,
            "limit": 100,
        }
        if value_grouping_window is not None:
            params["value_grouping_window"] = value_grouping_window
        summaries = self._stripe.v1.billing.meters.event_summaries

        def fetch() -> list[EventSummary]:
            page = summaries.list(meter_id, cast(Any, params))
            return [
                EventSummary(
                    id=s.id,
                    meter=s.meter,
                    start_time=s.start_time,
                    end_time=s.end_time,
                    aggregated_value=Decimal(str(s.aggregated_value)),
                )
                for s in page.auto_paging_iter()
            ]

        return self._with_retries(fetch, what=f"event summaries of {meter_id}")[0]

    # ------------------------------------------------------------ products and prices

    def find_product(self, product_id: str) -> dict[str, Any] | None:
        """``GET /v1/products/{id}``; ``None`` when Stripe has no such product."""
        retrieve = self._stripe.v1.products.retrieve
        try:
            product = self._with_retries(lambda: retrieve(product_id), what="get product")[0]
        except StripeError as exc:
            if exc.code == "resource_missing":
                return None
            raise
        return product.to_dict()

    def create_product(self, params: Mapping[str, Any], idempotency_key: str) -> dict[str, Any]:
        """``POST /v1/products`` with an idempotency key."""
        return self._create(self._stripe.v1.products.create, params, idempotency_key, "product")

    def _create(
        self, create: Callable[..., Any], params: Mapping[str, Any], key: str, what: str
    ) -> dict[str, Any]:
        options: Any = {"idempotency_key": key}
        made = self._with_retries(
            lambda: create(cast(Any, dict(params)), options), what=f"create {what}"
        )[0]
        return dict(made.to_dict())

    def find_price(self, lookup_key: str) -> dict[str, Any] | None:
        """The active price with ``lookup_key`` (``GET /v1/prices?lookup_keys[]=``), or None."""
        listing = self._stripe.v1.prices.list
        page = self._with_retries(
            lambda: listing({"lookup_keys": [lookup_key], "active": True, "limit": 1}),
            what="find price",
        )[0]
        found = [p.to_dict() for p in page.data]
        return found[0] if found else None

    def create_price(self, params: Mapping[str, Any], idempotency_key: str) -> dict[str, Any]:
        """``POST /v1/prices`` with an idempotency key."""
        return self._create(self._stripe.v1.prices.create, params, idempotency_key, "price")

    def invoice_preview(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /v1/invoices/create_preview`` (the upcoming invoice) as a dict."""
        preview = self._stripe.v1.invoices.create_preview
        invoice = self._with_retries(
            lambda: preview(cast(Any, dict(params))), what="invoice preview"
        )[0]
        return invoice.to_dict()

    # ------------------------------------------------------------ payments (credit purchases)

    def retrieve_customer(self, customer_id: str) -> dict[str, Any]:
        """``GET /v1/customers/{id}`` as a dict (``invoice_settings.default_payment_method``)."""
        retrieve = self._stripe.v1.customers.retrieve
        return dict(
            self._with_retries(lambda: retrieve(customer_id), what="get customer")[0].to_dict()
        )

    def create_payment_intent(
        self, params: Mapping[str, Any], idempotency_key: str
    ) -> dict[str, Any]:
        """``POST /v1/payment_intents`` with an idempotency key (a retry never charges twice).

        A declined card is Stripe's 402 ``card_error`` carrying the PaymentIntent (status
        ``requires_payment_method``, ``last_payment_error`` set): that PaymentIntent is
        returned, not raised. Any other error raises :class:`StripeError`.
        """
        try:
            return self._create(
                self._stripe.v1.payment_intents.create, params, idempotency_key, "payment intent"
            )
        except StripeError as exc:
            cause = exc.__cause__
            body = getattr(cause, "json_body", None) if cause is not None else None
            error = body.get("error") if isinstance(body, dict) else None
            intent = error.get("payment_intent") if isinstance(error, dict) else None
            if exc.status == 402 and isinstance(intent, dict):
                return dict(intent)
            raise

    def retrieve_payment_intent(self, intent_id: str) -> dict[str, Any]:
        """``GET /v1/payment_intents/{id}`` as a dict."""
        retrieve = self._stripe.v1.payment_intents.retrieve
        found = self._with_retries(lambda: retrieve(intent_id), what="get payment intent")[0]
        return dict(found.to_dict())

    # ------------------------------------------------------------ retries

    def backoff_delay(self, retry: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(retry - 1))] for retry 1, 2, ..."""
        return self._rng.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2 ** (retry - 1)))

    def _with_retries(self, call: Callable[[], T], *, what: str) -> tuple[T, int]:
        attempt = 0
        while True:
            attempt += 1
            if self._bucket is not None:
                self._bucket.acquire()
            try:
                return call(), attempt
            except stripe.StripeError as exc:
                error = _translate(exc)
                if _is_duplicate(exc):
                    raise _Duplicate(attempt) from exc
                if not _retryable(exc, error):
                    raise error from exc
                if attempt > self.max_retries:
                    log.warning("%s: giving up after %d attempts: %s", what, attempt, error)
                    raise error from exc
                delay = self.backoff_delay(attempt)
                log.info(
                    "%s: attempt %d failed (%s, status %s); retrying in %.3fs",
                    what,
                    attempt,
                    error.code or type(exc).__name__,
                    error.status,
                    delay,
                )
                self._sleep(delay)


class _Duplicate(Exception):
    def __init__(self, attempts: int) -> None:
        super().__init__("duplicate identifier")
        self.attempts = attempts


def _translate(exc: stripe.StripeError) -> StripeError:
    message = exc.user_message or str(exc) or type(exc).__name__
    status = exc.http_status
    if isinstance(exc, stripe.APIConnectionError):
        status = None
    code = exc.code or (exc.error.code if exc.error is not None else None)
    return StripeError(message, code=code, status=status)


def _retryable(exc: stripe.StripeError, error: StripeError) -> bool:
    # An expired v2 session is renewed on the next attempt.
    return isinstance(exc, stripe.TemporarySessionExpiredError) or error.retryable


def _is_duplicate(exc: stripe.StripeError) -> bool:
    message = exc.user_message or ""
    return exc.http_status == 400 and message.startswith(DUPLICATE_IDENTIFIER_MESSAGE)


def _to_v2_event(params: Mapping[str, Any]) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_name": params["event_name"],
        "payload": dict(params["payload"]),
    }
    if params.get("identifier") is not None:
        event["identifier"] = params["identifier"]
    if params.get("timestamp") is not None:
        ts = datetime.fromtimestamp(int(params["timestamp"]), UTC)
        event["timestamp"] = ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return event


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(str(value)).timestamp()
