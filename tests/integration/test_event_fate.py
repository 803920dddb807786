"""``GET /v1/events/{customer}/{key}`` and ``meterstream event``: one event's fate, on a real
worker (embedded broker, chdb). Each answer is compared with what the test sent: the
meters and windows a counted event went to and the value it took, resends, conflicting
copies, rejections with their reasons, and keys never sent."""

from __future__ import annotations

import json
import time
import urllib.parse
from decimal import Decimal
from typing import Any

import pytest
import requests

from meterstream.endpoints import write_endpoints
from tests.harness import StackSlice, Worker, wait_until
from tests.integration.test_cli import cli
from tests.integration.test_events_api import keys_cli
from tests.support.meters import BY_MODEL, meter_entry, meters_yaml

pytestmark = pytest.mark.integration

METERS = meters_yaml(
    meter_entry("tokens", "ai_tokens", "sum", "properties.tokens", group_by=BY_MODEL,
                window="hour"),
    meter_entry("us_tokens", "ai_tokens", "sum", "properties.tokens", window="day",
                filters='[{property: properties.country, operator: eq, value: "US"}]'),
    meter_entry("calls", "ai_tokens", "count", window="hour"),
)  # fmt: skip
HOUR = 3_600_000


def fate(worker: Worker, customer: str, key: str, api_key: str | None = None) -> dict[str, Any]:
    path = "/".join(urllib.parse.quote(p, safe="") for p in (customer, key))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = requests.get(f"{worker.web_url}/v1/events/{path}", headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return dict(response.json())


def ev(key: str, tokens: Any, ts: int, customer: str = "acme", **props: Any) -> dict[str, Any]:
    return {
        "event_name": "ai_tokens",
        "customer_id": customer,
        "idempotency_key": key,
        "timestamp": ts,
        "properties": {"tokens": tokens, "model": "gpt-4o", **props},
    }


def test_each_fate_says_what_happened_to_the_event(stack: StackSlice) -> None:
    worker = stack.start_worker(stack.meters_file(METERS))
    now = time.time_ns() // 1_000_000
    ts = now - now % HOUR + 1_000  # one second into this hour: every window is this hour's
    if ts > now:
        ts -= HOUR
    counted = ev("k-counted", 1200, ts, country="US")
    resent = ev("k-resent", 5, ts + 1)
    conflict = ev("k-conflict", 7, ts + 2)
    unmetered = {**ev("k-unmetered", 1, ts), "event_name": "page_view"}
    stack.produce([counted, resent, conflict, unmetered])
    wait_until(
        lambda: len(worker.sql("SELECT 1 FROM usage_events")) == 4 or None, what="4 recorded"
    )
    stack.produce(
        [
            resent,
            resent,
            {**conflict, "properties": {"tokens": 70, "model": "gpt-4o"}},
            {**ev("k-bad", "many", ts), "timestamp": "yesterday-ish"},
            ev("k-other-customer", 3, ts, customer="globex"),
        ]
    )
    wait_until(
        lambda: len(worker.sql("SELECT 1 FROM rejected_events")) == 4 or None,
        what="2 duplicates, 1 conflict, 1 invalid event dead-lettered",
    )

    answer = fate(worker, "acme", "k-counted")
    assert answer["fate"] == "counted"
    assert answer["event"]["event_name"] == "ai_tokens"
    assert answer["event"]["properties"]["tokens"] == 1200
    by_meter = {line["meter"]: line for line in answer["counted"]}
    assert set(by_meter) == {"tokens", "us_tokens", "calls"}
    assert Decimal(by_meter["tokens"]["value_taken"]) == 1200
    assert Decimal(by_meter["calls"]["value_taken"]) == 1
    assert by_meter["tokens"]["group_key"] == '{"properties.model":"gpt-4o"}'
    hour_start = ts - ts % HOUR
    assert by_meter["tokens"]["window_start"].startswith(
        time.strftime("%Y-%m-%dT%H:00:00.000", time.gmtime(hour_start / 1000))
    )
    assert by_meter["us_tokens"]["window_start"].endswith("T00:00:00.000+00:00")
    # The hour's tokens window holds all three acme events: 1200 + 5 + 7 (first copy).
    assert Decimal(by_meter["tokens"]["window_value"]) == 1212
    assert by_meter["tokens"]["window_event_count"] == 3
    assert answer["not_counted"] == []

    answer = fate(worker, "acme", "k-resent")
    assert answer["fate"] == "duplicate"
    assert len(answer["duplicates"]) == 2
    # A filter that does not hold is said, per meter.
    assert answer["not_counted"] == [
        {"meter": "us_tokens", "reason": "filter", "detail": "the meter's filter does not hold"}
    ]

    answer = fate(worker, "acme", "k-conflict")
    assert answer["fate"] == "conflicting"
    assert answer["event"]["properties"]["tokens"] == 7  # the first copy counts
    [refused] = answer["conflicting_copies"]
    assert refused["reason"] == "idempotency_conflict"
    assert json.loads(refused["raw"])["properties"]["tokens"] == 70

    answer = fate(worker, "acme", "k-bad")
    assert answer["fate"] == "rejected"
    [rejection] = answer["rejections"]
    assert rejection["reason"] == "invalid_event"
    assert "timestamp" in rejection["detail"]
    assert "event" not in answer

    answer = fate(worker, "acme", "k-unmetered")
    assert answer["fate"] == "uncounted"
    assert answer["not_counted"][0]["detail"] == "no meter reads 'page_view'"

    assert fate(worker, "acme", "k-never-sent")["fate"] == "never_seen"
    # The key exists, for another customer: this customer never sent it.
    assert fate(worker, "acme", "k-other-customer")["fate"] == "never_seen"
    assert fate(worker, "globex", "k-other-customer")["fate"] == "counted"

    # A key restricted to one customer reads only that customer's events.
    state = stack.tmp / "state"
    own = keys_cli(state, "create", "acme-app", "--customer", "acme")
    assert fate(worker, "acme", "k-counted", own)["fate"] == "counted"
    path = f"{worker.web_url}/v1/events/globex/k-other-customer"
    denied = requests.get(path, headers={"Authorization": f"Bearer {own}"}, timeout=60)
    assert denied.status_code == 403
    assert "acme" in denied.json()["error"]

    # The command answers the same through the running worker; exit 0 only when counted.
    cli_state = stack.tmp / "cli-state"
    write_endpoints(cli_state, {"web_url": worker.web_url, "kafka_bootstrap": stack.bootstrap})
    shown = cli("event", "acme", "k-conflict", "--state-dir", str(cli_state))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("conflicting: the first copy counts")
    assert "counted by tokens (sum): took 7 in window" in shown.stdout
    assert "idempotency_conflict" in shown.stdout
    as_json = cli("event", "acme", "k-bad", "--format", "json", "--state-dir", str(cli_state))
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["fate"] == "rejected"
