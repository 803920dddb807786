"""Meter definitions against the record; read-only, an operator's key (a key
restricted to a customer cannot: 403).

``POST /v1/meters/diff``: the totals of the record under two meters files
(``meterstream meters diff`` while this worker holds ClickHouse).

Body: ``{"old": "<meters YAML>", "new": "<meters YAML>", "from": ..., "to": ...,
"customer": ..., "meter": ..., "by_window": false}`` (times RFC 3339 or epoch ms;
``old``, ``new``, ``from`` and ``to`` required). Everything is validated first: 400
with every problem, each with its path (``old: meters[0].versions[1].effective_until:
...``).

``POST /v1/meters/recompute``: ``{"meter": ..., "from": ..., "to": ..., "customer":
..., "reason": ..., "author": ..., "correction_id": ..., "dry_run": false, "by_window":
false}``: the meter's windows of the range rebuilt from the record under this worker's
meters file, as a correction of kind ``recompute`` in the corrections log
(pipeline/worker/recompute.py). ``dry_run``: what it would change (the windows as
stored against the record's fold), read-only; ``reason`` is required otherwise. A
repeat with the same ``correction_id`` rebuilds the same windows again.
"""

from __future__ import annotations

from typing import Any

import orjson
import yaml
from faust.web import Request, Response, View

from meterstream.api.http import Routes
from meterstream.billing.record import diff_from_record
from meterstream.corrections.request import CORRECTION_ID
from meterstream.errors import ConfigError, CorrectionError, Denied
from meterstream.events import parse_time
from meterstream.meters.config import MetersConfig, parse_meters, yaml_load_exact
from meterstream.meters.diff import DiffScope
from meterstream.sinks.clickhouse.client import ClickHouse
from meterstream.sinks.clickhouse.reads import ReadIO
from meterstream.worker import recompute
from meterstream.worker.corrections import CorrectionService

MAX_RANGE_MS = 400 * 86_400_000
"""The longest range one request reads (the record's events of it are held in memory)."""
FIELDS = frozenset({"old", "new", "from", "to", "customer", "meter", "by_window"})
RECOMPUTE_FIELDS = frozenset(
    {"meter", "from", "to", "customer", "by_window", "dry_run", "author", "reason", "correction_id"}
)


def register(routes: Routes, reads: ReadIO) -> None:
    respond = routes.respond

    @routes.page("/v1/meters/diff")
    class MetersDiff(View):
        async def post(self, request: Request) -> Response:
            routes.operator(request, "compare meter definitions")
            body = await _object(routes, request)
            problems = [f"{key}: unknown field" for key in sorted(set(body) - FIELDS)]
            old, new = (_config(body, side, problems) for side in ("old", "new"))
            start, end = _time(body, "from", problems), _time(body, "to", problems)
            customer, meter = _text(body, "customer", problems), _text(body, "meter", problems)
            by_window = _flag(body, "by_window", problems)
            _check_range(start, end, problems)
            names = {m.name for c in (old, new) if c is not None for m in c.meters}
            if old is not None and new is not None and meter is not None and meter not in names:
                problems.append(f"meter: {meter!r} is in neither meters file")
            if problems or old is None or new is None or start is None or end is None:
                return respond(self, {"error": "invalid request", "problems": problems}, 400)
            scope = DiffScope(start, end, customer, meter, bool(by_window))
            return respond(self, await reads.read(_diff, old, new, scope))


def _diff(ch: ClickHouse, old: MetersConfig, new: MetersConfig, scope: DiffScope) -> dict[str, Any]:
    return diff_from_record(ch, old, new, scope).as_json()


def register_recompute(
    routes: Routes, reads: ReadIO, service: CorrectionService, meters: MetersConfig
) -> None:
    """``POST /v1/meters/recompute`` (it needs the worker's correction service)."""
    respond = routes.respond

    @routes.page("/v1/meters/recompute")
    class MetersRecompute(View):
        async def post(self, request: Request) -> Response:
            key = routes.operator(request, "recompute a meter")
            body = await _object(routes, request)
            problems = [f"{name}: unknown field" for name in sorted(set(body) - RECOMPUTE_FIELDS)]
            start, end = _time(body, "from", problems), _time(body, "to", problems)
            customer, meter = _text(body, "customer", problems), _text(body, "meter", problems)
            by_window = _flag(body, "by_window", problems)
            dry_run = _flag(body, "dry_run", problems)
            author = _text(body, "author", problems) or ""
            reason = body.get("reason")
            if not dry_run and not (isinstance(reason, str) and 1 <= len(reason) <= 1000):
                problems.append("reason: required, a string of 1-1000 characters")
            cid = body.get("correction_id")
            if cid is not None and not (isinstance(cid, str) and CORRECTION_ID.fullmatch(cid)):
                problems.append("correction_id: 1-100 letters, digits and _.:-")
            _check_range(start, end, problems)
            if meter is None:
                problems.append("meter: required")
            elif meter not in {m.name for m in meters.meters}:
                problems.append(f"meter: {meter!r} is not a meter of this worker's file")
            if problems or meter is None or start is None or end is None:
                return respond(self, {"error": "invalid request", "problems": problems}, 400)
            if dry_run:
                answer = await reads.read(
                    recompute.preview, meters, meter, start, end, customer, by_window
                )
                return respond(self, answer)
            try:
                answer = await recompute.recompute(
                    service,
                    meter,
                    start,
                    end,
                    customer=customer,
                    author=author,
                    reason=str(reason),
                    operator=f"key {key.id} ({key.name})",
                    correction_id=cid,
                )
            except CorrectionError as exc:
                return respond(self, {"error": str(exc)}, 409)
            return respond(self, answer)


async def _object(routes: Routes, request: Request) -> dict[str, Any]:
    """The request's body, a JSON object (400 otherwise)."""
    try:
        body = orjson.loads(await routes.json_body(request))
    except ValueError:
        raise Denied(400, "body must be a JSON object") from None
    if not isinstance(body, dict):
        raise Denied(400, "body must be a JSON object")
    return body


def _flag(body: dict[str, Any], name: str, problems: list[str]) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        problems.append(f"{name}: must be true or false")
        return False
    return value


def _check_range(start: int | None, end: int | None, problems: list[str]) -> None:
    if start is not None and end is not None and not 0 < end - start <= MAX_RANGE_MS:
        problems.append("to: must be after from, and at most 400 days after it")


def _config(body: dict[str, Any], side: str, problems: list[str]) -> MetersConfig | None:
    text = body.get(side)
    if not isinstance(text, str):
        problems.append(f"{side}: required, a meters YAML document as a string")
        return None
    if _has_alias(text):
        problems.append(f"{side}: YAML anchors and aliases are not accepted here")
        return None
    try:
        return parse_meters(yaml_load_exact(text), side)
    except ConfigError as exc:
        problems += [f"{side}: {line}" for line in exc.problems]
    except Exception as exc:  # a YAML syntax error, said as a problem of that side
        problems.append(f"{side}: not YAML: {str(exc).splitlines()[0] if str(exc) else exc}")
    return None


def _has_alias(text: str) -> bool:
    """Whether the YAML text uses an alias (``*name``): a few bytes of aliases can stand
    for a document too large to validate, so a request may not use them."""
    try:
        return any(isinstance(token, yaml.AliasToken) for token in yaml.scan(text))
    except yaml.YAMLError:
        return False  # the parse says what is wrong


def _time(body: dict[str, Any], name: str, problems: list[str]) -> int | None:
    """``body[name]``, a required time (RFC 3339 or epoch ms), as epoch ms."""
    value = body.get(name)
    try:
        if value in ("", None) or not isinstance(value, str | int) or isinstance(value, bool):
            raise ValueError("required, RFC 3339 or epoch milliseconds")
        return parse_time(str(value))
    except ValueError as exc:
        problems.append(f"{name}: {exc}")
        return None


def _text(body: dict[str, Any], name: str, problems: list[str]) -> str | None:
    value = body.get(name)
    if value is None or (isinstance(value, str) and 0 < len(value) <= 200):
        return value
    problems.append(f"{name}: must be a string of 1-200 characters")
    return None
