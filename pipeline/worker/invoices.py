"""Prices wired to the verified record: the invoice preview and the analysts' priced usage.

Both read ``meter_windows`` (the latest version of every window, as the usage API and
the views do) and the customer's plan schedule (``customer_plans``), and price with
:mod:`meterstream.pricing`:

- :func:`preview`: a customer's invoice for a period. The period is cut at each plan
  change (:func:`~meterstream.pricing.invoice.plan_segments`); each segment's quantity
  of a meter is its value over the windows that *start* in the segment, all groups
  merged (sum/count add, max/min, unique_count = size of the union, latest = the
  latest), the same SQL merge as ``GET /v1/customers/{id}/usage``. A plan change
  therefore takes effect at a window boundary: the window holding the effective
  instant is priced wholly by the plan in effect at its start.
- :func:`priced_usage_rows` / :func:`price_period`: the same segments and quantities
  per UTC day, for ``priced_usage_daily``: a day's ``amount`` is what it added to its
  line, ``charge(segment value through the day) - charge(through the day before)``
  (:func:`~meterstream.pricing.prices.daily_amounts`), exact. Summed over a segment's
  days and rounded once (half up, to the minor unit), it is the preview's usage line.
  Only usage lines are there: base fees and minimum top-ups are per period, not per day.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from meterstream.errors import ConfigError, PricingError
from meterstream.meters.config import MetersConfig
from meterstream.pricing.invoice import (
    Invoice,
    Period,
    PlanAssignment,
    Segment,
    SegmentUsage,
    compute_invoice,
    plan_segments,
)
from meterstream.pricing.money import ZERO
from meterstream.pricing.plans import PlansConfig, free_plans, load_plans
from meterstream.pricing.prices import daily_amounts
from meterstream.settings import Settings
from meterstream.sinks.clickhouse import pricing as store
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.queries import latest_windows

log = logging.getLogger("meterstream.pricing")

DAY_MS = 24 * 3600 * 1000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def load_plans_for(settings: Settings, meters: MetersConfig | None = None) -> PlansConfig:
    """The deployment's plans (``METERSTREAM_PLANS_FILE``, checked against the meters),
    or only the built-in free plan when none is set: usage is metered and costs nothing
    (``plans.example.yaml`` prices the example meters: ``--plans plans.example.yaml``)."""
    path = settings.plans_file
    if path is None:
        return free_plans()
    if not path.exists():
        raise ConfigError(
            [f"plans file {path} not found (set --plans or METERSTREAM_PLANS_FILE)"],
            source="plans",
        )
    return load_plans(path, meters)


def _ms(value: dt.datetime) -> int:
    return (value - _EPOCH) // dt.timedelta(milliseconds=1)


def _utc(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


def assignments(row: store.ScheduleRow | None) -> list[PlanAssignment]:
    """A stored schedule as the pure package's assignments."""
    if row is None:
        return []
    return [PlanAssignment(plan, _utc(ms)) for plan, ms in row.schedule]


def segments_for(
    plans: PlansConfig, period: Period, schedule: store.ScheduleRow | None
) -> tuple[Segment, ...]:
    return plan_segments(assignments(schedule), period, plans.default.name)


def preview(
    ch: ClickHouse,
    plans: PlansConfig,
    customer_id: str,
    period: Period,
    override: Callable[[int, int], Mapping[str, Decimal]] | None = None,
) -> Invoice:
    """The customer's invoice for ``period`` from the verified record (module docstring);
    ``override(start_ms, end_ms)``: quantities that replace the stored ones of a segment
    (a correction's dry run: what the invoice would be after it)."""
    schedule = store.current_schedules(ch, [customer_id]).get(customer_id)
    usage = []
    for s in segments_for(plans, period, schedule):
        start, end = _ms(s.start), _ms(s.end)
        quantities = store.segment_quantities(ch, customer_id, start, end)
        if override is not None:
            quantities.update(override(start, end))
        usage.append(SegmentUsage(s, quantities))
    return compute_invoice(plans, period, usage, customer_id)


def preview_document(
    ch: ClickHouse, plans: PlansConfig, customer_id: str, period: Period
) -> dict[str, Any]:
    """:func:`preview` as JSON (the route's and the CLI's answer)."""
    return preview(ch, plans, customer_id, period).to_dict()


# ------------------------------------------------------------------ per day


def merge_windows(aggregation: str, windows: Sequence[Mapping[str, Any]]) -> Decimal:
    """Windows of one meter merged into one value, as ``MERGED_VALUE_SQL`` does."""
    if not windows:
        return ZERO
    if aggregation in ("sum", "count"):
        return sum((Decimal(w["value"]) for w in windows), ZERO)
    if aggregation == "max":
        return max(Decimal(w["value"]) for w in windows)
    if aggregation == "min":
        return min(Decimal(w["value"]) for w in windows)
    if aggregation == "unique_count":
        return Decimal(len({v for w in windows for v in w["distinct_values"]}))
    if aggregation == "latest":
        last = max(windows, key=lambda w: (w["latest_ts_ms"], str(w["latest_key"]).encode()))
        return Decimal(last["value"])
    raise ValueError(f"unknown aggregation {aggregation!r}")


def merged_to_date(
    aggregation: str, batches: Sequence[Sequence[Mapping[str, Any]]]
) -> list[Decimal]:
    """``merge_windows`` of the windows of ``batches[0..i]``, for every ``i``, in one pass
    (the credit burn prices a month of hourly windows each tick: a merge from scratch per
    window would be quadratic)."""
    out: list[Decimal] = []
    if aggregation == "unique_count":
        seen: set[Any] = set()
        for batch in batches:
            for w in batch:
                seen.update(w["distinct_values"])
            out.append(Decimal(len(seen)))
        return out
    if aggregation == "latest":
        last: Mapping[str, Any] | None = None
        for batch in batches:
            for w in batch:
                if last is None or (w["latest_ts_ms"], str(w["latest_key"]).encode()) > (
                    last["latest_ts_ms"],
                    str(last["latest_key"]).encode(),
                ):
                    last = w
            out.append(ZERO if last is None else Decimal(last["value"]))
        return out
    value: Decimal | None = None
    for batch in batches:
        if batch:
            here = merge_windows(aggregation, batch)
            if value is None:
                value = here
            elif aggregation in ("sum", "count"):
                value += here
            elif aggregation == "max":
                value = max(value, here)
            else:
                value = min(value, here)
        out.append(ZERO if value is None else value)
    return out


def _day(ms: int) -> int:
    return ms - ms % DAY_MS


def priced_usage_rows(
    ch: ClickHouse,
    plans: PlansConfig,
    customer_id: str,
    period: Period,
    run: int,
) -> list[tuple[Any, ...]]:
    """One pricing run's ``priced_usage_runs`` rows of a customer and period."""
    schedule = store.current_schedules(ch, [customer_id]).get(customer_id)
    windows = latest_windows(
        ch, customer_id=customer_id, start_ms=_ms(period.start), end_ms=_ms(period.end)
    )
    return rows_of_windows(plans, customer_id, period, run, schedule, windows)


def rows_of_windows(
    plans: PlansConfig,
    customer_id: str,
    period: Period,
    run: int,
    schedule: store.ScheduleRow | None,
    period_windows: Sequence[dict[str, Any]],
) -> list[tuple[Any, ...]]:
    """:func:`priced_usage_rows` from what it reads: the customer's schedule and the
    latest windows starting in ``period`` (in ``latest_windows`` order); each segment
    prices those that start in it."""
    rows: list[tuple[Any, ...]] = []
    for segment in segments_for(plans, period, schedule):
        plan = plans.by_name(segment.plan)
        if not plan.prices:
            continue
        start, end = _ms(segment.start), _ms(segment.end)
        windows = [w for w in period_windows if start <= int(w["window_start_ms"]) < end]
        by_meter: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for window in windows:
            by_meter[str(window["meter"])].append(window)
        for price in plan.prices:
            found = by_meter.get(price.meter, [])
            days: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for window in found:
                days[_day(int(window["window_start_ms"]))].append(window)
            aggregation = str(found[0]["aggregation"]) if found else "sum"
            order = sorted(days) or [_day(start)]
            so_far: list[dict[str, Any]] = []
            day_values, to_date = [], []
            for day in order:
                so_far += days.get(day, [])
                day_values.append(merge_windows(aggregation, days.get(day, [])))
                to_date.append(merge_windows(aggregation, so_far))
            amounts = daily_amounts(price.model, to_date)
            for day, quantity, value, amount in zip(
                order, day_values, to_date, amounts, strict=True
            ):
                rows.append(
                    (
                        customer_id,
                        period.start,
                        run,
                        _utc(day).date(),
                        price.meter,
                        plan.name,
                        segment.start,
                        plan.money.code,
                        quantity,
                        value,
                        amount,
                    )
                )
    return rows


PRICING_SLICE = 500
"""Customers priced per pair of reads in a pricing run (their windows in memory at once)."""


def period_customers(ch: ClickHouse, period: Period) -> list[str]:
    """Customers to price for ``period``: those with windows in it or with a schedule."""
    found = set(store.customers_with_windows(ch, _ms(period.start), _ms(period.end)))
    found |= {c for c, row in store.current_schedules(ch).items() if row.schedule}
    return sorted(found)


def priced_period_rows(
    ch: ClickHouse,
    plans: PlansConfig,
    period: Period,
    run: int,
    customers: Iterable[str] | None = None,
) -> list[tuple[Any, ...]]:
    """A pricing run's rows for ``customers`` (default :func:`period_customers`); reads
    only, so it can run on a read-only connection. A customer whose plans cannot price the
    period (two currencies, an unknown plan) is logged and left out. Read in slices of
    :data:`PRICING_SLICE` customers, two reads each (``store.schedules_and_windows``)."""
    todo = list(customers) if customers is not None else period_customers(ch, period)
    start, end = _ms(period.start), _ms(period.end)
    rows: list[tuple[Any, ...]] = []
    for i in range(0, len(todo), PRICING_SLICE):
        schedules, by_customer = store.schedules_and_windows(
            ch, todo[i : i + PRICING_SLICE], start, end
        )
        for customer, windows in by_customer.items():
            try:
                rows += rows_of_windows(
                    plans, customer, period, run, schedules.get(customer), windows
                )
            except (KeyError, ValueError, PricingError) as exc:
                log.warning("pricing %s for %s skipped: %s", customer, period.start, exc)
    return rows


def price_period(
    ch: ClickHouse,
    plans: PlansConfig,
    period: Period,
    customers: Iterable[str] | None = None,
    run: int | None = None,
) -> int:
    """Reprice ``period`` into ``priced_usage_runs`` (:func:`priced_period_rows`, then one
    insert); returns the number of rows written."""
    run = run if run is not None else time.time_ns() // 1_000_000
    rows = priced_period_rows(ch, plans, period, run, customers)
    store.write_priced_usage(ch, rows)
    return len(rows)
