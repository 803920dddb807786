"""A realistic synthetic load for the example meters, with its own expected totals.

Five customers use an AI chat (tokens per model), call an API (requests, with
user ids and the caller's country), run servers (heartbeats with a count) and
burn compute units (decimals). About 3% of events are resent unchanged (a
producer retry), 1% are resent with changed content (an idempotency conflict)
and 1% are invalid. Timestamps cover the last two hours, so some hourly
windows close while the demo runs and reach Stripe.

Expected totals are computed here independently of the pipeline's meter code,
by the rules the example meters state.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pipeline.events import canonical_json

CUSTOMERS = ["acme", "globex", "initech", "umbrella", "hooli"]
# Who pays, the operator's decision: the demo maps its customers at start
# (pipeline/run.py, map_demo_customers); nothing in its events names a Stripe customer.
STRIPE_CUSTOMERS = {customer: f"cus_demo_{customer}" for customer in CUSTOMERS}
MODELS = ["gpt-4o", "claude-sonnet", "llama-3"]
COUNTRIES = ["US", "US", "US", "DE", "IN", "BR"]


@dataclass
class DemoLoad:
    seed: int = 7
    history_ms: int = 2 * 3600 * 1000
    rng: random.Random = field(init=False)
    # expected[meter][customer] for the example meters
    sums: dict[str, dict[str, Decimal]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Decimal))
    )
    maxes: dict[str, dict[str, Decimal]] = field(default_factory=lambda: defaultdict(dict))
    uniques: dict[str, dict[str, set[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set))
    )
    sent: list[dict[str, Any]] = field(default_factory=list)
    produced: int = 0
    invalid: int = 0
    duplicates: int = 0
    conflicts: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _base(self, customer: str, now_ms: int, live: bool) -> dict[str, Any]:
        ts = now_ms - (0 if live else self.rng.randrange(self.history_ms))
        return {
            "customer_id": customer,
            "idempotency_key": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            "timestamp": ts,
            "properties": {},
        }

    def _new_event(self, now_ms: int, live: bool) -> dict[str, Any]:
        customer = self.rng.choice(CUSTOMERS)
        event = self._base(customer, now_ms, live)
        props = event["properties"]
        kind = self.rng.random()
        if kind < 0.35:
            event["event_name"] = "ai_chat"
            props.update(model=self.rng.choice(MODELS), tokens=self.rng.randrange(50, 4000))
            self.sums["ai_tokens"][customer] += props["tokens"]
        elif kind < 0.65:
            event["event_name"] = "api_request"
            props.update(user_id=f"user_{self.rng.randrange(40)}", path="/v1/things")
            self.sums["api_requests"][customer] += 1
            self.uniques["active_users"][customer].add(props["user_id"])
        elif kind < 0.75:
            event["event_name"] = "server_heartbeat"
            props.update(servers=self.rng.randrange(1, 30))
            current = self.maxes["active_servers"].get(customer)
            servers = Decimal(props["servers"])
            self.maxes["active_servers"][customer] = (
                servers if current is None else max(current, servers)
            )
        elif kind < 0.88:
            event["event_name"] = "compute"
            units = Decimal(self.rng.randrange(1, 5000)) / 100
            props.update(units=units)
            self.sums["compute_units"][customer] += units
        else:
            event["event_name"] = "call"
            country = self.rng.choice(COUNTRIES)
            props.update(country=country, seconds=self.rng.randrange(5, 600))
            name = "local_calls" if country == "US" else "international_calls"
            self.sums[name][customer] += 1
        return event

    def next_batch(self, n: int, now_ms: int, live: bool = True) -> list[bytes]:
        """``n`` encoded records, including retries, conflicts and invalid ones."""
        out: list[bytes] = []
        for _ in range(n):
            roll = self.rng.random()
            if roll < 0.03 and self.sent:
                out.append(canonical_json(self.rng.choice(self.sent)).encode())
                self.duplicates += 1
            elif roll < 0.04 and self.sent:
                copy = dict(self.rng.choice(self.sent))
                copy["properties"] = {**copy["properties"], "tampered": True}
                out.append(canonical_json(copy).encode())
                self.conflicts += 1
            elif roll < 0.05:
                out.append(b'{"event_name": "api_request", "properties": {}}')
                self.invalid += 1
            else:
                event = self._new_event(now_ms, live)
                self.sent.append(event)
                out.append(canonical_json(event).encode())
        self.produced += len(out)
        return out

    def expected(self) -> dict[str, dict[str, Decimal]]:
        result: dict[str, dict[str, Decimal]] = {}
        for meter, per in self.sums.items():
            result[meter] = dict(per)
        for meter, per_max in self.maxes.items():
            result[meter] = dict(per_max)
        for meter, sets in self.uniques.items():
            result[meter] = {c: Decimal(len(s)) for c, s in sets.items()}
        return result
