"""The whole pipeline on real components: Tansu broker, embedded ClickHouse, the
Stripe emulator through the official SDK. The expected totals are computed by
hand in the test from the unique valid events."""

from __future__ import annotations

import time
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal

import pytest

from tests.harness import StackSlice, http_json, wait_until
from tests.integration.test_stripe_forwarding import cli
from tests.support.meters import BY_MODEL, meter_entry, meters_yaml, stripe

pytestmark = pytest.mark.integration

METERS = meters_yaml(
    meter_entry("tokens", "ai_chat", "sum", "properties.tokens", group_by=BY_MODEL,
                window="hour", stripe=stripe("e2e_tokens")),
    meter_entry("requests", "api_request", "count", window="hour", stripe=stripe("e2e_requests")),
)  # fmt: skip

HOUR = 3_600_000


def _event(key: str, customer: str, name: str, ts: int, **props: object) -> dict[str, object]:
    return {
        "event_name": name,
        "customer_id": customer,
        "idempotency_key": key,
        "timestamp": ts,
        "properties": props,
    }


@pytest.mark.brokers("session", "kafka")
def test_events_to_clickhouse_and_stripe(stack: StackSlice) -> None:
    now = time.time_ns() // 1_000_000
    base = (now // HOUR - 3) * HOUR  # three hours ago: windows are closed
    good = [
        _event("k1", "acme", "ai_chat", base + 1_000, model="a", tokens=100),
        _event("k2", "acme", "ai_chat", base + 2_000, model="b", tokens="20.5"),
        _event("k3", "acme", "ai_chat", base + HOUR + 5, model="a", tokens=7),
        _event("k4", "globex", "ai_chat", base + 10, model="a", tokens=Decimal("0.25")),
        _event("k5", "acme", "api_request", base + 100),
        _event("k6", "acme", "api_request", base + HOUR + 100),
        _event("k7", "globex", "api_request", base + 200),
    ]
    exact_dup = dict(good[0])
    conflict = {**good[1], "properties": {**good[1]["properties"], "tokens": 999}}  # type: ignore[dict-item]
    future = _event("k8", "acme", "ai_chat", now + 3_600_000, model="a", tokens=5)
    missing_field = {"event_name": "ai_chat", "properties": {"tokens": 1}}
    records: list[bytes | dict[str, object]] = [
        *good,
        exact_dup,
        conflict,
        b"{not json",
        missing_field,
        future,
    ]
    meters_file = stack.meters_file(METERS)
    # Who pays is the operator's mapping (the default source), set before the worker runs.
    for customer in ("acme", "globex"):
        mapped = cli(stack, meters_file, "customers", "set", customer, f"cus_{customer}")
        assert mapped.returncode == 0, mapped.stdout + mapped.stderr
    sent_at = time.time()
    stack.produce(records)
    worker = stack.start_worker(meters_file)

    # Expected, by hand, from the unique valid events.
    tokens: dict[tuple[str, str, int], Decimal] = defaultdict(Decimal)
    for e in good:
        if e["event_name"] == "ai_chat":
            props = e["properties"]
            start = int(e["timestamp"]) // HOUR * HOUR  # type: ignore[call-overload]
            tokens[(str(e["customer_id"]), str(props["model"]), start)] += Decimal(
                str(props["tokens"])
            )  # type: ignore[index]
    requests: dict[tuple[str, int], int] = defaultdict(int)
    for e in good:
        if e["event_name"] == "api_request":
            requests[(str(e["customer_id"]), int(e["timestamp"]) // HOUR * HOUR)] += 1  # type: ignore[call-overload]

    wait_until(
        lambda: worker.sql("SELECT count() AS n FROM rejected_events")[0]["n"] >= 5,
        what="rejections recorded",
    )
    wait_until(
        lambda: worker.sql("SELECT count() AS n FROM usage_events FINAL")[0]["n"] == len(good),
        what="record complete",
    )
    windows = worker.sql(
        """SELECT meter, customer_id, group_key, toUnixTimestamp64Milli(window_start) AS ws,
                  argMax(value, version) AS value, argMax(event_count, version) AS n
           FROM meter_windows GROUP BY meter, customer_id, group_key, window_start"""
    )
    got_tokens = {
        (w["customer_id"], w["group_key"], int(w["ws"])): Decimal(str(w["value"]))
        for w in windows
        if w["meter"] == "tokens"
    }
    assert got_tokens == {
        (c, f'{{"properties.model":"{m}"}}', s): v for (c, m, s), v in tokens.items()
    }
    got_requests = {
        (w["customer_id"], int(w["ws"])): int(Decimal(str(w["value"])))
        for w in windows
        if w["meter"] == "requests"
    }
    assert got_requests == dict(requests)

    reasons = worker.sql(
        "SELECT reason, customer_id, idempotency_key FROM rejected_events ORDER BY reason"
    )
    by_reason = defaultdict(list)
    for r in reasons:
        by_reason[r["reason"]].append((r["customer_id"], r["idempotency_key"]))
    assert by_reason["duplicate"] == [("acme", "k1")]
    assert by_reason["idempotency_conflict"] == [("acme", "k2")]
    assert by_reason["future_timestamp"] == [("acme", "k8")]
    assert len(by_reason["invalid_json"]) == 1
    assert len(by_reason["invalid_event"]) == 1

    # Stripe: whole numbers whose sum equals the ClickHouse total (rounded by the carry rule).
    def stripe_events() -> list[dict[str, object]]:
        got = http_json(f"{stack.stripe_url}/_emulator/events")
        return list(got["data"] if isinstance(got, dict) else got)

    totals_ch = defaultdict(Decimal)
    for (customer, _model, _start), value in tokens.items():
        totals_ch[("e2e_tokens", customer)] += value
    for (customer, _start), n in requests.items():
        totals_ch[("e2e_requests", customer)] += n
    rounded = {k: int(v.quantize(Decimal(1), rounding=ROUND_HALF_UP)) for k, v in totals_ch.items()}
    expected_stripe = {k: v for k, v in rounded.items() if v}  # nothing is sent for a zero

    def stripe_totals() -> dict[tuple[str, str], int]:
        totals: dict[tuple[str, str], int] = defaultdict(int)
        for ev in stripe_events():
            payload = ev["payload"]
            assert isinstance(payload, dict)
            assert str(payload["value"]).lstrip("-").isdigit()
            totals[(str(ev["event_name"]), str(payload["stripe_customer_id"])[4:])] += int(
                payload["value"]
            )
        return dict(totals)

    wait_until(lambda: stripe_totals() == expected_stripe, timeout=60, what="Stripe totals")
    stats = http_json(f"{stack.stripe_url}/_emulator/stats")
    assert stats["rejected_duplicates"] == 0

    # /metrics agrees with ClickHouse.
    metrics = {}
    for line in worker.metrics().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metrics[name] = float(value)
    assert metrics["meterstream_events_in_total"] == len(records)
    # the end of the last batch: after the records were sent, before this read
    assert sent_at < metrics["meterstream_last_batch_seconds"] <= time.time()
    assert metrics["meterstream_events_accepted_total"] == len(good)
    assert metrics["meterstream_events_duplicate_total"] == 1
    for reason, rows in by_reason.items():
        if reason != "duplicate":
            assert metrics[f'meterstream_events_rejected_total{{reason="{reason}"}}'] == len(rows)
    assert metrics['meterstream_meter_updates_total{meter="tokens"}'] == 4
    assert metrics['meterstream_meter_updates_total{meter="requests"}'] == 3
    assert metrics['meterstream_stripe_requests_total{outcome="sent"}'] == len(stripe_events())
    assert metrics['meterstream_sink_batch_rows_sum{table="usage_events"}'] == len(good)
