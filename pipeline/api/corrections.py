"""Routes of fixing history (issue #26), registered before the guard is installed. Every
one needs an unrestricted (operator) key: a customer cannot change or read history's
corrections.

- ``POST /v1/corrections``: a void or an amend (pipeline/corrections/request.py has the
  body); ``dry_run: true`` answers the effect and changes nothing; a repeat with the
  same ``correction_id`` is the same correction (answered with ``repeated: true``).
- ``GET /v1/corrections[?limit=N]``: the log, newest first.
- ``GET /v1/corrections/{correction_id}``: one correction and the events it changed.
- ``POST /v1/backfill`` ``{"events": [...], "author", "reason", "dry_run"}`` (at most
  5,000 events) or ``{"rejected": "too_late", "customer_id"?, "from"?, "to"?, ...}``
  (the events kept in ``rejected_events`` for that reason, re-imported).
"""

from __future__ import annotations

import functools
from typing import Any

from faust.web import Request, Response, View

from meterstream.api.http import Routes
from meterstream.corrections.request import instant, parse_correction
from meterstream.errors import CorrectionError
from meterstream.events import Reason, canonical_json, loads_exact
from meterstream.meters.config import MetersConfig
from meterstream.sinks.clickhouse import corrections as store
from meterstream.worker.corrections import MAX_BACKFILL_EVENTS, CorrectionService


def _body(raw: bytes) -> Any:
    try:
        return loads_exact(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CorrectionError("body is not JSON") from None


def _has_timestamp(raw: bytes) -> bool:
    try:
        doc = loads_exact(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return True  # not JSON: the stream dead-letters it again, with its reason
    return not isinstance(doc, dict) or doc.get("timestamp") is not None


def backfill_request(body: Any) -> tuple[dict[str, Any], list[bytes] | None]:
    """The options of a backfill body, and its events (raw JSON each; None: re-import
    rejected events); :class:`CorrectionError` otherwise."""
    if not isinstance(body, dict):
        raise CorrectionError('body must be a JSON object {"events": [...], "reason": ...}')
    allowed = {"events", "rejected", "customer_id", "from", "to", "author", "reason", "dry_run"}
    problems = []
    unknown = set(body) - allowed
    if unknown:
        problems.append(f"unknown field(s): {', '.join(sorted(unknown))}")
    reason, author = body.get("reason"), body.get("author", "")
    if not isinstance(reason, str) or not 1 <= len(reason) <= 1000:
        problems.append("reason: required, a string of 1-1000 characters")
    if not isinstance(author, str) or len(author) > 200:
        problems.append("author: a string of at most 200 characters")
    customer = body.get("customer_id")
    if customer is not None and (not isinstance(customer, str) or not 1 <= len(customer) <= 200):
        problems.append("customer_id: a string of 1-200 characters")
    if not isinstance(body.get("dry_run", False), bool):
        problems.append("dry_run: must be true or false")
    events = body.get("events")
    rejected = body.get("rejected")
    if (events is None) == (rejected is None):
        problems.append("give either events (a list) or rejected (a reason, e.g. too_late)")
    elif events is not None and (
        not isinstance(events, list) or not 1 <= len(events) <= MAX_BACKFILL_EVENTS
    ):
        problems.append(f"events: must be a list of 1-{MAX_BACKFILL_EVENTS} events")
    elif rejected is not None and rejected != str(Reason.TOO_LATE):
        problems.append("rejected: only too_late events can be re-imported")
    if problems:
        raise CorrectionError(problems)
    options = {
        "author": author,
        "reason": reason,
        "dry_run": body.get("dry_run", False),
        "customer_id": body.get("customer_id"),
        "from": instant(body, "from", problems),
        "to": instant(body, "to", problems),
    }
    if problems:
        raise CorrectionError(problems)
    raws = None if events is None else [canonical_json(e).encode() for e in events]
    return options, raws


def register(routes: Routes, service: CorrectionService, meters: MetersConfig) -> None:
    """Add the routes; call before the guard is installed (pipeline/api/web.py)."""
    respond = routes.respond
    page = functools.partial(routes.page, bad_input=(CorrectionError,))

    def operator_name(request: Request) -> str:
        key = routes.operator(request, "correct history")
        return f"key {key.id} ({key.name})"

    @page("/v1/corrections")
    class Corrections(View):
        async def post(self, request: Request) -> Response:
            who = operator_name(request)
            correction = parse_correction(_body(await routes.json_body(request)), meters)
            doc = await service.correct(correction, who)
            status = 200 if correction.dry_run or doc.get("repeated") else 201
            return respond(self, doc, status)

        async def get(self, request: Request) -> Response:
            operator_name(request)
            try:
                limit = max(1, min(1000, int(request.query.get("limit", "100"))))
            except ValueError:
                raise CorrectionError("limit: a number of 1-1000") from None
            rows = await service.services.chio.call(store.corrections, limit)
            return respond(self, {"corrections": rows})

    @page("/v1/corrections/{correction_id}")
    class CorrectionOne(View):
        async def get(self, request: Request, correction_id: str) -> Response:
            operator_name(request)
            doc = await service.services.chio.call(
                store.correction, correction_id, with_events=True
            )
            if doc is None:
                return respond(self, {"error": f"no correction {correction_id!r}"}, 404)
            return respond(self, doc)

    @page("/v1/backfill")
    class Backfill(View):
        async def post(self, request: Request) -> Response:
            who = operator_name(request)
            options, raws = backfill_request(_body(await routes.json_body(request)))
            untimed = 0
            if raws is None:
                kept = await service.rejected(
                    str(Reason.TOO_LATE), options["customer_id"], options["from"], options["to"]
                )
                # an event sent without a timestamp was timed by its Kafka record, which the
                # dead letters do not keep: re-imported, it would count at today's time
                raws = [raw for raw in kept if _has_timestamp(raw)]
                untimed = len(kept) - len(raws)
            doc = await service.backfill(
                raws,
                author=options["author"],
                reason=options["reason"],
                dry_run=options["dry_run"],
                operator=who,
            )
            if untimed:
                doc["counts"]["no_timestamp"] = untimed
            return respond(self, doc, 200)
