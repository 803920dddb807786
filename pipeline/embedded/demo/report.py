"""The demo's screen and its summary, as pure functions of what was read (no I/O).

* :func:`fmt_number`: numbers as people write them (``180``, ``1,234,567``,
  ``12.34``): no trailing zeros, thousands separated.
* :func:`compare`: the generator's own totals against ClickHouse and against
  Stripe, every difference named. For Stripe only what is due is compared: the
  windows that had closed ``grace`` before the forwarder's last complete round
  started, rounded by the meter's rule; every later window is listed as not due
  yet, with the time it will be.
* :func:`live_frame` and :func:`summary_lines`: one row per meter and one
  column per demo customer, so the screen fits a 24x80 terminal.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from meterstream.embedded.demo.load import (
    CUSTOMER_PREFIX,
    CUSTOMERS,
    RULE_BY_METER,
    RULES,
    Expected,
)
from meterstream.embedded.demo.load import is_demo_customer as _is_demo
from meterstream.meters.windows import DAY_MS
from meterstream.sinks.stripe.payloads import Rounding, period_value

Totals = Mapping[tuple[str, str], Decimal]


def fmt_number(value: Decimal | int | None) -> str:
    """``Decimal("180.000000000")`` -> ``180``; 1234567 -> ``1,234,567``; 12.340 -> ``12.34``."""
    if value is None:
        return ""
    number = value if isinstance(value, Decimal) else Decimal(value)
    if number == 0:
        return "0"
    return f"{number.normalize():,f}"


def fmt_compact(value: Decimal | int | None) -> str:
    """Four significant digits with k/M/G above 9,999 (``123.5M``); else 2 decimals."""
    if value is None:
        return ""
    number = value if isinstance(value, Decimal) else Decimal(value)
    for unit, suffix in ((10**9, "G"), (10**6, "M"), (10**4, "k")):
        if abs(number) >= unit:
            scaled = number / (unit if suffix != "k" else 1000)
            digits = len(str(int(abs(scaled))))
            return fmt_number(round(scaled, max(0, 4 - digits))) + suffix
    return fmt_number(round(number, 2))


def fmt_duration(seconds: float) -> str:
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def fmt_time(ms: float) -> str:
    """``HH:MM:SS`` UTC (``:SS`` dropped when zero)."""
    moment = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return moment.strftime("%H:%M" if moment.second == 0 else "%H:%M:%S")


def fmt_window(start_ms: int, end_ms: int) -> str:
    start = dt.datetime.fromtimestamp(start_ms / 1000, tz=dt.UTC)
    end = dt.datetime.fromtimestamp(end_ms / 1000, tz=dt.UTC)
    if end_ms - start_ms >= DAY_MS:
        return f"day {start:%m-%d}"
    return f"{start:%H:%M}-{end:%H:%M} UTC"


def short(customer: str) -> str:
    return customer.removeprefix(CUSTOMER_PREFIX)


@dataclass(frozen=True)
class StripeMeter:
    """What the due/not-due split needs to know about one meter's Stripe block."""

    grace_ms: int
    interval_s: int
    rounding: Rounding


@dataclass
class Check:
    """The outcome of :func:`compare` for one billing period."""

    period: str
    clickhouse: dict[tuple[str, str], tuple[Decimal | None, Decimal | None]] = field(
        default_factory=dict
    )  # (meter, customer) -> (the generator's total, ClickHouse's)
    stripe: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # due, Stripe
    clickhouse_differences: list[str] = field(default_factory=list)
    stripe_differences: list[str] = field(default_factory=list)
    not_due: list[str] = field(default_factory=list)
    stripe_unchecked: str | None = None
    other_customers: int = 0

    @property
    def ok(self) -> bool:
        return not self.clickhouse_differences and not self.stripe_differences

    @property
    def stripe_ok(self) -> bool:
        return self.stripe_unchecked is None and not self.stripe_differences


def round_covering(info: StripeMeter, window_ms: int, complete_ms: int, now_ms: int) -> int:
    """The earliest start (ms) of a forward round whose totals are final at ``now_ms``.

    Such a round started after the record held every event (``complete_ms``) and
    after the last window that is due at ``now_ms`` (closed ``grace`` ago) closed
    plus its grace, so it sent every due window with all its events.
    """
    closed = now_ms - info.grace_ms
    return max(complete_ms, closed - closed % window_ms + info.grace_ms)


def due_cutoffs(
    stripe_meters: Mapping[str, StripeMeter], forwarded_s: Mapping[str, float]
) -> dict[str, int]:
    """meter -> the latest window end (ms) the last complete forward round covered."""
    return {
        meter: int(forwarded_s[meter] * 1000) - info.grace_ms
        for meter, info in stripe_meters.items()
        if meter in forwarded_s
    }


def compare(
    period: str,
    bounds: tuple[int, int],
    expected: Expected,
    clickhouse: Totals,
    stripe: Totals | None,
    stripe_meters: Mapping[str, StripeMeter],
    forwarded_s: Mapping[str, float],
    stripe_unavailable: str | None = None,
) -> Check:
    """The generator's totals of ``period`` against ClickHouse and Stripe (see module doc).

    Every (meter, customer) of the demo's namespace is compared, whichever side
    has it: a total the generator never produced is a difference too.
    """
    start, end = bounds
    check = Check(period)
    want = expected.totals(start, end)
    keys = set(want) | {k for k in clickhouse if _is_demo(k[1])}
    for key in sorted(keys):
        w, h = want.get(key), clickhouse.get(key)
        check.clickhouse[key] = (w, h)
        if w is None or h is None or w != h:
            check.clickhouse_differences.append(_difference("ClickHouse", key, w, h))
    check.other_customers = len({c for _, c in clickhouse if not _is_demo(c)})

    meters = [m for m in stripe_meters if m in RULE_BY_METER]
    if stripe is None:
        check.stripe_unchecked = stripe_unavailable or "Stripe could not be read"
        return check
    missing = [m for m in meters if m not in forwarded_s]
    if missing:
        check.stripe_unchecked = (
            "the forwarder has not completed a round for "
            + ", ".join(missing)
            + " (see worker.log)"
        )
        return check
    cutoffs = due_cutoffs(stripe_meters, forwarded_s)
    closed_by: Callable[[str], int] = lambda meter: cutoffs.get(meter, start)  # noqa: E731
    due = expected.totals(start, end, closed_by)
    stripe_keys = {k for k in due if k[0] in meters} | {
        k for k in stripe if k[0] in meters and _is_demo(k[1])
    }
    for key in sorted(stripe_keys):
        meter = key[0]
        exact = due.get(key)
        w_int = 0 if exact is None else period_value(exact, stripe_meters[meter].rounding)
        h_int = int(stripe.get(key, Decimal(0)))
        check.stripe[key] = (w_int, h_int)
        if w_int != h_int:
            check.stripe_differences.append(
                _difference("Stripe", key, Decimal(w_int), h_int, "due total (rounded)")
            )
    check.not_due = not_due_lines(expected, bounds, stripe_meters, meters, cutoffs)
    return check


def _difference(
    side: str,
    key: tuple[str, str],
    want: Decimal | None,
    have: Decimal | int | None,
    what: str = "total",
) -> str:
    meter, customer = key
    if want is None:
        return f"{side} {meter} {customer}: {fmt_number(have)}; the generator sent none"
    if have is None:
        return f"{side} {meter} {customer}: nothing; the generator's {what} is {fmt_number(want)}"
    delta = Decimal(have) - want
    sign = "+" if delta > 0 else "-"
    return (
        f"{side} {meter} {customer}: {fmt_number(have)}; the generator's {what} is "
        f"{fmt_number(want)} ({sign}{fmt_number(abs(delta))})"
    )


def not_due_lines(
    expected: Expected,
    bounds: tuple[int, int],
    stripe_meters: Mapping[str, StripeMeter],
    meters: list[str],
    cutoffs: Mapping[str, int],
    limit: int = 2,
) -> list[str]:
    """Plain lines for each window of the period that Stripe is not sent yet, and when."""
    start, end = bounds
    windows = expected.open_windows(start, end, lambda m: cutoffs.get(m, start), meters)
    grouped: dict[tuple[int, int], list[str]] = {}
    for meter, w_start, w_end in windows:
        grouped.setdefault((w_start, w_end), []).append(meter)
    lines = []
    for (w_start, w_end), names in sorted(grouped.items())[:limit]:
        info = stripe_meters[names[0]]
        who = "every Stripe meter" if len(names) == len(meters) else ", ".join(sorted(names))
        lines += [
            f"not due yet: window {fmt_window(w_start, w_end)} of {who}; it closes at "
            f"{fmt_time(w_end)}",
            f"  the first forward after {fmt_time(w_end + info.grace_ms)} "
            f"({info.grace_ms // 1000} s grace; one every {info.interval_s} s) sends it",
        ]
    if len(grouped) > limit:
        lines.append(f"  ... and {len(grouped) - limit} more windows not due yet")
    return lines


# ------------------------------------------------------------------ layout


def meter_rows(extra: Iterable[str] = ()) -> list[str]:
    """The demo's meters in file order, then any other meter that has demo data."""
    names = [r.meter for r in RULES]
    return names + sorted(set(extra) - set(names))


def customer_columns(extra: Iterable[str] = ()) -> list[str]:
    return CUSTOMERS + sorted(set(extra) - set(CUSTOMERS))


Cell = tuple[Decimal | int | None, str]  # (value, mark: "" or "!")


def matrix(
    title: str,
    rows: list[str],
    cols: list[str],
    cell: Callable[[str, str], Cell],
    width: int = 80,
    label_width: int = 0,
) -> list[str]:
    """A table with one row per meter and one column per customer (prefix dropped).

    Numbers are written in full; if that makes a line ``width`` or wider, large
    ones are shortened (``123.5M``, ``12.35k``).
    """
    values = [[cell(r, c) for c in cols] for r in rows]
    for fmt in (fmt_number, fmt_compact):
        cells = [[_cell_text(fmt, value, mark) for value, mark in line] for line in values]
        lines = _lay_out(title, rows, cols, cells, label_width)
        if max(len(line) for line in lines) < width:
            break
    return lines


def _cell_text(
    fmt: Callable[[Decimal | int | None], str], value: Decimal | int | None, mark: str
) -> str:
    text = fmt(value)
    return f"{text or '-'}{mark}" if mark else text


def _lay_out(
    title: str, rows: list[str], cols: list[str], cells: list[list[str]], label_width: int
) -> list[str]:
    first = max([len(title), label_width] + [len(r) for r in rows])
    widths = [max([len(short(c))] + [len(line[i]) for line in cells]) for i, c in enumerate(cols)]
    head = title.ljust(first) + "".join(
        "  " + short(c).rjust(w) for c, w in zip(cols, widths, strict=True)
    )
    out = [head.rstrip()]
    for r, line in zip(rows, cells, strict=True):
        text = r.ljust(first) + "".join(
            "  " + v.rjust(w) for v, w in zip(line, widths, strict=True)
        )
        out.append(text.rstrip())
    return out


def fit(lines: list[str], width: int, height: int) -> list[str]:
    """At most ``height - 1`` lines of at most ``width - 1`` columns (cut, never wrapped:
    a wrapped line would break the redraw in place)."""
    if len(lines) >= height:
        keep = max(1, height - 2)
        lines = [*lines[:keep], f"... {len(lines) - keep} more lines: make the terminal taller"]
    return [line if len(line) < width else line[: max(1, width - 4)] + "..." for line in lines]


@dataclass
class LiveView:
    """What one refresh of the live screen shows."""

    run_id: str
    elapsed_s: float
    rate: float
    sent: int
    new: int
    recorded: int | None
    period: str
    clickhouse: Totals | None
    stripe: Totals | None
    stripe_meters: Mapping[str, StripeMeter]
    forwarded_s: Mapping[str, float]
    now_ms: int
    problem: str | None = None
    width: int = 80


def live_frame(view: LiveView) -> list[str]:
    """The live screen: 20 lines of at most 80 columns for the example meters."""
    recorded = "?" if view.recorded is None else fmt_number(view.recorded)
    lines = [
        f"meterstream demo {view.run_id}: {fmt_duration(view.elapsed_s)}; Ctrl-C stops cleanly",
        f"this run: {fmt_number(view.sent)} records sent, {fmt_number(view.new)} new events, "
        f"{recorded} in the record",
        f"totals of {view.period} (UTC) so far, all demo runs in this state dir "
        f"({CUSTOMER_PREFIX}*)",
        "",
    ]
    if view.problem:
        lines.append(f"(totals not available yet: {view.problem})")
        return lines
    ch = view.clickhouse or {}
    demo_ch = {k: v for k, v in ch.items() if _is_demo(k[1])}
    cols = customer_columns(c for _, c in demo_ch)
    rows = meter_rows(m for m, _ in demo_ch)
    lines += matrix(
        "ClickHouse", rows, cols, lambda m, c: (demo_ch.get((m, c)), ""), width=view.width
    )
    stripe_rows = [m for m in rows if m in view.stripe_meters]
    if stripe_rows:
        lines.append("")
        last = max(view.forwarded_s.values(), default=None)
        title = f"Stripe ({fmt_time(last * 1000)})" if last else "Stripe"
        if view.stripe is None:
            lines.append(f"{title}: not readable (not the emulator?)")
        else:
            stripe = view.stripe
            lines += matrix(
                title,
                stripe_rows,
                cols,
                lambda m, c: (stripe.get((m, c)), ""),
                width=view.width,
                label_width=max(len(r) for r in rows),
            )
        lines += stripe_explanation(view)
    return lines


def stripe_explanation(view: LiveView) -> list[str]:
    """Two lines: what the Stripe rows show and why they lag ClickHouse."""
    info = next(iter(view.stripe_meters.values()))
    rule_windows = {RULE_BY_METER[m].window_ms for m in view.stripe_meters if m in RULE_BY_METER}
    size = min(rule_windows, default=3_600_000)
    open_start = view.now_ms - view.now_ms % size
    return [
        "Stripe: what the emulator received at the last forward (time above). A window",
        f"is sent {info.grace_ms // 1000} s after it closes (a forward every {info.interval_s} s): "
        f"{fmt_window(open_start, open_start + size)} is not.",
    ]


@dataclass
class RunFacts:
    """The counts the summary reports about the generator."""

    sent: int
    new: int
    resent: int
    duplicates: int
    conflicts: int
    invalid: int
    runs: int
    events: int
    recorded: bool
    expired: int = 0


def summary_lines(
    check: Check, facts: RunFacts, stripe_meters: Mapping[str, StripeMeter]
) -> list[str]:
    """The final summary of one period: 24 lines when nothing differs."""
    recorded = "all in the record" if facts.recorded else "NOT all in the record"
    runs = "run" if facts.runs == 1 else "runs"
    lines = [
        f"final summary for {check.period} (UTC), customers {CUSTOMER_PREFIX}*",
        f"this run: {fmt_number(facts.sent)} records sent; {fmt_number(facts.new)} new events, "
        f"{fmt_number(facts.duplicates)} retries (count once),",
        f"{fmt_number(facts.conflicts)} conflicting copies and {fmt_number(facts.invalid)} "
        "invalid records (dead-lettered)",
    ]
    if facts.resent:
        lines.append(
            f"it resent {fmt_number(facts.resent)} events of runs stopped before the record "
            "held them (they count once)"
        )
    lines.append(
        f"expected: {facts.runs} demo {runs} in this state dir, "
        f"{fmt_number(facts.events)} events, {recorded}"
    )
    if facts.expired:
        lines.append(
            f"{facts.expired} stopped run(s) are older than the dedup horizon and were not "
            "resent; their events may show as differences (start afresh: rm -rf the state dir)"
        )
    ch_rows = meter_rows(m for m, _ in check.clickhouse)
    cols = customer_columns(c for _, c in check.clickhouse)

    def ch_cell(m: str, c: str) -> Cell:
        w, h = check.clickhouse.get((m, c), (None, None))
        return w, ("" if w == h else "!")

    lines += ["", "the generator's totals; ClickHouse and Stripe hold the same unless marked !"]
    lines += matrix("ClickHouse", ch_rows, cols, ch_cell)
    if check.stripe:
        stripe_rows = [m for m in ch_rows if m in stripe_meters]

        def stripe_cell(m: str, c: str) -> Cell:
            w, h = check.stripe.get((m, c), (None, None))
            return w, ("" if w == h else "!")

        label = max(len(r) for r in ch_rows)
        lines += matrix("Stripe (due)", stripe_rows, cols, stripe_cell, label_width=label)
    lines += check.not_due
    differences = check.clickhouse_differences + check.stripe_differences
    if differences:
        lines += ["", "differences:"] + ["  " + d for d in differences]
    if check.other_customers:
        lines.append(
            f"(ClickHouse also holds {check.other_customers} customer(s) outside "
            f"{CUSTOMER_PREFIX}*: not the demo's, not compared)"
        )
    compared = len(check.clickhouse)
    lines += [
        "",
        "ClickHouse equals the generator's totals: "
        + (
            f"NO ({len(check.clickhouse_differences)} of {compared} differ)"
            if check.clickhouse_differences
            else f"yes ({compared} of {compared})"
        ),
    ]
    if check.stripe_unchecked is not None:
        lines.append(f"Stripe: NOT CHECKED: {check.stripe_unchecked}")
    else:
        due = len(check.stripe)
        lines.append(
            "Stripe equals the generator's closed windows (rounded): "
            + (
                f"NO ({len(check.stripe_differences)} of {due} differ)"
                if check.stripe_differences
                else f"yes ({due} of {due} due)"
            )
        )
    return lines
