"""Credit purchases through Stripe, Stripe's webhook, and auto-recharge, wired.

The pure parts are :mod:`meterstream.credits.purchases` (the PaymentIntent's parameters,
the state machine of a purchase) and :mod:`meterstream.credits.recharge` (when to buy).
This module feeds them and writes what they decide:

- **A purchase** (``POST /v1/customers/{id}/credits/purchases``, ``meterstream credits
  purchase``): the customer's Stripe id from the customer mapping and the default payment
  method from ``GET /v1/customers/{id}`` (``invoice_settings.default_payment_method``) are
  looked up first (none: :class:`~meterstream.errors.PurchaseRefused`, 409, nothing
  recorded or charged); the purchase is recorded ``created`` in ClickHouse
  ``credit_purchases``, then the PaymentIntent is created and confirmed off-session with
  the purchase id as Stripe's ``Idempotency-Key``. A decline (Stripe's 402 with the
  PaymentIntent) or a refusal no retry can change (:data:`REFUSED_FOR_GOOD`, e.g.
  ``amount_too_small``) fails the purchase at once; a success waits for Stripe's word.
- **Granted on Stripe's word**: ``payment_intent.succeeded`` on ``POST
  /v1/stripe/webhooks`` (signature verified with ``METERSTREAM_STRIPE_WEBHOOK_SECRET``,
  300 s tolerance) moves the state machine, which grants once (grant id = purchase id,
  through :meth:`CreditService.grant`: ledger kind ``grant``, ``recharge`` for a recharge
  purchase). Every state change is a new row of ``credit_purchases`` holding the event ids
  applied, written before the webhook is answered 2xx: a redelivery, even after a
  restart, is a duplicate; a crash between the grant and the row replays the event, and
  the grant, already in the book, is not made again.
- **Catch-up** (a lost webhook must not lose a paid purchase): every
  :data:`CATCH_UP_SECONDS`, each purchase still ``created`` a minute (the setting
  ``METERSTREAM_CREDITS_PURCHASE_CATCH_UP_SECONDS``) after it was made is
  read back with ``GET /v1/payment_intents/{id}``, and a final status is applied as an
  event of ours (``pi:<id>:<status>``); one whose PaymentIntent was never created (a crash
  or Stripe down before the answer) is created again under the same idempotency key,
  which Stripe answers with the same PaymentIntent (for 24 hours: a purchase the worker
  could not pay for a day stays ``created``; not handled).
- **A failure** fires the ``payment_failed`` alert once (at the state machine's move to
  ``failed``), through the alert path (topic ``billing-alerts``, signed webhooks): the
  customer's ``payment_failed`` thresholds, or one with id ``payment_failed`` when the
  customer has none (a failed payment always needs someone's attention).
- **Auto-recharge** (``PUT /v1/customers/{id}/credits/recharge``): rules and states in
  ``credit_recharge``; :func:`~meterstream.credits.recharge.evaluate` runs on every status
  of a customer with credits (the burn, grants, expiries: a listener of the credit
  service, under its lock). A purchase it decides is recorded first, then the recharge
  state (a crash between is reconciled at start: a ``created`` recharge purchase is the
  pending one; a finished one whose outcome the recharge state lacks is applied), then
  paid in the background. Its failure turns auto-recharge off
  (durably) and fires ``payment_failed``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from decimal import Decimal
from typing import Any

import orjson

from meterstream.billing.deliver import stripe_client
from meterstream.credits.alerts import Alert, AlertKind, Threshold, payment_failed
from meterstream.credits.money import to_stripe_amount
from meterstream.credits.purchases import (
    PaymentEvent,
    PaymentOutcome,
    Purchase,
    PurchaseState,
    PurchaseStatus,
    apply_event,
    event_of_payment_intent,
    parse_stripe_event,
    payment_intent_params,
)
from meterstream.credits.recharge import (
    AutoRecharge,
    RechargeState,
    disable,
    enable,
    evaluate,
    purchase_result,
)
from meterstream.credits.status import CustomerStatus
from meterstream.credits.webhooks import DEFAULT_TOLERANCE_S, verify_header
from meterstream.errors import (
    CreditsError,
    PurchaseRefused,
    StripeError,
    WebhookSignatureError,
)
from meterstream.sinks.clickhouse import credits as store
from meterstream.sinks.stripe import customers as mappings
from meterstream.sinks.stripe.client import StripeMeterClient
from meterstream.worker.alerts import AlertDesk
from meterstream.worker.credits import CreditService
from meterstream.worker.services import WorkerServices

log = logging.getLogger("meterstream.purchases")

CATCH_UP_SECONDS = 10.0
DEFAULT_PAYMENT_FAILED = Threshold("payment_failed", AlertKind.PAYMENT_FAILED)
# Stripe's answers to a PaymentIntent's creation that a retry under the same key cannot
# change (e.g. amount_too_small): the purchase fails, nothing was charged.
REFUSED_FOR_GOOD = (400, 402, 404)
WEBHOOK_OFF = "no Stripe webhook here: METERSTREAM_STRIPE_WEBHOOK_SECRET is not set"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class PurchaseDesk:
    """Every purchase's state, the auto-recharge rules, Stripe's calls and its webhook."""

    def __init__(self, services: WorkerServices, credits: CreditService, alerts: AlertDesk) -> None:
        self.services = services
        self.credits = credits
        self.alerts = alerts
        self._client: StripeMeterClient | None = None  # made on the first call to Stripe
        self.purchases: dict[str, PurchaseState] = {}
        self.rules: dict[str, AutoRecharge] = {}
        self.recharge: dict[str, RechargeState] = {}
        self.lock = asyncio.Lock()  # purchase states; taken before the credit service's
        self.recharge_lock = asyncio.Lock()  # rules and states; never held over another
        self._tasks: set[asyncio.Task[None]] = set()
        credits.status_listeners.append(self.on_status)

    @property
    def client(self) -> StripeMeterClient:
        if self._client is None:
            self._client = stripe_client(self.services.settings)
        return self._client

    # -- start

    async def start(self) -> None:
        """Purchases and auto-recharge from ClickHouse (before the credit books resume:
        resuming evaluates the recharges)."""
        for text in await self.services.chio.call(store.purchase_states):
            try:
                state = PurchaseState.from_json(orjson.loads(text))
            except (CreditsError, KeyError, ValueError) as exc:
                log.error("a credit purchase not loaded: %s", exc)
                continue
            self.purchases[state.purchase.purchase_id] = state
        settings = await self.services.chio.call(store.recharge_settings)
        for customer, (_, rule_text, state_text) in settings.items():
            try:
                doc = orjson.loads(rule_text)
                if doc:
                    self.rules[customer] = _rule_of(doc)
                self.recharge[customer] = RechargeState.from_json(orjson.loads(state_text))
            except (CreditsError, KeyError, ValueError) as exc:
                log.error("auto-recharge of %s not loaded: %s", customer, exc)
        for state in self.purchases.values():  # a crash between purchase and recharge rows
            p = state.purchase
            held = self.recharge.get(p.customer_id)
            if p.origin != "recharge" or held is None:
                continue
            if state.status == PurchaseStatus.CREATED and held.pending is None:
                self.recharge[p.customer_id] = replace(held, pending=p.purchase_id, armed=False)
            elif state.status != PurchaseStatus.CREATED and held.pending == p.purchase_id:
                await self._recharge_done(state)  # its outcome, not yet in credit_recharge
        log.info(
            "credits: %d purchase(s), %d auto-recharge(s)", len(self.purchases), len(self.rules)
        )

    # -- purchases

    async def purchase(self, purchase: Purchase, changed_by: str) -> dict[str, Any]:
        """Record and pay ``purchase`` (a retry with the same id answers the same one)."""
        await self.credits.ready.wait()
        payer = None
        if purchase.purchase_id not in self.purchases:  # refused: nothing recorded
            payer = await self._payment_method(purchase.customer_id)  # (not under the lock)
        async with self.lock:
            held = self.purchases.get(purchase.purchase_id)
            if held is not None:
                if _terms(held.purchase) != _terms(purchase):
                    raise PurchaseRefused(
                        f"purchase {purchase.purchase_id!r} exists with other terms"
                    )
                state = held
            else:
                state = PurchaseState(purchase)
                await self._record(state, f"created by {changed_by}")
                self.services.metrics.credit_purchases.inc(outcome="created")
        if state.status == PurchaseStatus.CREATED and state.payment_intent_id is None:
            await self._pay(purchase.purchase_id, payer)
        return purchase_document(self.purchases[purchase.purchase_id])

    async def _payment_method(self, customer: str) -> tuple[str, str]:
        """(Stripe customer id, its default payment method), or :class:`PurchaseRefused`."""
        rows = await self.services.chio.call(mappings.current_rows, [customer])
        row = rows.get(customer)
        stripe_id = row.stripe_customer_id if row is not None else ""
        if not stripe_id:
            raise PurchaseRefused(
                f"customer {customer!r} has no Stripe customer: map it first "
                "(meterstream customers set CUSTOMER cus_...); nothing was charged"
            )
        try:
            found = await asyncio.to_thread(self.client.retrieve_customer, stripe_id)
        except StripeError as exc:
            if exc.status != 404:
                raise  # Stripe unreachable or failing: 503, nothing charged; retry
            raise PurchaseRefused(
                f"Stripe has no customer {stripe_id} (mapped to {customer!r}): {exc}; "
                "nothing was charged"
            ) from None
        method = (found.get("invoice_settings") or {}).get("default_payment_method")
        if isinstance(method, dict):
            method = method.get("id")
        if not isinstance(method, str) or not method:
            raise PurchaseRefused(
                f"Stripe customer {stripe_id} of {customer!r} has no default payment method "
                "(invoice_settings.default_payment_method); nothing was charged"
            )
        return stripe_id, method

    async def _pay(self, purchase_id: str, payer: tuple[str, str] | None = None) -> None:
        """Create the PaymentIntent (idempotency key: the purchase id) on ``payer`` (the
        Stripe customer and payment method; looked up when not given); a decline or a
        customer who cannot pay (a recharge's: no mapping, no method) fails it now."""
        purchase = self.purchases[purchase_id].purchase
        try:
            stripe_id, method = payer or await self._payment_method(purchase.customer_id)
        except PurchaseRefused as exc:
            await self._apply(_local_failure(purchase, "no_payment_method"), str(exc))
            return
        params = payment_intent_params(
            purchase, stripe_customer_id=stripe_id, payment_method=method
        )
        try:
            intent = await asyncio.to_thread(
                self.client.create_payment_intent, params, purchase.purchase_id
            )
        except StripeError as exc:
            if exc.status not in REFUSED_FOR_GOOD:
                raise  # Stripe down or failing: tried again (same key) by the catch-up
            code = exc.code or f"stripe_{exc.status}"
            await self._apply(_local_failure(purchase, code), f"refused by Stripe: {exc}")
            return
        async with self.lock:
            state = self.purchases[purchase_id]
            if state.payment_intent_id is None:
                state = replace(state, payment_intent_id=str(intent.get("id")))
                await self._record(state, "payment intent created")
        event = event_of_payment_intent(intent, seen_ms=now_ms())
        if event is not None and event.outcome != PaymentOutcome.SUCCEEDED:
            await self._apply(event, "declined when created")  # success: Stripe's webhook

    async def _apply(self, event: PaymentEvent, note: str) -> str:
        """Move the purchase by one event; grant, fail, record; returns the outcome."""
        async with self.lock:
            state = self.purchases.get(event.purchase_id)
            if state is None:
                return "unknown"
            new, effects = apply_event(state, event)
            if effects.outcome == "duplicate":
                return effects.outcome
            grant = effects.grant
            if grant is not None and not self.credits.holds(grant.customer_id, grant.grant_id):
                await self.credits.grant(grant, f"stripe {event.event_id}")
            if effects.newly_failed:
                await self.alerts.fire(new.purchase.customer_id, self._failure_alerts(new))
            if effects.problem is not None:
                log.error(
                    "purchase %s: %s (nothing granted; look at Stripe)",
                    event.purchase_id,
                    effects.problem,
                )
                self.services.metrics.credit_purchases.inc(outcome="mismatch")
            await self._record(new, f"{note}: {effects.outcome}")
            if grant is not None:
                self.services.metrics.credit_purchases.inc(outcome="succeeded")
            if effects.newly_failed:
                self.services.metrics.credit_purchases.inc(outcome="failed")
        if new.purchase.origin == "recharge" and (grant is not None or effects.newly_failed):
            await self._recharge_done(new)
        return effects.outcome

    def _failure_alerts(self, state: PurchaseState) -> tuple[Alert, ...]:
        p = state.purchase
        own = [
            t
            for t in self.alerts.thresholds.get(p.customer_id, ())
            if t.kind == AlertKind.PAYMENT_FAILED
        ]
        return payment_failed(
            own or [DEFAULT_PAYMENT_FAILED],
            customer_id=p.customer_id,
            purchase_id=p.purchase_id,
            amount=p.amount,
            currency=p.currency,
            at_ms=now_ms(),
            failure_code=state.failure_code,
        )

    async def _record(self, state: PurchaseState, note: str) -> None:
        p = state.purchase
        row = (
            p.purchase_id,
            p.customer_id,
            p.origin,
            p.amount,
            p.currency,
            state.status.value,
            state.payment_intent_id or "",
            sorted(state.seen_event_ids),
            state.failure_code or "",
            note[:500],
            orjson.dumps(state.to_json()).decode(),
            time.time_ns(),
            p.created_ms,
        )
        await self.services.chio.call(store.append_purchase, row)
        self.purchases[p.purchase_id] = state

    # -- Stripe's webhook

    async def webhook(self, body: bytes, header: str | None) -> tuple[int, dict[str, Any]]:
        """One delivery of Stripe's webhook: (HTTP status, answer). 2xx only once its
        outcome is recorded (an exception here is a 5xx: Stripe delivers it again)."""
        secret = self.services.settings.stripe_webhook_secret
        if header and secret is None:  # the route is off (Stripe retries until it is on)
            return 404, {"error": WEBHOOK_OFF}
        try:
            if secret is None:
                raise WebhookSignatureError("no signature header")
            verify_header(
                body,
                header,
                secret.get_secret_value(),
                now_ms=now_ms(),
                tolerance_s=DEFAULT_TOLERANCE_S,
            )
        except WebhookSignatureError as exc:
            self.services.metrics.stripe_webhooks.inc(result="rejected")
            log.warning("Stripe webhook refused: %s", exc)
            return 400, {"error": f"signature: {exc}"}
        try:
            event = parse_stripe_event(orjson.loads(body))
        except (CreditsError, orjson.JSONDecodeError) as exc:  # signed, so Stripe's: retrying
            self.services.metrics.stripe_webhooks.inc(result="ignored")  # cannot make it better
            log.warning("Stripe webhook ignored: %s", exc)
            return 200, {"received": True, "ignored": str(exc)[:300]}
        if event is None:
            self.services.metrics.stripe_webhooks.inc(result="ignored")
            return 200, {"received": True, "ignored": "event type not used"}
        await self.credits.ready.wait()
        try:
            outcome = await self._apply(event, f"webhook {event.event_id}")
        except CreditsError as exc:  # names another customer than the purchase's
            log.error("Stripe webhook %s ignored: %s", event.event_id, exc)
            outcome = "ignored"
        result = {"duplicate": "duplicate", "unknown": "ignored", "ignored": "ignored"}
        self.services.metrics.stripe_webhooks.inc(result=result.get(outcome, "applied"))
        return 200, {"received": True, "outcome": outcome}

    # -- catch-up

    async def catch_up(self) -> None:
        """Read back what Stripe did with every purchase still ``created`` after
        ``METERSTREAM_CREDITS_PURCHASE_CATCH_UP_SECONDS`` (a minute)."""
        if not self.credits.ready.is_set():
            return
        now = now_ms()
        after_ms = int(self.services.settings.credits_purchase_catch_up_seconds * 1000)
        for state in list(self.purchases.values()):
            purchase = state.purchase
            if state.status != PurchaseStatus.CREATED or (now - purchase.created_ms < after_ms):
                continue
            try:
                if state.payment_intent_id is None:
                    await self._pay(purchase.purchase_id)
                    continue
                intent = await asyncio.to_thread(
                    self.client.retrieve_payment_intent, state.payment_intent_id
                )
                event = event_of_payment_intent(intent, seen_ms=now_ms())
                if event is not None:
                    await self._apply(event, "catch-up read")
            except Exception:  # logged, tried again next round; never stops the worker
                log.exception("catch-up of purchase %s failed", purchase.purchase_id)

    # -- auto-recharge

    async def set_recharge(
        self, customer: str, rule: AutoRecharge | None, changed_by: str
    ) -> dict[str, Any]:
        """Set (or with ``None`` turn off) the customer's auto-recharge, durably; then
        judge it against the balance at once."""
        await self.credits.ready.wait()
        async with self.recharge_lock:
            held = self.recharge.get(customer)
            if rule is None:
                state = disable(held or RechargeState(enabled=False), "turned off")
                saved = self.rules.get(customer)
            else:
                state = enable(held) if held is not None else RechargeState()
                saved = rule
            await self._save_recharge(customer, saved, state, changed_by)
        await self.credits.refresh(customer, f"recharge:{time.time_ns()}")
        return self.recharge_document(customer)

    async def _save_recharge(
        self, customer: str, rule: AutoRecharge | None, state: RechargeState, by: str
    ) -> None:
        doc = orjson.dumps(rule.to_json() if rule is not None else {}).decode()
        await self.services.chio.call(
            store.append_recharge,
            customer,
            doc,
            orjson.dumps(state.to_json()).decode(),
            state.enabled,
            time.time_ns(),
            by,
        )
        if rule is not None:
            self.rules[customer] = rule
        self.recharge[customer] = state

    async def on_status(self, status: CustomerStatus) -> None:
        """The credit service's listener: buy when the balance reached the threshold."""
        customer = status.customer_id
        rule = self.rules.get(customer)
        if rule is None:
            return
        async with self.recharge_lock:
            state = self.recharge.get(customer, RechargeState())
            try:
                new, purchase = evaluate(rule, state, status)
            except CreditsError as exc:
                log.warning("auto-recharge of %s not evaluated: %s", customer, exc)
                return
            if new == state:
                return
            if purchase is not None and purchase.purchase_id not in self.purchases:
                await self._record(PurchaseState(purchase), f"auto-recharge at {status.cause}")
                self.services.metrics.credit_purchases.inc(outcome="created")
                log.info(
                    "auto-recharge of %s: buying %s %s (%s)",
                    customer,
                    purchase.amount,
                    purchase.currency,
                    purchase.purchase_id,
                )
            await self._save_recharge(customer, rule, new, f"status {status.cause}")
        if purchase is not None:
            self._spawn(self._pay_in_background(purchase.purchase_id))

    async def _recharge_done(self, state: PurchaseState) -> None:
        customer = state.purchase.customer_id
        async with self.recharge_lock:
            held = self.recharge.get(customer)
            if held is None:
                return
            new = purchase_result(
                held,
                state.purchase.purchase_id,
                succeeded=state.status == PurchaseStatus.SUCCEEDED,
                failure_code=state.failure_code,
            )
            if new != held:
                await self._save_recharge(
                    customer,
                    self.rules.get(customer),
                    new,
                    f"purchase {state.purchase.purchase_id}",
                )
                if not new.enabled:
                    log.warning(
                        "auto-recharge of %s turned off: payment failed (%s)",
                        customer,
                        new.disabled_reason,
                    )

    async def _pay_in_background(self, purchase_id: str) -> None:
        try:
            await self._pay(purchase_id)
        except Exception:  # the catch-up creates it again under the same key
            log.exception("auto-recharge purchase %s not paid yet; retried", purchase_id)

    def _spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reads

    def purchases_document(self, customer: str) -> dict[str, Any]:
        found = [s for s in self.purchases.values() if s.purchase.customer_id == customer]
        found.sort(key=lambda s: (s.purchase.created_ms, s.purchase.purchase_id))
        return {"customer_id": customer, "purchases": [purchase_document(s) for s in found]}

    def recharge_document(self, customer: str) -> dict[str, Any]:
        rule = self.rules.get(customer)
        state = self.recharge.get(customer)
        return {
            "customer_id": customer,
            "rule": rule.to_json() if rule is not None else None,
            "state": state.to_json() if state is not None else None,
            "enabled": bool(rule is not None and state is not None and state.enabled),
        }


def purchase_document(state: PurchaseState) -> dict[str, Any]:
    """A purchase as the API shows it: its terms, status and Stripe references."""
    return {
        **state.purchase.to_json(),
        "status": state.status.value,
        "payment_intent_id": state.payment_intent_id,
        "stripe_event_ids": sorted(state.seen_event_ids),
        "granted_ms": state.granted_ms,
        "failure_code": state.failure_code,
    }


def _terms(p: Purchase) -> tuple[Any, ...]:
    return (p.customer_id, p.amount, p.currency, p.origin, p.priority)


def _rule_of(doc: dict[str, Any]) -> AutoRecharge:
    return AutoRecharge(
        customer_id=doc["customer_id"],
        currency=doc["currency"],
        threshold=Decimal(str(doc["threshold"])),
        target=Decimal(str(doc["target"])),
        priority=doc.get("priority", 50),
        expires_after_ms=doc.get("expires_after_ms"),
    )


def _local_failure(purchase: Purchase, code: str) -> PaymentEvent:
    """A failure decided here, before Stripe was asked (no PaymentIntent exists)."""
    return PaymentEvent(
        event_id=f"local:{purchase.purchase_id}:{code}",
        outcome=PaymentOutcome.FAILED,
        purchase_id=purchase.purchase_id,
        customer_id=purchase.customer_id,
        payment_intent_id="",
        amount_minor=to_stripe_amount(purchase.amount, purchase.currency),
        currency=purchase.currency,
        created_ms=now_ms(),
        failure_code=code,
    )
