"""/metrics on a real worker (Tansu, chdb, the Stripe emulator): read by prometheus_client's
own parser, the latency histograms move as events flow; ``meterstream status`` reads it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import REPO, StackSlice, Worker, wait_until
from tests.integration.test_stripe_forwarding import cli

pytestmark = pytest.mark.integration

METERS = """
meters:
  - name: tokens
    event_name: ai_chat
    aggregation: sum
    value: properties.tokens
    window: hour
    stripe: {event_name: expo_tokens, interval: 1s, grace: 0s}
  - name: calls
    event_name: ai_chat
    aggregation: count
    window: hour
"""

HOUR = 3_600_000
HISTOGRAMS = ("record", "window", "stripe")


def families(worker: Worker) -> dict[str, Any]:
    """Family name -> family, parsed by Prometheus's text parser (raises on bad text)."""
    return {f.name: f for f in text_string_to_metric_families(worker.metrics())}


def counts(worker: Worker) -> dict[str, float]:
    found = families(worker)
    out = {}
    for stage in HISTOGRAMS:
        family = found[f"meterstream_event_to_{stage}_seconds"]
        assert family.type == "histogram"
        samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
        count = samples[(f"{family.name}_count", None)]
        assert samples[(f"{family.name}_bucket", "+Inf")] == count
        buckets = sorted(
            (float(le), v) for (name, le), v in samples.items() if name.endswith("_bucket")
        )
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        out[stage] = count
    return out


def _events(customers: list[str], n: int, base: int, tag: str) -> list[dict[str, object]]:
    return [
        {
            "event_name": "ai_chat",
            "customer_id": customers[i % len(customers)],
            "idempotency_key": f"{tag}-{i}",
            "timestamp": base + i,
            "properties": {"tokens": i + 1},
        }
        for i in range(n)
    ]


def test_metrics_parse_and_histograms_move_with_events(stack: StackSlice) -> None:
    meters_file = stack.meters_file(METERS)
    customers = ["acme", "globex", "initech"]
    for customer in customers:
        done = cli(stack, meters_file, "customers", "set", customer, f"cus_{customer}")
        assert done.returncode == 0, done.stdout + done.stderr
    worker = stack.start_worker(meters_file)

    # Before any event: every metric name the worker always had, and empty histograms.
    found = families(worker)
    for name in (
        "meterstream_events_in",
        "meterstream_events_accepted",
        "meterstream_events_duplicate",
        "meterstream_consumer_lag",
        "meterstream_stripe_last_forward_seconds",
        "meterstream_sink_batch_rows",
        "meterstream_processing_guarantee",
    ):
        assert name in found, sorted(found)
    assert counts(worker) == {"record": 0, "window": 0, "stripe": 0}

    base = (time.time_ns() // 1_000_000 // HOUR - 2) * HOUR  # closed windows: forwarded now
    first = _events(customers, 60, base, "a")
    stack.produce(first)
    wait_until(lambda: counts(worker)["window"] == 60, timeout=120, what="60 events counted")
    # one Stripe meter event per customer, each carrying that customer's oldest event
    wait_until(lambda: counts(worker)["stripe"] >= 3, timeout=120, what="Stripe deliveries")
    assert counts(worker)["record"] == 60

    # Latencies are real durations: this test's events took seconds, not hours.
    found = families(worker)
    for stage in HISTOGRAMS:
        family = found[f"meterstream_event_to_{stage}_seconds"]
        values = {(s.name, s.labels.get("le")): s.value for s in family.samples}
        total = values[(f"{family.name}_count", None)]
        assert 0 <= values[(f"{family.name}_sum", None)] < 300 * total
        assert values[(f"{family.name}_bucket", "300.0")] == total

    # Duplicates are no new events: record and window counts stay; new events move them.
    stack.produce(first[:10])
    wait_until(
        lambda: found_value(worker, "meterstream_events_duplicate_total") == 10,
        timeout=120,
        what="duplicates dropped",
    )
    assert counts(worker)["record"] == 60 and counts(worker)["window"] == 60
    stack.produce(_events(customers, 15, base + HOUR, "b"))
    wait_until(lambda: counts(worker)["record"] == 75, timeout=120, what="15 more recorded")
    wait_until(lambda: counts(worker)["window"] == 75, timeout=120, what="15 more counted")
    wait_until(lambda: counts(worker)["stripe"] >= 6, timeout=120, what="Stripe again")

    def lag() -> float | None:
        text = worker.metrics()
        values = [
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "meterstream_consumer_lag"
        ]
        return sum(values) if values else None

    wait_until(lambda: lag() == 0, timeout=60, what="consumer lag 0 (gauge every 10 s)")
    # meterstream status on the same worker (its URL given, as for a remote stack).
    done = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "status", "--worker", worker.web_url,
         "--interval", "1", "--json"],
        cwd=REPO, env=stack.env(meters_file), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert status["ready"] is True
    assert status["broker"]["check"] == "ok" and status["clickhouse"]["check"] == "ok"
    assert status["events_in_total"] == 85 and status["events_accepted_total"] == 75
    assert status["events_rejected_total"] == {}  # duplicates are not dead-lettered
    assert status["consumer_lag"]["total"] == 0
    assert status["events_per_second"] == 0  # nothing flows while it reads
    assert set(status["stripe"]["last_forward"]) == {"tokens"}
    assert time.time() - status["stripe"]["last_forward"]["tokens"] < 120
    assert status["stripe"]["error_rows"] == {"tokens": 0}


def found_value(worker: Worker, sample: str) -> float:
    for family in text_string_to_metric_families(worker.metrics()):
        for s in family.samples:
            if s.name == sample:
                return float(s.value)
    return 0.0
