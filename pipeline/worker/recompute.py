"""``meterstream meters recompute METER --from --to``: apply the meters file the worker
runs with to a meter's history, as an audited correction (kind ``recompute``).

Windows already written keep the totals they were counted with when a meter's
definition changes (README, "Meters that change"); a recompute is how an operator asks
for history to follow the file. It goes through the corrections path
(pipeline/worker/corrections.py): a row in the ``corrections`` log (who, when, why,
what: the meter, the range, the customer), then one ``usage-corrections`` record per
customer naming the windows, which the corrections agent rebuilds from the (effective)
record under the pipeline's lock and writes with a fresh version, telling the Stripe
forwarder and the credits. Each event is folded with the definition valid at its time
(a version's ``effective_until``), and the record's range decisions hold.

The windows rebuilt: every window of the meter in the range (widened to whole windows)
that is stored or that the record's events fall in under the file now, and their
customer-total keys. A repeat with the same ``correction_id`` sends the rebuilds again
(idempotent: a rebuild reads the record) and changes nothing else.

``dry_run``: what it would change (:func:`meterstream.meters.diff.recompute_preview`,
the windows as stored against the record's fold); nothing is written.
"""

from __future__ import annotations

import logging
from typing import Any

from meterstream.billing.record import recompute_preview_from_record
from meterstream.errors import CorrectionError
from meterstream.events import UsageEvent
from meterstream.meters import fold
from meterstream.meters.config import MetersConfig
from meterstream.sinks.clickhouse import corrections as store
from meterstream.sinks.clickhouse import queries
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.worker.batch import now_ms
from meterstream.worker.corrections import CorrectionService, new_correction_id

log = logging.getLogger("meterstream.corrections")
KIND = "recompute"


def _windows(
    ch: ClickHouse, meters: MetersConfig, meter: str, lo: int, hi: int, customer: str | None
) -> tuple[set[fold.WindowKey], int]:
    """The windows a recompute rebuilds (module docstring), and the events of the range
    the meter counts under the file now."""
    m = meters.by_name(meter)
    customers = None if customer is None else [customer]
    stored = queries.latest_windows(ch, meter=meter, start_ms=lo, end_ms=hi, customer_ids=customers)
    keys = {
        fold.WindowKey(r["meter"], r["customer_id"], r["group_key"], r["window_start_ms"])
        for r in stored
    }
    events = [
        UsageEvent(**row) for row in queries.events_in_range(ch, customers, [m.event_name], lo, hi)
    ]
    only = MetersConfig(meters=(m,))
    keys |= fold.windows_of(only, events)
    keys |= fold.total_keys(only, keys)
    counted = sum(state.event_count for state in fold.fold(only, events, meter=m).values())
    return keys, counted


def preview(
    ch: ClickHouse,
    meters: MetersConfig,
    meter: str,
    start_ms: int,
    end_ms: int,
    customer: str | None,
    by_window: bool,
) -> dict[str, Any]:
    """The dry run: what a recompute would change, nothing written."""
    m = meters.by_name(meter)
    lo, _ = m.window_bounds(start_ms)
    _, hi = m.window_bounds(end_ms - 1)
    answer = recompute_preview_from_record(
        ch, meters, meter, lo, hi, customer=customer, by_window=by_window
    )
    selector = {"meter": meter, "from": lo, "to": hi, "customer_id": customer}
    return {"kind": KIND, "status": "dry_run", "selector": selector, **answer.as_json()}


async def recompute(
    service: CorrectionService,
    meter: str,
    start_ms: int,
    end_ms: int,
    *,
    customer: str | None,
    author: str,
    reason: str,
    operator: str,
    correction_id: str | None = None,
) -> dict[str, Any]:
    """Apply a recompute of ``meter`` over [start, end); the answer of
    ``POST /v1/meters/recompute`` (its dry run is :func:`preview`)."""
    meters = service.services.meters
    m = meters.by_name(meter)
    lo, _ = m.window_bounds(start_ms)
    _, hi = m.window_bounds(end_ms - 1)
    selector = {"meter": meter, "from": lo, "to": hi, "customer_id": customer}
    cid = correction_id or new_correction_id()
    logged = (
        None if correction_id is None else await service.services.chio.call(store.correction, cid)
    )
    if logged is not None and (logged["kind"] != KIND or logged["selector"] != selector):
        raise CorrectionError(f"correction_id {cid!r} is another correction ({logged['kind']})")
    windows, counted = await service.services.chio.call(_windows, meters, meter, lo, hi, customer)
    doc: dict[str, Any] = logged or {
        "correction_id": cid,
        "kind": KIND,
        "author": f"{author} ({operator})" if author else operator,
        "reason": reason,
        "created_at_ms": now_ms(),
        "selector": selector,
        "events_affected": counted,
        "windows_affected": sum(1 for k in windows if not k.is_total),
        "status": "applied",
    }
    if logged is None:
        await service.services.chio.call(store.append_correction, doc)
        service.services.metrics.corrections.inc(kind=KIND)
    await service._send_rebuilds(cid, KIND, windows)  # chunked per customer there
    log.info(
        "recompute %s of %s by %s: %d window(s) to rebuild%s",
        cid,
        meter,
        doc["author"],
        doc["windows_affected"],
        " (repeated)" if logged else "",
    )
    return {**doc, "repeated": logged is not None}
