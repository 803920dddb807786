"""Customers (``/v1/customers``) and payment methods (``/v1/payment_methods``).

Payment methods are Stripe's test ones, by id; the card's outcome is Stripe's own
failure injection:

- ``pm_card_visa``, ``pm_card_mastercard``: charges succeed;
- ``pm_card_chargeDeclined``: declined, ``code=card_declined``,
  ``decline_code=generic_decline``;
- ``pm_card_chargeDeclinedInsufficientFunds``: declined, ``code=card_declined``,
  ``decline_code=insufficient_funds``.

Attaching a test id to a customer (``POST /v1/payment_methods/{pm}/attach``, or
``payment_method`` on customer create) makes a new ``pm_...`` of that card, attached to
the customer, as Stripe does. A customer's ``invoice_settings[default_payment_method]``
must be a payment method attached to it; a test id there is attached first (an
emulator convenience: tests need not attach), and the customer then shows the new id.

A customer made here is known to the meter-event customer check
(sinks/stripe/emulator/meter_events.py) as well as the ``/_emulator/customers``
registry; the check still applies only while that registry is non-empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from meterstream.sinks.stripe.emulator.protocol import (
    ApiError,
    authorized,
    known_params,
    metadata_param,
    new_id,
    newest_first,
    no_such,
)
from meterstream.sinks.stripe.emulator.state import EmulatorState


@dataclass(frozen=True)
class TestCard:
    brand: str
    last4: str
    decline_code: str | None = None  # None: charges succeed
    message: str = ""


TEST_CARDS = {
    "pm_card_visa": TestCard("visa", "4242"),
    "pm_card_mastercard": TestCard("mastercard", "4444"),
    "pm_card_chargeDeclined": TestCard(
        "visa", "0002", "generic_decline", "Your card was declined."
    ),
    "pm_card_chargeDeclinedInsufficientFunds": TestCard(
        "visa", "9995", "insufficient_funds", "Your card has insufficient funds."
    ),
}

_DEFAULT_PARAM = "invoice_settings[default_payment_method]"
_CUSTOMER_PARAMS = (
    "description",
    "email",
    "expand",
    "invoice_settings",
    "metadata",
    "name",
    "phone",
)


def _card_object(pm_id: str, card: TestCard, customer: str | None, created: int) -> dict[str, Any]:
    return {
        "id": pm_id,
        "object": "payment_method",
        "billing_details": {"address": None, "email": None, "name": None, "phone": None},
        "card": {
            "brand": card.brand,
            "country": "US",
            "exp_month": 12,
            "exp_year": 2034,
            "funding": "credit",
            "last4": card.last4,
        },
        "created": created,
        "customer": customer,
        "livemode": False,
        "metadata": {},
        "type": "card",
    }


def payment_method(state: EmulatorState, pm_id: Any, param: str | None) -> dict[str, Any]:
    """The payment method ``pm_id`` (a test id or an attached one), or ``resource_missing``."""
    if isinstance(pm_id, str) and pm_id in TEST_CARDS:
        return _card_object(pm_id, TEST_CARDS[pm_id], None, 0)
    found = state.pay.payment_methods.get(pm_id) if isinstance(pm_id, str) else None
    if found is None:
        raise no_such("PaymentMethod", pm_id, param, 404 if param is None else 400)
    return found


def card_of(state: EmulatorState, pm_id: str) -> TestCard:
    return TEST_CARDS[state.pay.pm_tokens.get(pm_id, pm_id)]


def attach(
    state: EmulatorState, pm_id: Any, customer_id: str, param: str
) -> tuple[dict[str, Any], str | None]:
    """``pm_id`` attached to the customer, and the test id it is made from when it is new:
    a test id makes a new payment method, not recorded until :func:`keep` (so a request
    refused later records nothing)."""
    pm = payment_method(state, pm_id, param)
    if pm["customer"] == customer_id:
        return pm, None
    if pm["customer"] is not None:
        raise ApiError(
            400,
            "The payment method you provided has already been attached to a customer.",
            param=param,
        )
    made = _card_object(new_id("pm"), TEST_CARDS[pm_id], customer_id, int(state.clock()))
    return made, pm_id


def keep(state: EmulatorState, pm: dict[str, Any], token: str | None) -> dict[str, Any]:
    """Record a payment method :func:`attach` made (nothing for one it found)."""
    if token is not None:
        state.pay.payment_methods[pm["id"]] = pm
        state.pay.pm_tokens[pm["id"]] = token
        state.log("payment_method", payment_method=pm, token=token)
    return pm


def customer_of(state: EmulatorState, customer_id: Any, param: str | None) -> dict[str, Any]:
    found = state.pay.customers.get(customer_id) if isinstance(customer_id, str) else None
    if found is None:
        raise no_such("customer", customer_id, param, 404 if param is None else 400)
    return found


def _string_fields(params: Mapping[str, Any], customer: dict[str, Any]) -> None:
    for name in ("description", "email", "name", "phone"):
        value = params.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > 512:
            raise ApiError(400, f"Invalid string: {name}", param=name)
        customer[name] = value or None


def _default_wanted(params: Mapping[str, Any]) -> Any:
    """``invoice_settings[default_payment_method]``: None when not given, "" to unset."""
    settings = params.get("invoice_settings")
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ApiError(400, "Invalid invoice_settings: must be a hash.", param="invoice_settings")
    return settings.get("default_payment_method")


def _save(state: EmulatorState, customer: dict[str, Any]) -> web.Response:
    state.pay.customers[customer["id"]] = customer
    state.log("customer", customer=customer)
    return web.json_response(customer)


async def create_customer(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    known_params(params, (*_CUSTOMER_PARAMS, "payment_method"))
    customer: dict[str, Any] = {
        "id": new_id("cus"),
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": int(state.clock()),
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "email": None,
        "invoice_prefix": None,
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": False,
        "metadata": metadata_param(params),
        "name": None,
        "phone": None,
        "preferred_locales": [],
        "tax_exempt": "none",
        "test_clock": None,
    }
    _string_fields(params, customer)
    made = []
    first = params.get("payment_method")
    if first is not None:
        made.append(attach(state, first, customer["id"], "payment_method"))
    default = _default_wanted(params)
    if default:
        found = made[0] if first is not None and default == first else None
        if found is None:
            found = attach(state, default, customer["id"], _DEFAULT_PARAM)
            made.append(found)
        customer["invoice_settings"]["default_payment_method"] = found[0]["id"]
    for pm, token in made:
        keep(state, pm, token)
    return _save(state, customer)


async def get_customer(request: web.Request) -> web.Response:
    state, _ = await authorized(request)
    return web.json_response(customer_of(state, request.match_info["id"], None))


async def update_customer(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    known_params(params, _CUSTOMER_PARAMS)
    customer = dict(customer_of(state, request.match_info["id"], None))
    customer["invoice_settings"] = dict(customer["invoice_settings"])
    customer["metadata"] = metadata_param(params, customer["metadata"])
    _string_fields(params, customer)
    default = _default_wanted(params)
    if default == "":
        customer["invoice_settings"]["default_payment_method"] = None
    elif default is not None:
        pm = keep(state, *attach(state, default, customer["id"], _DEFAULT_PARAM))
        customer["invoice_settings"]["default_payment_method"] = pm["id"]
    return _save(state, customer)


async def list_customers(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    return newest_first(request, state.pay.customers.values(), params, "email")


async def get_payment_method(request: web.Request) -> web.Response:
    state, _ = await authorized(request)
    return web.json_response(payment_method(state, request.match_info["id"], None))


async def attach_payment_method(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    known_params(params, ("customer", "expand"))
    customer = customer_of(state, params.get("customer"), "customer")
    pm = keep(state, *attach(state, request.match_info["id"], customer["id"], "customer"))
    return web.json_response(pm)
