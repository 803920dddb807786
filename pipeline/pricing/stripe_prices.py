"""Stripe Product and Price create parameters for a plan, built as pure data.

A plan maps onto Stripe one to one (issue #24 item 6):

- **One product per meter** (``id`` ``ms_meter_{meter}``): what is sold ("AI tokens"),
  shared by every plan's price for it, as Stripe's model has it (products are what you
  sell, prices what they cost) and as Prefab modelled its Servers.
- **One metered price per plan and meter** on that product: ``billing_scheme``,
  ``tiers_mode``, ``tiers[]`` (``up_to`` or ``"inf"``, ``unit_amount_decimal``,
  ``flat_amount_decimal``), ``transform_quantity[divide_by, round]``, ``currency`` and
  ``recurring[interval=month, usage_type=metered, meter=<Stripe meter id>]``.
- **One product per plan with a base fee** (``ms_plan_{plan}``) carrying a licensed
  monthly price of ``unit_amount`` = the fee (quantity 1 on the subscription).

Amounts go in Stripe's units: the plan's ``0.05`` USD is ``unit_amount_decimal="5"``
cents, ``0.000004`` USD is ``"0.0004"``; flat amounts are whole minor units
(``flat_amount_decimal="9900"``), as :mod:`meterstream.pricing.plans` validated.

**Creating twice creates nothing new.** Everything is deterministic: product ids are
fixed, and each price has a ``lookup_key`` ``ms_{plan}_{meter}_{digest}`` whose digest
covers every field that defines the price (currency, amounts, tiers, transform, product,
meter name), so the same definition always has the same key and a changed one gets a
new key (Stripe prices are immutable: a new definition is a new price). The
idempotency keys repeat the lookup key plus the Stripe meter id. The caller creates a
product unless ``GET /v1/products/{id}`` finds it (or treats ``resource_already_exists``
as success), and a price unless ``GET /v1/prices?lookup_keys[]=...`` finds it.

**What Stripe prices cannot say:** a plan's or a price's ``minimum`` has no Stripe price
field; :func:`unsupported` lists them so the caller can warn (the preview applies them;
Stripe's invoice would not).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from meterstream.pricing.money import plain
from meterstream.pricing.plans import Plan, PlanPrice

PREFIX = "ms"
MAX_LOOKUP_KEY = 200
"""Stripe's limit on ``lookup_key``."""
_DIGEST_CHARS = 16  # 64 bits: a definition collision is not a practical concern


def meter_product_id(meter: str) -> str:
    """The Stripe product id of a meter: ``ms_meter_{meter}``."""
    return f"{PREFIX}_meter_{meter}"


def plan_product_id(plan: Plan) -> str:
    """The Stripe product id of a plan's base fee: ``ms_plan_{plan}``."""
    return f"{PREFIX}_plan_{plan.name}"


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:_DIGEST_CHARS]


def _stripe_decimal(amount: Decimal, plan: Plan) -> str:
    return plain(plan.money.to_stripe(amount))


def _definition(plan: Plan, price: PlanPrice) -> dict[str, Any]:
    """The fields that define a metered price, in Stripe's units (no ids, no keys)."""
    out: dict[str, Any] = {
        "currency": plan.money.code,
        "product": meter_product_id(price.meter),
        "billing_scheme": price.billing_scheme,
    }
    if price.billing_scheme == "per_unit":
        assert price.unit_price is not None
        out["unit_amount_decimal"] = _stripe_decimal(price.unit_price, plan)
        if price.transform_quantity is not None:
            out["transform_quantity"] = {
                "divide_by": price.transform_quantity.divide_by,
                "round": price.transform_quantity.round,
            }
    else:
        out["tiers_mode"] = price.tiers_mode
        out["tiers"] = [
            {
                "up_to": "inf" if tier.up_to is None else tier.up_to,
                "unit_amount_decimal": _stripe_decimal(tier.unit_price, plan),
                "flat_amount_decimal": _stripe_decimal(tier.flat_price, plan),
            }
            for tier in price.tiers or ()
        ]
    return out


def price_lookup_key(plan: Plan, price: PlanPrice) -> str:
    """``ms_{plan}_{meter}_{digest of the definition}``; at most 200 characters."""
    digest = _digest([_definition(plan, price), price.meter])
    return f"{PREFIX}_{plan.name}_{price.meter}_{digest}"


def base_fee_lookup_key(plan: Plan) -> str:
    """``ms_{plan}_base_{digest of currency and fee}``."""
    digest = _digest([plan.money.code, _stripe_decimal(plan.base_fee, plan)])
    return f"{PREFIX}_{plan.name}_base_{digest}"


def meter_product_params(meter: str, name: str | None = None) -> dict[str, Any]:
    """``POST /v1/products`` for a meter's product (``name`` defaults to the meter's)."""
    return {
        "id": meter_product_id(meter),
        "name": name or meter,
        "metadata": {"meterstream_meter": meter},
    }


def plan_product_params(plan: Plan) -> dict[str, Any]:
    """``POST /v1/products`` for a plan's base-fee product."""
    return {
        "id": plan_product_id(plan),
        "name": plan.description or f"{plan.name} plan",
        "metadata": {"meterstream_plan": plan.name},
    }


def price_params(plan: Plan, price: PlanPrice, meter_id: str) -> dict[str, Any]:
    """``POST /v1/prices`` for a plan's metered price of one meter.

    ``meter_id`` is the Stripe Billing meter (``mtr_...``) the meter forwards to.
    """
    return {
        **_definition(plan, price),
        "lookup_key": price_lookup_key(plan, price),
        "nickname": f"{plan.name} {price.meter}",
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
        "metadata": {"meterstream_plan": plan.name, "meterstream_meter": price.meter},
    }


def base_fee_params(plan: Plan) -> dict[str, Any] | None:
    """``POST /v1/prices`` for a plan's monthly base fee; None when the plan has none."""
    if plan.base_fee.is_zero():
        return None
    return {
        "currency": plan.money.code,
        "product": plan_product_id(plan),
        "billing_scheme": "per_unit",
        "unit_amount": plan.money.to_minor(plan.base_fee),
        "lookup_key": base_fee_lookup_key(plan),
        "nickname": f"{plan.name} base fee",
        "recurring": {"interval": "month", "usage_type": "licensed"},
        "metadata": {"meterstream_plan": plan.name},
    }


@dataclass(frozen=True, slots=True)
class StripeRequest:
    """One create call: ``kind`` (``product`` | ``price``), its idempotency key and params.

    ``lookup`` is how to find an earlier copy: the product id or the price lookup key.
    """

    kind: Literal["product", "price"]
    lookup: str
    idempotency_key: str
    params: dict[str, Any]


def plan_requests(
    plan: Plan, meter_ids: Mapping[str, str], meter_names: Mapping[str, str] | None = None
) -> tuple[StripeRequest, ...]:
    """Every create call for ``plan``, in order (products before their prices).

    ``meter_ids`` maps each priced meter to its Stripe meter id (``KeyError`` if one is
    missing); ``meter_names`` optionally gives the product names (default: the meter name).
    """
    names = meter_names or {}
    requests: list[StripeRequest] = []
    base = base_fee_params(plan)
    if base is not None:
        product = plan_product_params(plan)
        requests.append(
            StripeRequest("product", product["id"], f"{product['id']}-product", product)
        )
        key = base["lookup_key"]
        requests.append(StripeRequest("price", key, f"{key}-price", base))
    for price in plan.prices:
        product = meter_product_params(price.meter, names.get(price.meter))
        requests.append(
            StripeRequest("product", product["id"], f"{product['id']}-product", product)
        )
        params = price_params(plan, price, meter_ids[price.meter])
        key = params["lookup_key"]
        idempotency = f"{key}-{_digest(meter_ids[price.meter])}"
        requests.append(StripeRequest("price", key, idempotency, params))
    return tuple(requests)


def unsupported(plan: Plan) -> list[str]:
    """What of ``plan`` Stripe prices cannot express (its minimums), one sentence each."""
    found = []
    if plan.minimum is not None:
        found.append(f"plan {plan.name}: minimum {plan.minimum} has no Stripe price field")
    for price in plan.prices:
        if price.minimum is not None:
            found.append(
                f"plan {plan.name}, meter {price.meter}: minimum {price.minimum} "
                "has no Stripe price field"
            )
    return found
