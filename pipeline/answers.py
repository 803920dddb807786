"""JSON answers: what the web API and the CLI print, written one way.

orjson (fast, bytes) with the types an answer or an analyst's query may hold:
Decimal as its exact text, bytes as UTF-8 text, anything else orjson does not
write itself (IP addresses, ...) as ``str``. Datetimes, dates and UUIDs are
orjson's own: RFC 3339 (a naive datetime without an offset), ISO, canonical.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import orjson


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    if isinstance(obj, dt.datetime):
        if obj.tzinfo is None:
            obj = obj.replace(tzinfo=dt.UTC)
        return obj.isoformat()
    if isinstance(obj, dt.date):
        return obj.isoformat()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    return str(obj)  # UUID, IP addresses, ...: what an analyst query may select


def dumps(obj: Any) -> bytes:
    """``obj`` as JSON bytes (Decimal exact, as a string)."""
    return orjson.dumps(obj, default=_default)
