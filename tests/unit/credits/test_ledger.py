from decimal import Decimal

import pytest

from meterstream.credits.grants import Grant, Void
from meterstream.credits.ledger import (
    EntryKind,
    LedgerEntry,
    LedgerKey,
    balance,
    make_entry,
    remaining_by_grant,
    totals,
)
from meterstream.errors import CreditsError

D = Decimal


def entry(kind: EntryKind, amount: str, grant: str = "", source: str = "", at: int = 0):
    key = LedgerKey.of(at, kind, grant, source)
    return make_entry("acme", "usd", key, 0, D(amount), D(amount), "test")


def test_the_id_depends_on_the_content_not_on_the_scale_of_amounts() -> None:
    key = LedgerKey.of(5, EntryKind.BURN, "g", "w")
    a = make_entry("acme", "usd", key, 0, D("-1.50"), D("-1.50"), "x")
    b = make_entry("acme", "usd", key, 0, D("-1.5000"), D("-1.5"), "y")
    assert a.entry_id == b.entry_id and a == b  # the cause is informational
    assert a.entry_id.startswith("le_") and len(a.entry_id) == 35
    others = [
        make_entry("acme", "usd", key, 1, D("-1.5"), D("-1.5"), "x"),
        make_entry("acme", "usd", key, 0, D("-1.5"), D("-2"), "x"),
        make_entry("acme", "usd", LedgerKey.of(6, EntryKind.BURN, "g", "w"), 0, D(-1), D(-1), ""),
        make_entry("other", "usd", key, 0, D("-1.5"), D("-1.5"), "x"),
    ]
    assert len({a.entry_id, *(o.entry_id for o in others)}) == 5


def test_json_round_trip_and_a_tampered_row_is_refused() -> None:
    e = entry(EntryKind.SETTLE, "-2.25", "g1", "w|1|", 10)
    doc = e.to_json()
    assert doc == {
        "entry_id": e.entry_id,
        "customer_id": "acme",
        "kind": "settle",
        "amount": "-2.25",
        "currency": "usd",
        "at_ms": 10,
        "grant_id": "g1",
        "source": "w|1|",
        "seq": 0,
        "key_total": "-2.25",
        "cause": "test",
    }
    assert LedgerEntry.from_json(doc) == e
    with pytest.raises(CreditsError, match="does not match"):
        LedgerEntry.from_json({**doc, "amount": "-2.26"})
    with pytest.raises(CreditsError):
        LedgerEntry.from_json({**doc, "kind": "gift"})


def test_sums_by_kind_and_by_grant_count_each_id_once() -> None:
    rows = [
        entry(EntryKind.GRANT, "20", "g1"),
        entry(EntryKind.RECHARGE, "5", "g2"),
        entry(EntryKind.BURN, "-3", "g1", "w1", 1),
        entry(EntryKind.UNCOVERED, "-4", "", "w2", 2),
        entry(EntryKind.SETTLE, "-4", "g2", "w2", 3),
        entry(EntryKind.UNCOVERED, "4", "", "w2", 3),
        entry(EntryKind.EXPIRY, "-1", "g2", "", 4),
        entry(EntryKind.VOID, "-2", "g1", "", 5),
    ]
    doubled = rows + rows[:3]
    assert balance(doubled) == D(15)
    t = totals(doubled)
    assert (t.granted, t.burned, t.settled, t.uncovered, t.expired, t.voided, t.balance) == (
        D(25),
        D(3),
        D(4),
        D(0),
        D(1),
        D(2),
        D(15),
    )
    assert t.to_json()["balance"] == "15"
    assert remaining_by_grant(doubled) == {"g1": D(15), "g2": D(0)}


def test_grants_and_voids_round_trip_through_json() -> None:
    g = Grant("g", "acme", D("12.30"), "usd", 5, expires_ms=10, priority=3, origin="promotion")
    assert Grant.from_json(g.to_json()) == g
    assert g.to_json()["amount"] == "12.3"
    v = Void("g", "acme", 7, "refund")
    assert Void.from_json(v.to_json()) == v
    with pytest.raises(CreditsError, match="float"):
        Grant.from_json({**g.to_json(), "amount": 12.3})
    with pytest.raises(CreditsError, match="missing"):
        Grant.from_json({"grant_id": "g"})
    with pytest.raises(CreditsError):
        Grant.from_json({**g.to_json(), "origin": "gift"})
