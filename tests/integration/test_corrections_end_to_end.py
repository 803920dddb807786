"""Fixing history end to end (issue #26): voids, amendments, dry runs and backfills on a real
worker, broker and chdb. Every expectation is a reference computed here from the events
sent (minus the voided ones, with the amended values), never from meterstream's code:
ClickHouse meter_windows, the usage API, the invoice preview and the corrections log.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest

from meterstream.api.keys import KeyStore
from meterstream.endpoints import write_endpoints
from tests.harness import AFTER_SIGKILL, REPO, StackSlice, Worker, wait_until
from tests.support.http import request_json, status_of
from tests.support.meters import FAST_STRIPE, meter_entry, meters_yaml, plans_yaml, stripe

pytestmark = pytest.mark.integration

MINUTE = 60_000

METERS = meters_yaml(
    meter_entry("tokens", "chat", "sum", "properties.tokens", window="minute"),
    meter_entry("calls", "chat", "count", window="minute"),
)

PLANS = plans_yaml("metered", tokens="0.001")


def _windows(worker: Worker, meter: str) -> dict[tuple[str, int], Decimal]:
    """meter_windows, latest version of each window, as (customer, window start) -> value."""
    rows = worker.sql(
        "SELECT customer_id, toUnixTimestamp64Milli(window_start) AS start,"
        " toString(argMax(value, version)) AS v FROM meter_windows"
        f" WHERE meter = '{meter}' GROUP BY customer_id, start"
    )
    return {
        (r["customer_id"], int(r["start"])): Decimal(r["v"]) for r in rows if Decimal(r["v"]) != 0
    }


def _reference(events: list[dict[str, Any]], meter: str) -> dict[tuple[str, int], Decimal]:
    """Per (customer, minute): the sum of tokens (or the count) of the distinct events."""
    seen: set[tuple[str, str]] = set()
    out: dict[tuple[str, int], Decimal] = {}
    for e in events:
        key = (e["customer_id"], e["idempotency_key"])
        if key in seen:
            continue
        seen.add(key)
        window = (e["customer_id"], e["timestamp"] // MINUTE * MINUTE)
        add = Decimal(e["properties"]["tokens"]) if meter == "tokens" else Decimal(1)
        out[window] = out.get(window, Decimal(0)) + add
    return {k: v for k, v in out.items() if v != 0}


def _settle(
    worker: Worker, expected: dict[str, dict[tuple[str, int], Decimal]], timeout: float = 60
) -> None:
    def same() -> bool:
        return all(_windows(worker, m) == want for m, want in expected.items())

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not same():
        time.sleep(0.5)
    for meter, want in expected.items():
        assert _windows(worker, meter) == want, meter


def _stream(now: int, n: int = 80, seed: int = 26) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = []
    for i in range(n):
        customer = "acme" if i % 4 else "other"
        events.append(
            {
                "event_name": "chat",
                "customer_id": customer,
                "idempotency_key": f"ev-{i:04d}",
                "timestamp": rng.randrange(now - 40 * MINUTE, now - 2 * MINUTE),
                "properties": {
                    "tokens": rng.randrange(1, 500),
                    "model": rng.choice(["small", "large"]),
                },
            }
        )
    duplicates = [dict(e) for e in rng.sample(events, 15)]
    return events + duplicates


def _cli(stack: StackSlice, worker: Worker, *args: str) -> Any:
    """``meterstream ARGS --format json`` through the running worker; its JSON answer."""
    write_endpoints(stack.tmp / "state", {"web_url": worker.web_url})
    run = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", *args, "--format", "json"],
        cwd=REPO,
        env=stack.env(stack.meters_file(METERS)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


def _acme(key: str, timestamp: int, tokens: Any, **properties: str) -> dict[str, Any]:
    """A chat event of customer acme."""
    return {
        "event_name": "chat",
        "customer_id": "acme",
        "idempotency_key": key,
        "timestamp": timestamp,
        "properties": {"tokens": tokens, **properties},
    }


def _month(ms: int) -> str:
    return time.strftime("%Y-%m", time.gmtime(ms / 1000))


def _start(stack: StackSlice, **env: str) -> tuple[Worker, str]:
    plans_file = stack.tmp / "plans.yaml"
    plans_file.write_text(PLANS)
    keys = KeyStore(stack.tmp / "state" / "api_keys.json")
    _, operator = keys.create("operator")
    worker = stack.start_worker(
        stack.meters_file(METERS), METERSTREAM_PLANS_FILE=str(plans_file), **env
    )
    return worker, operator


def _usage_total(worker: Worker, token: str, customer: str, lo: int, hi: int) -> Decimal:
    doc = request_json(
        f"{worker.web_url}/v1/customers/{customer}/usage?meter=tokens&from={lo}&to={hi}", token
    )
    return sum((Decimal(str(r["value"])) for r in doc["usage"]), Decimal(0))


def test_range_void_with_property_filter(stack: StackSlice) -> None:
    now = time.time_ns() // 1_000_000
    events = _stream(now)
    worker, operator = _start(stack)
    stack.produce(events)
    _settle(worker, {"tokens": _reference(events, "tokens"), "calls": _reference(events, "calls")})

    lo = (now - 30 * MINUTE) // MINUTE * MINUTE
    hi = (now - 10 * MINUTE) // MINUTE * MINUTE
    voided = {
        e["idempotency_key"]
        for e in events
        if e["customer_id"] == "acme"
        and lo <= e["timestamp"] < hi
        and e["properties"]["model"] == "large"
    }
    assert voided  # the selection is not empty
    body = {
        "kind": "void",
        "customer_id": "acme",
        "from": lo,
        "to": hi,
        "where": [{"property": "properties.model", "operator": "eq", "value": "large"}],
        "author": "ops@example.com",
        "reason": "a bug doubled large-model tokens",
        "correction_id": "void-large-1",
    }
    url = f"{worker.web_url}/v1/corrections"
    # a customer's own key may not correct history; no key neither
    keys = KeyStore(stack.tmp / "state" / "api_keys.json")
    _, acme_key = keys.create("acme only", "acme")
    assert status_of(url, acme_key, "POST", body) == 403
    assert status_of(url, None, "POST", body) == 401
    assert status_of(url, operator, "POST", {**body, "reason": None}) == 400

    # the command's dry run selects the same events, and changes nothing
    dry = _cli(
        stack,
        worker,
        "corrections",
        "void",
        "--customer",
        "acme",
        "--from",
        str(lo),
        "--to",
        str(hi),
        "--where",
        json.dumps(body["where"][0]),
        "--reason",
        "a bug doubled large-model tokens",
        "--dry-run",
    )
    assert dry["status"] == "dry_run"
    assert dry["events_affected"] == len(voided)
    assert worker.sql("SELECT count() AS n FROM event_corrections")[0]["n"] == 0

    doc = request_json(url, operator, "POST", body)
    assert doc["events_affected"] == len(voided)
    assert doc["status"] == "applied"
    kept = [e for e in events if e["idempotency_key"] not in voided]
    expected = {"tokens": _reference(kept, "tokens"), "calls": _reference(kept, "calls")}
    _settle(worker, expected)

    # the usage API (from meter_windows) and the invoice preview follow
    total = sum((v for (c, _), v in expected["tokens"].items() if c == "acme"), Decimal(0))
    assert _usage_total(worker, operator, "acme", now - 60 * MINUTE, now) == total
    period = time.strftime("%Y-%m", time.gmtime(now / 1000))
    spans_months = time.strftime("%Y-%m", time.gmtime((now - 40 * MINUTE) / 1000)) != period

    def preview_tokens() -> Decimal:
        doc = request_json(
            f"{worker.web_url}/v1/customers/acme/invoice-preview?period={period}", operator
        )
        line = next(x for x in doc["lines"] if x["meter"] == "tokens")
        return Decimal(line["quantity"])

    if not spans_months:
        assert preview_tokens() == total

    # the record is unchanged; the effective view leaves the voided events out
    recorded = worker.sql("SELECT uniqExact(customer_id, idempotency_key) AS n FROM usage_events")
    assert recorded[0]["n"] == len({(e["customer_id"], e["idempotency_key"]) for e in events})
    effective = worker.sql(
        "SELECT uniqExact(customer_id, idempotency_key) AS n FROM usage_events_effective"
    )
    assert effective[0]["n"] == recorded[0]["n"] - len(voided)

    # the log: who, why, what
    log = worker.sql(
        "SELECT kind, author, reason, events_affected FROM corrections FINAL"
        " WHERE correction_id = 'void-large-1'"
    )
    assert len(log) == 1
    assert log[0]["kind"] == "void"
    assert log[0]["author"].startswith("ops@example.com (key ")
    assert log[0]["reason"] == "a bug doubled large-model tokens"
    assert int(log[0]["events_affected"]) == len(voided)
    marked = worker.sql(
        "SELECT idempotency_key FROM event_corrections WHERE correction_id = 'void-large-1'"
    )
    assert {r["idempotency_key"] for r in marked} == voided

    # a voided event's fate says so, and who voided it, and why
    some = sorted(voided)[0]
    answer = request_json(f"{worker.web_url}/v1/events/acme/{some}", operator)
    assert answer["fate"] == "voided"
    assert "a bug doubled large-model tokens" in answer["summary"]
    assert [c["correction_id"] for c in answer["corrections"]] == ["void-large-1"]

    # the command shows it too
    shown = _cli(stack, worker, "corrections", "show", "void-large-1")
    assert shown["reason"] == "a bug doubled large-model tokens"
    assert len(shown["events"]) == len(voided)

    # a repeat with the same correction_id is the same correction: nothing changes
    again = request_json(url, operator, "POST", body)
    assert again["repeated"] is True
    assert again["events_affected"] == len(voided)
    time.sleep(2)
    _settle(worker, expected)
    assert len(worker.sql("SELECT * FROM corrections WHERE correction_id = 'void-large-1'")) == 1
    shown = request_json(f"{url}/void-large-1", operator)
    assert {e["idempotency_key"] for e in shown["events"]} == voided
    assert any(
        c["correction_id"] == "void-large-1" for c in request_json(url, operator)["corrections"]
    )
    metrics = worker.metrics()
    assert 'meterstream_corrections_total{kind="void"} 1.0' in metrics
    assert f'meterstream_corrected_events_total{{action="voided"}} {len(voided)}.0' in metrics
    assert 'meterstream_window_rebuilds_total{reason="correction"}' in metrics

    # the voided keys stay seen: sent again, they are duplicates, not counted
    stack.produce([e for e in events if e["idempotency_key"] in voided])
    time.sleep(3)
    _settle(worker, expected)


def test_amend_and_dry_run_then_restart(stack: StackSlice) -> None:
    now = time.time_ns() // 1_000_000
    events = _stream(now, n=40, seed=7)
    worker, operator = _start(stack)
    stack.produce(events)
    _settle(worker, {"tokens": _reference(events, "tokens")})
    url = f"{worker.web_url}/v1/corrections"

    target = next(e for e in events if e["customer_id"] == "acme")
    body = {
        "kind": "amend",
        "keys": [
            {
                "customer_id": "acme",
                "idempotency_key": target["idempotency_key"],
                "properties": {"tokens": 100000, "model": "small"},
            }
        ],
        "reason": "the producer sent the wrong token count",
    }
    amended = [
        {**e, "properties": {"tokens": 100000, "model": "small"}}
        if e["idempotency_key"] == target["idempotency_key"]
        else e
        for e in events
    ]
    before = _reference(events, "tokens")
    after = _reference(amended, "tokens")

    # the dry run says exactly what the amendment then does, and changes nothing
    dry = request_json(url, operator, "POST", {**body, "dry_run": True})
    assert dry["status"] == "dry_run"
    changed = {
        (w["customer_id"], w["window_start_ms"]): (
            Decimal(w["before"]["value"]),
            Decimal(w["after"]["value"]),
        )
        for w in dry["windows"]
        if w["meter"] == "tokens"
    }
    window = ("acme", target["timestamp"] // MINUTE * MINUTE)
    assert changed == {window: (before[window], after[window])}
    period = next(p for p in dry["periods"] if p["meter"] == "tokens")
    assert Decimal(period["change"]) == after[window] - before[window]
    month = time.strftime("%Y-%m", time.gmtime(target["timestamp"] / 1000))
    month_total = sum(
        (v for (c, start), v in before.items() if c == "acme" and _month(start) == month),
        Decimal(0),
    )
    assert Decimal(period["before"]["value"]) == month_total
    assert Decimal(period["after"]["value"]) == month_total + after[window] - before[window]
    preview_url = f"{worker.web_url}/v1/customers/acme/invoice-preview?period={month}"
    invoice = next(i for i in dry["invoices"] if i["customer_id"] == "acme")
    assert Decimal(invoice["total_before"]) == Decimal(request_json(preview_url, operator)["total"])
    cents = Decimal("0.01")
    month_after = month_total + after[window] - before[window]
    assert Decimal(invoice["change"]) == (
        (month_after * Decimal("0.001")).quantize(cents, ROUND_HALF_UP)
        - (month_total * Decimal("0.001")).quantize(cents, ROUND_HALF_UP)
    )
    time.sleep(2)
    _settle(worker, {"tokens": before})
    assert worker.sql("SELECT count() AS n FROM event_corrections")[0]["n"] == 0

    # the command's dry run answers the same
    by_cli = _cli(
        stack,
        worker,
        "corrections",
        "amend",
        f"acme/{target['idempotency_key']}",
        "--properties",
        json.dumps({"tokens": 100000, "model": "small"}),
        "--reason",
        "the producer sent the wrong token count",
        "--dry-run",
    )
    assert by_cli["windows"] == dry["windows"]
    assert by_cli["periods"] == dry["periods"]

    doc = request_json(url, operator, "POST", body)
    assert doc["events_affected"] == 1
    _settle(worker, {"tokens": after})
    # what the dry run said the invoice would be, it is
    assert Decimal(request_json(preview_url, operator)["total"]) == Decimal(invoice["total_after"])

    # a void, and a SIGKILL as soon as it is answered (its rebuild may not have run, or
    # run without its offset committed): after the restart the totals are the corrected
    # ones (the usage-corrections record is replayed; a rebuild reads the record)
    victim = next(
        e
        for e in events
        if e["customer_id"] == "acme" and e["idempotency_key"] != target["idempotency_key"]
    )
    void = {
        "kind": "void",
        "keys": [{"customer_id": "acme", "idempotency_key": victim["idempotency_key"]}],
        "reason": "test traffic",
    }
    assert request_json(url, operator, "POST", void)["events_affected"] == 1
    worker.kill()
    kept = [e for e in amended if e["idempotency_key"] != victim["idempotency_key"]]
    worker, _ = _start(stack)
    _settle(worker, {"tokens": _reference(kept, "tokens")}, timeout=AFTER_SIGKILL)
    # and the worker's own window states are the corrected ones: an event added to the
    # amended and the voided windows lands on the corrected totals
    more = [
        {**target, "idempotency_key": "after-restart-1", "properties": {"tokens": 1}},
        {**victim, "idempotency_key": "after-restart-2", "properties": {"tokens": 2}},
    ]
    stack.produce(more)
    _settle(worker, {"tokens": _reference(kept + more, "tokens")})


def test_backfill_old_and_too_late_events_once(stack: StackSlice) -> None:
    now = time.time_ns() // 1_000_000
    horizon = {"METERSTREAM_DEDUP_HORIZON_SECONDS": "600"}  # 10 minutes
    worker, operator = _start(stack, **horizon)
    rng = random.Random(3)

    def event(i: int, lo: int, hi: int) -> dict[str, Any]:
        return _acme(f"bf-{i:04d}", rng.randrange(lo, hi), rng.randrange(1, 500), model="small")

    live = [event(i, now - 5 * MINUTE, now - MINUTE) for i in range(10)]
    late = [event(100 + i, now - 50 * MINUTE, now - 20 * MINUTE) for i in range(10)]
    old = [event(200 + i, now - 90 * MINUTE, now - 60 * MINUTE) for i in range(15)]
    stack.produce(live + late)  # the late ones are rejected too_late by the stream
    wait_until(
        lambda: (
            worker.sql("SELECT count() AS n FROM rejected_events WHERE reason = 'too_late'")[0]["n"]
            == len(late)
        ),
        what="too_late events rejected",
    )
    _settle(worker, {"tokens": _reference(live, "tokens")})

    url = f"{worker.web_url}/v1/backfill"
    # an old event whose value no meter can read, and one that is not a valid event: each
    # dead-lettered with its reason, as the stream does
    unreadable = _acme("bf-bad-value", now - 70 * MINUTE, "lots")
    invalid = {**_acme("bf-bad-event", now - 70 * MINUTE, 5), "colour": "red"}
    doc = request_json(url, operator, "POST", {"events": [unreadable, invalid], "reason": "bad"})
    assert doc["counts"] == {"backfilled": 1, "live": 1}
    assert [(o["index"], o["rejected"]) for o in doc["outcomes"] if "rejected" in o] == [
        (1, "invalid_event")
    ]
    wait_until(
        lambda: (
            {
                (r["idempotency_key"], r["reason"])
                for r in worker.sql(
                    "SELECT idempotency_key, reason FROM rejected_events"
                    " WHERE idempotency_key LIKE 'bf-bad-%'"
                )
            }
            == {("bf-bad-value", "invalid_value"), ("bf-bad-event", "invalid_event")}
        ),
        what="the bad backfilled events dead-lettered",
    )

    # a dry run of the file: what would be backfilled, nothing written
    file_body = {"events": old + live[:3], "reason": "import of last quarter", "author": "ops"}
    dry = request_json(url, operator, "POST", {**file_body, "dry_run": True})
    assert dry["counts"] == {"backfilled": len(old), "live": 3}
    time.sleep(1)
    _settle(worker, {"tokens": _reference(live, "tokens")})

    doc = request_json(url, operator, "POST", file_body)
    assert doc["counts"] == {"backfilled": len(old), "live": 3}
    _settle(worker, {"tokens": _reference(live + old, "tokens")})
    # the too_late events, re-imported from rejected_events
    doc = request_json(
        url, operator, "POST", {"rejected": "too_late", "reason": "horizon was short"}
    )
    assert doc["counts"] == {"backfilled": len(late)}
    everything = live + old + late
    _settle(worker, {"tokens": _reference(everything, "tokens")})

    # a second run of both changes nothing (the file through the command)
    events_file = stack.tmp / "events.jsonl"
    events_file.write_text("".join(json.dumps(e) + "\n" for e in old + live[:3]))
    again = _cli(
        stack, worker, "backfill", str(events_file), "--reason", "again", "--batch-size", "7"
    )
    assert again["counts"] == {"already_recorded": len(old), "live": 3}
    again = request_json(url, operator, "POST", {"rejected": "too_late", "reason": "twice"})
    assert again["counts"] == {"already_recorded": len(late)}
    time.sleep(3)
    _settle(worker, {"tokens": _reference(everything, "tokens")})
    recorded = worker.sql("SELECT count() AS n FROM usage_events FINAL")
    assert recorded[0]["n"] == len(everything) + 1  # the unreadable one, counted by no meter
    log = worker.sql("SELECT kind, events_affected FROM corrections FINAL ORDER BY created_at")
    assert [(r["kind"], int(r["events_affected"])) for r in log] == [
        ("backfill", 1),
        ("backfill", len(old)),
        ("backfill", len(late)),
    ]
    backfilled = 1 + len(old) + len(late)
    assert f'meterstream_corrected_events_total{{action="backfilled"}} {backfilled}.0' in (
        worker.metrics()
    )


STRIPE_METERS = meters_yaml(
    meter_entry(
        "tokens",
        "chat",
        "sum",
        "properties.tokens",
        window="minute",
        stripe=stripe(
            "chat_tokens", f"customer_id_from: properties.stripe_customer_id, {FAST_STRIPE}"
        ),
    )
)


def _stripe_total(stack: StackSlice) -> Decimal:
    """What Stripe holds for cus_acme's chat_tokens meter, over every period."""
    from meterstream.sinks.stripe.client import StripeMeterClient

    client = StripeMeterClient(None, stack.stripe_url, rate_limit_per_second=None)
    now_s = int(time.time())
    lo, hi = (now_s // 60) * 60 - 2 * 86_400, (now_s // 60 + 1) * 60
    total = Decimal(0)
    for meter in client.list_meters():
        if meter["event_name"] == "chat_tokens":
            for s in client.event_summaries(meter["id"], "cus_acme", lo, hi):
                total += s.aggregated_value
    return total


def _stripe_reference(events: list[dict[str, Any]]) -> Decimal:
    """Per month, the distinct events' tokens rounded half up (``carry``), summed."""
    months: dict[str, Decimal] = {}
    seen: set[str] = set()
    for e in events:
        if e["idempotency_key"] in seen:
            continue
        seen.add(e["idempotency_key"])
        month = _month(e["timestamp"])
        months[month] = months.get(month, Decimal(0)) + Decimal(str(e["properties"]["tokens"]))
    return sum((v.quantize(Decimal(1), ROUND_HALF_UP) for v in months.values()), Decimal(0))


def test_range_void_then_backfill_reach_windows_balance_and_stripe(stack: StackSlice) -> None:
    """The issue's check: a range void and then a backfill (a file of old events and the
    too_late ones kept in rejected_events) leave meter_windows, the credit balance and
    what the Stripe emulator holds equal to the reference."""
    now = time.time_ns() // 1_000_000
    rng = random.Random(2612)

    def event(i: int, lo: int, hi: int) -> dict[str, Any]:
        tokens = str(Decimal(rng.randrange(1, 5000)) / 10)
        return _acme(f"s-{i:04d}", rng.randrange(lo, hi), tokens, stripe_customer_id="cus_acme")

    live = [event(i, now - 9 * MINUTE, now - MINUTE) for i in range(30)]
    live += [dict(e) for e in rng.sample(live, 8)]  # duplicates
    late = [event(100 + i, now - 50 * MINUTE, now - 20 * MINUTE) for i in range(12)]
    old = [event(200 + i, now - 80 * MINUTE, now - 55 * MINUTE) for i in range(12)]

    plans_file = stack.tmp / "plans.yaml"
    plans_file.write_text(PLANS)
    keys = KeyStore(stack.tmp / "state" / "api_keys.json")
    _, operator = keys.create("operator")
    worker = stack.start_worker(
        stack.meters_file(STRIPE_METERS),
        METERSTREAM_PLANS_FILE=str(plans_file),
        METERSTREAM_DEDUP_HORIZON_SECONDS="600",
        METERSTREAM_CREDITS_BURN_SECONDS="0.5",
    )
    credits = f"{worker.web_url}/v1/customers/acme/credits"
    wait_until(
        lambda: status_of(f"{worker.web_url}/v1/customers/acme/entitlements", operator) == 200,
        what="credits ready",
    )
    grant = Decimal("5000.00")
    request_json(f"{credits}/grants", operator, "POST", {"amount": str(grant), "grant_id": "g1"})
    stack.produce(live + late)

    def check(counted: list[dict[str, Any]]) -> None:
        windows = _reference(counted, "tokens")
        _settle(worker, {"tokens": windows})
        tokens = sum(windows.values(), Decimal(0))
        # the burn prices each window (0.001 per token) and takes it from the grant
        wait_until(
            lambda: (
                Decimal(request_json(credits, operator)["balance"])
                == grant - tokens * Decimal("0.001")
            ),
            timeout=60,
            what=f"balance {grant - tokens * Decimal('0.001')}",
        )
        want = _stripe_reference(counted)
        wait_until(lambda: _stripe_total(stack) == want, timeout=120, what=f"Stripe {want}")

    check(live)

    lo, hi = now - 7 * MINUTE, now - 3 * MINUTE
    voided = {
        e["idempotency_key"]
        for e in live
        if lo <= e["timestamp"] < hi and Decimal(e["properties"]["tokens"]) >= 200
    }
    assert voided
    void = {
        "kind": "void",
        "customer_id": "acme",
        "meter": "tokens",
        "from": lo,
        "to": hi,
        "where": [{"property": "properties.tokens", "operator": "gte", "value": 200}],
        "reason": "tokens doubled by a client bug",
    }
    kept = [e for e in live if e["idempotency_key"] not in voided]
    price = Decimal("0.001")

    def tokens(events: list[dict[str, Any]]) -> Decimal:
        return sum(_reference(events, "tokens").values(), Decimal(0))

    # the dry run: the balance and what Stripe receives, before anything changes
    dry = request_json(
        f"{worker.web_url}/v1/corrections", operator, "POST", {**void, "dry_run": True}
    )
    assert [
        (b["customer_id"], Decimal(b["balance_before"]), Decimal(b["balance_after"]))
        for b in dry["balances"]
    ] == [("acme", grant - tokens(live) * price, grant - tokens(kept) * price)]
    assert Decimal(dry["balances"][0]["change"]) == (tokens(live) - tokens(kept)) * price
    assert sum(Decimal(s["value"]) for s in dry["stripe"]) == tokens(kept) - tokens(live)
    doc = request_json(f"{worker.web_url}/v1/corrections", operator, "POST", void)
    assert doc["events_affected"] == len(voided)
    check(kept)

    backfill = f"{worker.web_url}/v1/backfill"
    doc = request_json(backfill, operator, "POST", {"events": old, "reason": "last hour's import"})
    assert doc["counts"] == {"backfilled": len(old)}
    doc = request_json(backfill, operator, "POST", {"rejected": "too_late", "reason": "re-import"})
    assert doc["counts"] == {"backfilled": len(late)}
    check(kept + old + late)
    # again: nothing changes
    doc = request_json(backfill, operator, "POST", {"events": old, "reason": "twice"})
    assert doc["counts"] == {"already_recorded": len(old)}
    time.sleep(3)
    check(kept + old + late)
