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
- ``GET /v1/events/{customer_id}/{idempotency_key}``: one event's fate.
- ``POST /v1/meters/diff``: the record's totals under two meters files;
  ``POST /v1/meters/recompute/preview``: what a recompute of a meter's windows from the
  record would change (both read-only, an operator's key; pipeline/api/routes/meters.py).
- ``GET /billing[/{customer_id}]``: the billing page (pipeline/api/page.py), with
  ``/v1/customers/{id}/rejected`` and ``/stripe-status``; a billing link (a signed,
  expiring token for one customer, pipeline/api/links.py) reads these routes, never writes.
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
request body timeout that ``read_body`` (pipeline/api/http.py) applies. The routes
are in pipeline/api/routes/, one module per group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meterstream.api import guard, page
from meterstream.api.http import Routes, page_link_secret
from meterstream.api.keys import KeyStore
from meterstream.api.publisher import EventPublisher
from meterstream.api.routes import customers, events, fate, health, sql, stripe, usage
from meterstream.api.routes import meters as meters_routes
from meterstream.api.routes.health import ReadyCheck
from meterstream.billing.forwarding import Forwarder
from meterstream.worker.services import WorkerServices


def register(
    services: WorkerServices,
    ready: ReadyCheck,
    publisher: EventPublisher,
    keys: KeyStore,
    forwarder: Forwarder | None = None,
    *,
    extra_routes: Sequence[Callable[[Routes], None]] = (),
) -> None:
    """meterstream's routes, behind the guard of pipeline/api/guard.py (Host check, no
    other route served, body timeout). The Stripe routes need a ``forwarder`` (a meter
    that forwards to Stripe)."""
    settings, metrics, reads = services.settings, services.metrics, services.reads
    routes = Routes(services.app, settings, metrics, keys, page_link_secret(settings))
    health.register(routes, ready)
    events.register(routes, publisher)
    sql.register(routes, reads)
    usage.register(routes, reads)
    fate.register(routes, reads, services.meters)
    meters_routes.register(routes, reads)
    page.register(routes, reads)
    for more in extra_routes:  # e.g. the invoice routes (pipeline/api/invoices.py)
        more(routes)
    customers.register(routes, services.mappings, forwarder)
    if forwarder is not None:
        stripe.register(routes, forwarder)
    guard.install(
        services.app,
        settings,
        lambda status: metrics.api_requests.inc(route="guard", status=str(status)),
    )
