"""Every topic meterstream reads or writes: name, partitions, key, value, retention, cleanup.

The topic names and the event format on ``usage-events`` are the public
interface for producers: any Kafka client may produce JSON events keyed by
``customer_id`` (UTF-8) with the default (murmur2) partitioner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str
    value: str
    retention_ms: int | None
    cleanup_policy: Literal["delete", "compact"]
    partitions: int | None = None  # None: the configured pipeline partition count

    def config(self) -> dict[str, str]:
        cfg: dict[str, str] = {"cleanup.policy": self.cleanup_policy}
        if self.retention_ms is not None:
            cfg["retention.ms"] = str(self.retention_ms)
        return cfg


USAGE_EVENTS = TopicSpec(
    name="usage-events",
    key="customer_id (UTF-8)",
    value="usage event JSON (see README, 'The event')",
    retention_ms=14 * DAY_MS,  # > the 7-day dedup horizon, so a replay can rebuild state
    cleanup_policy="delete",
)
USAGE_EVENTS_DLQ = TopicSpec(
    name="usage-events-dlq",
    key="customer_id (UTF-8, may be empty)",
    value=(
        'JSON {"reason", "detail", "raw", "customer_id", "idempotency_key", "meter", "received_at"}'
    ),
    retention_ms=30 * DAY_MS,
    cleanup_policy="delete",
)
CUSTOMERS = TopicSpec(
    name="customers",
    key="customer_id (UTF-8)",
    value=(
        'JSON {"stripe_customer_id": "cus_..."}; null deletes the mapping; recorded in'
        " ClickHouse customer_mappings by every worker (pipeline/billing/customers.py)"
    ),
    retention_ms=None,
    cleanup_policy="compact",
)
CUSTOMER_PLANS = TopicSpec(
    name="customer-plans",
    key="customer_id (UTF-8)",
    value=(
        'JSON {"plans": [{"plan": NAME, "from": RFC 3339}, ...]}: the whole plan schedule;'
        " null removes it; recorded in ClickHouse customer_plans by every worker"
        " (pipeline/billing/assignments.py)"
    ),
    retention_ms=None,
    cleanup_policy="compact",
)
STRIPE_ERRORS = TopicSpec(
    name="stripe-errors",
    key="identifier (UTF-8); refused:<customer>:<reason>:<stripe id> for a refusal",
    value=(
        "JSON of the stripe_meter_events row that failed permanently, or of a Stripe"
        " customer id an event property named and the forwarder refused (error_code"
        ' "stripe_customer_refused", pipeline/billing/stripe_ids.py)'
    ),
    retention_ms=30 * DAY_MS,
    cleanup_policy="delete",
)

ENTITLEMENTS = TopicSpec(
    name="entitlements",
    key="customer_id (UTF-8)",
    value=(
        'JSON {"customer_id", "has_access", "reasons", "balance", "currency", "period",'
        ' "usage": {meter: {"used", "limit", "remaining", "limit_reached"}},'
        ' "requires_balance", "at_ms", "cause"}: the latest entitlement, written on every'
        " change by the worker (pipeline/worker/credits.py)"
    ),
    retention_ms=None,
    cleanup_policy="compact",
)
BILLING_ALERTS = TopicSpec(
    name="billing-alerts",
    key="customer_id (UTF-8)",
    value=(
        'JSON {"id": "alrt_...", "object": "billing_alert", "type", "customer_id",'
        ' "threshold_id", "at_ms", "cause", "value", "threshold", "currency", "meter", ...}:'
        " each credit alert once per crossing (pipeline/worker/alerts.py); consumers"
        " deduplicate by id"
    ),
    retention_ms=30 * DAY_MS,
    cleanup_policy="delete",
)
USAGE_CORRECTIONS = TopicSpec(
    name="usage-corrections",
    key="customer_id (UTF-8); same partition count as usage-events (co-partitioned)",
    value=(
        'JSON {"correction_id", "kind": "void"|"amend"|"backfill", "windows": [[meter,'
        ' customer_id, group_key, window_start_ms], ...], "events": [event JSON, ...]}:'
        " written by the worker's correction and backfill routes only; the worker rebuilds"
        " those windows from the effective record (backfill: counts the events first)"
        " (pipeline/worker/corrections.py)"
    ),
    retention_ms=14 * DAY_MS,
    cleanup_policy="delete",
)
ALL_TOPICS = (
    USAGE_EVENTS,
    USAGE_EVENTS_DLQ,
    USAGE_CORRECTIONS,
    CUSTOMERS,
    CUSTOMER_PLANS,
    STRIPE_ERRORS,
    ENTITLEMENTS,
    BILLING_ALERTS,
)
