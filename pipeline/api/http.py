"""What every route of the worker's web API shares: the answer (JSON, counted in
``meterstream_api_requests_total``), the early answers (:class:`~meterstream.errors.Denied`),
the API key of a request, and its body, read within the body timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import faust
from aiohttp.web import RequestPayloadError
from faust.web import Request, Response, View

from meterstream.answers import dumps
from meterstream.api import guard, links
from meterstream.api.keys import ApiKey, KeyStore
from meterstream.billing.customers import check_customer_id
from meterstream.errors import Denied, DependencyError
from meterstream.metrics import Metrics
from meterstream.settings import Settings

log = logging.getLogger("meterstream.web")

UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="meterstream"'}
CLOSE = {"Connection": "close"}
Handler = Callable[..., Awaitable[Response]]
#: The methods of a faust View that answer requests.
HANDLER_METHODS = ("get", "post", "put", "patch", "delete")


def bearer_key(request: Request, keys: KeyStore) -> ApiKey:
    """The request's valid, unrevoked key, or 401."""
    scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
    key = keys.verify(token.strip()) if scheme.lower() == "bearer" else None
    if key is None:
        raise Denied(401, "a valid API key is required (Bearer msk_...)", UNAUTHORIZED)
    return key


def page_link_secret(settings: Settings) -> bytes | None:
    """The billing links' signing secret (pipeline/api/links.py), or None (every link
    refused) where the state dir cannot hold one."""
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


def only_customer(key: ApiKey | None, customer_id: str) -> None:
    """403 for a key restricted to another customer than ``customer_id``."""
    if key is not None and key.customer_id not in (None, customer_id):
        raise Denied(403, f"this key may only read customer {key.customer_id!r}")


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


def unrestricted(key: ApiKey | None, what: str) -> None:
    """403 for a key restricted to one customer: it cannot ``what`` (run SQL, manage
    Stripe forwarding or the customer mapping)."""
    if key is not None and key.customer_id is not None:
        raise Denied(403, f"a key restricted to one customer cannot {what}")


@dataclass(frozen=True)
class Routes:
    """What a group of routes (pipeline/api/routes/) registers with and answers through."""

    app: faust.App
    settings: Settings
    metrics: Metrics
    keys: KeyStore
    link_secret: bytes | None = None

    def respond(
        self, view: View, body: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> Response:
        """``body`` as JSON, counted under the view's name and the status."""
        self.metrics.api_requests.inc(route=type(view).__name__.lower(), status=str(status))
        return view.bytes(
            dumps(body), content_type="application/json", status=status, headers=headers
        )

    def guarded(self, handler: Handler, bad_input: tuple[type[Exception], ...] = ()) -> Handler:
        """The handler, with a :class:`Denied` raised in it answered as its JSON error, an
        exception of ``bad_input`` as 400 with its text, a failed dependency as 503."""

        async def run(view: View, request: Request, **kwargs: Any) -> Response:
            try:
                return await handler(view, request, **kwargs)
            except Denied as exc:
                return self.respond(view, {"error": exc.error}, exc.status, exc.headers)
            except bad_input as exc:
                return self.respond(view, {"error": str(exc)}, 400)
            except DependencyError as exc:
                return self.respond(view, {"error": f"ClickHouse: {exc}"}, 503)

        return run

    def page(
        self, path: str, bad_input: tuple[type[Exception], ...] = ()
    ) -> Callable[[type[View]], type[View]]:
        """A class decorator: the View registered at ``path``, each of its handlers
        (:data:`HANDLER_METHODS`) :meth:`guarded`."""

        def register(view: type[View]) -> type[View]:
            for name in HANDLER_METHODS:
                if name in vars(view):
                    setattr(view, name, self.guarded(vars(view)[name], bad_input))
            registered: type[View] = self.app.page(path)(view)
            return registered

        return register

    def key(self, request: Request) -> ApiKey:
        """The request's key; every write needs one (401 otherwise)."""
        return bearer_key(request, self.keys)

    def reader(self, request: Request) -> ApiKey | None:
        """The key of a read of customer data (:func:`read_key`): a billing link, a key,
        or none on loopback only (``METERSTREAM_API_READ_AUTH``)."""
        return read_key(request, self.settings, self.keys, self.link_secret)

    def customer_reader(self, request: Request, customer_id: str) -> ApiKey | None:
        """:meth:`reader`, and 403 unless the key may read ``customer_id``."""
        key = self.reader(request)
        only_customer(key, customer_id)
        return key

    def checked_customer(self, customer_id: str) -> str:
        """``customer_id`` as the contract allows it (1-200 characters), or 400."""
        try:
            return check_customer_id(customer_id)
        except ValueError as exc:
            raise Denied(400, str(exc)) from None

    def readable_customer(self, request: Request, customer_id: str) -> str:
        """``customer_id`` checked, once the request's key may read it (403 otherwise)."""
        self.customer_reader(request, customer_id)
        return self.checked_customer(customer_id)

    def operator(self, request: Request, what: str) -> ApiKey:
        """The request's key, unrestricted (a customer's key cannot ``what``: 403)."""
        key = self.key(request)
        unrestricted(key, what)
        return key

    async def json_body(self, request: Request) -> bytes:
        """The request's JSON body, within the size limit and the body timeout."""
        return await read_body(request, self.settings.api_max_body_bytes)
