"""What meterstream sends to Stripe, built as pure functions (no I/O).

Three concerns live here:

* **Identifiers.** Every Stripe meter event carries a deterministic
  ``identifier`` built from (meter, customer, period, sequence), so a resend
  after a crash or a timeout is a no-op at Stripe (Stripe keeps identifiers
  unique for at least 24 hours).
* **Whole numbers.** Stripe meter values are whole numbers; meterstream's
  totals are exact :class:`~decimal.Decimal`. :func:`next_delta` and
  :func:`period_value` turn exact totals into whole numbers without losing the
  fraction (see :class:`Rounding`).
* **Formulas and params.** Our six aggregations map onto Stripe's ``sum`` and
  ``last`` formulas; :func:`build_meter_event` builds the exact v1 params.
"""

from __future__ import annotations

import hashlib
import json
import re
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Any, Literal

MAX_IDENTIFIER_LENGTH = 100
"""Stripe's limit on ``identifier`` (v1 and v2)."""

IDENTIFIER_PREFIX = "ms"
_DIGEST_HEX_CHARS = 32  # 128 bits of sha256: collisions are not a practical concern
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._:-]+")

StripeFormula = Literal["sum", "last"]

_FORMULAS: dict[str, StripeFormula] = {
    "sum": "sum",
    "count": "sum",
    "max": "last",
    "min": "last",
    "unique_count": "last",
    "latest": "last",
}


def meter_event_identifier(meter: str, customer_id: str, period: str, sequence: int) -> str:
    """The deterministic Stripe ``identifier`` of one forward of one meter for one customer.

    Shape: ``ms_{meter}_{period}_{sequence}_{digest}``, at most 100 characters.
    ``digest`` is the first 32 hex characters (128 bits) of the sha256 of the
    canonical JSON of all four inputs, so identifiers differ whenever any input
    differs, including ``customer_id`` (which is kept out of the readable part:
    it may be long or personal). Characters outside ``[A-Za-z0-9._:-]`` in the
    readable part become ``-`` and the readable part is truncated to fit the
    100-character limit; neither affects uniqueness, which rests on the digest
    of the raw inputs.
    """
    if isinstance(sequence, bool) or not isinstance(sequence, int):
        raise TypeError(f"sequence must be an int, not {type(sequence).__name__}")
    canonical = json.dumps([meter, customer_id, period, sequence], ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:_DIGEST_HEX_CHARS]
    readable = _UNSAFE_CHARS.sub("-", f"{IDENTIFIER_PREFIX}_{meter}_{period}_{sequence}")
    room = MAX_IDENTIFIER_LENGTH - len(digest) - 1
    return f"{readable[:room]}_{digest}"


class Rounding(StrEnum):
    """How an exact Decimal total becomes the whole numbers Stripe accepts.

    Every mode applies to the *running total*, never to one forward in
    isolation, so a fraction is never dropped: it stays in the exact total and
    is sent as soon as it adds up to a unit (the design's "the fraction is
    carried, not lost"). Let ``sent`` be the sum of whole numbers sent so far
    and ``exact`` the exact total. After each forward:

    * ``CARRY`` (default): ``sent == round_half_up(exact)``. Commercial
      rounding of the running total: the drift ``sent - exact`` is within
      [-0.5, +0.5], so Stripe's total is the nearest whole number to the truth
      (halves away from zero), neither side systematically favoured.
    * ``UP``: ``sent == ceil(exact)``. Never under-bills; drift in [0, 1).
    * ``DOWN``: ``sent == floor(exact)``. Never over-bills; drift in (-1, 0].
    """

    CARRY = "carry"
    UP = "up"
    DOWN = "down"


_DECIMAL_ROUNDING = {
    Rounding.CARRY: ROUND_HALF_UP,
    Rounding.UP: ROUND_CEILING,
    Rounding.DOWN: ROUND_FLOOR,
}


def _to_whole(value: Decimal, rounding: Rounding) -> int:
    if not isinstance(value, Decimal):
        raise TypeError(f"exact values must be Decimal, not {type(value).__name__}")
    if not value.is_finite():
        raise ValueError(f"cannot send a non-finite value to Stripe: {value}")
    return int(value.to_integral_value(rounding=_DECIMAL_ROUNDING[Rounding(rounding)]))


def next_delta(exact_total: Decimal, sent_whole: int, rounding: Rounding = Rounding.CARRY) -> int:
    """What to send now to a Stripe ``sum`` meter (our sum and count meters).

    ``exact_total`` is the exact running total of the period so far and
    ``sent_whole`` the sum of the whole numbers already sent for it. The answer
    brings the sum of everything sent to ``rounded(exact_total)`` under
    ``rounding`` (see :class:`Rounding`); it may be 0 (nothing to send) or
    negative (a total that went down; Stripe accepts negative values).
    """
    return _to_whole(exact_total, rounding) - sent_whole


def period_value(exact: Decimal, rounding: Rounding = Rounding.CARRY) -> int:
    """The whole number to send to a Stripe ``last`` meter (max, min, unique_count, latest).

    These meters send the period-to-date value, which replaces the previous
    one, so there is nothing to carry: the value is rounded once under
    ``rounding`` (``CARRY`` rounds half up, ``UP`` is ceil, ``DOWN`` is floor).
    """
    return _to_whole(exact, rounding)


def formula_for(aggregation: str) -> StripeFormula:
    """The Stripe meter formula that carries one of our aggregations.

    sum and count forward deltas (formula ``sum``); max, min, unique_count and
    latest forward the period-to-date value (formula ``last``).
    """
    try:
        return _FORMULAS[aggregation]
    except KeyError:
        raise ValueError(
            f"unknown aggregation {aggregation!r}; expected one of {sorted(_FORMULAS)}"
        ) from None


def build_meter_event(
    event_name: str,
    identifier: str,
    stripe_customer_id: str,
    value: int,
    timestamp_s: int,
    customer_key: str = "stripe_customer_id",
    value_key: str = "value",
) -> dict[str, Any]:
    """The exact params of ``POST /v1/billing/meter_events`` (payload values are strings)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Stripe meter values are whole numbers, not {type(value).__name__}")
    if isinstance(timestamp_s, bool) or not isinstance(timestamp_s, int):
        raise TypeError(f"timestamp_s must be int epoch seconds, not {type(timestamp_s).__name__}")
    if not identifier or len(identifier) > MAX_IDENTIFIER_LENGTH:
        raise ValueError(f"identifier must be 1-{MAX_IDENTIFIER_LENGTH} characters")
    if customer_key == value_key:
        raise ValueError("customer_key and value_key must differ")
    return {
        "event_name": event_name,
        "identifier": identifier,
        "timestamp": timestamp_s,
        "payload": {customer_key: stripe_customer_id, value_key: str(value)},
    }
