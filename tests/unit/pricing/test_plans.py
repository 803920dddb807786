"""The plans file: loading, every problem at once with its path, the default plan."""

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterstream.errors import ConfigError
from meterstream.meters.config import load_meters
from meterstream.pricing.plans import Plan, PlansConfig, load_plans, parse_plans
from meterstream.pricing.prices import Graduated, PerUnit, Tier, TransformQuantity, Volume
from tests.support import REPO

D = Decimal


def problems(doc: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_plans(doc, **kwargs)
    return caught.value.problems


def plan(**fields: Any) -> dict[str, Any]:
    return {"name": "p", "currency": "usd", **fields}


def per_unit(**fields: Any) -> dict[str, Any]:
    return {"meter": "m", "unit_price": "0.02", **fields}


def tiered(tiers: list[dict[str, Any]], mode: str, **fields: Any) -> dict[str, Any]:
    return {"meter": "m", "billing_scheme": "tiered", "tiers_mode": mode, "tiers": tiers, **fields}


def one_price(price: dict[str, Any]) -> dict[str, Any]:
    """A plans document of one plan with one price."""
    return {"plans": [plan(prices=[price])]}


def test_example_file_loads_against_the_example_meters() -> None:
    config = load_plans(REPO / "plans.example.yaml", load_meters(REPO / "meters.example.yaml"))
    assert [p.name for p in config.plans] == [
        "essential",
        "business",
        "enterprise",
        "servers_basic",
        "servers_pro",
        "compute",
        "compute_with_base",
        "free_tier",
    ]
    free_tier = config.by_name("free_tier")
    assert free_tier.limits == {"ai_tokens": D(10000)} and free_tier.prices == ()
    assert config.has_limits
    essential = config.by_name("essential").price_for("ai_tokens")
    assert essential is not None
    assert essential.model == PerUnit(D("0.05"), TransformQuantity(1000, "up"))
    servers = config.by_name("servers_pro").price_for("active_servers")
    assert servers is not None
    assert servers.model == Graduated((Tier(100, D(0), D(99)), Tier(None, D("0.99"), D(0))))
    requests = config.by_name("servers_basic").price_for("api_requests")
    assert requests is not None and isinstance(requests.model, Volume)
    assert config.by_name("compute_with_base").base_fee == D(20)
    # no default_plan and no plan named "default": the built-in free plan
    assert config.default.name == "default" and config.default.charges_nothing


def test_yaml_numbers_are_exact(tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(
        "plans:\n  - name: p\n    currency: USD\n    prices:\n"
        "      - {meter: m, unit_price: 0.1}\n"
        "      - {meter: n, billing_scheme: tiered, tiers_mode: volume,\n"
        "         tiers: [{up_to: 1e3, unit_price: 0.3}, {up_to: inf, unit_price: '0.000004'}]}\n"
    )
    config = load_plans(path)
    p = config.by_name("p")
    assert p.currency == "usd"  # Stripe's spelling
    assert p.prices[0].unit_price == D("0.1")
    assert p.prices[1].model == Volume((Tier(1000, D("0.3")), Tier(None, D("0.000004"))))


def test_every_problem_at_once_with_its_path() -> None:
    doc = {
        "plans": [
            plan(
                name="Bad Name",
                currency="xyz",
                base_fee="-1",
                prices=[
                    per_unit(unit_price=None),
                    {
                        "meter": "m2",
                        "billing_scheme": "tiered",
                        "tiers_mode": "graduated",
                        "tiers": [{"up_to": 10}, {"up_to": 5}, {"up_to": 20, "flat_price": "x"}],
                    },
                ],
            ),
            plan(prices=[{"meter": "m", "billing_scheme": "tiered"}], extra=1),
            "not a plan",
        ],
        "default_plan": "nope",
        "other": 1,
    }
    assert problems(doc) == [
        "other: unknown field",
        "plans[0].name: 'Bad Name' is not a valid name: lowercase letters, digits and "
        "underscores, starting with a letter, at most 63 characters",
        "plans[0].currency: 'xyz' is not a currency Stripe charges in (ISO 4217 code)",
        "plans[0].base_fee: must not be negative, not -1",
        "plans[0].prices[0].unit_price: required for billing_scheme 'per_unit'",
        "plans[0].prices[1].tiers[2].flat_price: must be an amount (a number), not 'x'",
        "plans[1].prices[0].tiers_mode: required for billing_scheme 'tiered'",
        "plans[1].prices[0].tiers: required for billing_scheme 'tiered'",
        "plans[1].extra: unknown field",
        "plans[2]: must be a mapping",
        "default_plan: no plan named 'nope'",
    ]


def test_tier_rules_with_paths() -> None:
    tiers = [{"up_to": 10}, {"up_to": 10}, {"up_to": "inf"}, {"up_to": 30}]
    doc = one_price(tiered(tiers, "volume"))
    assert problems(doc) == [
        "plans[0].prices[0].tiers[1].up_to: must be greater than tiers[0].up_to (10), not 10",
        "plans[0].prices[0].tiers[2].up_to: only the last tier may be unbounded ('inf')",
        "plans[0].prices[0].tiers[3].up_to: the last tier must be unbounded: use 'inf', not 30",
    ]
    for bad in (0, -3, 1.5, True, "ten", None):
        doc = one_price(tiered([{"up_to": bad}, {"up_to": "inf"}], "volume"))
        assert problems(doc)[0].startswith(
            "plans[0].prices[0].tiers[0].up_to: must be a positive integer or 'inf'"
        )
    too_many = [{"up_to": i + 1} for i in range(250)] + [{"up_to": "inf"}]
    doc = one_price(tiered(too_many, "graduated"))
    assert problems(doc) == ["plans[0].prices[0].tiers: at most 250 tiers are allowed, not 251"]


def test_billing_scheme_rules() -> None:
    doc = {
        "plans": [
            plan(
                prices=[
                    per_unit(tiers=[{"up_to": "inf"}], tiers_mode="volume"),
                    {
                        "meter": "n",
                        "billing_scheme": "tiered",
                        "tiers_mode": "graduated",
                        "unit_price": 1,
                        "transform_quantity": {"divide_by": 10, "round": "up"},
                        "tiers": [{"up_to": "inf", "unit_price": 1}],
                    },
                    per_unit(meter="o", billing_scheme="flat"),
                    per_unit(meter="q", transform_quantity={"divide_by": 0, "round": "sideways"}),
                ]
            )
        ]
    }
    assert problems(doc) == [
        "plans[0].prices[0].tiers_mode: only for billing_scheme 'tiered' "
        "(set billing_scheme: tiered)",
        "plans[0].prices[0].tiers: only for billing_scheme 'tiered' (set billing_scheme: tiered)",
        "plans[0].prices[1].unit_price: not for tiered prices: put it in the tiers",
        "plans[0].prices[1].transform_quantity: cannot be combined with tiers "
        "(Stripe does not allow it)",
        "plans[0].prices[2].billing_scheme: 'flat' is not one of per_unit, tiered",
        "plans[0].prices[3].transform_quantity.divide_by: must be a positive integer, not 0",
        "plans[0].prices[3].transform_quantity.round: 'sideways' is not one of up, down",
    ]


def test_amounts_fit_stripe_in_the_plans_currency() -> None:
    doc = {
        "plans": [
            plan(
                base_fee="20.001",  # not whole cents
                minimum="0.5",
                prices=[
                    per_unit(unit_price="0.00000000000001"),  # 12 places in cents: the finest
                    per_unit(meter="n", unit_price="0.000000000000001"),  # 13 places in cents
                    per_unit(meter="o", unit_price=Decimal("1E+13")),  # too large
                ],
            ),
            plan(
                name="yen",
                currency="jpy",
                prices=[
                    {
                        "meter": "m",
                        "billing_scheme": "tiered",
                        "tiers_mode": "graduated",
                        "tiers": [
                            {"up_to": 5, "flat_price": "99.5"},
                            {"up_to": "inf", "unit_price": "0.5"},
                        ],
                        "minimum": "100",
                    }
                ],
            ),
            plan(name="dinar", currency="BHD", base_fee="1.235", prices=[per_unit(unit_price=1.5)]),
        ]
    }
    assert problems(doc) == [
        "plans[0].base_fee: 20.001 is not a whole number of USD minor units (0.01)",
        "plans[0].prices[1].unit_price: 0.000000000000001 has 13 decimal places in USD minor "
        "units; Stripe allows at most 12",
        "plans[0].prices[2].unit_price: 10000000000000 is too large (at most 999999999999 USD "
        "minor units)",
        "plans[1].prices[0].tiers[0].flat_price: 99.5 is not a whole number of JPY minor units (1)",
        "plans[2].prices[0].unit_price: 1.5 is a float; use a Decimal or a string for an exact "
        "amount",
    ]


def test_one_currency_per_plan_and_one_price_per_meter() -> None:
    doc = {"plans": [plan(prices=[per_unit(currency="eur"), per_unit(), per_unit(currency="USD")])]}
    assert problems(doc) == [
        "plans[0].prices[0].currency: 'eur' differs from the plan's 'usd': a plan's prices are in "
        "one currency",
        "plans[0].prices[1].meter: 'm' is priced twice (also prices[0])",
        "plans[0].prices[2].meter: 'm' is priced twice (also prices[0])",
    ]


def test_meters_are_cross_checked() -> None:
    meters = load_meters(REPO / "meters.example.yaml")
    doc = {"plans": [plan(prices=[per_unit(meter="ai_tokens"), per_unit(meter="tokens")])]}
    found = problems(doc, meters=meters)
    assert len(found) == 1
    assert found[0].startswith(
        "plans[0].prices[1].meter: no meter named 'tokens' in the meters file"
    )
    assert parse_plans(doc).by_name("p").price_for("tokens") is not None  # without meters: fine


def test_usage_limits_per_meter_on_a_plan() -> None:
    doc = {
        "plans": [
            plan(name="free", limits={"ai_tokens": 10000, "compute_units": "2.5"}),
            plan(name="pro", prices=[per_unit(meter="ai_tokens")]),
        ]
    }
    config = parse_plans(doc, meters=load_meters(REPO / "meters.example.yaml"))
    free = config.by_name("free")
    assert free.limits == {"ai_tokens": D(10000), "compute_units": D("2.5")}
    assert free.prices == ()  # a limit needs no price
    assert config.by_name("pro").limits == {}
    assert config.has_limits
    assert not parse_plans({"plans": [plan()]}).has_limits


def test_usage_limit_problems_have_their_paths() -> None:
    doc = {
        "plans": [
            plan(
                limits={
                    "zero": 0,
                    "negative": "-1",
                    "float": 1.5,
                    "text": "lots",
                    "Bad Name": 5,
                    "ok": "10000.5",
                }
            ),
            plan(name="q", limits=[10000]),
        ]
    }
    found = problems(doc)
    assert "plans[0].limits.zero: must be positive, not 0" in found
    assert "plans[0].limits.negative: must not be negative, not -1" in found
    assert any(p.startswith("plans[0].limits.float: 1.5 is a float") for p in found)
    assert any(p.startswith("plans[0].limits.text: must be an amount") for p in found)
    assert any(p.startswith("plans[0].limits.Bad Name") for p in found)
    assert any(p.startswith("plans[1].limits:") for p in found)
    assert not any(".ok" in p for p in found)
    assert len(found) == 6, found


def test_limited_meters_are_cross_checked() -> None:
    meters = load_meters(REPO / "meters.example.yaml")
    doc = {"plans": [plan(limits={"ai_tokens": 10, "tokens": 10000})]}
    found = problems(doc, meters=meters)
    assert len(found) == 1
    assert found[0].startswith("plans[0].limits.tokens: no meter named 'tokens' in the meters file")
    assert parse_plans(doc).by_name("p").limits["tokens"] == D(10000)  # without meters: fine


def test_duplicate_names_and_documents() -> None:
    assert problems({"plans": [plan(), plan()]}) == [
        "plans[1].name: duplicate plan name 'p' (also plans[0])"
    ]
    assert problems(None) == [
        "plans: required (the document must be a mapping with a 'plans' list)"
    ]
    assert problems({}) == ["plans: required"]
    assert problems({"plans": []}) == ["plans: at least one plan is required"]
    assert problems({"plans": {"p": {}}}) == ["plans: must be a list of plans"]


def test_default_plan() -> None:
    free = {"name": "free", "currency": "usd"}
    configured = parse_plans({"plans": [plan(), free], "default_plan": "free"})
    assert configured.default.name == "free" and configured.by_name("free") is configured.default
    named = parse_plans({"plans": [plan(), plan(name="default", base_fee=5)]})
    assert named.default.base_fee == 5
    built_in = parse_plans({"plans": [plan(currency="eur")]})
    assert built_in.default.name == "default"
    assert built_in.default.currency == "eur" and built_in.default.charges_nothing
    assert built_in.by_name("default") is built_in.default
    with pytest.raises(KeyError):
        built_in.by_name("nope")
    with pytest.raises(ValueError):
        PlansConfig(plans=(Plan(name="a", currency="usd"),), default_plan="b")


def test_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_plans(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("plans: [\n")
    with pytest.raises(ConfigError, match="YAML syntax error at line"):
        load_plans(bad)


def test_readme_example_is_valid(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Prices\n", 1)[1]
    path = tmp_path / "plans.yaml"
    path.write_text(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    config = load_plans(path, meters=load_meters(REPO / "meters.example.yaml"))
    pro = config.by_name("pro")
    assert (pro.base_fee, pro.minimum, config.default.name) == (20, 50, "free")
    assert [p.meter for p in pro.prices] == ["compute_units", "ai_tokens", "active_servers"]
    assert pro.prices[0].unit_price == Decimal("0.02")
