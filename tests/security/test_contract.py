"""Contract mismatches (issue #20, item 6), over HTTP and over Kafka, on a real worker.

- ``properties`` nested deeper than the documented 32 levels is an invalid event (422 /
  ``invalid_event``), however deep: also past what a JSON decoder can recurse into.
- A key repeated within one JSON object (``{"events": [A], "events": [B]}``, two
  ``customer_id``s, two ``properties.tokens``) is refused, never silently half-kept.
- Dead letters that the body cannot name a customer for (``too_large``,
  ``invalid_json``) carry the Kafka record key, or the customer of well-formed JSON.

Proving that a refused request wrote nothing: a marker event for the same customer is
sent after it (same partition, processed in order); once the marker is counted,
anything the refused request had written would be too.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import pytest
import requests

from meterstream.events import MAX_EVENT_BYTES
from tests.harness import StackSlice, Worker, wait_until
from tests.security.test_poison import send
from tests.support.cli import keys_cli
from tests.support.meters import meter_entry, meters_yaml

pytestmark = pytest.mark.integration

METERS = meters_yaml(meter_entry("tokens", "chat", "sum", "properties.tokens", window="hour"))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def event(customer: str, key: str, tokens: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "event_name": "chat",
        "customer_id": customer,
        "idempotency_key": key,
        "timestamp": now_ms() - 60_000,
        "properties": {"tokens": tokens, **extra},
    }


def nested(depth: int) -> str:
    """A JSON object ``depth`` levels deep: {"a": {"a": ... 1 ...}}."""
    return '{"a":' * depth + "1" + "}" * depth


def post(worker: Worker, key: str, body: bytes) -> requests.Response:
    return requests.post(
        f"{worker.web_url}/v1/events",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        timeout=60,
    )


def recorded_keys(worker: Worker) -> set[str]:
    return {r["k"] for r in worker.sql("SELECT idempotency_key AS k FROM usage_events")}


def tokens_of(worker: Worker, customer: str) -> Decimal:
    rows = worker.sql(
        "SELECT toString(sum(v)) AS t FROM (SELECT argMax(value, version) AS v FROM meter_windows"
        f" WHERE customer_id = '{customer}' GROUP BY meter, group_key, window_start)"
    )
    return Decimal(rows[0]["t"]) if rows and rows[0]["t"] is not None else Decimal(0)


def test_http_refuses_deep_nesting_and_repeated_keys(stack: StackSlice) -> None:
    worker = stack.start_worker(stack.meters_file(METERS))
    key = keys_cli(stack.tmp / "state", "create", "producer")
    ts = now_ms() - 60_000

    def body_event(k: str, properties: str) -> str:
        return (
            f'{{"event_name":"chat","customer_id":"acme","idempotency_key":"{k}",'
            f'"timestamp":{ts},"properties":{properties}}}'
        )

    refused = {
        # 33 levels, 5,000 levels (past any decoder's recursion), and the same in a batch
        "deep-33": body_event("deep-33", nested(33)),
        "deep-5000": body_event("deep-5000", nested(5_000)),
        "deep-batch": f'{{"events":[{body_event("deep-batch", nested(2_000))}]}}',
        # repeated keys: the batch key, the customer, a property, nested
        "dup-events": (
            f'{{"events":[{body_event("dup-events-a", "{}")}],'
            f'"events":[{body_event("dup-events-b", "{}")}]}}'
        ),
        "dup-customer": body_event("dup-customer", '{"tokens":1}').replace(
            '"customer_id":"acme"', '"customer_id":"acme","customer_id":"other"'
        ),
        "dup-tokens": body_event("dup-tokens", '{"tokens":1,"tokens":1000000}'),
        "dup-nested": body_event("dup-nested", '{"m":{"x":1,"y":2,"x":3}}'),
        "dup-escaped": body_event("dup-escaped", '{"tokens":1,"tok\\u0065ns":2}'),
    }
    for name, body in refused.items():
        response = post(worker, key, body.encode())
        assert response.status_code == 422, (name, response.status_code, response.text)
        text = response.text
        if name.startswith("deep"):
            assert "nested deeper than 32 levels" in text, (name, text)
        else:
            assert "duplicate key" in text, (name, text)
    # in a batch, the problem is the event's, by index
    repeated = '{"tokens":1,"tokens":2}'
    batch = f'{{"events":[{body_event("ok-1", "{}")},{body_event("dup-2", repeated)}]}}'
    response = post(worker, key, batch.encode())
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert [e["index"] for e in errors] == [1]
    assert "properties: duplicate key 'tokens'" in errors[0]["problems"][0]

    marker = json.dumps(event("acme", "marker", 5)).encode()
    assert post(worker, key, marker).status_code == 202
    wait_until(lambda: "marker" in recorded_keys(worker), timeout=60, what="marker recorded")
    assert recorded_keys(worker) == {"marker"}, "a refused request wrote something"
    wait_until(lambda: tokens_of(worker, "acme") == 5, timeout=30, what="marker counted")


def test_kafka_dead_letters_name_the_customer_and_refuse_repeated_keys(
    stack: StackSlice,
) -> None:
    worker = stack.start_worker(stack.meters_file(METERS))
    ts = now_ms() - 60_000

    def raw(customer: str, k: str, properties: str) -> bytes:
        return (
            f'{{"event_name":"chat","customer_id":"{customer}","idempotency_key":"{k}",'
            f'"timestamp":{ts},"properties":{properties}}}'
        ).encode()

    filler = "x" * (MAX_EVENT_BYTES + 10)
    records: list[tuple[bytes | None, bytes]] = [
        (b"k-deep", raw("k-deep", "deep-1", nested(3_000))),
        (b"k-deep33", raw("k-deep33", "deep-2", nested(33))),
        (b"k-large", raw("k-large", "large-1", f'{{"f":"{filler}"}}')),
        (None, raw("json-large", "large-2", f'{{"f":"{filler}"}}')),
        (b"k-badjson", b'{"event_name":"chat","customer_id":"k-badjson",'),
        (b"k-dupcust", raw("k-dupcust", "dup-1", '{"tokens":1}').replace(
            b'"customer_id":"k-dupcust"', b'"customer_id":"k-dupcust","customer_id":"victim"'
        )),
        (b"k-duptok", raw("k-duptok", "dup-2", '{"tokens":1,"tokens":1000000}')),
        (b"k-surrogate", b'{"event_name":5,"customer_id":"\\ud800","idempotency_key":"sur"}'),
        # no key: the dead letter's ids come from the JSON, not UTF-8 text (they once
        # made the dead-letter send raise: a crash loop)
        (None, b'{"event_name":5,"customer_id":"\\udfff","idempotency_key":"\\ud800x"}'),
    ]  # fmt: skip
    good = [(c.encode(), json.dumps(event(c, f"good-{c}", 3)).encode()) for c in ("k-duptok",
            "victim", "k-good")]  # fmt: skip
    send(stack, records + good)
    wait_until(
        lambda: all(tokens_of(worker, c) == 3 for c in ("k-duptok", "victim", "k-good")),
        timeout=120,
        what="the good events counted",
    )
    assert worker.proc.poll() is None, worker.log()[-3000:]
    assert "isolating the record(s)" not in worker.log(), "a contract problem made a batch raise"
    rows = worker.sql("SELECT reason, customer_id, idempotency_key, detail FROM rejected_events")
    by_customer = {r["customer_id"]: r for r in rows}
    expected = {
        "k-deep": "invalid_event",
        "k-deep33": "invalid_event",
        "k-large": "too_large",
        "json-large": "too_large",
        "k-badjson": "invalid_json",
        "k-dupcust": "invalid_event",
        "k-duptok": "invalid_event",
        "k-surrogate": "invalid_event",  # a lone surrogate in its customer_id
        "?": "invalid_event",  # the same without a key: made printable
    }
    assert {c: by_customer[c]["reason"] for c in expected if c in by_customer} == expected
    assert len(rows) == len(expected)
    assert "nested deeper than 32 levels" in by_customer["k-deep"]["detail"]
    assert by_customer["json-large"]["idempotency_key"] == "large-2"
    assert by_customer["?"]["idempotency_key"] == "?x"
    assert "duplicate key 'customer_id'" in by_customer["k-dupcust"]["detail"]
    assert "properties: duplicate key 'tokens'" in by_customer["k-duptok"]["detail"]
    assert recorded_keys(worker) == {"good-k-duptok", "good-victim", "good-k-good"}
    worker.stop()
