"""The Stripe forwarder's Faust install: a timer on the worker that forwards the customers
of its own partitions, the ``customers`` topic follower and the ``stripe-errors`` topic.
What it forwards, and how, is pipeline/billing/ (forwarding.py: verify -> plan -> deliver).
"""

from __future__ import annotations

import logging
from typing import Any

import faust

from meterstream.billing.customers import MappingStore
from meterstream.billing.deliver import error_message, stripe_client
from meterstream.billing.forwarding import Forwarder
from meterstream.errors import StripeError
from meterstream.kafka import customer_partition
from meterstream.meters.config import MetersConfig
from meterstream.metrics import Metrics
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.stripe.ledger import LedgerRow
from meterstream.topics import STRIPE_ERRORS
from meterstream.worker.batch import Pipeline
from meterstream.worker.raw_topics import raw_topic

log = logging.getLogger("meterstream.stripe")


def install_forwarder(
    app: faust.App,
    settings: Settings,
    meters: MetersConfig,
    chio: ClickHouseIO,
    metrics: Metrics,
    pipeline: Pipeline | None = None,
    mappings: MappingStore | None = None,
) -> Forwarder | None:
    """A timer on the worker that forwards the customers of its own partitions.

    Also: the ``customers`` topic follower (``mappings``, which records the topic's
    changes in ClickHouse) and the ``stripe-errors`` topic. Its web routes
    (``/v1/stripe/retry``, ``/v1/stripe/reconcile``, ``/v1/stripe/customers``) are in
    pipeline/api/web.py.
    """
    if not any(m.stripe for m in meters.meters):
        return None
    source = settings.topic("usage-events")
    follower = mappings or MappingStore(settings, chio, settings.kafka_bootstrap_servers or "")
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
        meters,
        chio,
        metrics,
        stripe_client(settings),
        owns,
        mapping_ready=follower.ready,
        publish_error=publish_error,
        publish_refusal=publish_refusal,
    )
    if pipeline is not None:
        forwarder.verifier.track_changes(pipeline.record_lock)
        pipeline.record_listeners.append(forwarder.verifier.record_changed)

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
