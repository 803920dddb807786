"""Stripe's wire protocol as the emulator speaks it: v1 form bodies in bracket
notation, v2 JSON bodies, ``Authorization: Bearer`` keys, typed parameters, list
objects, ids and times, and Stripe-shaped error answers (:class:`ApiError`)."""

from __future__ import annotations

import json
import re
import secrets
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from meterstream.errors import MeterstreamError
from meterstream.sinks.stripe.emulator.state import STATE_KEY, EmulatorState

WHOLE_NUMBER = re.compile(r"-?[0-9]+")
_FORM_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


class ApiError(MeterstreamError):
    """A Stripe-shaped error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",
        duplicate: bool = False,
        extra: Mapping[str, Any] | None = None,
        executed: bool = False,
    ) -> None:
        super().__init__(message)
        self.duplicate = duplicate
        self.extra = dict(extra or {})
        # executed: the request changed the account (a declined charge made a
        # PaymentIntent), so, like Stripe, its answer is saved for Idempotency-Key replays
        self.executed = executed
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type

    def response(self) -> web.Response:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
        if self.param is not None:
            error["param"] = self.param
        error.update(self.extra)
        retry = self.status == 429 or self.status >= 500
        headers = {"Stripe-Should-Retry": "true" if retry else "false"}
        return web.json_response({"error": error}, status=self.status, headers=headers)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def rfc3339(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def parse_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Nest Stripe's bracket notation: ``payload[value]=1`` -> ``{"payload": {"value": "1"}}``.

    ``a[]=x`` and ``a[0]=x`` build lists; other brackets build dicts.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        match = _FORM_KEY.match(key)
        if match is None:
            raise ApiError(400, f"Invalid parameter name: {key}", code="parameter_unknown")
        parts = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt_is_list = not last and (parts[i + 1] == "" or parts[i + 1].isdigit())
            if isinstance(node, list):
                if part == "" or int(part) >= len(node):
                    node.append(value if last else ([] if nxt_is_list else {}))
                    node = node[-1]
                elif last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif last:
                node[part] = value
            else:
                node = node.setdefault(part, [] if nxt_is_list else {})
    return out


async def read_params(request: web.Request) -> dict[str, Any]:
    """The request's parameters: the query (GET), a JSON object (v2) or a form (v1)."""
    if request.method == "GET":
        return parse_form(request.query.items())
    raw = await request.read()
    if not raw:
        return {}
    if (request.content_type or "").endswith("json"):
        return _json_object(raw)
    pairs = urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True)
    return parse_form(pairs)


async def json_body(request: web.Request) -> dict[str, Any]:
    """A JSON object body (the ``/_emulator`` controls); {} when empty."""
    raw = await request.read()
    return _json_object(raw) if raw else {}


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "Invalid JSON body.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "You did not provide an API key. Provide it in the Authorization header "
            "(Authorization: Bearer YOUR_SECRET_KEY).",
        )
    return token.strip()


def require_api_key(request: web.Request) -> None:
    key = bearer(request)
    if not key.startswith(("sk_", "rk_")):
        raise ApiError(401, "Invalid API Key provided.")


async def authorized(request: web.Request) -> tuple[EmulatorState, dict[str, Any]]:
    """A handler's start: the API key checked, then the state and the request's parameters."""
    require_api_key(request)
    return request.app[STATE_KEY], await read_params(request)


def required_str(params: Mapping[str, Any], name: str, max_len: int | None = None) -> str:
    value = params.get(name)
    if value is None:
        raise ApiError(
            400, f"Missing required param: {name}.", code="parameter_missing", param=name
        )
    if not isinstance(value, str):
        raise ApiError(400, f"Invalid string: {name} must be a string.", param=name)
    if value.strip() == "":
        raise ApiError(
            400,
            f"You passed an empty string for '{name}'.",
            code="parameter_invalid_string_empty",
            param=name,
        )
    if max_len is not None and len(value) > max_len:
        raise ApiError(400, f"Invalid {name}: must be at most {max_len} characters.", param=name)
    return value


def int_param(params: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    value = params.get(name)
    if value is None:
        if required:
            raise ApiError(
                400, f"Missing required param: {name}.", code="parameter_missing", param=name
            )
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and WHOLE_NUMBER.fullmatch(value):
        return int(value)
    raise ApiError(
        400, "Invalid integer: " + str(value), code="parameter_invalid_integer", param=name
    )


def list_object(
    request: web.Request, items: list[dict[str, Any]], params: Mapping[str, Any]
) -> web.Response:
    limit = int_param(params, "limit", required=False) or 10
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit must be between 1 and 100.", param="limit")
    start = 0
    after = params.get("starting_after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(
                404, f"No such object: '{after}'", code="resource_missing", param="starting_after"
            )
        start = ids.index(after) + 1
    page = items[start : start + limit]
    return web.json_response(
        {
            "object": "list",
            "data": page,
            "has_more": start + limit < len(items),
            "url": request.path,
        }
    )


def known_params(params: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Refuse a parameter the endpoint does not take, as Stripe does (``parameter_unknown``)."""
    for name in params:
        if name not in allowed:
            raise ApiError(
                400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name
            )


def bool_param(params: Mapping[str, Any], name: str, default: bool = False) -> bool:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise ApiError(400, f"Invalid boolean: {value}", param=name)


def metadata_param(
    params: Mapping[str, Any], current: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``metadata[...]`` merged into ``current`` (an empty value removes a key), by Stripe's
    limits: at most 50 keys of at most 40 characters, values of at most 500."""
    out = dict(current or {})
    raw = params.get("metadata")
    if raw is None or raw == "":
        return {} if raw == "" else out
    if not isinstance(raw, dict):
        raise ApiError(400, "Invalid metadata: must be a hash.", param="metadata")
    for key, value in raw.items():
        if not isinstance(value, str) or len(key) > 40 or len(value) > 500:
            raise ApiError(
                400,
                "Invalid metadata: keys are at most 40 characters and values strings of "
                "at most 500.",
                param=f"metadata[{key}]",
            )
        if value == "":
            out.pop(key, None)
        else:
            out[key] = value
    if len(out) > 50:
        raise ApiError(400, "Invalid metadata: at most 50 keys.", param="metadata")
    return out


def no_such(kind: str, object_id: Any, param: str | None, status: int = 400) -> ApiError:
    """Stripe's answer to an id it does not know: 404 in the path, 400 in a parameter."""
    return ApiError(status, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


def newest_first(
    request: web.Request, objects: Iterable[Mapping[str, Any]], params: Mapping[str, Any], by: str
) -> web.Response:
    """A list object of ``objects`` (oldest first), newest first, keeping those whose ``by``
    equals the ``by`` parameter when it is given (Stripe's list filters)."""
    wanted = params.get(by)
    kept = [dict(o) for o in objects if wanted in (None, o.get(by))]
    return list_object(request, kept[::-1], params)
