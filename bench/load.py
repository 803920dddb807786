"""A reproducible load for bench/meters.yaml, with its expected totals.

The expected totals are computed here from the generated values by the rules
bench/meters.yaml states, independently of the pipeline's meter and
aggregation code (plain Decimal arithmetic, sets and comparisons).

Every record is keyed by customer_id. ``dup_rate`` of the records are exact
resends (same bytes) of an earlier record, near or far back, so duplicates
are found both inside one batch and across batches.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

HOUR_MS = 3_600_000
MODELS = ("gpt-4o", "claude-sonnet", "llama-3")
STATUSES = (200, 200, 200, 201, 204, 404, 500, 503)
# (event_name, cumulative probability)
MIX = (("ai_chat", 0.30), ("api_request", 0.60), ("server_heartbeat", 0.75), ("balance", 0.85))
METERS = {
    "ai_tokens": "sum",
    "api_requests": "count",
    "active_users": "unique_count",
    "peak_servers": "max",
    "min_balance": "min",
    "storage_gb": "latest",
}


@dataclass
class Expected:
    """Per meter and customer: the value and the number of events counted."""

    sums: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    users: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    users_n: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    maxes: dict[str, Decimal] = field(default_factory=dict)
    maxes_n: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    mins: dict[str, Decimal] = field(default_factory=dict)
    mins_n: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # latest: (timestamp_ms, idempotency key bytes) -> value, greatest wins
    latest: dict[str, tuple[int, bytes, Decimal]] = field(default_factory=dict)
    latest_n: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tokens_n: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def totals(self) -> dict[str, dict[str, tuple[Decimal, int]]]:
        """meter -> customer -> (value, event_count)."""
        return {
            "ai_tokens": {c: (v, self.tokens_n[c]) for c, v in self.sums.items()},
            "api_requests": {c: (Decimal(n), n) for c, n in self.counts.items()},
            "active_users": {c: (Decimal(len(s)), self.users_n[c]) for c, s in self.users.items()},
            "peak_servers": {c: (v, self.maxes_n[c]) for c, v in self.maxes.items()},
            "min_balance": {c: (v, self.mins_n[c]) for c, v in self.mins.items()},
            "storage_gb": {c: (t[2], self.latest_n[c]) for c, t in self.latest.items()},
        }


@dataclass
class Load:
    events: int
    customers: int
    dup_rate: float = 0.05
    seed: int = 20240607
    end_ms: int = 0  # timestamps fall in [end_ms - 2h, end_ms)
    records: list[tuple[bytes, bytes]] = field(default_factory=list)  # (key, value)
    duplicates: int = 0
    expected: Expected = field(default_factory=Expected)

    @property
    def unique(self) -> int:
        return self.events - self.duplicates


def closed_end_ms(now_ms: int) -> int:
    """The start of the current hour: every hourly window before it is closed."""
    return now_ms - now_ms % HOUR_MS


class EventMaker:
    """Builds one event's JSON and folds it into the expected totals."""

    def __init__(self, rng: random.Random, customers: list[str], expected: Expected | None):
        self.rng = rng
        self.customers = customers
        self.expected = expected

    def make(self, key: str, ts: int) -> tuple[bytes, bytes]:
        rng = self.rng
        c = self.customers[rng.randrange(len(self.customers))]
        roll = rng.random()
        name = next((n for n, p in MIX if roll < p), "storage")
        exp = self.expected
        if name == "ai_chat":
            model = MODELS[rng.randrange(3)]
            tokens = rng.randrange(1, 4000)
            props = f'"model":"{model}","stripe_customer_id":"cus_{c}","tokens":{tokens}'
            if exp is not None:
                exp.sums[c] += tokens
                exp.tokens_n[c] += 1
        elif name == "api_request":
            user = f"u{rng.randrange(200)}"
            status = STATUSES[rng.randrange(len(STATUSES))]
            props = f'"status":{status},"stripe_customer_id":"cus_{c}","user_id":"{user}"'
            if exp is not None:
                if status < 500:
                    exp.counts[c] += 1
                exp.users[c].add(user)
                exp.users_n[c] += 1
        elif name == "server_heartbeat":
            servers = Decimal(rng.randrange(1, 100))
            props = f'"servers":{servers},"stripe_customer_id":"cus_{c}"'
            if exp is not None:
                cur = exp.maxes.get(c)
                exp.maxes[c] = servers if cur is None else max(cur, servers)
                exp.maxes_n[c] += 1
        elif name == "balance":
            balance = Decimal(rng.randrange(-100_000, 1_000_000)).scaleb(-2)
            props = f'"balance":{balance},"stripe_customer_id":"cus_{c}"'
            if exp is not None:
                cur = exp.mins.get(c)
                exp.mins[c] = balance if cur is None else min(cur, balance)
                exp.mins_n[c] += 1
        else:
            gb = Decimal(rng.randrange(0, 10_000_000)).scaleb(-3)
            props = f'"gb":{gb},"stripe_customer_id":"cus_{c}"'
            if exp is not None:
                rank = (ts, key.encode())
                cur_l = exp.latest.get(c)
                if cur_l is None or rank > cur_l[:2]:
                    exp.latest[c] = (ts, key.encode(), gb)
                exp.latest_n[c] += 1
        value = (
            f'{{"customer_id":"{c}","event_name":"{name}","idempotency_key":"{key}",'
            f'"properties":{{{props}}},"timestamp":{ts}}}'
        )
        return c.encode(), value.encode()


def customer_ids(n: int) -> list[str]:
    return [f"cust-{i:05d}" for i in range(n)]


def generate(events: int, customers: int, *, end_ms: int, dup_rate: float = 0.05) -> Load:
    """``events`` records (duplicates included) with timestamps over the 2 hours before end_ms."""
    load = Load(events, customers, dup_rate, end_ms=end_ms)
    rng = random.Random(load.seed)
    maker = EventMaker(rng, customer_ids(customers), load.expected)
    start = end_ms - 2 * HOUR_MS
    out = load.records
    for i in range(events):
        if out and rng.random() < dup_rate:
            # mostly recent (same or next batch), sometimes far back
            back = rng.randrange(1, 50) if rng.random() < 0.5 else rng.randrange(1, len(out) + 1)
            out.append(out[max(0, len(out) - back)])
            load.duplicates += 1
            continue
        key = f"{load.seed:x}-{i:08d}-{rng.getrandbits(48):012x}"
        out.append(maker.make(key, start + rng.randrange(2 * HOUR_MS)))
    return load
