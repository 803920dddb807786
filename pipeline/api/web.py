"""The worker's HTTP endpoints (Faust's web server).

- ``GET /healthz``: liveness (the process serves requests); never shows settings.
- ``GET /readyz``: broker, ClickHouse and Stripe reachable (and the API keys file's
  state, which does not make the worker unready: it serves the last good keys).
- ``GET /metrics``: Prometheus text format.
- ``GET /openapi.json``: the OpenAPI 3.1 document of this API.
- ``POST /v1/events``: one event or ``{"events": [...]}`` (1-100), all or nothing,
  written to ``usage-events`` with acks=all; always needs an API key.
- ``POST /v1/sql`` ``{"sql": "SELECT ..."}``: read-only SQL, checked on ClickHouse's
  parse of it and run within the operator's limits on threads and connections of its
  own (:mod:`meterstream.sinks.clickhouse.reads`), stopped when the client goes away;
  the way to query the embedded engine while the worker holds it.
- ``GET /v1/customers/{customer_id}/usage?meter=&from=&to=&window=``: usage totals.
- ``POST /v1/stripe/retry``, ``GET /v1/stripe/reconcile?period=YYYY-MM``: what the
  ``meterstream stripe`` commands use while this worker holds ClickHouse (only
  when a meter forwards to Stripe). Retry writes, so it always needs a key;
  reconcile reads, like SQL, and a customer-restricted key can do neither.
- ``GET /v1/stripe/customers``, ``GET|PUT|DELETE /v1/stripe/customers/{customer_id}``
  (``{"stripe_customer_id": "cus_..."}``): the operator's customer mapping, what
  ``meterstream customers`` uses while this worker holds ClickHouse. Writes always
  need a key, reads like SQL; a customer-restricted key can do neither.

The two reads of customer data need a key too, unless the server listens on
loopback only (``METERSTREAM_API_READ_AUTH``). A key restricted to a customer
sends and reads that customer only, and cannot run SQL (on loopback too, when sent).

Every route is behind pipeline/api/guard.py: the Host check (DNS rebinding) before
any handler, 404 for any route not registered here (Faust's own views), and the
request body timeout that ``read_body`` applies.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import faust
import orjson
from aiohttp.web import RequestPayloadError
from faust.web import Request, Response, View

from meterstream.api import guard, links, page
from meterstream.api.fate import read_fate
from meterstream.api.ingest import MalformedBody, check_body
from meterstream.api.keys import ApiKey, KeyStore
from meterstream.api.openapi import document
from meterstream.api.publisher import EventPublisher, PublishError
from meterstream.errors import (
    DependencyError,
    QueryCancelled,
    QueryLimitExceeded,
    QueryRefused,
    StripeError,
)
from meterstream.events import parse_timestamp
from meterstream.meters.config import MetersConfig, load_meters, meters_path
from meterstream.meters.windows import month_bounds, period_label
from meterstream.metrics import Metrics
from meterstream.settings import Settings
from meterstream.sinks.clickhouse import queries
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.reads import ReadIO, SqlBusy

if TYPE_CHECKING:
    from meterstream.billing.customers import MappingStore
    from meterstream.billing.forwarding import Forwarder

ReadyCheck = Callable[[], Awaitable[dict[str, str]]]
log = logging.getLogger("meterstream.web")


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return str(obj)
    if isinstance(obj, dt.datetime):
        if obj.tzinfo is None:
            obj = obj.replace(tzinfo=dt.UTC)
        return obj.isoformat()
    if isinstance(obj, dt.date):
        return obj.isoformat()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    return str(obj)  # UUID, IP addresses, ...: what an analyst query may select


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, default=_default)


def parse_time(text: str | None) -> int | None:
    """RFC 3339 or epoch ms -> epoch ms."""
    if not text:
        return None
    if text.lstrip("-").isdigit():
        return parse_timestamp(int(text))
    if dt.datetime.fromisoformat(text).tzinfo is None:
        text += "+00:00"  # a query parameter without an offset means UTC
    return parse_timestamp(text)


class Denied(Exception):
    """An early answer (400, 401, 403, 408, 413, 415) with a JSON body."""

    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers or {}


UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="meterstream"'}
CLOSE = {"Connection": "close"}


def bearer_key(request: Request, keys: KeyStore) -> ApiKey:
    """The request's valid, unrevoked key, or 401."""
    scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
    key = keys.verify(token.strip()) if scheme.lower() == "bearer" else None
    if key is None:
        raise Denied(401, "a valid API key is required (Bearer msk_...)", UNAUTHORIZED)
    return key


def page_link_secret(settings: Settings) -> bytes | None:
    """The billing links' signing secret, or None (links refused) where the state dir
    cannot hold one."""
    try:
        return links.link_secret(settings, create=True)
    except OSError as exc:  # a state dir this worker may not write: no links, said once
        log.warning("billing links are off: no signing secret (%s)", exc)
        return None


def read_key(
    request: Request, settings: Settings, keys: KeyStore, link_secret: bytes | None
) -> ApiKey | None:
    """Who reads customer data: a billing link (its one customer, until it expires), a
    valid key, or None on loopback without ``METERSTREAM_API_READ_AUTH=required``."""
    scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and token.strip().startswith(links.PREFIX):
        link = None
        if link_secret is not None:
            link = links.link_key(link_secret, token.strip(), time.time())
        if link is None:
            raise Denied(401, "the billing link is not valid or has expired", UNAUTHORIZED)
        return link
    if settings.reads_need_key:
        return bearer_key(request, keys)
    # Loopback: no key is needed, but a valid key that is sent keeps its customer
    # restriction (one this worker does not know is as good as none).
    try:
        return bearer_key(request, keys) if "Authorization" in request.headers else None
    except Denied:
        return None


def json_routes(
    metrics: Metrics, bad_input: tuple[type[Exception], ...] = ()
) -> tuple[
    Callable[..., Response],
    Callable[[Callable[..., Awaitable[Response]]], Callable[..., Awaitable[Response]]],
]:
    """``respond`` and ``guarded`` for routes added beside this module's (invoices,
    credits): JSON answers counted in the API metrics; :class:`Denied` answers its status,
    an exception of ``bad_input`` 400 with its text, a ClickHouse failure 503."""

    def respond(view: View, body: Any, status: int = 200) -> Response:
        metrics.api_requests.inc(route=type(view).__name__.lower(), status=str(status))
        return view.bytes(dumps(body), content_type="application/json", status=status)

    def guarded(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        async def run(view: View, request: Request, **kwargs: Any) -> Response:
            try:
                return await handler(view, request, **kwargs)
            except Denied as exc:
                metrics.api_requests.inc(route=type(view).__name__.lower(), status=str(exc.status))
                return view.bytes(
                    dumps({"error": exc.error}),
                    content_type="application/json",
                    status=exc.status,
                    headers=exc.headers,
                )
            except bad_input as exc:
                return respond(view, {"error": str(exc)}, 400)
            except DependencyError as exc:
                return respond(view, {"error": f"ClickHouse: {exc}"}, 503)

        return run

    return respond, guarded


def client_gone(request: Any) -> bool:
    """True once the HTTP client has closed its connection (aiohttp does not cancel the
    handler then: Faust's web server runs without handler cancellation)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def read_body(request: Any, limit: int) -> bytes:
    """The body as JSON bytes, or 415 (not JSON) / 413 (over ``limit``) / 408 (not all
    there within the body timeout, ``METERSTREAM_API_BODY_TIMEOUT_SECONDS``: a body that
    stalls or trickles holds a handler no longer than that).

    A client that goes away mid-body is one line at INFO, not a traceback (its 400
    reaches nobody but the metrics).
    """
    if request.content_type != "application/json":
        raise Denied(415, "Content-Type must be application/json")
    length = request.content_length
    if length is not None and length > limit:
        raise Denied(413, f"body is {length} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    seconds = guard.body_timeout(request)
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise Denied(413, f"body is over the {limit}-byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise Denied(408, f"the request body did not arrive within {seconds:g} s", CLOSE) from None
    except ConnectionError as exc:
        log.info("%s %s: the client went away mid-body (%s)", request.method, request.path, exc)
        raise Denied(400, "the client closed the connection mid-body", CLOSE) from None
    except RequestPayloadError as exc:  # e.g. broken chunked encoding
        raise Denied(400, f"malformed request body: {exc}", CLOSE) from None
    return b"".join(chunks)


def register(
    app: faust.App,
    settings: Settings,
    chio: ClickHouseIO,
    metrics: Metrics,
    ready: ReadyCheck,
    publisher: EventPublisher,
    keys: KeyStore,
    forwarder: Forwarder | None = None,
    mappings: MappingStore | None = None,
    *,
    reads: ReadIO,
    meters: MetersConfig | None = None,
) -> None:
    """meterstream's routes, behind the guard of pipeline/api/guard.py (Host check, no
    other route served, body timeout)."""
    _routes(
        app,
        settings,
        chio,
        metrics,
        ready,
        publisher,
        keys,
        forwarder,
        mappings,
        reads=reads,
        meters=meters,
    )
    guard.install(
        app, settings, lambda status: metrics.api_requests.inc(route="guard", status=str(status))
    )


def _routes(
    app: faust.App,
    settings: Settings,
    chio: ClickHouseIO,
    metrics: Metrics,
    ready: ReadyCheck,
    publisher: EventPublisher,
    keys: KeyStore,
    forwarder: Forwarder | None = None,
    mappings: MappingStore | None = None,
    *,
    reads: ReadIO,
    meters: MetersConfig | None = None,
) -> None:
    horizon_ms = settings.dedup_horizon_seconds * 1000
    the_meters = meters if meters is not None else load_meters(meters_path(settings))
    openapi = dumps(document())

    def respond(
        view: View, body: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> Response:
        metrics.api_requests.inc(route=type(view).__name__.lower(), status=str(status))
        return view.bytes(
            dumps(body), content_type="application/json", status=status, headers=headers
        )

    def guarded(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        async def run(view: View, request: Request, **kwargs: Any) -> Response:
            try:
                return await handler(view, request, **kwargs)
            except Denied as exc:
                return respond(view, {"error": exc.error}, exc.status, exc.headers)

        return run

    link_secret = page_link_secret(settings)

    def reader(request: Request) -> ApiKey | None:
        return read_key(request, settings, keys, link_secret)

    @app.page("/healthz")
    class Health(View):
        async def get(self, request: Request) -> Response:
            return respond(self, {"status": "ok"})

    @app.page("/readyz")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            checks = await ready()
            ok = all(v == "ok" for v in checks.values())
            body = {"ready": ok, "checks": checks, "api_keys": keys.status()}
            return respond(self, body, 200 if ok else 503)

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.text(metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/openapi.json")
    class OpenAPI(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(openapi, content_type="application/json")

    @app.page("/v1/events")
    class Events(View):
        @guarded
        async def post(self, request: Request) -> Response:
            key = bearer_key(request, keys)
            body = await read_body(request, settings.api_max_body_bytes)
            try:
                check, problems = check_body(
                    body,
                    now_ms=time.time_ns() // 1_000_000,
                    horizon_ms=horizon_ms,
                    customer_id=key.customer_id,
                )
            except MalformedBody as exc:
                return respond(self, {"error": str(exc)}, 400)
            if problems or check.errors:
                bad = len(check.errors)
                error = problems[0] if problems else f"{bad} event(s) invalid"
                return respond(
                    self,
                    {"error": f"{error}; nothing was written", "errors": check.errors},
                    422,
                )
            if check.forbidden:
                return respond(
                    self,
                    {
                        "error": "events for another customer; nothing was written",
                        "errors": check.forbidden,
                    },
                    403,
                )
            try:
                await publisher.publish(check.records)
            except PublishError as exc:
                return respond(
                    self,
                    {"error": f"{exc}; retry with the same idempotency keys"},
                    503,
                    {"Retry-After": "1"},
                )
            metrics.api_events.inc(len(check.records))
            accepted = [
                {"idempotency_key": r.idempotency_key, "generated": r.generated}
                for r in check.records
            ]
            return respond(self, {"accepted": len(accepted), "events": accepted}, 202)

    @app.page("/v1/sql")
    class SQL(View):
        @guarded
        async def post(self, request: Request) -> Response:
            key = reader(request)
            if key is not None and key.customer_id is not None:
                raise Denied(403, "a key restricted to one customer cannot run SQL")
            try:
                body = orjson.loads(await read_body(request, settings.api_max_body_bytes))
                sql = body["sql"]
                if not isinstance(sql, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return respond(self, {"error": 'body must be JSON {"sql": "SELECT ..."}'}, 400)
            try:
                columns, rows = await reads.sql(sql, lambda: client_gone(request))
            except QueryRefused as exc:
                return respond(self, {"error": str(exc), "problems": exc.problems}, 400)
            except QueryLimitExceeded as exc:
                return respond(self, {"error": str(exc), "limit": exc.setting}, 400)
            except QueryCancelled as exc:  # nobody is listening; for the access log
                return respond(self, {"error": str(exc)}, 499)
            except SqlBusy as exc:
                return respond(self, {"error": str(exc)}, 503, {"Retry-After": "5"})
            except Exception as exc:  # the analyst's SQL error, reported back
                return respond(self, {"error": str(exc)}, 400)
            return respond(self, {"columns": columns, "rows": rows})

    def customer_reader(request: Request, customer_id: str) -> None:
        key = reader(request)
        if key is not None and key.customer_id not in (None, customer_id):
            raise Denied(403, f"this key may only read customer {key.customer_id!r}")

    page.register(app, respond, guarded, customer_reader, reads)

    @app.page("/v1/customers/{customer_id}/usage")
    class Usage(View):
        @guarded
        async def get(self, request: Request, customer_id: str) -> Response:
            customer_reader(request, customer_id)
            q = request.query
            window = q.get("window")
            if window not in (None, "hour", "day", "month"):
                return respond(self, {"error": "window must be hour, day or month"}, 400)
            try:
                start, end = parse_time(q.get("from")), parse_time(q.get("to"))
            except ValueError as exc:
                return respond(self, {"error": f"bad time: {exc}"}, 400)
            try:
                rows = await reads.read(
                    queries.usage, customer_id, q.get("meter") or None, start, end, window
                )
            except DependencyError as exc:
                return respond(self, {"error": f"ClickHouse: {exc}"}, 503)
            return respond(self, {"customer_id": customer_id, "usage": rows})

    @app.page("/v1/events/{customer_id}/{idempotency_key}")
    class EventFate(View):
        """Why an event is or is not counted (pipeline/api/fate.py)."""

        @guarded
        async def get(self, request: Request, customer_id: str, idempotency_key: str) -> Response:
            customer_reader(request, customer_id)
            try:
                answer = await reads.read(read_fate, customer_id, idempotency_key, the_meters)
            except DependencyError as exc:
                return respond(self, {"error": f"ClickHouse: {exc}"}, 503)
            return respond(self, answer)

    if mappings is not None:
        _customer_routes(app, settings, respond, guarded, reader, keys, mappings, forwarder)
    if forwarder is None:
        return
    stripe = forwarder

    def operator(request: Request, key: ApiKey | None) -> None:
        if key is not None and key.customer_id is not None:
            raise Denied(403, "a key restricted to one customer cannot manage Stripe forwarding")

    @app.page("/v1/stripe/retry")
    class StripeRetry(View):
        @guarded
        async def post(self, request: Request) -> Response:
            operator(request, bearer_key(request, keys))
            try:
                rows = await stripe.retry_errors()
            except StripeError as exc:
                return respond(self, {"error": str(exc), "code": exc.code}, 502)
            from meterstream.billing.forwarding import row_summary

            return respond(self, {"rows": [row_summary(r) for r in rows]})

    @app.page("/v1/stripe/reconcile")
    class StripeReconcile(View):
        @guarded
        async def get(self, request: Request) -> Response:
            operator(request, reader(request))
            period = request.query.get("period") or period_label(time.time_ns() // 1_000_000)
            try:
                month_bounds(period)
            except ValueError as exc:
                return respond(self, {"error": str(exc)}, 400)
            try:
                diffs = await stripe.reconcile(period)
            except StripeError as exc:
                return respond(self, {"error": str(exc), "code": exc.code}, 502)
            return respond(
                self,
                {
                    "period": period,
                    "differences": [d.as_dict() for d in diffs],
                    "lines": [d.describe() for d in diffs],
                },
            )


def _customer_routes(
    app: faust.App,
    settings: Settings,
    respond: Callable[..., Response],
    guarded: Callable[..., Any],
    reader: Callable[[Request], ApiKey | None],
    keys: KeyStore,
    mappings: MappingStore,
    forwarder: Forwarder | None,
) -> None:
    """``/v1/stripe/customers[/{customer_id}]``: the operator's customer mapping
    (pipeline/billing/customers.py). Reads like SQL; writes always need a key; a key
    restricted to one customer can do neither (it must not pick who pays)."""
    from meterstream.billing.customers import check_customer_id, mapping_document
    from meterstream.billing.stripe_ids import check_stripe_customer_id

    def operator_only(key: ApiKey | None) -> None:
        if key is not None and key.customer_id is not None:
            raise Denied(403, "a key restricted to one customer cannot manage the customer mapping")

    def read_key(request: Request) -> ApiKey | None:
        """Reads follow the read rule, but a key that is sent is always checked."""
        if request.headers.get("Authorization"):
            return bearer_key(request, keys)
        return reader(request)

    def held(customer: str | None = None) -> list[dict[str, str]]:
        if forwarder is None:
            return []
        return [
            {"meter": meter, "customer_id": c, "reason": why}
            for meter, by_customer in sorted(forwarder.held.items())
            for c, why in sorted(by_customer.items())
            if customer in (None, c)
        ]

    def customer_of(customer_id: str) -> str:
        try:
            return check_customer_id(customer_id)
        except ValueError as exc:
            raise Denied(400, str(exc)) from None

    def changed_by(key: ApiKey) -> str:
        return f"key {key.id} ({key.name})"

    async def change(view: View, key: ApiKey, customer: str, stripe_id: str | None) -> Response:
        try:
            row, published = await mappings.change(customer, stripe_id, "api", changed_by(key))
        except DependencyError as exc:
            return respond(view, {"error": f"ClickHouse: {exc}"}, 503)
        return respond(view, {"change": row.public() if row else None, "published": published})

    @app.page("/v1/stripe/customers")
    class StripeCustomers(View):
        @guarded
        async def get(self, request: Request) -> Response:
            operator_only(read_key(request))
            try:
                rows = await mappings.rows()
            except DependencyError as exc:
                return respond(self, {"error": f"ClickHouse: {exc}"}, 503)
            current = [r.public() for r in rows.values() if r.stripe_customer_id]
            return respond(self, {"customers": current, "held": held()})

    @app.page("/v1/stripe/customers/{customer_id}")
    class StripeCustomer(View):
        @guarded
        async def get(self, request: Request, customer_id: str) -> Response:
            operator_only(read_key(request))
            customer = customer_of(customer_id)
            try:
                history = await mappings.history(customer)
            except DependencyError as exc:
                return respond(self, {"error": f"ClickHouse: {exc}"}, 503)
            return respond(self, mapping_document(customer, history, held(customer)))

        @guarded
        async def put(self, request: Request, customer_id: str) -> Response:
            key = bearer_key(request, keys)
            operator_only(key)
            customer = customer_of(customer_id)
            try:
                body = orjson.loads(await read_body(request, settings.api_max_body_bytes))
                stripe_id = check_stripe_customer_id(body["stripe_customer_id"])
            except (ValueError, KeyError, TypeError) as exc:
                detail = exc if isinstance(exc, ValueError) else "missing stripe_customer_id"
                return respond(
                    self,
                    {"error": f'body must be JSON {{"stripe_customer_id": "cus_..."}}: {detail}'},
                    400,
                )
            return await change(self, key, customer, stripe_id)

        @guarded
        async def delete(self, request: Request, customer_id: str) -> Response:
            key = bearer_key(request, keys)
            operator_only(key)
            return await change(self, key, customer_of(customer_id), None)
