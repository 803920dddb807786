"""The Stripe forwarder's Faust install: a timer on the worker that forwards the customers
of its own partitions, the ``customers`` topic follower and the ``stripe-errors`` topic.
What it forwards, and how, is pipeline/billing/ (forwarding.py: verify -> plan -> deliver).
"""

from __future__ import annotations

import logging
from typing import Any

from meterstream.billing.deliver import error_message, stripe_client
from meterstream.billing.forwarding import Forwarder
from meterstream.errors import StripeError
from meterstream.kafka import customer_partition
from meterstream.sinks.stripe.ledger import LedgerRow
from meterstream.topics import STRIPE_ERRORS
from meterstream.worker.raw_topics import raw_topic
from meterstream.worker.services import WorkerServices

log = logging.getLogger("meterstream.stripe")


def install_forwarder(services: WorkerServices) -> Forwarder | None:
    """A timer on the worker that forwards the customers of its own partitions.

    Also: the ``customers`` topic follower (``services.mappings``, which records the topic's
    changes in ClickHouse) and the ``stripe-errors`` topic. Its web routes
    (``/v1/stripe/retry``, ``/v1/stripe/reconcile``, ``/v1/stripe/customers``) are in
    pipeline/api/web.py.
    """
    app, settings, metrics = services.app, services.settings, services.metrics
    if not any(m.stripe for m in services.meters.meters):
        return None
    source = settings.topic("usage-events")
    follower = services.mappings
    errors_topic = raw_topic(app, settings.topic(STRIPE_ERRORS.name))

    def owns(customer: str) -> bool:
        assigned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == source}
        return customer_partition(customer, settings.partitions) in assigned

    async def publish_error(row: LedgerRow, message: str) -> None:
        await errors_topic.send(key=row.identifier.encode(), value=error_message(row, message))

    async def publish_refusal(key: str, value: bytes) -> None:
        await errors_topic.send(key=key.encode(), value=value)

    forwarder = Forwarder(
        settings,
        services.meters,
        services.chio,
        stripe_client(settings),
        owns,
        mapping_ready=follower.ready,
        publish_error=publish_error,
        publish_refusal=publish_refusal,
    )
    forwarder.verifier.track_changes(services.pipeline.record_lock)
    services.pipeline.record_listeners.append(forwarder.verifier.record_changed)

    def on_rebalance(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        forwarder.verifier.invalidate()
        metrics.stripe_arrivals.clear()

    app.on_partitions_revoked.connect(on_rebalance)
    app.on_partitions_assigned.connect(on_rebalance)

    @app.task
    async def follow_customer_mapping() -> None:
        await follower.follow()

    @app.timer(forwarder.tick_seconds)
    async def forward_to_stripe() -> None:
        try:
            await forwarder.tick()
        except StripeError as exc:
            log.error("Stripe forwarding failed, will retry next interval: %s", exc)
        except Exception:
            # A bug or a total nobody foresaw must not stop the worker (ingestion goes
            # on without billing): said loudly, retried next interval.
            log.exception("Stripe forwarding raised; will retry next interval")

    return forwarder
