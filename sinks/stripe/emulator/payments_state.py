"""What the emulator knows of payments: customers, payment methods, PaymentIntents,
Stripe events, webhook endpoints, the webhook deliveries still owed and the attempts
made; one :class:`PaymentsState` per app (``EmulatorState.pay``).

Journaled with ``--state-file`` (sinks/stripe/emulator/journal.py) as these records:

- ``customer``, ``payment_method``, ``payment_intent``, ``webhook_endpoint``: the whole
  object after each change (the last one wins);
- ``webhook_endpoint_deleted``: an endpoint's id;
- ``stripe_event``: an event and the endpoints it is owed to; ``webhook_done``: one
  endpoint's delivery of it ended (delivered, given up, or its endpoint deleted).

After a restart every delivery still owed is queued again (Stripe keeps retrying an
undelivered event); the attempts made (``/_emulator/webhook_deliveries``), held and
duplicated deliveries are the process's own and start afresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Delivery:
    """One delivery of one event to one endpoint: its attempts so far and when the next is due.

    ``copy`` is 0 for the delivery Stripe owes, 1 for a duplicate injected by
    ``webhook_duplicates`` (its end does not settle what is owed). ``generation`` is the
    state's at creation: a delivery from before a reset is dropped.
    """

    event_id: str
    endpoint_id: str
    due: float  # time.monotonic()
    copy: int = 0
    attempts: int = 0
    generation: int = 0


@dataclass
class PaymentsState:
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    payment_methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    pm_tokens: dict[str, str] = field(default_factory=dict)  # attached pm -> its test token
    payment_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    events_by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    owed: dict[str, list[str]] = field(default_factory=dict)  # event id -> endpoint ids
    queue: list[Delivery] = field(default_factory=list)
    held: list[Delivery] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    generation: int = 0
    wake: Callable[[], None] | None = None
    configured: list[dict[str, Any]] = field(default_factory=list)  # --webhook-url: kept on reset

    def records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"op": "customer", "customer": c} for c in self.customers.values()
        ]
        out += [
            {"op": "payment_method", "payment_method": pm, "token": self.pm_tokens[pm["id"]]}
            for pm in self.payment_methods.values()
        ]
        out += [
            {"op": "payment_intent", "payment_intent": p} for p in self.payment_intents.values()
        ]
        out += [{"op": "webhook_endpoint", "endpoint": e} for e in self.endpoints.values()]
        out += [
            {"op": "stripe_event", "event": e, "owed": self.owed.get(e["id"], [])}
            for e in self.events
        ]
        return out

    def restore_record(self, record: dict[str, Any]) -> bool:
        """Apply one journal record of this state; False when it is not one."""
        op = record["op"]
        if op == "customer":
            self.customers[record["customer"]["id"]] = record["customer"]
        elif op == "payment_method":
            pm = record["payment_method"]
            self.payment_methods[pm["id"]] = pm
            self.pm_tokens[pm["id"]] = record["token"]
        elif op == "payment_intent":
            self.payment_intents[record["payment_intent"]["id"]] = record["payment_intent"]
        elif op == "webhook_endpoint":
            self.endpoints[record["endpoint"]["id"]] = record["endpoint"]
        elif op == "webhook_endpoint_deleted":
            self.endpoints.pop(record["id"], None)
        elif op == "stripe_event":
            self.add_event(record["event"], list(record["owed"]))
        elif op == "webhook_done":
            self.settle(record["event"], record["endpoint"])
        else:
            return False
        return True

    def add_event(self, event: dict[str, Any], owed: list[str]) -> None:
        self.events.append(event)
        self.events_by_id[event["id"]] = event
        if owed:
            self.owed[event["id"]] = owed

    def settle(self, event_id: str, endpoint_id: str) -> bool:
        """The delivery of ``event_id`` to ``endpoint_id`` is no longer owed; True if it was."""
        owed = self.owed.get(event_id)
        if owed is None or endpoint_id not in owed:
            return False
        owed.remove(endpoint_id)
        if not owed:
            del self.owed[event_id]
        return True

    def owe_pending(self) -> None:
        """Queue every delivery still owed (after a restore), oldest event first."""
        now = time.monotonic()
        for event in self.events:
            for endpoint_id in self.owed.get(event["id"], []):
                self.queue.append(
                    Delivery(event["id"], endpoint_id, now, generation=self.generation)
                )

    def clear(self) -> None:
        self.customers.clear()
        self.payment_methods.clear()
        self.pm_tokens.clear()
        self.payment_intents.clear()
        self.events.clear()
        self.events_by_id.clear()
        self.endpoints.clear()
        self.owed.clear()
        self.queue.clear()
        self.held.clear()
        self.attempts.clear()
        self.generation += 1
        self.endpoints.update({e["id"]: dict(e) for e in self.configured})

    def notify(self) -> None:
        """Wake the sender (sinks/stripe/emulator/webhooks.py) if it runs."""
        if self.wake is not None:
            self.wake()
