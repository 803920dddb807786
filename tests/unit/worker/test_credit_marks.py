"""Which customers a batch marks for the next burn (CreditService.record_changed)."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from types import SimpleNamespace

import orjson

from meterstream.credits.burn import CreditBook
from meterstream.credits.grants import Grant
from meterstream.meters.fold import WindowKey
from meterstream.meters.windows import period_label
from meterstream.pricing.plans import free_plans
from meterstream.settings import Settings
from meterstream.worker.credits import CreditService

NOV = 1_793_491_200_000  # 2026-11-01T00:00:00Z


def _service() -> CreditService:
    calls = SimpleNamespace(call=None, metrics=None)  # no ClickHouse call is made here
    return CreditService(None, Settings(), calls, free_plans())  # type: ignore[arg-type]


def _key(customer: str) -> WindowKey:
    return WindowKey("tokens", customer, "", NOV)


def test_a_batch_while_the_books_resume_marks_every_customer_it_touched() -> None:
    """A batch that lands while ``start`` reads the record may land after that read:
    its customers are burned once the books are there, not at their next event."""
    credits = _service()
    credits.record_changed([], {_key("acme"): None, _key("bob"): None}, set())
    assert dict(credits.dirty) == {"acme": {"2026-11"}, "bob": {"2026-11"}}


def test_once_resumed_only_customers_with_credits_are_marked() -> None:
    credits = _service()
    credits.ready.set()
    credits.books["acme"] = object()  # type: ignore[assignment]
    credits.record_changed([], {_key("acme"): None}, {_key("bob")})
    assert dict(credits.dirty) == {"acme": {"2026-11"}}


def test_a_mark_wakes_the_burn_and_nothing_else_does() -> None:
    """The burn loop waits for a marked customer (then the gap), else the full interval."""

    async def scenario() -> tuple[float, float, bool]:
        credits = _service()
        credits.ready.set()
        loop = asyncio.get_running_loop()
        started = loop.time()
        credits.record_changed([], {_key("nobody"): None}, set())  # no book: no mark
        assert not credits.marked.is_set()
        await credits.burn_soon(every=0.3, gap=0.0)  # nothing marked: the whole interval
        idle = loop.time() - started
        credits.books["acme"] = object()  # type: ignore[assignment]
        loop.call_later(0.05, credits.record_changed, [], {_key("acme"): None}, set())
        started = loop.time()
        await credits.burn_soon(every=30.0, gap=0.0)  # woken by the batch, not the timer
        return idle, loop.time() - started, credits.marked.is_set()

    idle, woken, marked = asyncio.run(scenario())
    assert idle >= 0.29
    assert woken < 10.0
    assert marked


def test_a_new_month_decides_every_customer_with_credits_again() -> None:
    """The first tick of a month decides (and would publish) each book's entitlement with
    no usage: the month's usage starts again (on the old code: only at the next usage)."""
    credits = _service()
    credits.ready.set()
    now = time.time_ns() // 1_000_000
    grant = Grant("g-1", "acme", Decimal(10), "usd", NOV, None, 0, "manual")
    book, _ = CreditBook.resume("acme", "usd", grants=[grant], now_ms=now)
    credits.books["acme"] = book
    credits.usage["acme"] = (period_label(now), {"tokens": Decimal(5)})

    asyncio.run(credits._burn({}))  # the same month: nothing to decide
    assert "acme" not in credits.entitlements

    credits._period = "2000-01"  # the last tick was in another month
    asyncio.run(credits._burn({}))
    decided = credits.entitlements["acme"]
    assert decided.cause.startswith("period:")
    assert decided.period == period_label(now) and decided.balance == Decimal(10)


def test_the_entitlements_on_the_topic_at_start_are_decided_again() -> None:
    """adopt_published: each customer's last entitlement on the topic is taken as published
    (an unchanged decision is not sent again) and the customer marked for the first tick;
    records that are not our entitlements (anyone with the broker can write) are skipped."""
    credits = _service()
    doc = {"customer_id": "acme", "has_access": False, "at_ms": 1, "cause": "usage:1"}
    records = {
        b"acme": orjson.dumps(doc),
        b"bob": orjson.dumps({**doc, "customer_id": "mallory"}),  # not its own key
        b"carol": b"not json",
        b"\xff": orjson.dumps(doc),  # not UTF-8
        b"dave": None,  # a tombstone
        None: orjson.dumps(doc),
        b"erin": b"[1, 2]",
    }
    assert credits.adopt_published(records) == 1
    assert dict(credits.dirty) == {"acme": {period_label(time.time_ns() // 1_000_000)}}
    assert credits._published == {"acme": {"customer_id": "acme", "has_access": False}}
    assert credits.marked.is_set()
