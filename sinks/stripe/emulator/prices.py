"""Products, prices and the upcoming invoice (issue #24): enough of Stripe's catalog for
metered prices, priced from the meter events the emulator received."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from aiohttp import web

from meterstream.sinks.stripe.emulator.meters import aggregate, live_events
from meterstream.sinks.stripe.emulator.protocol import (
    ApiError,
    authorized,
    int_param,
    list_object,
    new_id,
    require_api_key,
    required_str,
)
from meterstream.sinks.stripe.emulator.state import STATE_KEY

# ---------------------------------------------------------------- products, prices, invoices
#
# Enough of Stripe's catalog for metered prices (issue #24): products, prices with
# billing_scheme per_unit | tiered, tiers_mode graduated | volume, transform_quantity,
# recurring[usage_type=metered, meter] or licensed; and an invoice preview
# (POST /v1/invoices/create_preview, GET /v1/invoices/upcoming) for a customer and a list
# of prices, from the meter events received, by Stripe's documented price semantics:
# a metered price's quantity is the meter's aggregate over the period (sum, count or
# last; a negative total is 0), packages are the quantity divided by divide_by and
# rounded up or down, graduated tiers price each tier's units (up_to inclusive) plus the
# flat amount of every tier reached (the first always), volume tiers price every unit at
# the tier holding the total, and each line's exact amount (Stripe's *_decimal amounts
# are in minor units) is rounded once, half up, to a whole minor unit; the total is the
# sum of the lines. The period is the calendar month (UTC) holding the emulator's clock,
# or ``period[start]``/``period[end]`` (epoch seconds, an emulator extension: previews
# here have no subscription to take a billing cycle from).


def _decimal_param(value: Any, param: str) -> Decimal:
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise ApiError(400, f"Invalid decimal: {value}", param=param) from None
    if not number.is_finite() or number < 0:
        raise ApiError(400, f"Invalid decimal: {value}", param=param)
    return number


def _amount(params: Mapping[str, Any], name: str, param: str) -> Decimal | None:
    """``name`` (integer) or ``name_decimal`` (decimal string), in minor units."""
    if params.get(f"{name}_decimal") is not None:
        return _decimal_param(params[f"{name}_decimal"], f"{param}_decimal")
    if params.get(name) is not None:
        return Decimal(int_param(params, name, required=True) or 0)
    return None


def _price_tiers(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(
            400, "Missing required param: tiers.", code="parameter_missing", param="tiers"
        )
    tiers: list[dict[str, Any]] = []
    previous = 0
    for i, tier in enumerate(raw):
        if not isinstance(tier, dict):
            raise ApiError(400, f"Invalid tiers[{i}]: must be a hash.", param=f"tiers[{i}]")
        up_to = tier.get("up_to")
        last = i == len(raw) - 1
        if up_to == "inf":
            if not last:
                raise ApiError(400, "Only the last tier may have up_to=inf.", param="tiers")
            bound = None
        else:
            bound = int_param(tier, "up_to", required=True)
            if last or bound is None or bound <= previous:
                raise ApiError(
                    400,
                    "Tiers must have ascending up_to values and the last must be inf.",
                    param=f"tiers[{i}][up_to]",
                )
            previous = bound
        unit = _amount(tier, "unit_amount", f"tiers[{i}][unit_amount]") or Decimal(0)
        flat = _amount(tier, "flat_amount", f"tiers[{i}][flat_amount]") or Decimal(0)
        tiers.append(
            {
                "up_to": bound,
                "unit_amount_decimal": str(unit),
                "flat_amount_decimal": str(flat),
                "unit_amount": int(unit) if unit == unit.to_integral() else None,
                "flat_amount": int(flat) if flat == flat.to_integral() else None,
            }
        )
    return tiers


async def create_product(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    name = required_str(params, "name", 250)
    product_id = params.get("id") or new_id("prod")
    if not isinstance(product_id, str) or len(product_id) > 250:
        raise ApiError(400, "Invalid id.", param="id")
    if product_id in state.products:
        raise ApiError(
            400,
            f"Product already exists: {product_id}",
            code="resource_already_exists",
            param="id",
        )
    metadata = params.get("metadata") or {}
    product = {
        "id": product_id,
        "object": "product",
        "active": True,
        "created": int(state.clock()),
        "livemode": False,
        "metadata": metadata if isinstance(metadata, dict) else {},
        "name": name,
    }
    state.products[product_id] = product
    state.log("product", product=product)
    return web.json_response(product)


async def get_product(request: web.Request) -> web.Response:
    require_api_key(request)
    product = request.app[STATE_KEY].products.get(request.match_info["id"])
    if product is None:
        raise ApiError(
            404,
            f"No such product: '{request.match_info['id']}'",
            code="resource_missing",
            param="id",
        )
    return web.json_response(product)


async def create_price(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    currency = required_str(params, "currency").lower()
    if not re.fullmatch(r"[a-z]{3}", currency):
        raise ApiError(400, f"Invalid currency: {currency}", param="currency")
    product = required_str(params, "product")
    if product not in state.products:
        raise ApiError(
            404, f"No such product: '{product}'", code="resource_missing", param="product"
        )
    scheme = params.get("billing_scheme") or "per_unit"
    if scheme not in ("per_unit", "tiered"):
        raise ApiError(
            400, "Invalid billing_scheme: must be per_unit or tiered.", param="billing_scheme"
        )
    recurring = params.get("recurring")
    if recurring is not None:
        if not isinstance(recurring, dict) or recurring.get("interval") not in (
            "day", "week", "month", "year",
        ):  # fmt: skip
            raise ApiError(400, "Invalid recurring[interval].", param="recurring[interval]")
        usage_type = recurring.get("usage_type") or "licensed"
        if usage_type not in ("licensed", "metered"):
            raise ApiError(400, "Invalid recurring[usage_type].", param="recurring[usage_type]")
        meter = recurring.get("meter")
        if usage_type == "metered" and meter not in state.meters:
            raise ApiError(
                400 if meter is None else 404,
                f"No such billing meter: '{meter}'" if meter else "A metered price needs a meter.",
                code="resource_missing" if meter else "parameter_missing",
                param="recurring[meter]",
            )
        recurring = {
            "interval": recurring["interval"],
            "interval_count": 1,
            "usage_type": usage_type,
            "meter": meter if usage_type == "metered" else None,
        }
    transform = params.get("transform_quantity")
    unit = _amount(params, "unit_amount", "unit_amount")
    tiers = None
    tiers_mode = None
    if scheme == "per_unit":
        if unit is None:
            raise ApiError(
                400, "Missing required param: unit_amount.", code="parameter_missing",
                param="unit_amount",
            )  # fmt: skip
        if transform is not None:
            if not isinstance(transform, dict) or transform.get("round") not in ("up", "down"):
                raise ApiError(400, "Invalid transform_quantity.", param="transform_quantity")
            divide_by = int_param(transform, "divide_by", required=True)
            if divide_by is None or divide_by < 1:
                raise ApiError(
                    400, "Invalid transform_quantity[divide_by].", param="transform_quantity"
                )
            transform = {"divide_by": divide_by, "round": transform["round"]}
    else:
        if transform is not None:
            raise ApiError(
                400,
                "Quantity transformation isn't compatible with tiered pricing.",
                param="transform_quantity",
            )
        tiers_mode = params.get("tiers_mode")
        if tiers_mode not in ("graduated", "volume"):
            raise ApiError(
                400, "Invalid tiers_mode: must be graduated or volume.", param="tiers_mode"
            )
        tiers = _price_tiers(params.get("tiers"))
    lookup_key = params.get("lookup_key")
    if lookup_key is not None and any(
        p["lookup_key"] == lookup_key and p["active"] for p in state.prices.values()
    ):
        raise ApiError(
            400,
            f"A price (with lookup_key {lookup_key}) already exists.",
            param="lookup_key",
        )
    metadata = params.get("metadata") or {}
    price_id = new_id("price")
    price: dict[str, Any] = {
        "id": price_id,
        "object": "price",
        "active": True,
        "billing_scheme": scheme,
        "created": int(state.clock()),
        "currency": currency,
        "livemode": False,
        "lookup_key": lookup_key,
        "metadata": metadata if isinstance(metadata, dict) else {},
        "nickname": params.get("nickname"),
        "product": product,
        "recurring": recurring,
        "tiers": tiers,
        "tiers_mode": tiers_mode,
        "transform_quantity": transform,
        "type": "recurring" if recurring else "one_time",
        "unit_amount": int(unit) if unit is not None and unit == unit.to_integral() else None,
        "unit_amount_decimal": None if unit is None else str(unit),
    }
    state.prices[price_id] = price
    state.log("price", price=price)
    return web.json_response(price)


async def list_prices(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    keys = params.get("lookup_keys")
    prices = [
        p
        for p in state.prices.values()
        if (keys is None or p["lookup_key"] in keys)
        and params.get("product") in (None, p["product"])
    ]
    return list_object(request, prices, params)


def _price_amount(price: Mapping[str, Any], quantity: Decimal) -> Decimal:
    """The exact amount of ``quantity`` under ``price``, in minor units (Stripe's rules)."""
    q = max(quantity, Decimal(0))
    if price["billing_scheme"] == "per_unit":
        transform = price.get("transform_quantity")
        if transform:
            ratio = Fraction(q) / transform["divide_by"]
            q = Decimal(math.ceil(ratio) if transform["round"] == "up" else math.floor(ratio))
        return q * Decimal(price["unit_amount_decimal"])
    tiers = price["tiers"]
    if price["tiers_mode"] == "volume":
        for tier in tiers:
            if tier["up_to"] is None or q <= tier["up_to"]:
                return q * Decimal(tier["unit_amount_decimal"]) + Decimal(
                    tier["flat_amount_decimal"]
                )
    total, lower = Decimal(0), 0
    for i, tier in enumerate(tiers):
        if i > 0 and q <= lower:
            break
        top = q if tier["up_to"] is None else min(q, Decimal(tier["up_to"]))
        units = max(top - lower, Decimal(0))
        total += units * Decimal(tier["unit_amount_decimal"]) + Decimal(tier["flat_amount_decimal"])
        if tier["up_to"] is None:
            break
        lower = tier["up_to"]
    return total


def _month(epoch: float) -> tuple[int, int]:
    now = datetime.fromtimestamp(epoch, UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    return int(start.timestamp()), int(end.timestamp())


async def invoice_preview(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    customer = required_str(params, "customer")
    details = params.get("subscription_details") or {}
    items = details.get("items") if isinstance(details, dict) else None
    if items is None:
        items = params.get("subscription_items")
    if not isinstance(items, list) or not items:
        raise ApiError(
            400,
            "Missing required param: subscription_details[items].",
            code="parameter_missing",
            param="subscription_details[items]",
        )
    period = params.get("period") or {}
    start, end = _month(state.clock())
    if isinstance(period, dict) and period:
        start = int_param(period, "start", required=True) or 0
        end = int_param(period, "end", required=True) or 0
    lines = []
    currencies = set()
    for i, item in enumerate(items):
        price_id = item.get("price") if isinstance(item, dict) else None
        price = state.prices.get(price_id) if isinstance(price_id, str) else None
        if price is None:
            raise ApiError(
                404,
                f"No such price: '{price_id}'",
                code="resource_missing",
                param=f"subscription_details[items][{i}][price]",
            )
        currencies.add(price["currency"])
        recurring = price.get("recurring") or {}
        if recurring.get("usage_type") == "metered":
            meter = state.meters[recurring["meter"]]
            events = live_events(state, meter, customer, start, end)
            formula = meter["default_aggregation"]["formula"]
            quantity = max(aggregate(formula, events), 0) if events else 0
        else:
            quantity = int_param(item, "quantity", required=False) or 1
        exact = _price_amount(price, Decimal(quantity))
        amount = int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
        lines.append(
            {
                "object": "line_item",
                "amount": amount,
                "currency": price["currency"],
                "description": price.get("nickname") or price["id"],
                "period": {"start": start, "end": end},
                "price": price,
                "quantity": quantity,
            }
        )
    if len(currencies) > 1:
        raise ApiError(400, "All prices of an invoice must use one currency.")
    total = sum(line["amount"] for line in lines)
    invoice = {
        "object": "invoice",
        "id": None,
        "amount_due": total,
        "currency": currencies.pop(),
        "customer": customer,
        "lines": {"object": "list", "data": lines, "has_more": False, "url": request.path},
        "livemode": False,
        "period_end": end,
        "period_start": start,
        "status": "draft",
        "subtotal": total,
        "total": total,
    }
    return web.json_response(invoice)
