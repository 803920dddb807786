"""What stands in front of the emulator's routes: the Host check
(pipeline/webhosts.py), JSON-only changes through ``/_emulator``, and for the
API routes, in order: count, latency, injected faults, the rate limit, the
idempotent replay of ``Idempotency-Key`` requests, and a lost answer."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from meterstream.hosts import HostPolicy
from meterstream.sinks.stripe.emulator.protocol import ApiError
from meterstream.sinks.stripe.emulator.state import STATE_KEY, EmulatorState, FaultConfig

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_api(request: web.Request) -> bool:
    return request.path.startswith(("/v1/", "/v2/"))


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Order: count, latency, faults, rate limit, idempotent replay, handler, saving the
    executed answer for replay, and last a lost answer (``lost_answer_rate``)."""
    if not _is_api(request):
        try:
            return await handler(request)
        except ApiError as err:
            return err.response()
    state = request.app[STATE_KEY]
    state.stats.requests += 1
    faults = state.faults  # as the request found them, for all of its steps
    if faults.latency_ms:
        await asyncio.sleep(faults.latency_ms / 1000)
    refused = _injected_fault(state, faults) or _rate_limited(state, faults)
    if refused is not None:
        return refused.response()
    key = request.headers.get("Idempotency-Key") if request.method == "POST" else None
    fingerprint = ""
    if key:
        fingerprint = await _fingerprint(request)
        replay = _replay(state, key, fingerprint)
        if replay is not None:
            return replay
    # The handlers do not wait once they start (their body is read already), so two
    # requests with one key cannot run at once: no 409 idempotency_key_in_use here.
    try:
        response = await handler(request)
        executed = request.method == "POST" and 200 <= response.status < 300
    except ApiError as err:
        response, executed = err.response(), err.executed
    # Like Stripe, only executed requests are saved for replay (a declined charge
    # was executed: it made a PaymentIntent); a request that failed validation,
    # or was faulted or rate limited, is not.
    if key and executed and isinstance(response, web.Response):
        assert response.text is not None
        saved_reply = (state.clock(), fingerprint, response.status, response.text)
        state.idempotency[key] = saved_reply
        state.log("idempotency", key=key, value=list(saved_reply))
    return _lost(state, faults, executed) or response


def _lost(state: EmulatorState, faults: FaultConfig, executed: bool) -> web.Response | None:
    """A 500 in place of an executed POST's answer, drawn at ``lost_answer_rate``, or None."""
    if not executed or not faults.lost_answer_rate:
        return None
    if state.rng.random() >= faults.lost_answer_rate:
        return None
    state.stats.faults_injected += 1
    return ApiError(
        500, "The answer was lost (injected by the emulator after executing).", type="api_error"
    ).response()


def _injected_fault(state: EmulatorState, faults: FaultConfig) -> ApiError | None:
    """A 429 or 500 drawn from the seeded RNG at the configured rates, or None."""
    draw = state.rng.random() if (faults.rate_429 or faults.rate_500) else 1.0
    if draw < faults.rate_429:
        state.stats.faults_injected += 1
        return rate_limit_error()
    if draw < faults.rate_429 + faults.rate_500:
        state.stats.faults_injected += 1
        return ApiError(
            500, "An unknown error occurred (injected by the emulator).", type="api_error"
        )
    return None


def _rate_limited(state: EmulatorState, faults: FaultConfig) -> ApiError | None:
    """429 beyond ``rate_limit_per_second`` requests in this clock second, or None."""
    limit = faults.rate_limit_per_second
    if limit is None:
        return None
    second = int(state.clock())
    window_second, count = state.rate_window
    count = count + 1 if window_second == second else 1
    state.rate_window = (second, count)
    if count > limit:
        state.stats.rate_limited += 1
        return rate_limit_error()
    return None


async def _fingerprint(request: web.Request) -> str:
    """What an idempotent request is: its path, key and body."""
    body = await request.read()
    auth = request.headers.get("Authorization", "")
    return hashlib.sha256(b"\0".join([request.path.encode(), auth.encode(), body])).hexdigest()


def _replay(state: EmulatorState, key: str, fingerprint: str) -> web.StreamResponse | None:
    """The saved answer to this Idempotency-Key (400 if it came with other parameters),
    or None when the key is new."""
    saved = state.idempotency.get(key)
    if saved is None:
        return None
    _, saved_fingerprint, status, text = saved
    if saved_fingerprint != fingerprint:
        return ApiError(
            400,
            "Keys for idempotent requests can only be used with the same parameters "
            "they were first used with. Try using a key other than "
            f"'{key}' if you meant to execute a different request.",
            type="idempotency_error",
        ).response()
    return web.Response(
        text=text,
        status=status,
        content_type="application/json",
        headers={"Idempotent-Replayed": "true"},
    )


def rate_limit_error() -> ApiError:
    return ApiError(
        429,
        "Too many requests hit the API too quickly. We recommend an exponential backoff "
        "of your requests.",
        code="rate_limit",
    )


@web.middleware
async def controls_take_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A change through ``/_emulator`` must be JSON: no cross-site form or text/plain post."""
    if (
        request.path.startswith("/_emulator/")
        and request.method not in ("GET", "HEAD", "OPTIONS")
        and request.content_type != "application/json"
    ):
        message = "The /_emulator controls take Content-Type: application/json."
        return ApiError(415, message).response()
    return await handler(request)


def emulator_hosts(bind_host: str, allowed: Iterable[str] = ()) -> HostPolicy:
    """The names an emulator bound to ``bind_host`` answers to (pipeline/hosts.py)."""
    return HostPolicy.for_server(bind_host, allowed, hint="stripe-emulator --allowed-hosts")
