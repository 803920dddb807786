"""Prices and the upcoming invoice (issue #24): pure, no Faust, Kafka, ClickHouse or Stripe SDK.

- :mod:`~meterstream.pricing.money`: currencies, minor units, the one rounding rule.
- :mod:`~meterstream.pricing.prices`: price models (per unit / package, graduated, volume),
  a quantity in, the exact charge with every tier out; daily attribution.
- :mod:`~meterstream.pricing.plans`: the plans YAML file, its validation, the default plan.
- :mod:`~meterstream.pricing.invoice`: which plan prices which usage in a period, and the
  invoice lines, subtotal and total, serialisable to JSON.
- :mod:`~meterstream.pricing.stripe_prices`: Stripe Product/Price create parameters.

Import from the module that defines a name (``meterstream.pricing.invoice``, ...).
"""
