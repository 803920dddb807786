"""An independent reference for the credit ledger, written from the README's rules alone.

No checkpoints, no incremental diff: every call sorts the final inputs by event time and
walks them once with plain lists. Tests compare the engine's ledger (after any arrival
order, duplicates, restarts) with this.
"""

from __future__ import annotations

from decimal import Decimal

from meterstream.credits.grants import Grant, Void
from meterstream.credits.spend import SpendChange

# (kind, grant_id or "", source or "", at_ms) -> amount
Ledger = dict[tuple[str, str, str, int], Decimal]


def reference_ledger(
    grants: list[Grant], voids: list[Void], spends: list[SpendChange], now_ms: int
) -> Ledger:
    void_at: dict[str, int] = {}
    for v in voids:
        void_at[v.grant_id] = min(v.voided_ms, void_at.get(v.grant_id, v.voided_ms))
    latest: dict[str, SpendChange] = {}
    for s in spends:
        if s.source not in latest or latest[s.source].revision < s.revision:
            latest[s.source] = s

    def end_of(g: Grant) -> tuple[int | None, str]:
        if g.grant_id in void_at:
            when = max(void_at[g.grant_id], g.effective_ms)
            if g.expires_ms is None or when < g.expires_ms:
                return when, "void"
        return g.expires_ms, "expiry"

    def order(g: Grant) -> tuple:
        never = 10**20
        return (
            g.priority,
            never if g.expires_ms is None else g.expires_ms,
            g.effective_ms,
            g.grant_id,
        )

    events: list[tuple] = []
    for g in grants:
        events.append((g.effective_ms, 0, order(g), "start", g))
        end, why = end_of(g)
        if end is not None:
            events.append((end, 1, g.grant_id, why, g))
    for s in latest.values():
        if s.amount > 0:
            events.append((s.event_ms, 2, s.source, "spend", s))
    events.sort(key=lambda e: e[:3])

    out: Ledger = {}

    def add(kind: str, grant: str, source: str, at: int, amount: Decimal) -> None:
        out[(kind, grant, source, at)] = out.get((kind, grant, source, at), Decimal(0)) + amount

    left: dict[str, Decimal] = {}
    usable: list[Grant] = []
    owed: list[list] = []  # [source, amount still owed], oldest first
    for at, _, _, what, obj in events:
        if at > now_ms:
            break
        if what == "start":
            g = obj
            add("recharge" if g.origin == "recharge" else "grant", g.grant_id, "", at, g.amount)
            left[g.grant_id] = g.amount
            end, _ = end_of(g)
            if end is None or end > at:
                for debt in owed:
                    if left[g.grant_id] == 0:
                        break
                    pay = min(debt[1], left[g.grant_id])
                    if pay == 0:
                        continue
                    debt[1] -= pay
                    left[g.grant_id] -= pay
                    add("settle", g.grant_id, debt[0], at, -pay)
                    add("uncovered", "", debt[0], at, pay)
            usable.append(g)
        elif what in ("expiry", "void"):
            g = obj
            usable.remove(g)
            if left[g.grant_id] != 0:
                add(what, g.grant_id, "", at, -left[g.grant_id])
                left[g.grant_id] = Decimal(0)
        else:
            s = obj
            need = s.amount
            for g in sorted(usable, key=order):
                take = min(left[g.grant_id], need)
                if take > 0:
                    left[g.grant_id] -= take
                    need -= take
                    add("burn", g.grant_id, s.source, at, -take)
            if need > 0:
                add("uncovered", "", s.source, at, -need)
                owed.append([s.source, need])
    return {k: v for k, v in out.items() if v != 0}
