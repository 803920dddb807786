"""Event -> updated credit balance latency (issue 25 item 3), for bench/run.py.

The worker runs with a plans file (one per-unit price, on ``ai_tokens``) and an operator
key; right after it starts, a sample of customers gets a large grant effective before
the load's first window, so the pipeline phase (b) burns with credits present. In the
latency phase (c) a watcher consumes the compacted topic ``entitlements`` from its end:
every change of a customer's balance is written there. Per sampled customer the balance
before the phase is read from ``GET /v1/customers/{id}/credits``; each priced event it is
sent adds exactly ``tokens * unit price`` to what the balance must fall by, so the first
entitlement whose balance is at or below ``start - cumulative cost through the event``
is the first balance that includes the event (one partition per customer, in order).
Latency = the time that entitlement was read off the topic - the event's timestamp
(its send time): an upper bound, by the consumer's fetch wait.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from bench.stack import BenchError
from meterstream.api.keys import KeyStore
from meterstream.billing.customers import _direct
from meterstream.settings import Settings
from meterstream.sinks.clickhouse import credits as store
from meterstream.worker.credits import grant_row, new_grant

UNIT_PRICE = Decimal("0.001")  # usd per ai_tokens token
PRICED_METER = "ai_tokens"
PRICED_EVENT = "ai_chat"
GRANT = Decimal(1_000_000)  # never runs out during the bench
SAMPLE = 25  # customers with credits


def plans_yaml() -> str:
    """One usd plan, the default, with a per-unit price on the bench's ``ai_tokens``."""
    return (
        "plans:\n  - name: bench\n    currency: usd\n    prices:\n"
        f"      - {{meter: {PRICED_METER}, unit_price: {UNIT_PRICE}}}\n"
        "default_plan: bench\n"
    )


def event_cost(value: bytes) -> tuple[str, Decimal] | None:
    """(customer, exact cost) of a generated event the plan prices; None otherwise."""
    event = orjson.loads(value)
    if event.get("event_name") != PRICED_EVENT:
        return None
    tokens = Decimal(str(event["properties"]["tokens"]))
    return str(event["customer_id"]), tokens * UNIT_PRICE


def tick_start_ms(cause: object) -> int | None:
    """The burn tick's start of an entitlement caused by usage (``usage:<ms>``)."""
    if isinstance(cause, str) and cause.startswith("usage:") and cause[6:].isdigit():
        return int(cause[6:])
    return None


def first_including(
    events: Iterable[tuple[str, int, Decimal]],
    start: Decimal,
    balances: Iterable[tuple[float, Decimal]],
) -> dict[str, float]:
    """One customer: ``events`` (key, sent ms, cost > 0) in send order, its balance
    ``start`` before them, ``balances`` (seen at ms, balance) in the order seen ->
    {key: ms of the first balance that includes the event}, i.e. the first balance at
    or below ``start`` less the cumulative cost through the event. Events no balance
    included are absent."""
    pending: list[tuple[str, Decimal]] = []
    spent = Decimal(0)
    for key, _, cost in events:
        spent += cost
        pending.append((key, spent))
    found: dict[str, float] = {}
    i = 0
    for seen_ms, balance in balances:
        included = start - balance
        while i < len(pending) and pending[i][1] <= included:
            found[pending[i][0]] = seen_ms
            i += 1
    return found


@dataclass
class Credits:
    """The bench's credit setup: the plans file, an operator key, the sampled customers."""

    plans_file: Path
    keys_file: Path
    token: str
    sample: list[str]

    @classmethod
    def create(cls, tmp: Path, customers: list[str], sample: int = SAMPLE) -> Credits:
        plans_file = tmp / "bench-plans.yaml"
        plans_file.write_text(plans_yaml())
        keys_file = tmp / "bench-api-keys.json"
        _, token = KeyStore(keys_file).create("bench-operator")
        step = max(1, len(customers) // sample)
        return cls(plans_file, keys_file, token, customers[::step][:sample])

    def env(self) -> dict[str, str]:
        return {
            "METERSTREAM_PLANS_FILE": str(self.plans_file),
            "METERSTREAM_API_KEYS_FILE": str(self.keys_file),
        }

    def _call(self, url: str, body: Any = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        req = urllib.request.Request(
            url,
            data=data,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise BenchError(f"{req.get_method()} {url}: {exc.code} {exc.read()[:500]!r}") from None

    def record_grants(self, env: Mapping[str, str], effective_ms: int) -> None:
        """A grant of ``GRANT`` usd to every sampled customer, effective ``effective_ms``,
        recorded in the ClickHouse of ``env`` (a worker's environment) before that worker
        starts, as ``meterstream credits grant`` does without a worker: the worker resumes
        the books at start, so the pipeline phase measures the burn, not grant creation
        (one process: chdb is one process per path)."""
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.credit_latency",
                "grant",
                str(effective_ms),
                *self.sample,
            ],
            env={**os.environ, **env},
            cwd=Path(__file__).resolve().parent.parent,
            check=True,
            capture_output=True,
            timeout=300,
        )

    def balances(self, web_url: str) -> dict[str, Decimal]:
        return {
            c: Decimal(str(self._call(f"{web_url}/v1/customers/{c}/credits")["balance"]))
            for c in self.sample
        }


@dataclass
class BalanceWatch:
    """Consumes ``topic`` (the entitlements) from its end in a thread: every balance of a
    sampled customer with the time it was read (ms)."""

    bootstrap: str
    topic: str
    partitions: int
    sample: set[str]
    seen: dict[str, list[tuple[float, Decimal]]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    # per balance of a burn tick begun after the watch started (cause ``usage:<tick start
    # ms>``): read at - tick start, seconds: how far into the tick a new balance is published
    into_tick: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="balance-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(60):
            raise BenchError(f"entitlements watcher not positioned: {self.errors}")

    def snapshot(self) -> dict[str, list[tuple[float, Decimal]]]:
        with self._lock:
            return {c: list(v) for c, v in self.seen.items()}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        try:
            asyncio.run(self._consume())
        except Exception as exc:  # reported with the result
            self.errors.append(repr(exc))
            self._ready.set()

    async def _consume(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
        )
        await consumer.start()
        try:
            parts = [TopicPartition(self.topic, p) for p in range(self.partitions)]
            consumer.assign(parts)
            await consumer.seek_to_end(*parts)
            for tp in parts:  # resolve the end offsets before any event is sent
                await consumer.position(tp)
            positioned_ms = time.time() * 1000
            self._ready.set()
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=100)
                now_ms = time.time() * 1000
                for messages in batches.values():
                    for message in messages:
                        doc = orjson.loads(message.value)
                        if doc.get("customer_id") in self.sample:
                            with self._lock:
                                self.seen[doc["customer_id"]].append(
                                    (now_ms, Decimal(str(doc["balance"])))
                                )
                            tick = tick_start_ms(doc.get("cause"))
                            # a tick begun before the watch (during the self-check, whose
                            # reads it queued behind) says nothing of the half-load phase
                            if tick is not None and tick >= positioned_ms:
                                self.into_tick.append((now_ms - tick) / 1000)
        finally:
            await consumer.stop()


def balance_latencies(
    sent: Mapping[str, int],
    payloads: Mapping[str, bytes],
    start: Mapping[str, Decimal],
    seen: Mapping[str, list[tuple[float, Decimal]]],
) -> tuple[list[float], int, list[str]]:
    """Per priced event of a sampled customer (one in ``start``): seconds from its send to
    the first balance that includes it; how many events no balance included; and the
    customers whose last balance is not exactly ``start`` less the cost of their events
    (a balance that fell too far would match events early: the self-check)."""
    per_customer: dict[str, list[tuple[str, int, Decimal]]] = defaultdict(list)
    for key, ts in sent.items():  # insertion order = send order
        priced = event_cost(payloads[key])
        if priced is not None and priced[0] in start:
            per_customer[priced[0]].append((key, ts, priced[1]))
    latencies: list[float] = []
    missing = 0
    problems: list[str] = []
    for customer, events in per_customer.items():
        balances = seen.get(customer, [])
        found = first_including(events, start[customer], balances)
        for key, ts, _ in events:
            if key in found:
                latencies.append((found[key] - ts) / 1000)
            else:
                missing += 1
        want = start[customer] - sum((cost for _, _, cost in events), Decimal(0))
        last = balances[-1][1] if balances else start[customer]
        if last != want:
            problems.append(f"{customer}: balance {last}, expected {want}")
    return latencies, missing, problems


def wait_all_included(
    sent: Mapping[str, int],
    payloads: Mapping[str, bytes],
    start: Mapping[str, Decimal],
    watch: BalanceWatch,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, missing, problems = balance_latencies(sent, payloads, start, watch.snapshot())
        if not missing and not problems:
            return
        time.sleep(0.5)


def _record_grants(effective_ms: int, customers: list[str]) -> None:
    """``python -m bench.credit_latency grant EFFECTIVE_MS CUSTOMER...`` (the settings from
    the environment): the bench's grants written to ``credit_grants``."""
    ch = _direct(Settings())
    try:
        store.append_grants(
            ch,
            [
                grant_row(
                    new_grant(c, GRANT, "usd", effective_ms=effective_ms, grant_id=f"bench-{c}"),
                    "bench",
                )
                for c in customers
            ],
        )
    finally:
        ch.close()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "grant":
        sys.exit("usage: python -m bench.credit_latency grant EFFECTIVE_MS CUSTOMER...")
    _record_grants(int(sys.argv[2]), sys.argv[3:])
