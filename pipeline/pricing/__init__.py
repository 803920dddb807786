"""Prices and the upcoming invoice (issue #24): pure, no Faust, Kafka, ClickHouse or Stripe SDK.

- :mod:`~meterstream.pricing.money`: currencies, minor units, the one rounding rule.
- :mod:`~meterstream.pricing.prices`: price models (per unit / package, graduated, volume),
  a quantity in, the exact charge with every tier out; daily attribution.
- :mod:`~meterstream.pricing.plans`: the plans YAML file, its validation, the default plan.
- :mod:`~meterstream.pricing.invoice`: which plan prices which usage in a period, and the
  invoice lines, subtotal and total, serialisable to JSON.
- :mod:`~meterstream.pricing.stripe_prices`: Stripe Product/Price create parameters.
"""

from meterstream.pricing.invoice import (
    Invoice,
    InvoiceLine,
    Period,
    PlanAssignment,
    Segment,
    SegmentUsage,
    compute_invoice,
    plan_segments,
    preview_invoice,
)
from meterstream.pricing.money import CURRENCIES, Currency, currency
from meterstream.pricing.plans import Plan, PlanPrice, PlansConfig, load_plans, parse_plans
from meterstream.pricing.prices import (
    Charge,
    Graduated,
    PerUnit,
    PriceModel,
    Tier,
    TierCharge,
    TransformQuantity,
    Volume,
    daily_amounts,
)

__all__ = [
    "CURRENCIES",
    "Charge",
    "Currency",
    "Graduated",
    "Invoice",
    "InvoiceLine",
    "PerUnit",
    "Period",
    "Plan",
    "PlanAssignment",
    "PlanPrice",
    "PlansConfig",
    "PriceModel",
    "Segment",
    "SegmentUsage",
    "Tier",
    "TierCharge",
    "TransformQuantity",
    "Volume",
    "compute_invoice",
    "currency",
    "daily_amounts",
    "load_plans",
    "parse_plans",
    "plan_segments",
    "preview_invoice",
]
