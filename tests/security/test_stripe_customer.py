"""Which Stripe customer pays is the operator's decision, never event content a producer
controls (issue #20, item 4). On the real stack: worker processes on the embedded broker
and chdb, the session Stripe emulator (what it received is at ``/_emulator/events``),
the ``meterstream`` CLI, and ``meterstream run`` itself.

A tenant whose key is restricted to its own customer (and an unrestricted key, and a
Kafka producer with no key at all) names a victim's Stripe customer in its events, in
every spelling a producer could try: Stripe must receive nothing for a Stripe customer
the operator did not map, and the victim's Stripe customer exactly the victim's usage.
With the property source (an opt-in), the first Stripe id of a customer is pinned and
a change, or a claim on another customer's id, is refused and reported. The mapping
survives a restart of the worker and the loss of the embedded broker's state.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import requests

from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.endpoints import write_endpoints
from tests.harness import REPO, StackSlice, Worker, http_json, wait_until
from tests.support.kafka import consume_all
from tests.support.meters import meter_entry, meters_yaml, stripe

pytestmark = pytest.mark.integration

HOUR = 3_600_000
STRIPE = "interval: 1s, grace: 0s"
# The meter's payload key for the customer is `customer`, so an event property of that
# name is one more spelling a producer might try.
METERS = meters_yaml(
    meter_entry("tokens", "chat", "sum", "properties.tokens",
                stripe=stripe("sec_tokens", f"customer_key: customer, {STRIPE}")),
    meter_entry("calls", "chat", "count", stripe=stripe("sec_calls", STRIPE)),
)  # fmt: skip
BY_PROPERTY = meters_yaml(
    meter_entry("tokens", "chat", "sum", "properties.tokens",
                stripe=stripe("pin_tokens",
                              f"customer_id_from: properties.stripe_customer_id, {STRIPE}")),
)  # fmt: skip
VICTIM = "cus_victim"
# Every way an event could name the victim's Stripe customer.
SPELLINGS: list[dict[str, Any]] = [
    {"stripe_customer_id": VICTIM},
    {"stripe": {"customer_id": VICTIM}},
    {"stripe": {"stripe_customer_id": VICTIM}},
    {"customer": VICTIM},  # the meter's customer_key
    {"stripe_customer": VICTIM},
    {"Stripe_Customer_Id": VICTIM},
    {"customer_id": VICTIM},
    {"payload": {"customer": VICTIM, "stripe_customer_id": VICTIM}},
]


# ------------------------------------------------------------------ helpers


def cli(state_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterstream.cli", *args, "--state-dir", str(state_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def stack_cli(stack: StackSlice, meters_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(stack.tmp / "state", stack.env(meters_file), *args)


def new_key(stack: StackSlice, meters_file: Path, name: str, customer: str | None = None) -> str:
    extra = ["--customer", customer] if customer else []
    result = stack_cli(stack, meters_file, "keys", "create", name, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def post(url: str, key: str | None, events: list[dict[str, Any]]) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(
        f"{url}/v1/events", data=json.dumps({"events": events}), headers=headers, timeout=60
    )


def api(url: str, method: str, path: str, key: str | None, body: Any = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body)
    return requests.request(method, f"{url}{path}", data=data, headers=headers, timeout=60)


def chat(
    customer_id: str, key: str, ts: int, tokens: int, props: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "event_name": "chat",
        "customer_id": customer_id,
        "idempotency_key": key,
        "timestamp": ts,
        "properties": {"tokens": tokens, **(props or {})},
    }


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes | None]]) -> None:
    from aiokafka import AIOKafkaProducer

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            for key, value in records:
                await producer.send_and_wait(topic, key=key, value=value)
        finally:
            await producer.stop()

    asyncio.run(send())


def acme_and_globex(tokens: tuple[int, int], calls: int) -> dict[tuple[str, str], int]:
    """What Stripe holds per (event name, Stripe customer) when acme and globex are mapped:
    their tokens, and ``calls`` calls each."""
    acme_tokens, globex_tokens = tokens
    return {
        ("sec_tokens", "cus_acme"): acme_tokens,
        ("sec_calls", "cus_acme"): calls,
        ("sec_tokens", "cus_globex"): globex_tokens,
        ("sec_calls", "cus_globex"): calls,
    }


def wait_forwarded(stripe_url: str, expected: dict[tuple[str, str], int], what: str) -> None:
    """Until the emulator's totals are ``expected`` (90 s)."""
    wait_until(lambda: stripe_received(stripe_url) == expected, timeout=90, interval=1, what=what)


def stripe_received(stripe_url: str) -> dict[tuple[str, str], int]:
    """(Stripe event name, Stripe customer) -> the sum of what the emulator accepted
    (every meter here has formula sum)."""
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for event in http_json(f"{stripe_url}/_emulator/events")["data"]:
        totals[(event["event_name"], event["customer"])] += int(event["value"])
    return dict(totals)


def settle(stripe_url: str, seconds: float = 4.0) -> dict[tuple[str, str], int]:
    """What Stripe holds once several forward intervals (1 s) passed with no change."""
    last = stripe_received(stripe_url)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = stripe_received(stripe_url)
        if now != last:
            last, deadline = now, time.monotonic() + seconds
    return last


def metric(worker: Worker, name: str, **labels: str) -> float | None:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}")
    for line in worker.metrics().splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def base_ms() -> int:
    """Two hours ago, on the hour: every window closed, well inside the dedup horizon."""
    return (time.time_ns() // 1_000_000 // HOUR - 2) * HOUR


# ------------------------------------------------------------------ the default: the mapping


def test_no_producer_can_pick_the_stripe_customer_by_default(stack: StackSlice) -> None:
    meters_file = stack.meters_file(METERS)
    state = stack.tmp / "state"
    admin = new_key(stack, meters_file, "admin")
    tenant_key = new_key(stack, meters_file, "tenant-a", "tenant-a")
    # The operator maps two customers, before any worker runs (straight to ClickHouse).
    for customer, stripe_id in (("victim", VICTIM), ("tenant-a", "cus_tenant_a")):
        result = stack_cli(stack, meters_file, "customers", "set", customer, stripe_id)
        assert result.returncode == 0, result.stdout + result.stderr
    worker = stack.start_worker(meters_file)
    url = worker.web_url
    write_endpoints(state, {"web_url": url})  # the CLI now goes through the worker
    base = base_ms()

    # The victim's own usage: 5 tokens.
    assert post(url, admin, [chat("victim", "v1", base + 1, 5)]).status_code == 202
    # A key restricted to tenant-a: every spelling naming the victim's Stripe customer,
    # 1001 tokens in all (the example).
    tenant_events = [
        chat("tenant-a", f"a{i}", base + 10 + i, 1000 if i == 0 else 1 if i == 1 else 0, props)
        for i, props in enumerate(SPELLINGS)
    ]
    assert post(url, tenant_key, tenant_events).status_code == 202
    # It cannot write the victim's events, nor a top-level Stripe customer field.
    assert post(url, tenant_key, [chat("victim", "a-x", base, 99)]).status_code == 403
    top_level = {**chat("tenant-a", "a-y", base, 99), "stripe_customer_id": VICTIM}
    assert post(url, tenant_key, [top_level]).status_code == 422
    assert post(url, None, [chat("tenant-a", "a-z", base, 99, SPELLINGS[0])]).status_code == 401
    # An unrestricted key, for a customer the operator never mapped.
    unmapped = [chat("tenant-b", f"b{i}", base + 100 + i, 50, p) for i, p in enumerate(SPELLINGS)]
    assert post(url, admin, unmapped).status_code == 202
    # A Kafka producer (no key at all): tenant-a again, and another unmapped customer.
    stack.produce(
        [chat("tenant-a", f"k{i}", base + 200 + i, 3, p) for i, p in enumerate(SPELLINGS)]
        + [chat("tenant-c", f"c{i}", base + 300 + i, 70, p) for i, p in enumerate(SPELLINGS)]
    )
    tenant_tokens = 1001 + 3 * len(SPELLINGS)
    tenant_calls = 2 * len(SPELLINGS)
    expected = {
        ("sec_tokens", VICTIM): 5,
        ("sec_calls", VICTIM): 1,
        ("sec_tokens", "cus_tenant_a"): tenant_tokens,
        ("sec_calls", "cus_tenant_a"): tenant_calls,
    }

    def forwarded() -> bool:
        got = stripe_received(stack.stripe_url)
        return all(got.get(k) == v for k, v in expected.items())

    try:
        wait_until(forwarded, timeout=90, interval=1, what="the mapped customers forwarded")
    except AssertionError:
        got = stripe_received(stack.stripe_url)
        assert got == expected, worker.log()[-3000:]
    # Nothing reached a Stripe customer the operator did not map, and the victim's
    # Stripe customer got exactly the victim's usage.
    assert settle(stack.stripe_url) == expected
    # The unmapped customers are held, visibly: metric, one log line each, the CLI.
    assert metric(worker, "meterstream_stripe_waiting_customers", meter="tokens") == 2
    log = worker.log()
    for customer in ("tenant-b", "tenant-c"):
        assert log.count(f"tokens: customer {customer} held: no Stripe customer id") == 1
    listed = stack_cli(stack, meters_file, "customers", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"victim": VICTIM, "tenant-a": "cus_tenant_a"}
    table = stack_cli(stack, meters_file, "customers", "list")
    assert "held tokens tenant-b: no Stripe customer id" in table.stderr

    # Once the operator maps tenant-b, its usage goes there; tenant-c stays held.
    mapped = stack_cli(stack, meters_file, "customers", "set", "tenant-b", "cus_tenant_b")
    assert mapped.returncode == 0, mapped.stdout + mapped.stderr
    expected[("sec_tokens", "cus_tenant_b")] = 50 * len(SPELLINGS)
    expected[("sec_calls", "cus_tenant_b")] = len(SPELLINGS)
    wait_until(forwarded, timeout=60, interval=1, what="tenant-b forwarded once mapped")
    assert settle(stack.stripe_url) == expected
    assert metric(worker, "meterstream_stripe_waiting_customers", meter="tokens") == 1


def test_a_customer_key_cannot_touch_the_mapping(stack: StackSlice) -> None:
    meters_file = stack.meters_file(METERS)
    state = stack.tmp / "state"
    admin = new_key(stack, meters_file, "admin")
    tenant_key = new_key(stack, meters_file, "tenant-a", "tenant-a")
    worker = stack.start_worker(meters_file)
    url = worker.web_url
    assert api(url, "PUT", "/v1/stripe/customers/victim", admin, {"stripe_customer_id": VICTIM}).ok

    for method, path, body in [
        ("PUT", "/v1/stripe/customers/tenant-a", {"stripe_customer_id": VICTIM}),
        ("PUT", "/v1/stripe/customers/victim", {"stripe_customer_id": "cus_tenant_a"}),
        ("DELETE", "/v1/stripe/customers/victim", None),
        ("GET", "/v1/stripe/customers", None),
        ("GET", "/v1/stripe/customers/victim", None),
        ("GET", "/v1/stripe/customers/tenant-a", None),
    ]:
        answer = api(url, method, path, tenant_key, body)
        assert answer.status_code == 403, (method, path, answer.text)
        if method != "GET":
            assert api(url, method, path, None, body).status_code == 401
    assert (
        api(
            url, "PUT", "/v1/stripe/customers/x", admin, {"stripe_customer_id": " cus_1"}
        ).status_code
        == 400
    )

    # Nothing changed; the audit trail names who set it.
    write_endpoints(state, {"web_url": url})
    got = stack_cli(stack, meters_file, "customers", "get", "victim", "--format", "json")
    assert got.returncode == 0, got.stderr
    found = json.loads(got.stdout)
    assert found["stripe_customer_id"] == VICTIM
    assert [(c["stripe_customer_id"], c["origin"]) for c in found["history"]] == [(VICTIM, "api")]
    assert "(admin)" in found["history"][0]["changed_by"]
    assert stack_cli(stack, meters_file, "customers", "get", "tenant-a").returncode == 1
    rows = worker.sql("SELECT count() AS n FROM customer_mappings")
    assert rows[0]["n"] == 1


# ------------------------------------------------------------------ the property option: pinned


def test_property_source_pins_and_refuses_changes_and_claims(stack: StackSlice) -> None:
    meters_file = stack.meters_file(BY_PROPERTY)
    state = stack.tmp / "state"
    tenant_key = new_key(stack, meters_file, "tenant-a", "tenant-a")
    assert stack_cli(stack, meters_file, "customers", "set", "victim", VICTIM).returncode == 0
    base = base_ms()
    stack.produce(
        [
            chat("tenant-a", "a1", base + 1, 10, {"stripe_customer_id": "cus_tenant_a"}),
            chat("victim", "v1", base + 2, 5),
        ]
    )
    worker = stack.start_worker(meters_file)
    url = worker.web_url
    write_endpoints(state, {"web_url": url})
    wait_until(
        lambda: (
            stripe_received(stack.stripe_url)
            == {("pin_tokens", "cus_tenant_a"): 10, ("pin_tokens", VICTIM): 5}
        ),
        timeout=90,
        interval=1,
        what="tenant-a pinned and forwarded",
    )
    pins = worker.sql("SELECT customer_id, stripe_customer_id FROM stripe_customer_pins")
    assert pins == [{"customer_id": "tenant-a", "stripe_customer_id": "cus_tenant_a"}]

    # Later, tenant-a's events name other Stripe customers (a later event time too, so
    # "the latest value" would pick them); an unpinned customer names the victim's.
    changed = [
        chat("tenant-a", "a2", base + HOUR, 1000, {"stripe_customer_id": VICTIM}),
        chat("tenant-a", "a3", base + HOUR + 1, 1, {"stripe_customer_id": "cus_other"}),
        chat("tenant-a", "a4", base + HOUR + 2, 7, {"stripe_customer_id": " cus_tenant_a"}),
    ]
    assert post(url, tenant_key, changed).status_code == 202
    stack.produce([chat("tenant-b", "b1", base + HOUR + 3, 40, {"stripe_customer_id": VICTIM})])
    expected_refusals = {
        ("tenant-a", VICTIM, "changed", "cus_tenant_a", ""),
        ("tenant-a", "cus_other", "changed", "cus_tenant_a", ""),
        ("tenant-a", " cus_tenant_a", "invalid", "", ""),
        ("tenant-b", VICTIM, "claimed", "", "victim"),
    }

    def refusals() -> set[tuple[str, ...]]:
        rows = worker.sql(
            """SELECT customer_id, claimed_stripe_customer_id AS claimed, reason,
                      kept_stripe_customer_id AS kept, other_customer_id AS other
               FROM stripe_customer_refusals FINAL"""
        )
        return {(r["customer_id"], r["claimed"], r["reason"], r["kept"], r["other"]) for r in rows}

    wait_until(lambda: refusals() == expected_refusals, timeout=60, what="refusals recorded")
    # Not forwarded: tenant-a's new usage is held with its pin, tenant-b's never goes out.
    assert settle(stack.stripe_url) == {
        ("pin_tokens", "cus_tenant_a"): 10,
        ("pin_tokens", VICTIM): 5,
    }
    # Reported: an ERROR line with both ids, the metrics, and the stripe-errors topic.
    log = worker.log()
    assert any(
        "ERROR" in line and f"'{VICTIM}'" in line and "'cus_tenant_a'" in line
        for line in log.splitlines()
    ), log[-3000:]
    assert metric(worker, "meterstream_stripe_refused_customers", meter="tokens") == 2
    assert metric(worker, "meterstream_stripe_customer_refusals_total", reason="changed") == 2
    assert metric(worker, "meterstream_stripe_customer_refusals_total", reason="claimed") == 1
    records = [
        json.loads(v) for _, v in consume_all(stack.bootstrap, f"{stack.prefix}stripe-errors")
    ]
    assert {(r["customer_id"], r["stripe_customer_id"], r["reason"]) for r in records} == {
        (c, s, reason) for c, s, reason, _, _ in expected_refusals
    }
    assert {r["error_code"] for r in records} == {"stripe_customer_refused"}

    # The pin and the refusals survive a restart: still held, reported once.
    worker.stop()
    worker = stack.start_worker(meters_file)
    write_endpoints(state, {"web_url": worker.web_url})
    wait_until(
        lambda: metric(worker, "meterstream_stripe_refused_customers", meter="tokens") == 2,
        timeout=60,
        what="held again after the restart",
    )
    assert settle(stack.stripe_url) == {
        ("pin_tokens", "cus_tenant_a"): 10,
        ("pin_tokens", VICTIM): 5,
    }
    count = worker.sql("SELECT count() AS n FROM stripe_customer_refusals")[0]["n"]
    assert count == len(expected_refusals)

    # The operator resolves it: an explicit mapping wins, all of tenant-a's usage goes there.
    result = stack_cli(stack, meters_file, "customers", "set", "tenant-a", "cus_tenant_a")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(
        lambda: stripe_received(stack.stripe_url).get(("pin_tokens", "cus_tenant_a")) == 1018,
        timeout=60,
        interval=1,
        what="tenant-a forwarded once mapped",
    )
    assert settle(stack.stripe_url) == {
        ("pin_tokens", "cus_tenant_a"): 1018,
        ("pin_tokens", VICTIM): 5,
    }
    assert metric(worker, "meterstream_stripe_refused_customers", meter="tokens") == 1


# ------------------------------------------------------------------ the mapping is durable


def test_mapping_survives_a_worker_restart_and_works_without_a_worker(stack: StackSlice) -> None:
    meters_file = stack.meters_file(METERS)
    state = stack.tmp / "state"
    worker = stack.start_worker(meters_file)
    write_endpoints(state, {"web_url": worker.web_url})
    result = stack_cli(stack, meters_file, "customers", "set", "acme", "cus_acme")
    assert result.returncode == 0, result.stdout + result.stderr
    worker.stop()
    (state / "endpoints.json").unlink()

    # No worker: the CLI reads and writes ClickHouse itself.
    got = stack_cli(stack, meters_file, "customers", "get", "acme")
    assert (got.returncode, got.stdout.strip()) == (0, "cus_acme"), got.stderr
    result = stack_cli(stack, meters_file, "customers", "set", "globex", "cus_globex")
    assert result.returncode == 0, result.stdout + result.stderr
    result = stack_cli(stack, meters_file, "customers", "set", "initech", "cus_initech")
    assert result.returncode == 0
    assert stack_cli(stack, meters_file, "customers", "unset", "initech").returncode == 0
    listed = stack_cli(stack, meters_file, "customers", "list", "--format", "json")
    assert json.loads(listed.stdout) == {"acme": "cus_acme", "globex": "cus_globex"}

    base = base_ms()
    stack.produce(
        [chat(c, f"{c}{i}", base + i, 2) for i, c in enumerate(["acme", "globex", "initech"])]
    )
    worker = stack.start_worker(meters_file)
    expected = acme_and_globex(tokens=(2, 2), calls=1)
    wait_forwarded(stack.stripe_url, expected, "forwarded with the mapping after the restart")
    assert settle(stack.stripe_url) == expected
    assert metric(worker, "meterstream_stripe_waiting_customers", meter="tokens") == 1  # initech
    history = worker.sql(
        "SELECT customer_id, stripe_customer_id, origin FROM customer_mappings"
        " WHERE customer_id = 'initech' ORDER BY version"
    )
    assert [(r["stripe_customer_id"], r["origin"]) for r in history] == [
        ("cus_initech", "cli"),
        ("", "cli"),
    ]


def same_slice_on(stack: StackSlice, broker: EmbeddedBroker) -> StackSlice:
    """``stack``'s slice (its topic prefix, database, chdb path and emulator) on ``broker``."""
    return StackSlice(
        broker.bootstrap, stack.chdb_path, stack.stripe_url, stack.tmp,
        prefix=stack.prefix, database=stack.database,
    )  # fmt: skip


def test_mapping_survives_the_embedded_brokers_loss(stack: StackSlice, tmp_path: Path) -> None:
    """A broker of this test's own (the session's is shared), replaced by a fresh one
    that knows nothing: topics, the customers topic included, are gone."""
    meters_file = stack.meters_file(METERS)
    state = stack.tmp / "state"
    first = EmbeddedBroker(log=tmp_path / "broker-1.log").start()
    own = same_slice_on(stack, first)
    try:
        worker = own.start_worker(meters_file)
        write_endpoints(state, {"web_url": worker.web_url})
        # One mapping through the CLI, one written to the customers topic by a plain
        # Kafka client (the topic is public contract).
        result = cli(state, own.env(meters_file), "customers", "set", "acme", "cus_acme")
        assert result.returncode == 0, result.stdout + result.stderr
        produce(
            first.bootstrap,
            f"{own.prefix}customers",
            [(b"globex", b'{"stripe_customer_id": "cus_globex"}')],
        )
        wait_until(
            lambda: (
                {
                    r["customer_id"]: r["origin"]
                    for r in worker.sql("SELECT customer_id, origin FROM customer_mappings")
                }
                == {"acme": "api", "globex": "topic"}
            ),
            timeout=30,
            what="both mappings recorded in ClickHouse",
        )
        base = base_ms()
        own.produce([chat("acme", "a1", base, 3), chat("globex", "g1", base + 1, 4)])
        first_round = acme_and_globex(tokens=(3, 4), calls=1)
        wait_forwarded(stack.stripe_url, first_round, "forwarded on the first broker")
        worker.stop()
    finally:
        own.stop_all()
        first.stop()

    second = EmbeddedBroker(log=tmp_path / "broker-2.log").start()
    fresh = same_slice_on(stack, second)
    try:
        worker = fresh.start_worker(meters_file)
        write_endpoints(state, {"web_url": worker.web_url})
        fresh.produce([chat("acme", "a2", base + 2, 10), chat("globex", "g2", base + 3, 20)])
        expected = acme_and_globex(tokens=(13, 24), calls=2)
        try:
            wait_forwarded(
                stack.stripe_url, expected, "forwarded with the mapping on a fresh broker"
            )
        except AssertionError:
            assert stripe_received(stack.stripe_url) == expected, worker.log()[-3000:]
        assert metric(worker, "meterstream_stripe_waiting_customers", meter="tokens") == 0
        listed = cli(state, fresh.env(meters_file), "customers", "list", "--format", "json")
        assert json.loads(listed.stdout) == {"acme": "cus_acme", "globex": "cus_globex"}
    finally:
        fresh.stop_all()
        second.stop()


# ------------------------------------------------------------------ `meterstream run`


def test_meterstream_run_forwards_only_to_mapped_stripe_customers(tmp_path: Path) -> None:
    """The embedded stack as users start it, with the example meters: a restricted key,
    an unrestricted key, no key and a Kafka producer all name the victim's Stripe
    customer; only the victim's own usage reaches it, and nothing else reaches Stripe."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterstream.cli", "run", "--meters", "meters.example.yaml",
         "--state-dir", str(tmp_path)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        endpoints_file = tmp_path / "endpoints.json"

        def started() -> bool:
            if proc.poll() is not None:
                log = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"run exited {proc.returncode}: {log}")
            return endpoints_file.exists()

        wait_until(started, timeout=120, what="endpoints.json")
        endpoints = json.loads(endpoints_file.read_text())
        url, stripe_url = endpoints["web_url"], endpoints["stripe_api_base"]
        admin = cli(tmp_path, env, "keys", "create", "admin").stdout.strip()
        tenant_key = cli(
            tmp_path, env, "keys", "create", "t", "--customer", "tenant"
        ).stdout.strip()
        mapped = cli(tmp_path, env, "customers", "set", "victim", VICTIM)
        assert mapped.returncode == 0, mapped.stdout + mapped.stderr

        base = base_ms()
        run_id = uuid.uuid4().hex[:6]

        def tokens(customer: str, n: int, amount: int) -> list[dict[str, Any]]:
            return [
                {
                    "event_name": "ai_chat",
                    "customer_id": customer,
                    "idempotency_key": f"{run_id}-{customer}-{i}",
                    "timestamp": base + i,
                    "properties": {
                        "model": "gpt-4o",
                        "tokens": amount,
                        **SPELLINGS[i % len(SPELLINGS)],
                    },
                }
                for i in range(n)
            ]

        assert post(url, None, tokens("tenant", 1, 1000)).status_code == 401
        assert post(url, tenant_key, tokens("tenant", 8, 1000)).status_code == 202
        assert post(url, tenant_key, tokens("victim", 1, 1000)).status_code == 403
        assert post(url, admin, tokens("acme", 8, 300)).status_code == 202
        victim_events = [
            {**e, "properties": {"model": "gpt-4o", "tokens": 7}} for e in tokens("victim", 3, 7)
        ]
        assert post(url, admin, victim_events).status_code == 202
        produce(
            endpoints["kafka_bootstrap"],
            "usage-events",
            [(e["customer_id"].encode(), json.dumps(e).encode()) for e in tokens("globex", 8, 500)],
        )

        def victim_billed() -> bool:
            got = stripe_received(stripe_url)
            return got.get(("ai_tokens", VICTIM)) == 21

        wait_until(victim_billed, timeout=120, interval=1, what="the victim's own usage forwarded")
        got = settle(stripe_url, seconds=35)  # two more forwards of the example meters (15 s)
        assert got == {("ai_tokens", VICTIM): 21}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
