"""Credit alerts wired: thresholds per customer, fired once per crossing, delivered to the
topic ``billing-alerts`` and to a signed webhook, never twice after a restart.

- **Thresholds** (``PUT /v1/customers/{id}/credits/alerts``) are kept in ClickHouse
  ``credit_alert_thresholds``; the pure :func:`~meterstream.credits.alerts.evaluate` judges
  them after every change of the customer's credits (pipeline/worker/credits.py).
- **Once per crossing, across restarts**: every change of a customer's threshold states is
  one row of ``credit_alerts`` holding the new states *and* the alerts that change fired
  (one insert), so a state that says "fired" is never recorded without its alert, and the
  worker resumes the states at start (an alert never fires again for the same crossing).
- **Delivery**: each alert is sent to the topic ``billing-alerts`` (key: customer) and, when
  ``METERSTREAM_CREDITS_WEBHOOK_URL`` is set, POSTed there signed with
  ``METERSTREAM_CREDITS_WEBHOOK_SECRET`` (HMAC-SHA256 over ``"<t>." + body``, header
  ``Meterstream-Signature: t=...,v1=...``, ``Meterstream-Event-Id`` = the alert id);
  retried with exponential backoff under the same id until a 2xx (given up after 3 days).
  Each delivery is recorded in ``credit_alert_deliveries``; at start, what has no delivery
  is sent again (at least once: a crash between a delivery and its record resends the
  same id, which receivers deduplicate).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import faust
import orjson

from meterstream.credits.alerts import Alert, AlertKind, Threshold, ThresholdState, evaluate
from meterstream.credits.grants import Grant
from meterstream.credits.money import json_decimal
from meterstream.credits.status import CustomerStatus
from meterstream.credits.webhooks import build_request, canonical_body, delivered, next_attempt_ms
from meterstream.errors import CreditsError
from meterstream.settings import Settings
from meterstream.sinks.clickhouse import credits as store
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.topics import BILLING_ALERTS
from meterstream.worker.raw_topics import raw_topic

log = logging.getLogger("meterstream.alerts")
MAX_THRESHOLDS = 100


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def threshold_of(doc: Any) -> Threshold:
    """A threshold from JSON (amounts as decimal strings); :class:`CreditsError` otherwise."""
    if not isinstance(doc, dict):
        raise CreditsError("a threshold is a JSON object")
    unknown = set(doc) - {"threshold_id", "kind", "amount", "percent", "meter", "within_ms",
                          "margin"}  # fmt: skip
    if unknown:
        raise CreditsError(f"unknown threshold field(s): {', '.join(sorted(unknown))}")

    def dec(name: str) -> Decimal | None:
        value = doc.get(name)
        return None if value is None else json_decimal(value, name)

    try:
        kind = AlertKind(str(doc.get("kind")))
    except ValueError:
        kinds = ", ".join(k.value for k in AlertKind)
        raise CreditsError(f"kind must be one of {kinds}, got {doc.get('kind')!r}") from None
    return Threshold(
        threshold_id=doc.get("threshold_id"),  # type: ignore[arg-type]  # checked by Threshold
        kind=kind,
        amount=dec("amount"),
        percent=dec("percent"),
        meter=doc.get("meter"),
        within_ms=doc.get("within_ms"),
        margin=dec("margin") or Decimal(0),
    )


def thresholds_of(doc: Any) -> tuple[Threshold, ...]:
    items = doc.get("thresholds") if isinstance(doc, dict) else None
    if not isinstance(items, list) or len(items) > MAX_THRESHOLDS:
        raise CreditsError(f'body must be {{"thresholds": [...]}} (at most {MAX_THRESHOLDS})')
    found = tuple(threshold_of(item) for item in items)
    ids = [t.threshold_id for t in found]
    if len(set(ids)) != len(ids):
        raise CreditsError("threshold ids must be distinct")
    return found


@dataclass
class _Pending:
    customer: str
    doc: dict[str, Any]
    attempts: int = 0
    first_ms: int = 0
    next_ms: int = 0


class AlertDesk:
    """Thresholds and states per customer, the alerts to deliver, and their delivery."""

    def __init__(self, app: faust.App | None, settings: Settings, chio: ClickHouseIO) -> None:
        self.settings = settings
        self.chio = chio
        self.thresholds: dict[str, tuple[Threshold, ...]] = {}
        self.states: dict[str, dict[str, ThresholdState]] = {}
        self.versions: dict[str, int] = {}
        self.to_topic: dict[str, _Pending] = {}
        self.to_webhook: dict[str, _Pending] = {}
        self.url = settings.credits_webhook_url
        secret = settings.credits_webhook_secret
        self.secret = secret.get_secret_value() if secret is not None else ""
        self.topic: Any = None
        if app is not None:
            self.topic = raw_topic(
                app, settings.topic(BILLING_ALERTS.name), partitions=settings.partitions
            )
        self._sending = asyncio.Lock()
        self._recording = asyncio.Lock()

    async def start(self) -> None:
        """Thresholds, states and what was not delivered, from ClickHouse."""
        for customer, text in (await self.chio.call(store.thresholds)).items():
            try:
                self.thresholds[customer] = thresholds_of(orjson.loads(text))
            except (CreditsError, orjson.JSONDecodeError) as exc:
                log.error("alert thresholds of %s not loaded: %s", customer, exc)
        for customer, (version, text) in (await self.chio.call(store.alert_states)).items():
            self.versions[customer] = version
            self.states[customer] = {
                k: ThresholdState.from_json(v) for k, v in orjson.loads(text).items()
            }
        for channel, pending in (("topic", self.to_topic), ("webhook", self.to_webhook)):
            if channel == "webhook" and not self.url:
                continue
            for text in await self.chio.call(store.undelivered_alerts, channel):
                doc = orjson.loads(text)
                pending[doc["id"]] = _Pending(doc["customer_id"], doc)

    async def set_thresholds(
        self, customer: str, thresholds: tuple[Threshold, ...], changed_by: str
    ) -> None:
        doc = orjson.dumps({"thresholds": [t.to_json() for t in thresholds]}).decode()
        version = max(now_ms(), self.versions.get(customer, 0) + 1)
        await self.chio.call(store.set_thresholds, customer, doc, version, changed_by)
        self.thresholds[customer] = thresholds

    def document(self, customer: str) -> dict[str, Any]:
        return {
            "customer_id": customer,
            "thresholds": [t.to_json() for t in self.thresholds.get(customer, ())],
            "states": {k: v.to_json() for k, v in self.states.get(customer, {}).items()},
            "webhook": bool(self.url),
        }

    async def evaluate(
        self, status: CustomerStatus, live_grants: Iterable[tuple[Grant, Decimal]]
    ) -> None:
        """Judge the customer's thresholds; record new states and alerts in one row."""
        customer = status.customer_id
        thresholds = self.thresholds.get(customer)
        if not thresholds:
            return
        before = self.states.get(customer, {})
        step = evaluate(thresholds, before, status, live_grants=live_grants)
        if dict(step.states) == before and not step.alerts:
            return
        await self._record(customer, dict(step.states), step.alerts)

    async def fire(self, customer: str, alerts: Sequence[Alert]) -> None:
        """Record and queue alerts fired by an event rather than a threshold's crossing
        (``payment_failed``: once per failed purchase, its id derived from the purchase);
        one ``credit_alerts`` row with the customer's threshold states unchanged."""
        if alerts:
            await self._record(customer, dict(self.states.get(customer, {})), alerts)

    async def _record(
        self, customer: str, states: dict[str, ThresholdState], alerts: Sequence[Alert]
    ) -> None:
        """One ``credit_alerts`` row (the new states and the alerts), then the queues."""
        async with self._recording:  # one version per row, even from two callers
            version = max(now_ms(), self.versions.get(customer, 0) + 1)
            docs = [a.to_json() for a in alerts]
            await self.chio.call(
                store.append_alert_change,
                customer,
                version,
                orjson.dumps({k: v.to_json() for k, v in states.items()}).decode(),
                orjson.dumps(docs).decode(),
            )
            self.versions[customer] = version
            self.states[customer] = states
        for doc in docs:
            log.info("alert %s for %s: %s", doc["id"], customer, doc["type"])
            self.to_topic[doc["id"]] = _Pending(customer, doc)
            if self.url:
                self.to_webhook[doc["id"]] = _Pending(customer, doc)

    async def deliver(self) -> None:
        """Send what is due: every pending alert to the topic, due webhooks (backoff)."""
        async with self._sending:
            for alert_id, item in list(self.to_topic.items()):
                if self.topic is None:
                    break
                try:
                    await self.topic.send(
                        key=item.customer.encode(), value=canonical_body(item.doc)
                    )
                except Exception as exc:  # retried next time
                    log.warning("alert %s not published: %s", alert_id, exc)
                    break
                await self.chio.call(store.record_delivery, alert_id, "topic", 1, "delivered")
                del self.to_topic[alert_id]
            if self.url and self.to_webhook:
                await self._webhooks()

    async def _webhooks(self) -> None:
        import aiohttp

        now = now_ms()
        due = [(k, v) for k, v in self.to_webhook.items() if v.next_ms <= now]
        if not due:
            return
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for alert_id, item in due:
                now = now_ms()
                request = build_request(alert_id, item.doc, self.secret, now_ms=now)
                item.attempts += 1
                item.first_ms = item.first_ms or now
                status: int | None = None
                try:
                    async with session.post(
                        str(self.url), data=request.body, headers=request.headers
                    ) as answer:
                        status = answer.status
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    log.warning("alert %s: webhook attempt %d failed: %s", alert_id,
                                item.attempts, exc)  # fmt: skip
                if delivered(status):
                    await self.chio.call(
                        store.record_delivery, alert_id, "webhook", item.attempts, "delivered"
                    )
                    del self.to_webhook[alert_id]
                    continue
                when = next_attempt_ms(item.attempts, item.first_ms, now_ms(), alert_id)
                if when is None:
                    log.error("alert %s: webhook given up after %d attempts", alert_id,
                              item.attempts)  # fmt: skip
                    await self.chio.call(
                        store.record_delivery, alert_id, "webhook", item.attempts, "dead"
                    )
                    del self.to_webhook[alert_id]
                else:
                    item.next_ms = when
