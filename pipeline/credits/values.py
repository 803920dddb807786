"""Validation shared by the credit values: identifiers, epoch-ms times, every problem at once.

Each value object checks itself in ``__post_init__`` and raises one
:class:`~meterstream.errors.CreditsError` naming every problem it found, so a hostile or
mistaken input is refused with a clear message before it can reach the ledger.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar, cast

from meterstream.credits.money import canon
from meterstream.errors import CreditsError

T = TypeVar("T")

MAX_ID_CHARS = 200
#: Latest accepted time: the year 9999 (ClickHouse ``DateTime64(3)`` ends there).
MAX_MS = 253_402_300_799_999


def id_problem(value: object, what: str, *, max_chars: int = MAX_ID_CHARS) -> str | None:
    """Why ``value`` is not an identifier (1..max_chars printable characters), or ``None``."""
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__}"
    if not 1 <= len(value) <= max_chars:
        return f"{what} must be 1-{max_chars} characters, got {len(value)}"
    if not value.isprintable():
        return f"{what} must not contain control characters: {value!r}"
    return None


def ms_problem(value: object, what: str) -> str | None:
    """Why ``value`` is not an epoch-millisecond time in 1970..9999 (UTC), or ``None``."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{what} must be an integer (epoch milliseconds, UTC), got {type(value).__name__}"
    if not 0 <= value <= MAX_MS:
        return f"{what} must be an epoch-millisecond time between 1970 and 9999, got {value}"
    return None


def int_problem(value: object, what: str, low: int, high: int) -> str | None:
    """Why ``value`` is not an integer in ``[low, high]``, or ``None``."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{what} must be an integer, got {type(value).__name__}"
    if not low <= value <= high:
        return f"{what} must be between {low} and {high}, got {value}"
    return None


def raise_problems(what: str, problems: Iterable[str | None]) -> None:
    """Raise one :class:`CreditsError` listing every non-``None`` problem, if any."""
    found = [p for p in problems if p is not None]
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise CreditsError(f"invalid {what} ({len(found)} problem(s)):\n{lines}")


def stable_id(prefix: str, *parts: str) -> str:
    """``prefix`` + the first 32 hex digits of SHA-256 over ``parts`` (unit-separated).

    The same parts give the same id in every process and after every restart, which is
    what lets a receiver or a ClickHouse table deduplicate a replayed entry or alert.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return f"{prefix}{digest[:32]}"


def json_value(value: Any) -> Any:
    """``value`` as JSON: amounts as canonical decimal strings (:func:`canon`), enums by
    value, sets sorted, sequences element by element, value objects by their ``to_json``."""
    if isinstance(value, Decimal):
        return canon(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(json_value(v) for v in value)
    if isinstance(value, tuple | list):
        return [json_value(v) for v in value]
    if hasattr(value, "to_json"):
        return value.to_json()
    return value


def from_row(cls: type[T], row: Mapping[str, Any], **given: Any) -> T:
    """The dataclass ``cls`` from a row whose columns are named as its fields (``given``:
    values to use in place of the row's, e.g. converted ones)."""
    names = [f.name for f in dataclasses.fields(cast(Any, cls))]
    return cls(**{name: given[name] if name in given else row[name] for name in names})


class JsonFields:
    """A dataclass value object as JSON: every field in declaration order, by
    :func:`json_value` (what the API answers and ClickHouse keeps)."""

    def to_json(self) -> dict[str, Any]:
        assert dataclasses.is_dataclass(self)
        return {f.name: json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}
