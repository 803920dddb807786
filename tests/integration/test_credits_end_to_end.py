"""Prepaid credits end to end (issue #25): a stream burns two grants of different priority,
one expiring mid-stream; a late event, duplicates and a SIGKILL of the worker mid-stream
change nothing. The balance (API, CLI), the ledger in ClickHouse (its sum and its totals by
kind) and the entitlement flip (API and the compacted ``entitlements`` topic) equal a
reference computed here from the events, minute windows and the grants, without the
credits package.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import subprocess
import sys
import time
from decimal import Decimal
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from meterstream.api.keys import KeyStore
from meterstream.endpoints import write_endpoints
from tests.harness import AFTER_SIGKILL, REPO, StackSlice, Worker, wait_until
from tests.support.http import read_latencies, request_json, serve_posts, status_of
from tests.support.meters import meter_entry, meters_yaml, plans_yaml

pytestmark = pytest.mark.integration

MINUTE = 60_000
HOUR = 3_600_000
PRICE = Decimal("0.001")  # per token

METERS = meters_yaml(meter_entry("tokens", "chat", "sum", "properties.tokens", window="minute"))

PLANS = plans_yaml("prepaid", tokens="0.001")


def _iso(ms: int) -> str:
    import datetime as dt

    when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _reference(events: list[dict[str, Any]], grants: list[dict[str, Any]]) -> dict[str, Decimal]:
    """Burn by hand: per minute window (dated at its start) in time order, the grants usable
    then, lowest priority first; what is left of a grant at its expiry expires."""
    windows: dict[int, int] = {}
    seen = set()
    for e in events:
        if e["idempotency_key"] in seen:
            continue
        seen.add(e["idempotency_key"])
        start = e["timestamp"] // MINUTE * MINUTE
        windows[start] = windows.get(start, 0) + e["properties"]["tokens"]
    left = {g["id"]: g["amount"] for g in grants}
    expired = burned = uncovered = Decimal(0)
    moments = sorted(
        [(start, 1, "spend", start) for start in windows]
        + [(g["expires"], 0, "expiry", g["id"]) for g in grants if g["expires"] is not None]
    )
    for at, _, what, ref in moments:
        if what == "expiry":
            expired += left[ref]
            left[ref] = Decimal(0)
            continue
        spend = windows[ref] * PRICE
        for g in sorted(grants, key=lambda g: g["priority"]):
            if g["effective"] <= at and (g["expires"] is None or at < g["expires"]):
                take = min(left[g["id"]], spend)
                left[g["id"]] -= take
                spend -= take
                burned += take
        uncovered += spend
    granted = sum((g["amount"] for g in grants), Decimal(0))
    return {
        "granted": granted,
        "burned": burned,
        "expired": expired,
        "uncovered": uncovered,
        "balance": granted - burned - expired - uncovered,
        **{f"left:{gid}": amount for gid, amount in left.items()},
    }


def _ledger_totals(worker: Worker, customer: str) -> dict[str, Decimal]:
    rows = worker.sql(
        "SELECT kind, toString(sum(amount)) AS amount FROM credit_ledger FINAL"
        f" WHERE customer_id = '{customer}' GROUP BY kind"
    )
    return {r["kind"]: Decimal(r["amount"]) for r in rows}


SECRET = "whsec_test_credits"


class Receiver:
    """A webhook endpoint: refuses each alert's first attempt (500), accepts the next."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bytes]] = []  # (event id, signature header, body)
        self.down = False  # refuse everything (503) while set
        self.server, self.url = serve_posts(self._answer, "/hook")

    def _answer(self, request: BaseHTTPRequestHandler, body: bytes) -> int:
        event = request.headers["Meterstream-Event-Id"]
        first = all(e != event for e, _, _ in self.calls)
        self.calls.append((event, request.headers["Meterstream-Signature"], body))
        return 503 if self.down else 500 if first else 200

    def accepted(self) -> dict[str, dict[str, Any]]:
        """Alerts answered 200, by id, each signature checked here (Stripe's scheme)."""
        out: dict[str, dict[str, Any]] = {}
        for event, header, body in self.calls:
            parts = dict(p.split("=", 1) for p in header.split(","))
            mac = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
            assert hmac.compare_digest(mac.hexdigest(), parts["v1"]), header
            assert abs(int(parts["t"]) - time.time()) < 300
            doc = json.loads(body)
            assert doc["id"] == event
            if [e for e, _, _ in self.calls].count(event) >= 2:
                out[event] = doc
        return out


def _worker_env(stack: StackSlice, receiver: Receiver) -> dict[str, str]:
    plans_file = stack.tmp / "plans.yaml"
    plans_file.write_text(PLANS)
    return {
        "METERSTREAM_PLANS_FILE": str(plans_file),
        "METERSTREAM_CREDITS_BURN_SECONDS": "0.5",
        "METERSTREAM_CREDITS_WEBHOOK_URL": receiver.url,
        "METERSTREAM_CREDITS_WEBHOOK_SECRET": SECRET,
    }


def _records(stack: StackSlice, topic: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        consumer = AIOKafkaConsumer(
            f"{stack.prefix}{topic}",
            bootstrap_servers=stack.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        out: list[dict[str, Any]] = []
        try:
            batches = await consumer.getmany(timeout_ms=3000)
            while batches:
                for records in batches.values():
                    out += [json.loads(r.value) for r in records if r.key == b"acme"]
                batches = await consumer.getmany(timeout_ms=1000)
        finally:
            await consumer.stop()
        return sorted(out, key=lambda d: d["at_ms"])

    return asyncio.run(read())


def test_two_grants_burn_expire_and_cut_off_exactly(stack: StackSlice) -> None:
    now = time.time_ns() // 1_000_000
    t_mid = (now - 25 * MINUTE) // MINUTE * MINUTE  # grant A expires here, mid-stream
    rng = random.Random(25)

    def event(i: int, lo: int, hi: int) -> dict[str, Any]:
        return {
            "event_name": "chat",
            "customer_id": "acme",
            "idempotency_key": f"cr-{i:04d}",
            "timestamp": rng.randrange(lo, hi),
            "properties": {"tokens": rng.randrange(1, 400)},
        }

    before = [event(i, now - 50 * MINUTE, t_mid) for i in range(40)]
    after = [event(100 + i, t_mid, now - 2 * MINUTE) for i in range(40)]
    late = [event(200, now - 45 * MINUTE, t_mid)]  # arrives last, burns against grant A
    s1 = sum(e["properties"]["tokens"] for e in before + late) * PRICE
    s2 = sum(e["properties"]["tokens"] for e in after) * PRICE
    # A (priority 10) covers what happens before t_mid with room to spare, B (priority 50)
    # less than what happens after: the balance runs out mid-stream.
    a_amount = (s1 + Decimal(2)).quantize(Decimal("0.01"))
    b_amount = (s2 / 2).quantize(Decimal("0.01"))
    effective = now - 2 * HOUR

    receiver = Receiver()
    env = _worker_env(stack, receiver)
    keys = KeyStore(stack.tmp / "state" / "api_keys.json")
    _, operator = keys.create("operator")
    _, acme_key = keys.create("acme only", "acme")
    _, other_key = keys.create("other only", "other")
    worker = stack.start_worker(
        stack.meters_file(METERS),
        **env,
    )
    base = f"{worker.web_url}/v1/customers/acme"
    wait_until(lambda: status_of(f"{base}/entitlements", operator) == 200, what="credits ready")
    assert status_of(f"{base}/credits", operator) == 404  # no grant yet

    # grant A through the API; a restricted key may not grant, even to itself
    body_a = {
        "amount": str(a_amount),
        "priority": 10,
        "effective": _iso(effective),
        "expires": _iso(t_mid),
        "grant_id": "grant-a",
    }
    assert status_of(f"{base}/credits/grants", acme_key, "POST", body_a) == 403
    made = request_json(f"{base}/credits/grants", operator, "POST", body_a)
    assert made["grant"]["grant_id"] == "grant-a"
    # nothing used yet: all of A expired at t_mid (already past)
    assert Decimal(made["balance"]) == 0
    # a float amount is refused
    refused = {"amount": 1.5, "grant_id": "float"}
    assert status_of(f"{base}/credits/grants", operator, "POST", refused) == 400

    # grant B through the CLI (through the running worker)
    state = stack.tmp / "cli-state"
    write_endpoints(state, {"web_url": worker.web_url})
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    clean["METERSTREAM_API_KEY"] = operator

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meterstream.cli", "credits", *args, "--state-dir", str(state)],
            cwd=REPO, env=clean, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    granted = cli("grant", "acme", str(b_amount), "--priority", "50",
                  "--effective", _iso(effective), "--grant-id", "grant-b")  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    assert "grant-b" in granted.stdout
    grants = [
        {"id": "grant-a", "amount": a_amount, "priority": 10, "effective": effective,
         "expires": t_mid},
        {"id": "grant-b", "amount": b_amount, "priority": 50, "effective": effective,
         "expires": None},
    ]  # fmt: skip
    assert Decimal(request_json(f"{base}/credits", acme_key)["balance"]) == b_amount
    low = (b_amount / 2).quantize(Decimal("0.01"))
    thresholds = {"thresholds": [
        {"threshold_id": "low", "kind": "balance_below", "amount": str(low)},
        {"threshold_id": "out", "kind": "balance_exhausted"},
    ]}  # fmt: skip
    assert status_of(f"{base}/credits/alerts", acme_key, "PUT", thresholds) == 403
    bad = {"thresholds": [{"threshold_id": "x", "kind": "nope"}]}
    assert status_of(f"{base}/credits/alerts", operator, "PUT", bad) == 400
    request_json(f"{base}/credits/alerts", operator, "PUT", thresholds)
    assert request_json(f"{base}/entitlements", acme_key)["has_access"] is True

    # the stream, part one: before t_mid, sent twice (duplicates burn nothing)
    stack.produce(before)
    stack.produce(before)
    part_one = _reference(before, grants)
    assert part_one["balance"] > 0

    def balance() -> Decimal:
        return Decimal(request_json(f"{base}/credits", operator)["balance"])

    wait_until(lambda: balance() == part_one["balance"], timeout=60, what="part one burned")
    assert request_json(f"{base}/entitlements", operator)["has_access"] is True

    # part two: after t_mid, then a late event from before it; SIGKILL mid-stream
    stack.produce(after[:20])
    time.sleep(1.0)
    worker.kill()
    stack.produce(after[20:] + late + before[:5])
    worker = stack.start_worker(
        stack.meters_file(METERS),
        **env,
    )
    base = f"{worker.web_url}/v1/customers/acme"
    everything = before + after + late
    expected = _reference(everything, grants)
    assert expected["uncovered"] > 0  # the stream overran the credits
    wait_until(
        lambda: status_of(f"{base}/credits", operator) == 200 and balance() == expected["balance"],
        timeout=AFTER_SIGKILL,
        what="everything burned",
    )
    doc = request_json(f"{base}/credits", acme_key)
    left = {g["grant_id"]: Decimal(g["remaining"]) for g in doc["grants"]}
    assert left == {"grant-a": 0, "grant-b": 0}
    assert Decimal(doc["uncovered"]) == expected["uncovered"]

    # the ledger: its sum is the balance, its totals by kind are the reference's
    totals = _ledger_totals(worker, "acme")
    assert sum(totals.values(), Decimal(0)) == expected["balance"]
    assert totals.get("grant", 0) == expected["granted"]
    assert -totals.get("burn", 0) == expected["burned"]
    assert -totals.get("expiry", 0) == expected["expired"]
    assert -totals.get("uncovered", 0) == expected["uncovered"]
    ledger = request_json(f"{base}/credits/ledger", acme_key)
    assert Decimal(ledger["totals"]["balance"]) == expected["balance"]
    assert Decimal(ledger["totals"]["expired"]) == expected["expired"]
    ids = [e["entry_id"] for e in ledger["entries"]]
    assert len(ids) == len(set(ids))

    # the entitlement flipped: no access at zero balance, on the API and on the topic
    ent = request_json(f"{base}/entitlements", acme_key)
    assert ent["has_access"] is False and ent["reasons"] == ["balance_exhausted"]
    assert Decimal(ent["balance"]) == expected["balance"]
    assert Decimal(ent["usage"]["tokens"]["used"]) == sum(
        e["properties"]["tokens"] for e in everything
    )
    records = _records(stack, "entitlements")
    flips = [r["has_access"] for r in records]
    assert True in flips and flips[-1] is False
    assert Decimal(records[-1]["balance"]) == expected["balance"]

    # served from the worker's state: the latency of 300 reads, printed (measured, not
    # asserted: 2 shared cores), keep-alive off, one request at a time
    print(f"entitlements GET over HTTP: {read_latencies(f'{base}/entitlements', acme_key, 300)}")

    # keys: a restricted key reads its own customer only
    assert status_of(f"{base}/credits", other_key) == 403
    assert status_of(f"{base}/entitlements", other_key) == 403

    # the CLI reads the same balance and ledger (through the restarted worker)
    write_endpoints(state, {"web_url": worker.web_url})
    shown = cli("balance", "acme", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert Decimal(json.loads(shown.stdout)["balance"]) == expected["balance"]
    shown = cli("ledger", "acme", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert Decimal(json.loads(shown.stdout)["totals"]["burned"]) == expected["burned"]

    # grant C pays the overrun first (settle); a void takes what is left of it
    c_amount = Decimal("3.00")
    made = request_json(
        f"{base}/credits/grants", operator, "POST", {"amount": "3.00", "grant_id": "grant-c"}
    )
    settled = min(c_amount, expected["uncovered"])
    assert Decimal(made["balance"]) == expected["balance"] + c_amount
    void_url = f"{base}/credits/grants/grant-c/void"
    assert status_of(void_url, acme_key, "POST", {"reason": "test"}) == 403
    assert status_of(f"{base}/credits/grants/nope/void", operator, "POST", {}) == 404
    voided = request_json(void_url, operator, "POST", {"reason": "test"})
    final = expected["balance"] + settled
    assert Decimal(voided["balance"]) == final
    totals = _ledger_totals(worker, "acme")
    assert sum(totals.values(), Decimal(0)) == final
    assert -totals.get("settle", 0) == settled
    assert -totals.get("void", 0) == c_amount - settled
    assert -totals.get("uncovered", 0) == expected["uncovered"] - settled

    # the alerts: each threshold crossed once (low, then out), each delivered once after a
    # refused first attempt (retried under the same id, same body), signed; on the topic
    wait_until(lambda: len(receiver.accepted()) == 2, timeout=60, what="two alerts delivered")
    accepted = receiver.accepted()
    assert sorted(d["threshold_id"] for d in accepted.values()) == ["low", "out"]
    assert sorted(d["type"] for d in accepted.values()) == ["balance_below", "balance_exhausted"]
    for event in accepted:
        bodies = {body for e, _, body in receiver.calls if e == event}
        assert len(bodies) == 1  # a retry resends the same body
    on_topic = {d["id"]: d for d in _records(stack, "billing-alerts")}
    assert on_topic == accepted
    calls_before = len(receiver.calls)

    # a plain restart writes nothing new and changes nothing
    rows_before = worker.sql("SELECT count() AS n FROM credit_ledger FINAL")[0]["n"]
    assert worker.stop() == 0
    worker = stack.start_worker(
        stack.meters_file(METERS),
        **env,
    )
    base = f"{worker.web_url}/v1/customers/acme"
    wait_until(lambda: status_of(f"{base}/credits", operator) == 200, what="credits resumed")
    assert balance() == final
    time.sleep(2)
    assert worker.sql("SELECT count() AS n FROM credit_ledger FINAL")[0]["n"] == rows_before
    assert len(receiver.calls) == calls_before  # no alert sent again
    receiver.server.shutdown()


def test_an_alert_pending_at_a_kill_is_delivered_once_after_the_restart(stack: StackSlice) -> None:
    now = time.time_ns() // 1_000_000
    receiver = Receiver()
    receiver.down = True
    env = _worker_env(stack, receiver)
    keys = KeyStore(stack.tmp / "state" / "api_keys.json")
    _, operator = keys.create("operator")
    worker = stack.start_worker(stack.meters_file(METERS), **env)
    base = f"{worker.web_url}/v1/customers/acme"
    wait_until(lambda: status_of(f"{base}/entitlements", operator) == 200, what="credits ready")
    request_json(f"{base}/credits/grants", operator, "POST",
             {"amount": "1.00", "effective": _iso(now - HOUR)})  # fmt: skip
    out = {"thresholds": [{"threshold_id": "out", "kind": "balance_exhausted"}]}
    request_json(f"{base}/credits/alerts", operator, "PUT", out)
    stack.produce(
        [
            {"event_name": "chat", "customer_id": "acme", "idempotency_key": f"k-{i}",
             "timestamp": now - 10 * MINUTE + i, "properties": {"tokens": 500}}
            for i in range(3)
        ]
    )  # fmt: skip  # 1.50 of usage: the balance runs out
    wait_until(lambda: len(receiver.calls) >= 1, timeout=60, what="a refused webhook attempt")
    fired = {e for e, _, _ in receiver.calls}
    assert len(fired) == 1
    worker.kill()
    receiver.down = False
    worker = stack.start_worker(stack.meters_file(METERS), **env)
    wait_until(
        lambda: len(receiver.accepted()) == 1, timeout=AFTER_SIGKILL, what="the alert delivered"
    )
    assert set(receiver.accepted()) == fired  # the same alert, not a new one
    alerts = worker.sql(
        "SELECT count() AS n FROM credit_alerts FINAL ARRAY JOIN JSONExtractArrayRaw(alerts) AS a"
    )
    assert alerts[0]["n"] == 1  # it fired once
    calls = len(receiver.calls)
    assert worker.stop() == 0
    worker = stack.start_worker(stack.meters_file(METERS), **env)
    base = f"{worker.web_url}/v1/customers/acme"
    wait_until(lambda: status_of(f"{base}/credits", operator) == 200, what="credits resumed")
    time.sleep(2)
    assert len(receiver.calls) == calls  # delivered: never sent again
    receiver.server.shutdown()
