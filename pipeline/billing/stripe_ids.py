"""Which Stripe customer pays for a customer's usage: the operator decides (pure, no I/O).

A producer controls the content of its events, so nothing in an event may pick the
Stripe customer that pays on its own. Per meter, ``stripe.customer_id_from`` is:

* ``mapping`` (the default): the operator's mapping (``meterstream customers set``,
  the ``customers`` topic, ``PUT /v1/stripe/customers/{id}``), kept in ClickHouse
  (``customer_mappings``). A customer without one is held, never dropped.
* ``customer_id``: the meterstream customer id is the Stripe customer id.
* ``properties.<path>`` (opt-in): the Stripe id the customer's events name, pinned.
  The first id a customer's events give (by when the record received them) is
  pinned for good (``stripe_customer_pins``). The customer is held, and the
  refusal reported, when its events name

  - another id than its pin (``changed``): a change of a customer's Stripe id is
    never applied silently;
  - an id that belongs to another customer (``claimed``): the explicit mapping
    of another customer, the pin of another customer, or an id two unpinned
    customers name at once (neither is pinned);
  - several ids in its first events, received together (``ambiguous``);
  - something that is not a Stripe customer id (``invalid``: `` cus_1``, an
    invisible character...), never pinned.

  The pin is kept even while the customer is held for a later, different id.

In every case an explicit mapping wins: it is how the operator resolves a held
customer (and changes a customer's Stripe id on purpose).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Reason = Literal["changed", "claimed", "ambiguous", "invalid"]
_STRIPE_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")


def check_stripe_customer_id(value: Any) -> str:
    """A Stripe customer id: 1-255 of letters, digits, ``_`` and ``-`` (``cus_...``)."""
    if not isinstance(value, str) or not _STRIPE_ID.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a Stripe customer id (1-255 letters, digits, '_' or '-', "
            "e.g. cus_Q3x...)"
        )
    return value


def is_stripe_customer_id(value: Any) -> bool:
    return isinstance(value, str) and _STRIPE_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class Pin:
    """A customer's pinned Stripe id and when it was pinned (epoch ms: order only)."""

    stripe_customer_id: str
    version: int


@dataclass(frozen=True)
class Refusal:
    """A Stripe id named by a customer's events and not used; the customer is held."""

    customer_id: str
    claimed: str
    reason: Reason
    kept: str = ""
    other_customer: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.customer_id, self.claimed, self.reason)

    def describe(self) -> str:
        c = self.customer_id
        if self.reason == "changed":
            what = (
                f"customer {c}: events name Stripe customer {self.claimed!r}, but {self.kept!r} "
                "is pinned (the first one its events gave); a change is never applied"
            )
        elif self.reason == "claimed":
            what = (
                f"customer {c}: events name Stripe customer {self.claimed!r}, which belongs to "
                f"customer {self.other_customer}"
            )
        elif self.reason == "ambiguous":
            what = (
                f"customer {c}: its first events name several Stripe customers at once, "
                f"{self.claimed!r} among them"
            )
        else:
            what = f"customer {c}: events name {self.claimed!r}, not a Stripe customer id"
        return f"{what}; held until `meterstream customers set {c} cus_...`"


@dataclass
class Resolution:
    """Per customer: the Stripe id to forward to, or held (no id yet, or refused)."""

    ids: dict[str, str] = field(default_factory=dict)
    new_pins: dict[str, str] = field(default_factory=dict)  # record these before sending
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def refused(self) -> set[str]:
        return {r.customer_id for r in self.refusals}

    def waiting(self, customers: Iterable[str]) -> list[str]:
        """Customers held because no Stripe id is known (not refused)."""
        refused = self.refused
        return sorted(c for c in customers if c not in self.ids and c not in refused)


def is_property_source(source: str) -> bool:
    return source.startswith("properties.")


def resolve(
    source: str,
    customers: Iterable[str],
    mapping: Mapping[str, str],
    pins: Mapping[str, Pin] | None = None,
    values: Mapping[str, Sequence[tuple[str, int]]] | None = None,
) -> Resolution:
    """The Stripe id of each of ``customers`` by the rules of the module docstring.

    ``mapping`` and ``pins`` are everyone's (another customer's claim counts);
    ``values`` are the distinct Stripe ids each customer's events name, with when
    each was first recorded, earliest first.
    """
    out = Resolution()
    customers = sorted(set(customers))
    if source == "mapping":
        out.ids = {c: mapping[c] for c in customers if mapping.get(c)}
        return out
    if source == "customer_id":
        out.ids = {c: mapping.get(c) or c for c in customers}
        return out
    if not is_property_source(source):
        out.ids = {c: mapping[c] for c in customers if mapping.get(c)}
        return out

    pins = pins or {}
    values = values or {}
    mapped_to: dict[str, set[str]] = defaultdict(set)
    for customer, stripe_id in mapping.items():
        if stripe_id:
            mapped_to[stripe_id].add(customer)
    pinned_by: dict[str, tuple[int, str]] = {}
    for customer, its_pin in pins.items():
        earlier = pinned_by.get(its_pin.stripe_customer_id)
        if earlier is None or (its_pin.version, customer) < earlier:
            pinned_by[its_pin.stripe_customer_id] = (its_pin.version, customer)

    candidates: dict[str, str] = {}  # unpinned customer -> the id it would pin
    for customer in customers:
        if mapping.get(customer):
            out.ids[customer] = mapping[customer]  # the operator's decision wins
            continue
        named = [(v, at) for v, at in values.get(customer, ()) if is_stripe_customer_id(v)]
        invalid = [
            Refusal(customer, v, "invalid")
            for v, _ in values.get(customer, ())
            if not is_stripe_customer_id(v)
        ]
        out.refusals += invalid
        pin = pins.get(customer)
        if pin is not None:
            kept = pin.stripe_customer_id
        elif not named:
            continue  # no id yet: held (waiting, or refused as invalid)
        else:
            first_at = named[0][1]
            firsts = sorted({v for v, at in named if at == first_at})
            if len(firsts) > 1:
                out.refusals += [Refusal(customer, v, "ambiguous") for v in firsts]
                continue
            kept = firsts[0]
        refused = [Refusal(customer, v, "changed", kept) for v, _ in named if v != kept]
        owners = mapped_to.get(kept, set()) - {customer}
        pinned = pinned_by.get(kept)
        if owners:
            refused.append(Refusal(customer, kept, "claimed", "", min(owners)))
        elif pinned is not None and pinned[1] != customer:
            refused.append(Refusal(customer, kept, "claimed", "", pinned[1]))
        elif pin is None:
            candidates[customer] = kept  # pinned even if a later id is refused
        out.refusals += refused
        if not refused and not invalid:
            out.ids[customer] = kept

    by_id: dict[str, list[str]] = defaultdict(list)
    for customer, stripe_id in candidates.items():
        by_id[stripe_id].append(customer)
    for stripe_id, claimants in by_id.items():
        if len(claimants) == 1:
            out.new_pins[claimants[0]] = stripe_id
            continue
        for customer in claimants:  # two customers name one id at once: neither gets it
            other = min(c for c in claimants if c != customer)
            out.refusals.append(Refusal(customer, stripe_id, "claimed", "", other))
            out.ids.pop(customer, None)
    return out
