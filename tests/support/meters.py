"""Meters files for tests, one line a meter: ``meters_yaml(meter_entry(...), ...)`` is the YAML
text a test writes with ``StackSlice.meters_file``. Values are YAML text, so a flow
mapping or list (``stripe="{event_name: x, interval: 1s}"``, ``group_by="[properties.m]"``)
is written as it would be in the file."""

from __future__ import annotations

from typing import Any

FAST_STRIPE = "interval: 1s, grace: 0s"
"""Stripe options of a meter whose windows are sent as soon as they close."""
BY_MODEL = "[properties.model]"
"""``group_by`` of a meter that splits its windows by the event's model."""


def meter_entry(
    name: str, event_name: str, aggregation: str, value: str = "", **fields: str
) -> str:
    """One meter entry: name, the event it counts, its aggregation, the value path (not for
    ``count``), then any other field (``window``, ``group_by``, ``filters``, ``stripe``)."""
    entry = {"event_name": event_name, "aggregation": aggregation, "value": value, **fields}
    return f"  - name: {name}\n" + "".join(f"    {k}: {v}\n" for k, v in entry.items() if v)


def meters_yaml(*meters: str) -> str:
    """A meters file holding ``meters`` in order."""
    return "\nmeters:\n" + "".join(meters)


def stripe(event_name: str, options: str = FAST_STRIPE) -> str:
    """A meter's ``stripe`` flow mapping: the Stripe event name, then ``options``."""
    return f"{{event_name: {event_name}, {options}}}"


def plans_yaml(default: str, **unit_prices: str) -> str:
    """A plans file of one plan in usd, named ``default`` and the default plan, with a
    per-unit price per meter (``tokens="0.001"``)."""
    prices = "".join(f"      - {{meter: {m}, unit_price: {p}}}\n" for m, p in unit_prices.items())
    return (
        f"\nplans:\n  - name: {default}\n    currency: usd\n    prices:\n{prices}"
        f"default_plan: {default}\n"
    )


def chat(customer: str, key: str, tokens: Any, ts: int) -> dict[str, Any]:
    """A ``chat`` event of ``customer`` with ``tokens`` (any JSON value: tests send bad ones
    too) at ``ts`` (epoch ms)."""
    return {
        "event_name": "chat",
        "customer_id": customer,
        "idempotency_key": key,
        "timestamp": ts,
        "properties": {"tokens": tokens},
    }
