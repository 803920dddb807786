"""The emulator's products, prices and invoice preview (issue #24), through the real
``stripe`` SDK: Stripe's documented examples, computed by hand here."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from meterstream.errors import StripeError
from meterstream.sinks.stripe.client import MeterSpec, StripeMeterClient
from meterstream.sinks.stripe.emulator.server import BackgroundEmulator
from meterstream.sinks.stripe.payloads import build_meter_event

pytestmark = pytest.mark.integration

# Stripe's "Set up tiered pricing" page: fonts, 1-5 at 7 USD, 6-10 at 6.50 USD, 11+ at 6 USD.
FONT_TIERS = [
    {"up_to": 5, "unit_amount": 700},
    {"up_to": 10, "unit_amount": 650},
    {"up_to": "inf", "unit_amount": 600},
]


@pytest.fixture(scope="module")
def emulator() -> Iterator[BackgroundEmulator]:
    with BackgroundEmulator() as emu:
        yield emu


@pytest.fixture
def client(emulator: BackgroundEmulator) -> StripeMeterClient:
    emulator.reset()
    return StripeMeterClient(None, emulator.url, rate_limit_per_second=None, max_retries=0)


def _meter(client: StripeMeterClient, name: str, formula: Any = "sum") -> str:
    return str(client.create_meter(MeterSpec(name, name, formula))["id"])


def _send(client: StripeMeterClient, name: str, customer: str, *values: int) -> None:
    # One second apart, oldest first: for a `last` meter the latest timestamp wins (a
    # tie is undefined at Stripe, and the emulator flags it rather than pick one).
    now = int(time.time()) - len(values)
    for i, value in enumerate(values):
        client.send_meter_event(
            build_meter_event(name, f"{name}-{customer}-{i}", customer, value, now + i)
        )


def _price(client: StripeMeterClient, meter: str, key: str, **params: Any) -> str:
    if client.find_product("prod_fonts") is None:
        client.create_product({"id": "prod_fonts", "name": "Fonts"}, "prod-fonts")
    body = {
        "currency": "usd",
        "product": "prod_fonts",
        "lookup_key": key,
        "recurring": {"interval": "month", "usage_type": "metered", "meter": meter},
        **params,
    }
    return str(client.create_price(body, key)["id"])


def _invoice(client: StripeMeterClient, customer: str, *prices: str) -> dict[str, Any]:
    return client.invoice_preview(
        {"customer": customer, "subscription_details": {"items": [{"price": p} for p in prices]}}
    )


def test_tiers_and_packages_follow_stripes_examples(client: StripeMeterClient) -> None:
    meter = _meter(client, "fonts")
    graduated = _price(
        client, meter, "grad", billing_scheme="tiered", tiers_mode="graduated", tiers=FONT_TIERS
    )
    volume = _price(
        client, meter, "vol", billing_scheme="tiered", tiers_mode="volume", tiers=FONT_TIERS
    )
    # "per started 1,000": 0.05 USD (5 cents) per package, rounded up
    packages = _price(
        client,
        meter,
        "pkg",
        unit_amount_decimal="5",
        transform_quantity={"divide_by": 1000, "round": "up"},
    )
    decimal = _price(client, meter, "dec", unit_amount_decimal="0.05")  # 0.05 cents a unit
    _send(client, "fonts", "cus_a", 4, 2)  # 6 fonts
    invoice = _invoice(client, "cus_a", graduated, volume, packages, decimal)
    amounts = [line["amount"] for line in invoice["lines"]["data"]]
    # graduated: 5 x 7 + 1 x 6.50 = 41.50; volume: 6 x 6.50 = 39; 1 started package: 0.05;
    # 6 x 0.05 cents = 0.3 cents, rounded once to 0 cents
    assert amounts == [4150, 3900, 5, 0]
    assert invoice["total"] == invoice["subtotal"] == invoice["amount_due"] == 8055
    assert all(line["quantity"] == 6 for line in invoice["lines"]["data"])
    # Stripe's decimal example: 0.05 cents x 30 = 1.5 cents, rounded to 2
    _send(client, "fonts", "cus_b", 30)
    assert _invoice(client, "cus_b", decimal)["total"] == 2
    # a customer without events: graduated still charges the first tier's flat amount
    flat = _price(
        client,
        meter,
        "flat",
        billing_scheme="tiered",
        tiers_mode="graduated",
        tiers=[{"up_to": 100, "flat_amount": 9900}, {"up_to": "inf", "unit_amount": 99}],
    )
    assert _invoice(client, "cus_none", flat)["total"] == 9900
    _send(client, "fonts", "cus_c", 102)
    assert _invoice(client, "cus_c", flat)["total"] == 9900 + 2 * 99


def test_last_formula_and_licensed_prices(client: StripeMeterClient) -> None:
    meter = _meter(client, "servers", "last")
    per_server = _price(client, meter, "srv", unit_amount=200)
    client.create_product({"id": "prod_base", "name": "Base"}, "prod-base")
    base = client.create_price(
        {"currency": "usd", "product": "prod_base", "unit_amount": 2000,
         "recurring": {"interval": "month", "usage_type": "licensed"}},
        "base",
    )["id"]  # fmt: skip
    _send(client, "servers", "cus_a", 7, 3)  # the last value counts
    invoice = _invoice(client, "cus_a", per_server, base)
    assert [(line["quantity"], line["amount"]) for line in invoice["lines"]["data"]] == [
        (3, 600),
        (1, 2000),
    ]


def test_stripes_rules_are_enforced(client: StripeMeterClient) -> None:
    meter = _meter(client, "calls")
    _price(client, meter, "one", unit_amount=1)
    with pytest.raises(StripeError):  # lookup keys are unique
        _price(client, meter, "one", unit_amount=2)
    with pytest.raises(StripeError, match="tiered pricing"):
        _price(
            client, meter, "t", billing_scheme="tiered", tiers_mode="graduated", tiers=FONT_TIERS,
            transform_quantity={"divide_by": 10, "round": "up"},
        )  # fmt: skip
    with pytest.raises(StripeError, match="inf"):
        _price(
            client, meter, "bad", billing_scheme="tiered", tiers_mode="volume",
            tiers=[{"up_to": 5, "unit_amount": 1}],
        )  # fmt: skip
    with pytest.raises(StripeError):
        _price(client, "mtr_missing", "nometer", unit_amount=1)
    with pytest.raises(StripeError):
        client.create_product({"id": "prod_fonts", "name": "again"}, "again")
    assert client.find_price("nothing") is None
    assert client.find_price("one") is not None


def test_products_and_prices_survive_a_restart(tmp_path: Any) -> None:
    state = tmp_path / "stripe.jsonl"
    with BackgroundEmulator(state_file=state) as emu:
        client = StripeMeterClient(None, emu.url, rate_limit_per_second=None, max_retries=0)
        meter = _meter(client, "fonts")
        price = _price(
            client, meter, "grad", billing_scheme="tiered", tiers_mode="graduated", tiers=FONT_TIERS
        )
        _send(client, "fonts", "cus_a", 6)
    with BackgroundEmulator(state_file=state) as emu:
        client = StripeMeterClient(None, emu.url, rate_limit_per_second=None, max_retries=0)
        assert client.find_product("prod_fonts") is not None
        found = client.find_price("grad")
        assert found is not None and found["id"] == price
        assert _invoice(client, "cus_a", price)["total"] == 4150
