"""The durable customer mapping on a real ClickHouse (sinks/stripe/customers.py) and the
rules by which ``customers`` topic records are recorded (pipeline/billing/customers.py,
MappingStore.import_record): a replay is not a change, a record older than the
current mapping is ignored, a malformed one changes nothing. Also the read of the
Stripe ids a customer's events name, the input of the property pin."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from meterstream.billing.customers import MappingStore
from meterstream.events import UsageEvent
from meterstream.metrics import Metrics
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.migrate import migrate
from meterstream.sinks.clickhouse.writer import USAGE_EVENTS, USAGE_EVENTS_COLUMNS, usage_event_row
from meterstream.sinks.stripe import customers as store
from tests.integration.clickhouse_fixtures import *  # noqa: F403

pytestmark = pytest.mark.integration


def value(stripe_id: str | None) -> bytes:
    return b"null" if stripe_id is None else f'{{"stripe_customer_id": "{stripe_id}"}}'.encode()


def test_changes_are_kept_and_the_latest_is_current(ch: ClickHouse) -> None:
    migrate(ch)
    first = store.append_change(ch, "acme", "cus_1", "cli", "alice@host")
    assert first is not None
    assert store.append_change(ch, "acme", "cus_1", "api", "key k (ops)") is None  # no-op
    second = store.append_change(ch, "acme", "cus_2", "api", "key k (ops)")
    assert second is not None and second.version > first.version
    assert store.append_change(ch, "nobody", None, "cli", "alice@host") is None
    removed = store.append_change(ch, "globex", "cus_g", "cli", "alice@host")
    assert removed is not None
    store.append_change(ch, "globex", None, "cli", "bob@host")
    assert store.current_mapping(ch) == {"acme": "cus_2"}
    assert [(r.stripe_customer_id, r.changed_by) for r in store.history(ch, "acme")] == [
        ("cus_1", "alice@host"),
        ("cus_2", "key k (ops)"),
    ]
    assert store.current_rows(ch)["globex"].stripe_customer_id == ""


def test_topic_records_replays_stale_and_malformed(ch: ClickHouse) -> None:
    migrate(ch)
    chio = ClickHouseIO(ch, Metrics())
    mappings = MappingStore(Settings(), chio, "unused:9092")

    async def run() -> None:
        await mappings.import_record(b"acme", value("cus_1"), 1_000)
        await mappings.import_record(b"acme", value("cus_1"), 1_000)  # a replay
        await mappings.import_record(b"acme", value("cus_2"), 2_000)
        await mappings.import_record(b"acme", value("cus_old"), 1_500)  # older: ignored
        await mappings.import_record(b"acme", b"not json", 3_000)  # ignored
        await mappings.import_record(b"acme", value(" cus_x"), 3_000)  # ignored
        await mappings.import_record(b"", value("cus_e"), 3_000)  # no customer: ignored
        await mappings.import_record(b"globex", value("cus_g"), 1_000)
        await mappings.import_record(b"globex", None, 4_000)  # a tombstone removes it
        await mappings.import_record(b"initech", None, 4_000)  # nothing to remove
        # A worker restart replays the whole topic: nothing new is recorded.
        fresh = MappingStore(Settings(), chio, "unused:9092")
        for key, val, ts in [
            (b"acme", value("cus_1"), 1_000),
            (b"acme", value("cus_2"), 2_000),
            (b"globex", value("cus_g"), 1_000),
            (b"globex", None, 4_000),
        ]:
            await fresh.import_record(key, val, ts)

    asyncio.run(run())
    rows = ch.query_rows(
        "SELECT customer_id, stripe_customer_id, origin, version FROM customer_mappings FINAL"
        " ORDER BY customer_id, version"
    )
    assert rows == [
        ("acme", "cus_1", "topic", 1_000),
        ("acme", "cus_2", "topic", 2_000),
        ("globex", "cus_g", "topic", 1_000),
        ("globex", "", "topic", 4_000),
    ]
    assert store.current_mapping(ch) == {"acme": "cus_2"}


def test_property_values_are_read_first_first(ch: ClickHouse) -> None:
    migrate(ch)

    def event(customer: str, key: str, props: dict[str, object]) -> UsageEvent:
        return UsageEvent("chat", customer, key, 1_790_000_000_000, {"n": Decimal(1), **props})

    batches = [
        (1_000, [event("a", "a1", {"stripe_customer_id": "cus_a"})]),
        (2_000, [event("a", "a2", {"stripe_customer_id": "cus_v"}), event("b", "b1", {})]),
        (3_000, [event("a", "a3", {"stripe_customer_id": "cus_a"})]),
        (4_000, [event("b", "b2", {"stripe": {"customer_id": "cus_b"}})]),
        (5_000, [event("c", "c1", {"stripe_customer_id": 5})]),  # not a string
        (6_000, [event("c", "c2", {"stripe_customer_id": None})]),  # null: no value
        (7_000, [event("c", "c3", {"stripe_customer_id": {"id": "cus_v"}})]),
    ]
    for ingested, events in batches:
        ch.insert(
            USAGE_EVENTS,
            [usage_event_row(e, ingested, ["m"]) for e in events],
            USAGE_EVENTS_COLUMNS,
        )
    flat = store.property_values(ch, "properties.stripe_customer_id", ["a", "b", "c"])
    assert flat == {
        "a": [("cus_a", 1_000), ("cus_v", 2_000)],
        "c": [("<Int64> 5", 5_000), ('<Object> {"id":"cus_v"}', 7_000)],
    }
    nested = store.property_values(ch, "properties.stripe.customer_id", ["a", "b"])
    assert nested == {"b": [("cus_b", 4_000)]}
