"""The burn engine: worked examples by hand, then properties against an independent oracle."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterstream.credits import ledger
from meterstream.credits.burn import CreditBook, Step, compute_ledger
from meterstream.credits.grants import Grant, Void
from meterstream.credits.ledger import EntryKind, LedgerEntry
from meterstream.credits.spend import SpendChange, window_source
from meterstream.errors import CreditsError
from tests.unit.credits.oracle import reference_ledger

D = Decimal
C = "acme"


def grant(gid: str, amount: str, eff: int, exp: int | None = None, prio: int = 50, **kw) -> Grant:
    return Grant(gid, C, D(amount), "usd", eff, expires_ms=exp, priority=prio, **kw)


def spend(
    source: str, at: int, amount: str, rev: int = 1, previous: str | None = None
) -> SpendChange:
    return SpendChange(
        C, source, at, D(amount), "usd", rev, None if previous is None else D(previous)
    )


def lines(step: Step) -> list[tuple[str, str, str | None, str | None, int]]:
    """(kind, amount, grant, source, at) of each entry, for comparison with a hand ledger."""
    return [(e.kind.value, str(e.amount), e.grant_id, e.source, e.at_ms) for e in step.entries]


def as_oracle(book: CreditBook) -> dict:
    return {
        (k.kind.value, k.grant_id, k.source, k.at_ms): total
        for k, (total, _) in book.written().items()
        if total != 0
    }


# -- worked examples (every number computed by hand)


def test_two_grants_of_different_priority_one_expiring_mid_stream() -> None:
    book = CreditBook(C, "usd")
    # promo: priority 10, $10, expires at t=1000; paid: priority 50, $20, never expires
    assert lines(book.add_grant(grant("promo", "10", 0, exp=1000, prio=10), 0)) == [
        ("grant", "10", "promo", None, 0)
    ]
    book.add_grant(grant("paid", "20", 0, prio=50), 0)
    assert book.balance == D(30)

    # $4 at t=100 and $3.50 at t=500 burn the promo first (lower priority number)
    assert lines(book.apply(spend("w100", 100, "4"), 100)) == [("burn", "-4", "promo", "w100", 100)]
    step = book.apply(spend("w500", 500, "3.50", 2), 500)
    assert lines(step) == [("burn", "-3.50", "promo", "w500", 500)]
    assert step.balance == D("22.50")

    # the clock passes t=1000: the promo's $2.50 expires
    step = book.advance(1000)
    assert lines(step) == [("expiry", "-2.50", "promo", None, 1000)]
    assert step.balance == D(20)

    # a spend at exactly t=1000 no longer sees the promo: the paid grant pays it all
    assert lines(book.apply(spend("w1000", 1000, "5", 3), 1000)) == [
        ("burn", "-5", "paid", "w1000", 1000)
    ]
    # $16 at t=1500: the paid grant has $15; $1 is uncovered (a negative balance)
    step = book.apply(spend("w1500", 1500, "16", 4), 1500)
    assert lines(step) == [
        ("burn", "-15", "paid", "w1500", 1500),
        ("uncovered", "-1", None, "w1500", 1500),
    ]
    assert step.balance == D(-1) and book.uncovered == D(1)
    assert book.remaining("promo") == 0 and book.remaining("paid") == 0


def test_a_late_spend_burns_the_grants_valid_at_its_event_time() -> None:
    book = CreditBook(C, "usd")
    book.add_grant(grant("g1", "10", 0, exp=100, prio=1), 0)
    book.add_grant(grant("g2", "10", 0, prio=2), 0)
    book.apply(spend("a", 10, "4"), 10)
    book.apply(spend("b", 50, "4", 2), 50)
    assert lines(book.advance(150)) == [("expiry", "-2", "g1", None, 100)]
    assert book.balance == D(10)

    # at t=160 a spend from t=5 arrives: g1 (expired since) was valid then and pays it;
    # b no longer fits in g1 and moves $1 to g2; g1 expired $2 less
    step = book.apply(spend("late", 5, "3", 3), 160)
    assert lines(step) == [
        ("burn", "-3", "g1", "late", 5),
        ("burn", "1", "g1", "b", 50),
        ("burn", "-1", "g2", "b", 50),
        ("expiry", "2", "g1", None, 100),
    ]
    # the balance fell by the late spend's cost minus what it took from expiring credit
    assert step.balance == D(9)
    corrections = [e for e in step.entries if e.seq > 0]
    assert [(e.kind, e.seq, e.key_total) for e in corrections] == [
        (EntryKind.BURN, 1, D(-3)),
        (EntryKind.EXPIRY, 1, D(0)),
    ]
    assert all(e.cause == "late@3" for e in step.entries)


def test_a_void_removes_what_is_left_and_a_later_spend_moves_on() -> None:
    book = CreditBook(C, "usd")
    book.add_grant(grant("g1", "10", 0, prio=1), 0)
    book.add_grant(grant("g2", "5", 0, prio=2), 0)
    book.apply(spend("a", 10, "4"), 10)
    step = book.void(Void("g1", C, 20, reason="refund"), 20)
    assert lines(step) == [("void", "-6", "g1", None, 20)]
    assert step.balance == D(5)
    assert lines(book.apply(spend("b", 30, "2"), 30)) == [("burn", "-2", "g2", "b", 30)]
    # a spend from before the void burns g1, so the void removes less
    assert lines(book.apply(spend("c", 15, "1"), 40)) == [
        ("burn", "-1", "g1", "c", 15),
        ("void", "1", "g1", None, 20),
    ]
    # voiding again later changes nothing; an earlier void wins
    assert book.void(Void("g1", C, 25), 40).outcome == "duplicate"
    step = book.void(Void("g1", C, 12), 40)
    assert lines(step) == [
        ("void", "-6", "g1", None, 12),
        ("burn", "1", "g1", "c", 15),
        ("burn", "-1", "g2", "c", 15),
        ("void", "5", "g1", None, 20),
    ]
    assert book.balance == D(2)


def test_a_void_before_a_grant_arrives_is_held_and_a_void_before_it_starts_voids_all() -> None:
    book = CreditBook(C, "usd")
    assert book.void(Void("g1", C, 5), 10).entries == ()
    step = book.add_grant(grant("g1", "7", 50), 60)
    assert lines(step) == [("grant", "7", "g1", None, 50), ("void", "-7", "g1", None, 50)]
    assert step.balance == 0


def test_an_expiry_is_written_when_its_time_comes_and_a_future_spend_waits() -> None:
    book = CreditBook(C, "usd")
    book.add_grant(grant("g", "10", 0, exp=100), 0)
    assert book.advance(99).entries == ()
    # a spend dated after now (a producer's clock ahead) waits until now reaches it
    assert book.apply(spend("soon", 120, "1"), 99).entries == ()
    assert lines(book.advance(120)) == [
        ("expiry", "-10", "g", None, 100),
        ("uncovered", "-1", None, "soon", 120),
    ]


def test_a_later_grant_pays_uncovered_spend_first() -> None:
    book = CreditBook(C, "usd")
    book.add_grant(grant("g1", "5", 0), 0)
    book.apply(spend("a", 10, "8"), 10)
    assert book.balance == D(-3)
    step = book.add_grant(grant("g2", "20", 20, origin="recharge"), 20)
    assert lines(step) == [
        ("recharge", "20", "g2", None, 20),
        ("settle", "-3", "g2", "a", 20),
        ("uncovered", "3", None, "a", 20),
    ]
    assert step.balance == D(17) and book.uncovered == 0 and book.remaining("g2") == D(17)
    # a grant backdated to before the spend covers it directly instead
    step = book.add_grant(grant("g0", "2", 5), 30)
    assert lines(step) == [
        ("grant", "2", "g0", None, 5),
        ("burn", "-2", "g0", "a", 10),
        ("uncovered", "2", None, "a", 10),
        ("settle", "2", "g2", "a", 20),
        ("uncovered", "-2", None, "a", 20),
    ]
    assert book.balance == D(19)


def test_a_window_is_a_level_replays_are_ignored_and_drift_is_reported() -> None:
    book = CreditBook(C, "usd")
    book.add_grant(grant("g", "10", 0), 0)
    w = window_source("ai_tokens", 60_000)
    assert w == "ai_tokens|60000|"
    assert lines(book.apply(spend(w, 60_000, "1.25", 7, previous="0"), 60_001)) == [
        ("burn", "-1.25", "g", w, 60_000)
    ]
    step = book.apply(spend(w, 60_000, "2.000001", 9, previous="1.25"), 60_002)
    assert lines(step) == [("burn", "-0.750001", "g", w, 60_000)]
    assert step.drift is None
    # the same change again, and an older one replayed after a restart: nothing
    assert book.apply(spend(w, 60_000, "2.000001", 9, previous="1.25"), 60_003).outcome == (
        "duplicate"
    )
    assert book.apply(spend(w, 60_000, "1.25", 7, previous="0"), 60_003).outcome == "stale"
    assert book.apply(spend(w, 60_000, "3", 9), 60_003).outcome == "conflict"
    # a change whose "before" is not what the book holds: the level wins, drift is reported
    step = book.apply(spend(w, 60_000, "1", 12, previous="2.5"), 60_004)
    assert step.drift == D("-0.499999") and lines(step) == [("burn", "1.000001", "g", w, 60_000)]
    assert book.balance == D(9)
    # the cost going back to zero removes its burn
    book.apply(spend(w, 60_000, "0", 13), 60_005)
    assert book.balance == D(10) and book.canonical() == {
        k: v for k, v in book.canonical().items() if k.kind == EntryKind.GRANT
    }


def test_burn_order_ties_break_by_expiry_then_age_then_id() -> None:
    book = CreditBook(C, "usd")
    for g in [
        grant("z-never", "1", 0, prio=5),
        grant("y-late", "1", 0, exp=500, prio=5),
        grant("x-young", "1", 3, exp=400, prio=5),
        grant("w-old", "1", 1, exp=400, prio=5),
        grant("b-same", "1", 1, exp=400, prio=5),
        grant("a-low", "1", 4, prio=9),
    ]:
        book.add_grant(g, 10)

    def burned(step: Step) -> set[str | None]:
        return {e.grant_id for e in step.entries}

    # same priority: soonest expiry first; same expiry: oldest; same age: grant_id
    assert burned(book.apply(spend("s1", 10, "1"), 10)) == {"b-same"}
    assert burned(book.apply(spend("s2", 10, "1"), 10)) == {"w-old"}
    assert burned(book.apply(spend("s3", 10, "1"), 10)) == {"x-young"}
    assert burned(book.apply(spend("s4", 10, "1"), 10)) == {"y-late"}
    assert burned(book.apply(spend("s5", 10, "1"), 10)) == {"z-never"}
    # a higher priority number burns last, however old or soon to expire the others are
    assert burned(book.apply(spend("s6", 10, "1"), 10)) == {"a-low"}


def test_grants_and_inputs_are_checked() -> None:
    book = CreditBook(C, "usd")
    g = grant("g", "10", 0)
    assert book.add_grant(g, 0).outcome == "applied"
    assert book.add_grant(g, 0).outcome == "duplicate"
    assert book.add_grant(grant("g", "11", 0), 0).outcome == "conflict"
    with pytest.raises(CreditsError, match="eur"):
        book.add_grant(Grant("e", C, D(1), "eur", 0), 0)
    with pytest.raises(CreditsError, match="customer 'other'"):
        book.apply(SpendChange("other", "s", 0, D(1), "usd", 1), 0)
    with pytest.raises(CreditsError) as problems:
        Grant("", C, D("0.001"), "USD", -1, expires_ms=5, priority=-1)
    message = str(problems.value)
    for expected in ("grant_id", "currency", "effective_ms", "priority"):
        assert expected in message
    with pytest.raises(CreditsError, match=r"whole number of 0\.01 usd"):
        Grant("g", C, D("0.001"), "usd", 0)
    with pytest.raises(CreditsError, match="float"):
        SpendChange(C, "s", 0, 1.5, "usd", 1)  # type: ignore[arg-type]
    with pytest.raises(CreditsError, match="after effective_ms"):
        Grant("g", C, D(1), "usd", 10, expires_ms=10)
    # a bad clock is refused before the input touches the book
    with pytest.raises(CreditsError, match="now_ms"):
        book.apply(spend("s", 0, "1"), 1.5)  # type: ignore[arg-type]
    assert book.spends == {} and book.balance == D(10)


def test_resume_after_a_kill_writes_exactly_what_the_ledger_lacks() -> None:
    inputs: list = [
        grant("g1", "10", 0, exp=100, prio=1),
        grant("g2", "10", 0, prio=2),
        spend("a", 10, "4"),
        spend("b", 50, "4", 2),
        150,
        spend("late", 5, "3", 3),
    ]
    full, written = CreditBook(C, "usd"), []
    for item in inputs:
        written.extend(_feed(full, item).entries)
    # killed after the ledger kept only part of the last step (its first entry)
    last = _feed(CreditBook(C, "usd"), inputs[0])  # (a fresh book, to show ids are stable)
    assert last.entries[0].entry_id == written[0].entry_id
    kept = written[:-3]
    book, step = CreditBook.resume(
        C,
        "usd",
        ledger=kept + kept[:2],  # a table read before it merged: repeats count once
        grants=[i for i in inputs if isinstance(i, Grant)],
        spends=[i for i in inputs if isinstance(i, SpendChange)],
        now_ms=160,
    )
    assert step.entries == tuple(written[-3:])
    assert book.balance == full.balance == ledger.balance(written)
    # and the resumed book carries on exactly like the one that was not killed
    more = spend("c", 200, "1", 4)
    assert _feed(book, more) == _feed(full, more)
    assert CreditBook.from_json(full.to_json()).sync(300).entries == ()


def _feed(book: CreditBook, item: object, now: int | None = None) -> Step:
    if isinstance(item, Grant):
        return book.add_grant(item, item.effective_ms if now is None else now)
    if isinstance(item, Void):
        return book.void(item, item.voided_ms if now is None else now)
    if isinstance(item, SpendChange):
        return book.apply(item, max(book.now_ms, item.event_ms) if now is None else now)
    assert isinstance(item, int)
    return book.advance(item)


# -- properties against the independent oracle

cents = st.integers(1, 2_000).map(lambda n: D(n) / 100)
fine = st.integers(0, 1_500_000).map(lambda n: D(n) / 100_000)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list, list, list, list[tuple[object, int]]]:
    grants = []
    for i in range(draw(st.integers(0, 4))):
        eff = draw(st.integers(0, 120))
        exp = draw(st.one_of(st.none(), st.integers(eff + 1, eff + 150)))
        grants.append(
            Grant(
                f"g{i}",
                C,
                draw(cents),
                "usd",
                eff,
                expires_ms=exp,
                priority=draw(st.integers(0, 2)),
                origin=draw(st.sampled_from(["manual", "recharge"])),
            )
        )
    voids = [
        Void(g.grant_id, C, draw(st.integers(0, 200)))
        for g in grants
        if draw(st.booleans()) and draw(st.booleans())
    ]
    spends = []
    for s in range(draw(st.integers(0, 7))):
        at = draw(st.integers(0, 200))
        revision = 0
        for _ in range(draw(st.integers(1, 3))):
            revision += draw(st.integers(1, 3))
            if draw(st.integers(0, 4)) == 0:
                at = draw(st.integers(0, 200))
            spends.append(SpendChange(C, f"s{s}", at, draw(fine), "usd", revision))
    inputs: list[object] = [*grants, *voids, *spends]
    order = draw(st.permutations(inputs))
    # an arrival clock that only moves forward, with duplicates and clock ticks mixed in
    arrivals: list[tuple[object, int]] = []
    now = 0
    for item in order:
        now += draw(st.integers(0, 40))
        arrivals.append((item, now))
        if draw(st.integers(0, 3)) == 0:
            arrivals.append((draw(st.sampled_from(order)), now))
        if draw(st.integers(0, 5)) == 0:
            arrivals.append((now, now))
    arrivals.append((400, 400))
    return grants, voids, spends, arrivals


def run(arrivals: list[tuple[object, int]], every: int = 32) -> tuple[CreditBook, list]:
    book = CreditBook(C, "usd", checkpoint_every=every)
    entries: list[LedgerEntry] = []
    for item, now in arrivals:
        step = _feed(book, item, now)
        entries.extend(step.entries)
        # after every step, the balance is the sum of the ledger written so far
        assert step.balance == book.balance == ledger.balance(entries)
    return book, entries


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.sampled_from([1, 2, 32]))
def test_the_ledger_equals_the_oracle_whatever_the_arrival(scenario, every: int) -> None:
    grants, voids, spends, arrivals = scenario
    book, entries = run(arrivals, every)
    expected = reference_ledger(grants, voids, spends, 400)
    assert as_oracle(book) == expected
    assert {
        (k.kind.value, k.grant_id, k.source, k.at_ms): v for k, v in book.canonical().items()
    } == expected
    assert {
        (k.kind.value, k.grant_id, k.source, k.at_ms): v
        for k, v in compute_ledger(
            C, "usd", grants=grants, voids=voids, spends=spends, now_ms=400
        ).items()
    } == expected
    # the balance is the sum of the ledger, and the ledger's lines add up per key
    assert book.balance == ledger.balance(entries) == sum(expected.values(), D(0))
    per_key: dict = {}
    for e in entries:
        total, seq = per_key.get(e.key, (D(0), 0))
        assert e.seq == seq and e.key_total == total + e.amount and e.amount != 0
        per_key[e.key] = (e.key_total, seq + 1)
    assert len({e.entry_id for e in entries}) == len(entries)


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_conservation_and_bounds(scenario) -> None:
    grants, _, spends, arrivals = scenario
    book, entries = run(arrivals)
    t = ledger.totals(entries)
    assert t.granted - t.burned - t.settled - t.expired - t.voided - t.uncovered == t.balance
    # every spend is accounted for, once: burned, settled later, or still uncovered
    latest = {s.source: s for s in sorted(spends, key=lambda s: s.revision)}
    assert t.burned + t.settled + t.uncovered == sum((s.amount for s in latest.values()), D(0))
    # burned never exceeds what was granted plus what is uncovered
    assert t.burned + t.settled <= t.granted
    assert t.granted == sum((g.amount for g in grants), D(0))
    left = ledger.remaining_by_grant(entries)
    for g in grants:
        assert D(0) <= left.get(g.grant_id, D(0)) <= g.amount
    # a negative balance means no usable grant has anything left
    if book.balance < 0:
        assert all(amount == 0 for _, amount in book.live_grants())
    assert book.uncovered == t.uncovered >= 0


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.data())
def test_duplicates_replays_and_restarts_change_nothing(scenario, data: st.DataObject) -> None:
    _, _, _, arrivals = scenario
    _, entries = run(arrivals)
    # the same arrivals again, each input repeated at once: identical entries and ids
    doubled = [pair for pair in arrivals for pair in (pair, pair)]
    assert run(doubled)[1] == entries
    # killed after step k with part of step k's entries lost; resumed; fed the rest
    k = data.draw(st.integers(0, len(arrivals) - 1))
    book = CreditBook(C, "usd")
    before: list[LedgerEntry] = []
    for item, now in arrivals[:k]:
        before.extend(_feed(book, item, now).entries)
    step_k = _feed(book, *arrivals[k]).entries
    kept = list(step_k[: data.draw(st.integers(0, len(step_k)))])
    seen = [item for item, _ in arrivals[: k + 1]]
    resumed, sync = CreditBook.resume(
        C,
        "usd",
        ledger=before + kept,
        grants=[i for i in seen if isinstance(i, Grant)],
        voids=[i for i in seen if isinstance(i, Void)],
        spends=[i for i in seen if isinstance(i, SpendChange)],
        now_ms=book.now_ms,
    )
    after = list(sync.entries)
    # the replay re-delivers step k and everything after it
    for item, now in arrivals[k:]:
        after.extend(_feed(resumed, item, now).entries)
    assert before + kept + after == entries


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.integers(0, 200), fine)
def test_a_spend_never_raises_the_balance(scenario, at: int, amount: Decimal) -> None:
    _, _, _, arrivals = scenario
    book, _ = run(arrivals)
    before = book.balance
    step = book.apply(SpendChange(C, "extra", at, amount, "usd", 1), 400)
    assert before - amount <= step.balance <= before
