"""PaymentIntents (``/v1/payment_intents``): create (and confirm at once), confirm,
cancel, retrieve, list; each change of status makes a Stripe event
(sinks/stripe/emulator/webhooks.py).

Created with ``confirm=true`` (or confirmed later) on a payment method whose test card
succeeds (sinks/stripe/emulator/customers.py), a PaymentIntent is ``succeeded`` at once
(``amount_received = amount``; events ``payment_intent.created``,
``payment_intent.succeeded``). On a declining card the answer is Stripe's ``402
card_error`` (``code=card_declined``, ``decline_code``, ``payment_intent`` = the
PaymentIntent, now ``requires_payment_method`` with ``last_payment_error`` and no
``payment_method``; events ``payment_intent.created``,
``payment_intent.payment_failed``); that answer is replayed for its
``Idempotency-Key`` like a success, since the request did make a PaymentIntent.

Refused before anything is made (nothing to replay): an amount that is not a whole
number, below Stripe's minimum charge for the currency (``amount_too_small``: 50
cents in usd) or above 99999999 (``amount_too_large``); an unknown currency; an
unknown customer or payment method (``resource_missing``); a payment method attached
to another customer; ``confirm=true`` without a payment method (Stripe applies no
default payment method to a PaymentIntent: ``payment_intent_unexpected_state``);
``off_session`` without ``confirm=true``; an unknown parameter.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from meterstream.sinks.stripe.emulator.customers import card_of, customer_of, payment_method
from meterstream.sinks.stripe.emulator.protocol import (
    ApiError,
    authorized,
    bool_param,
    int_param,
    known_params,
    metadata_param,
    new_id,
    newest_first,
    no_such,
)
from meterstream.sinks.stripe.emulator.state import EmulatorState
from meterstream.sinks.stripe.emulator.webhooks import emit

MAX_AMOUNT = 99_999_999
# Stripe's minimum charge amounts, in the currency's minor units (others: 50).
MINIMUM_AMOUNTS = {
    "usd": 50, "eur": 50, "gbp": 30, "cad": 50, "aud": 50, "chf": 50, "nzd": 50, "sgd": 50,
    "hkd": 400, "jpy": 50, "dkk": 250, "nok": 300, "sek": 300, "pln": 200, "czk": 1500,
    "huf": 17500, "mxn": 1000, "brl": 50, "inr": 50, "ron": 200, "bgn": 100, "aed": 200,
    "thb": 1000, "myr": 200,
}  # fmt: skip
ZERO_DECIMAL = {"jpy", "krw", "vnd", "clp", "pyg", "ugx", "xaf", "xof", "bif", "djf", "gnf"}
CURRENCIES = set(MINIMUM_AMOUNTS) | ZERO_DECIMAL | {"cny", "zar", "ils", "try", "isk", "php"}

_CREATE_PARAMS = (
    "amount", "confirm", "currency", "customer", "description", "expand", "metadata",
    "off_session", "payment_method", "payment_method_types", "receipt_email",
    "statement_descriptor", "statement_descriptor_suffix",
)  # fmt: skip
_FINAL = ("succeeded", "canceled")


def _amount(params: Mapping[str, Any], currency: str) -> int:
    amount = int_param(params, "amount", required=True)
    assert amount is not None
    minimum = MINIMUM_AMOUNTS.get(currency, 50)
    if amount < minimum:
        symbol = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥"}.get(currency, "")
        shown = symbol + (str(minimum) if currency in ZERO_DECIMAL else f"{minimum / 100:.2f}")
        raise ApiError(
            400,
            f"Amount must be at least {shown} {currency}",
            code="amount_too_small",
            param="amount",
        )
    if amount > MAX_AMOUNT:
        raise ApiError(
            400,
            f"Amount must be no more than {MAX_AMOUNT} in the currency's smallest unit",
            code="amount_too_large",
            param="amount",
        )
    return amount


def _currency(params: Mapping[str, Any]) -> str:
    raw = params.get("currency")
    if raw is None:
        raise ApiError(
            400, "Missing required param: currency.", code="parameter_missing", param="currency"
        )
    currency = str(raw).lower()
    if currency not in CURRENCIES:
        raise ApiError(
            400,
            f"Invalid currency: {currency}. Stripe currently supports these currencies: "
            + ", ".join(sorted(CURRENCIES)),
            param="currency",
        )
    return currency


def _usable_method(state: EmulatorState, pm_id: Any, customer: str | None) -> str:
    pm = payment_method(state, pm_id, "payment_method")
    owner = pm["customer"]
    if owner is not None and owner != customer:
        raise ApiError(
            400,
            f"The provided PaymentMethod {pm['id']} belongs to another Customer than this "
            "PaymentIntent's.",
            param="payment_method",
        )
    return str(pm["id"])


def _missing_method(intent: Mapping[str, Any]) -> ApiError:
    whom = f" with {intent['customer']}" if intent.get("customer") else ""
    return ApiError(
        400,
        "You cannot confirm this PaymentIntent because it's missing a payment method. "
        f"To confirm the PaymentIntent{whom}, specify a payment method attached to this "
        "customer along with the customer ID.",
        code="payment_intent_unexpected_state",
        param="payment_method",
    )


def _unexpected_state(intent: Mapping[str, Any], action: str) -> ApiError:
    return ApiError(
        400,
        f"You cannot {action} this PaymentIntent because it has a status of {intent['status']}.",
        code="payment_intent_unexpected_state",
        extra={"payment_intent": dict(intent)},
    )


def _save(state: EmulatorState, intent: dict[str, Any]) -> None:
    state.pay.payment_intents[intent["id"]] = intent
    state.log("payment_intent", payment_intent=intent)


def _charge(state: EmulatorState, intent: dict[str, Any], pm_id: str, key: str | None) -> None:
    """Confirm ``intent`` on ``pm_id``: succeeded, or declined (raises the 402 card error).

    The PaymentIntent and its event are saved before the answer, decline or not.
    """
    card = card_of(state, pm_id)
    intent["latest_charge"] = new_id("ch")
    if card.decline_code is None:
        intent.update(
            status="succeeded",
            payment_method=pm_id,
            amount_received=intent["amount"],
            last_payment_error=None,
        )
        _save(state, intent)
        emit(state, "payment_intent.succeeded", intent, key)
        return
    pm = payment_method(state, pm_id, "payment_method")
    error = {
        "type": "card_error",
        "code": "card_declined",
        "decline_code": card.decline_code,
        "message": card.message,
        "charge": intent["latest_charge"],
        "doc_url": "https://stripe.com/docs/error-codes/card-declined",
        "payment_method": pm,
    }
    intent.update(status="requires_payment_method", payment_method=None, last_payment_error=error)
    _save(state, intent)
    emit(state, "payment_intent.payment_failed", intent, key)
    raise ApiError(
        402,
        card.message,
        code="card_declined",
        type="card_error",
        extra={
            "decline_code": card.decline_code,
            "charge": intent["latest_charge"],
            "doc_url": error["doc_url"],
            "payment_intent": intent,
            "payment_method": pm,
        },
        executed=True,
    )


async def create_payment_intent(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    known_params(params, _CREATE_PARAMS)
    currency = _currency(params)
    amount = _amount(params, currency)
    customer = params.get("customer")
    if customer is not None:
        customer = customer_of(state, customer, "customer")["id"]
    confirm = bool_param(params, "confirm")
    off_session = bool_param(params, "off_session")
    if off_session and not confirm:
        raise ApiError(400, "off_session may only be set when confirm=true.", param="off_session")
    pm_id = params.get("payment_method")
    if pm_id is not None:
        pm_id = _usable_method(state, pm_id, customer)
    for name in ("description", "receipt_email"):
        value = params.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 1000):
            raise ApiError(400, f"Invalid string: {name}", param=name)
    description = params.get("description")
    intent_id = new_id("pi")
    intent: dict[str, Any] = {
        "id": intent_id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_received": 0,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": "automatic_async",
        "client_secret": f"{intent_id}_secret_{secrets.token_hex(12)}",
        "confirmation_method": "automatic",
        "created": int(state.clock()),
        "currency": currency,
        "customer": customer,
        "description": description,
        "last_payment_error": None,
        "latest_charge": None,
        "livemode": False,
        "metadata": metadata_param(params),
        "next_action": None,
        "payment_method": pm_id,
        "payment_method_types": ["card"],
        "receipt_email": params.get("receipt_email"),
        "status": "requires_confirmation" if pm_id else "requires_payment_method",
    }
    if confirm and pm_id is None:
        raise _missing_method(intent)
    key = request.headers.get("Idempotency-Key")
    _save(state, intent)
    emit(state, "payment_intent.created", intent, key)
    if confirm:
        assert pm_id is not None
        _charge(state, intent, pm_id, key)
    return web.json_response(intent)


def _intent(state: EmulatorState, request: web.Request) -> dict[str, Any]:
    found = state.pay.payment_intents.get(request.match_info["id"])
    if found is None:
        raise no_such("payment_intent", request.match_info["id"], None, 404)
    return dict(found)


async def get_payment_intent(request: web.Request) -> web.Response:
    state, _ = await authorized(request)
    return web.json_response(_intent(state, request))


async def list_payment_intents(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    return newest_first(request, state.pay.payment_intents.values(), params, "customer")


async def confirm_payment_intent(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    known_params(params, ("expand", "off_session", "payment_method", "receipt_email"))
    intent = _intent(state, request)
    if intent["status"] not in ("requires_payment_method", "requires_confirmation"):
        raise _unexpected_state(intent, "confirm")
    bool_param(params, "off_session")
    pm_id = params.get("payment_method") or intent["payment_method"]
    if pm_id is None:
        raise _missing_method(intent)
    pm_id = _usable_method(state, pm_id, intent["customer"])
    _charge(state, intent, pm_id, request.headers.get("Idempotency-Key"))
    return web.json_response(intent)


async def cancel_payment_intent(request: web.Request) -> web.Response:
    state, params = await authorized(request)
    known_params(params, ("cancellation_reason", "expand"))
    intent = _intent(state, request)
    if intent["status"] in _FINAL:
        raise _unexpected_state(intent, "cancel")
    reason = params.get("cancellation_reason")
    if reason not in (None, "duplicate", "fraudulent", "requested_by_customer", "abandoned"):
        raise ApiError(400, f"Invalid cancellation_reason: {reason}", param="cancellation_reason")
    intent.update(status="canceled", canceled_at=int(state.clock()), cancellation_reason=reason)
    _save(state, intent)
    emit(state, "payment_intent.canceled", intent, request.headers.get("Idempotency-Key"))
    return web.json_response(intent)
