"""The OpenAPI 3.1 document of the worker's web API, served at ``/openapi.json``.

Written by hand next to the routes (pipeline/api/routes/; here one function per group
of paths) and checked against them by the schemathesis test
(tests/integration/test_web_api_fuzz.py), which sends what this document allows,
and much that it does not, to a real worker.
"""

from __future__ import annotations

from typing import Any

from meterstream.api.fate import FATES
from meterstream.api.ingest import MAX_BATCH_EVENTS
from meterstream.events import MAX_PROPERTIES_DEPTH

VERSION = "1"


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, **headers: str) -> dict[str, Any]:
    response = _json({"$ref": "#/components/schemas/Error"}, description)
    if headers:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return response


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


KEY_REQUIRED: list[dict[str, list[str]]] = [{"apiKey": []}]
_RETRY_AFTER = {"Retry-After": "Seconds to wait"}
_TOO_LARGE = _error("The body is over the size limit.")
_NOT_JSON = _error("Content-Type is not application/json.")
_CLICKHOUSE_DOWN = _error("ClickHouse unavailable.")
_OPERATOR_ONLY = _error("A key restricted to a customer cannot do this.")
_RESTRICTED = _error("The key is restricted to another customer.")
_UNAUTHORIZED = _error(
    "No valid API key (missing, unknown or revoked).",
    **{"WWW-Authenticate": "Bearer challenge"},
)

EVENT = {
    "type": "object",
    "description": "One usage event (DESIGN.md, 'The event').",
    "required": ["event_name", "customer_id"],
    "additionalProperties": False,
    "properties": {
        "event_name": {"type": "string", "minLength": 1, "maxLength": 100},
        "customer_id": {"type": "string", "minLength": 1, "maxLength": 200},
        "idempotency_key": {
            "type": ["string", "null"],
            "minLength": 1,
            "maxLength": 200,
            "description": "Same key, same event: counted once. Omitted: derived from the "
            "content (name, customer, timestamp, properties) and returned.",
        },
        "timestamp": {
            "description": "When the usage happened: RFC 3339 with an offset, or epoch "
            "milliseconds. At most 5 minutes ahead and within the dedup horizon. "
            "Omitted: the time the API received it.",
            "oneOf": [
                {"type": "string", "format": "date-time"},
                {"type": "integer", "minimum": 0},
                {"type": "null"},
            ],
        },
        "properties": {
            "type": "object",
            "description": f"Free-form, at most {MAX_PROPERTIES_DEPTH} levels deep. Numbers "
            "are kept exact (never rounded through a float).",
        },
    },
}

_CHANGE = {
    "type": "object",
    "required": ["change", "published"],
    "properties": {
        "change": {"oneOf": [{"$ref": "#/components/schemas/MappingChange"}, {"type": "null"}]},
        "published": {"type": "boolean", "description": "also written to the customers topic"},
    },
}

SCHEMAS: dict[str, Any] = {
    "Event": EVENT,
    "EventBatch": {
        "type": "object",
        "required": ["events"],
        "additionalProperties": False,
        "properties": {
            "events": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_BATCH_EVENTS,
                "items": {"$ref": "#/components/schemas/Event"},
            }
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["accepted", "events"],
        "properties": {
            "accepted": {"type": "integer"},
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["idempotency_key", "generated"],
                    "properties": {
                        "idempotency_key": {"type": "string"},
                        "generated": {"type": "boolean"},
                    },
                },
            },
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "errors": {
                "type": "array",
                "description": "Per event, by its index in the batch.",
                "items": {
                    "type": "object",
                    "required": ["index", "problems"],
                    "properties": {
                        "index": {"type": "integer"},
                        "problems": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
            "problems": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Why read-only SQL refused the statement (nothing ran).",
            },
            "limit": {
                "type": "string",
                "description": "The METERSTREAM_SQL_ setting a query went over, with its value.",
            },
        },
    },
    "SqlResult": {
        "type": "object",
        "required": ["columns", "rows"],
        "properties": {
            "columns": {"type": "array", "items": {"type": "string"}},
            "rows": {"type": "array", "items": {"type": "array"}},
        },
    },
    "MappingChange": {
        "type": "object",
        "description": "One change of a customer's mapping (the audit trail).",
        "required": ["customer_id", "stripe_customer_id", "origin", "changed_by", "changed_at"],
        "properties": {
            "customer_id": {"type": "string"},
            "stripe_customer_id": {"type": ["string", "null"], "description": "null: removed"},
            "origin": {"type": "string", "enum": ["api", "cli", "topic"]},
            "changed_by": {"type": "string"},
            "changed_at": {"type": "string", "format": "date-time"},
            "version": {"type": "integer"},
        },
    },
    "Held": {
        "type": "object",
        "description": "A customer the forwarder holds (no Stripe id, or a refused one).",
        "required": ["meter", "customer_id", "reason"],
        "properties": {
            "meter": {"type": "string"},
            "customer_id": {"type": "string"},
            "reason": {"type": "string"},
        },
    },
    "Usage": {
        "type": "object",
        "required": ["customer_id", "usage"],
        "properties": {
            "customer_id": {"type": "string"},
            "usage": {
                "type": "array",
                "items": {
                    "type": "object",
                    "description": "One meter (and group) total; with window=, one per period.",
                    "required": ["meter", "aggregation", "value", "event_count"],
                    "properties": {
                        "meter": {"type": "string"},
                        "aggregation": {"type": "string"},
                        "group_key": {"type": "string"},
                        "value": {"type": "string", "description": "Exact decimal."},
                        "event_count": {"type": "integer"},
                    },
                },
            },
        },
    },
    "EventFate": {
        "type": "object",
        "description": "What happened to one event (README, Why an event is or is not counted).",
        "required": ["customer_id", "idempotency_key", "fate", "summary"],
        "properties": {
            "customer_id": {"type": "string"},
            "idempotency_key": {"type": "string"},
            "fate": {
                "type": "string",
                "enum": list(FATES),
            },
            "summary": {"type": "string"},
            "event": {"type": "object", "description": "The copy the record keeps."},
            "counted": {"type": "array", "items": {"type": "object"}},
            "not_counted": {"type": "array", "items": {"type": "object"}},
            "duplicates": {"type": "array", "items": {"type": "string"}},
            "conflicting_copies": {"type": "array", "items": {"type": "object"}},
            "rejections": {"type": "array", "items": {"type": "object"}},
            "rejections_total": {"type": "integer"},
            "corrections": {
                "type": "array",
                "items": {"type": "object"},
                "description": "The event's corrections, oldest first (the last one wins).",
            },
        },
    },
}


def document() -> dict[str, Any]:
    """The OpenAPI document, with what the guard in front of every route answers."""
    return _guard_responses(_standard_responses(_routes_document()))


def _standard_responses(doc: dict[str, Any]) -> dict[str, Any]:
    """What every operation shares, said once: an API key unless it says ``security: []``
    (then 401 without one), and for a request body 413 (over the size limit) and 415 (not
    JSON)."""
    for item in doc["paths"].values():
        for method, operation in item.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            if operation.setdefault("security", KEY_REQUIRED):
                responses.setdefault("401", _UNAUTHORIZED)
            if "requestBody" in operation:
                responses.setdefault("413", _TOO_LARGE)
                responses.setdefault("415", _NOT_JSON)
    return doc


def _guard_responses(doc: dict[str, Any]) -> dict[str, Any]:
    """What pipeline/api/guard.py answers before a route's handler runs: 421 (a name the
    server does not answer to) and 400 (no or a malformed Host) on every route but
    /healthz; 408 where a body is read and does not arrive in time."""
    for path, item in doc["paths"].items():
        if path == "/healthz":
            continue
        for method, operation in item.items():
            if method == "parameters":  # path-level, not an operation
                continue
            responses = operation["responses"]
            responses.setdefault(
                "421",
                _error("Not a host name this server answers to (METERSTREAM_WEB_ALLOWED_HOSTS)."),
            )
            responses.setdefault("400", _error("No Host header, or a malformed one."))
            if "requestBody" in operation:
                responses.setdefault(
                    "408", _error("The body did not arrive within the body timeout.")
                )
    return doc


def _routes_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meterstream worker API",
            "version": VERSION,
            "description": "Usage events in, exact billable totals out.",
        },
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from `meterstream keys create NAME`.",
                }
            },
            "schemas": SCHEMAS,
        },
        "paths": {
            **_health_paths(),
            **_events_paths(),
            **_sql_paths(),
            **_usage_paths(),
            **_fate_and_page_paths(),
            **_price_paths(),
            **_credit_paths(),
            **_correction_paths(),
            **_purchase_paths(),
            **_customer_paths(),
            **_stripe_paths(),
            **_meters_paths(),
        },
    }


_CUSTOMER = {
    "name": "customer_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}
_AMOUNT = {"type": "string", "description": "Exact decimal in the currency's major unit."}
_PLAN_SCHEDULE = {
    "type": "object",
    "required": ["customer_id", "default_plan", "plans"],
    "properties": {
        "customer_id": {"type": "string"},
        "default_plan": {"type": "string", "description": "Prices usage before any plan."},
        "plans": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["plan", "from"],
                "properties": {"plan": {"type": "string"}, "from": {"type": "string"}},
            },
        },
    },
}
_INVOICE = {
    "type": "object",
    "description": "The invoice so far (pipeline/pricing/invoice.py, Invoice.to_dict): "
    "amounts are decimal strings, each line rounded once; total = sum of the lines.",
    "required": ["customer_id", "period", "currency", "segments", "lines", "subtotal", "total"],
    "properties": {
        "customer_id": {"type": "string"},
        "period": {"type": "object"},
        "currency": {"type": "string"},
        "segments": {"type": "array", "items": {"type": "object"}},
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["kind", "plan", "amount", "amount_minor"],
                "properties": {
                    "kind": {"type": "string", "enum": ["base_fee", "usage", "minimum"]},
                    "plan": {"type": "string"},
                    "meter": {"type": ["string", "null"]},
                    "quantity": {"type": "string"},
                    "units": {"type": "string"},
                    "tiers": {"type": "array", "items": {"type": "object"}},
                    "amount": _AMOUNT,
                    "amount_minor": {"type": "integer"},
                },
            },
        },
        "subtotal": _AMOUNT,
        "total": _AMOUNT,
        "subtotal_minor": {"type": "integer"},
        "total_minor": {"type": "integer"},
    },
}


def _fate_and_page_paths() -> dict[str, Any]:
    """An event's fate and the billing page's reads (a key, or a billing link)."""
    customer = _CUSTOMER
    denied = {
        "403": _error("The key is restricted to another customer."),
        "503": _error("ClickHouse unavailable."),
    }
    return {
        "/v1/events/{customer_id}/{idempotency_key}": {
            "get": {
                "summary": "One event's fate: counted, duplicate, conflicting, rejected...",
                "parameters": [
                    customer,
                    {
                        "name": "idempotency_key",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                    },
                ],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/EventFate"}, "The fate."),
                    **denied,
                },
            }
        },
        "/v1/customers/{customer_id}/rejected": {
            "get": {
                "summary": "The customer's newest rejected events (exact resends left out)",
                "parameters": [
                    customer,
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                    },
                ],
                "responses": {
                    "200": _json({"type": "object"}, "Rejected events, newest first."),
                    "400": _error("A bad limit."),
                    **denied,
                },
            }
        },
        "/v1/customers/{customer_id}/stripe-status": {
            "get": {
                "summary": "What reached Stripe for the customer, and what waits",
                "parameters": [customer],
                "responses": {"200": _json({"type": "object"}, "Counts, last send."), **denied},
            }
        },
    }


def _price_paths() -> dict[str, Any]:
    """The routes of pipeline/api/invoices.py."""
    restricted = _error("The key is restricted to another customer.")
    change = _json({"type": "object"}, "The change (null: nothing changed) and whether "
                   "it was published on the customer-plans topic.")  # fmt: skip
    return {
        "/v1/customers/{customer_id}/invoice-preview": {
            "get": {
                "summary": "What a customer's usage costs so far this period",
                "parameters": [
                    _CUSTOMER,
                    {
                        "name": "period",
                        "in": "query",
                        "description": "YYYY-MM (default: the current month).",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _json(_INVOICE, "The preview."),
                    "400": _error("A bad period or customer id."),
                    "403": restricted,
                    "409": _error("The plans cannot price the period (e.g. two currencies)."),
                    "503": _error("ClickHouse unavailable."),
                },
            }
        },
        "/v1/customers/{customer_id}/plans": {
            "parameters": [_CUSTOMER],
            "get": {
                "summary": "A customer's plan schedule",
                "responses": {
                    "200": _json(_PLAN_SCHEDULE, "The schedule."),
                    "400": _error("A bad customer id."),
                    "403": restricted,
                    "503": _error("ClickHouse unavailable."),
                },
            },
            "put": {
                "summary": "Put a customer on a plan from a date",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["plan", "from"],
                                "properties": {
                                    "plan": {"type": "string"},
                                    "from": {
                                        "type": "string",
                                        "description": "YYYY-MM-DD (UTC) or RFC 3339.",
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": change,
                    "400": _error("A bad body, plan, date or customer id."),
                    "403": _error("A key restricted to a customer cannot do this."),
                    "503": _error("ClickHouse unavailable."),
                },
            },
            "delete": {
                "summary": "Remove the plan change at a date",
                "parameters": [
                    {"name": "from", "in": "query", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": change,
                    "400": _error("A bad date, no change at that date, or a bad customer id."),
                    "403": _error("A key restricted to a customer cannot do this."),
                    "503": _error("ClickHouse unavailable."),
                },
            },
        },
    }


_GRANT_BODY = {
    "type": "object",
    "required": ["amount"],
    "properties": {
        "amount": {"type": "string", "description": "Decimal string, whole minor units."},
        "priority": {"type": "integer", "description": "Burned lowest first (default 50)."},
        "effective": {"type": "string", "description": "YYYY-MM-DD or RFC 3339 (now)."},
        "expires": {"type": "string", "description": "YYYY-MM-DD or RFC 3339 (never)."},
        "currency": {"type": "string", "description": "Default: the default plan's."},
        "grant_id": {"type": "string", "description": "Your id: a retry is harmless."},
    },
}


def _credit_paths() -> dict[str, Any]:
    """The routes of pipeline/api/credits.py."""
    restricted, operator_only = _RESTRICTED, _OPERATOR_ONLY
    busy = _error("The worker is rebuilding its credit books (at start), or ClickHouse.")

    def body(schema: dict[str, Any]) -> dict[str, Any]:
        return {"required": False, "content": {"application/json": {"schema": schema}}}

    return {
        "/v1/customers/{customer_id}/credits": {
            "get": {
                "summary": "A customer's credit balance and grants",
                "parameters": [_CUSTOMER],
                "responses": {
                    "200": _json({"type": "object"}, "Balance, uncovered spend, grants."),
                    "400": _error("A bad customer id."),
                    "403": restricted,
                    "404": _error("The customer has no credits."),
                    "503": busy,
                },
            }
        },
        "/v1/customers/{customer_id}/credits/grants": {
            "post": {
                "summary": "Grant a customer credit",
                "parameters": [_CUSTOMER],
                "requestBody": body(_GRANT_BODY),
                "responses": {
                    "201": _json({"type": "object"}, "The grant and the balance after it."),
                    "400": _error("A bad body, amount, date, currency or customer id."),
                    "403": operator_only,
                    "503": busy,
                },
            }
        },
        "/v1/customers/{customer_id}/credits/grants/{grant_id}/void": {
            "post": {
                "summary": "Void what is left of a grant from now on",
                "parameters": [
                    _CUSTOMER,
                    {
                        "name": "grant_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                ],
                "requestBody": body(
                    {"type": "object", "properties": {"reason": {"type": "string"}}}
                ),
                "responses": {
                    "200": _json({"type": "object"}, "The void and the balance after it."),
                    "400": _error("A bad body or customer id."),
                    "403": operator_only,
                    "404": _error("No such grant for the customer."),
                    "503": busy,
                },
            }
        },
        "/v1/customers/{customer_id}/credits/ledger": {
            "get": {
                "summary": "A customer's credit ledger and its sums by kind",
                "parameters": [_CUSTOMER],
                "responses": {
                    "200": _json({"type": "object"}, "Entries and totals."),
                    "400": _error("A bad customer id."),
                    "403": restricted,
                    "503": busy,
                },
            }
        },
        "/v1/customers/{customer_id}/credits/alerts": {
            "parameters": [_CUSTOMER],
            "get": {
                "summary": "A customer's alert thresholds and their states",
                "responses": {
                    "200": _json({"type": "object"}, "Thresholds and states."),
                    "400": _error("A bad customer id."),
                    "403": restricted,
                    "503": busy,
                },
            },
            "put": {
                "summary": "Set a customer's alert thresholds (the whole list)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["thresholds"],
                                "properties": {
                                    "thresholds": {"type": "array", "items": {"type": "object"}}
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json({"type": "object"}, "Thresholds and states."),
                    "400": _error("A bad body, threshold or customer id."),
                    "403": operator_only,
                    "503": busy,
                },
            },
        },
        "/v1/customers/{customer_id}/entitlements": {
            "get": {
                "summary": "Whether a customer has access, and why not",
                "parameters": [
                    _CUSTOMER,
                    {"name": "meter", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": _json({"type": "object"}, "Access, reasons, balance, usage."),
                    "400": _error("A bad customer id."),
                    "403": restricted,
                    "503": busy,
                },
            }
        },
    }


_FILTER = {
    "type": "object",
    "description": "A property filter, as in the meters file.",
    "required": ["property", "operator"],
    "properties": {
        "property": {"type": "string"},
        "operator": {"type": "string"},
        "value": {},
    },
}
_CORRECTION_BODY = {
    "type": "object",
    "description": (
        "A void by keys or by range (customer_id, event_name and/or meter, [from, to),"
        " where), or an amend by keys (each with its new properties)."
    ),
    "required": ["kind", "reason"],
    "additionalProperties": False,
    "properties": {
        "kind": {"enum": ["void", "amend"]},
        "reason": {"type": "string", "minLength": 1, "maxLength": 1000},
        "author": {"type": "string", "maxLength": 200},
        "dry_run": {"type": "boolean"},
        "correction_id": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,100}$"},
        "keys": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10000,
            "items": {
                "type": "object",
                "required": ["customer_id", "idempotency_key"],
                "properties": {
                    "customer_id": {"type": "string"},
                    "idempotency_key": {"type": "string"},
                    "properties": {"type": "object"},
                },
            },
        },
        "customer_id": {"type": "string"},
        "event_name": {"type": "string"},
        "meter": {"type": "string"},
        "from": {"type": ["string", "integer"], "description": "RFC 3339 or epoch ms"},
        "to": {"type": ["string", "integer"], "description": "exclusive"},
        "where": {"type": "array", "items": _FILTER},
    },
}
_BACKFILL_BODY = {
    "type": "object",
    "description": "Events to import (at most 5,000), or the rejected too_late events.",
    "required": ["reason"],
    "additionalProperties": False,
    "properties": {
        "events": {
            "type": "array",
            "minItems": 1,
            "maxItems": 5000,
            "items": {
                "description": (
                    "A usage event (DESIGN.md, 'The event'); one that is not valid is"
                    " dead-lettered as on the stream and reported in the answer's outcomes."
                )
            },
        },
        "rejected": {"enum": ["too_late"]},
        "customer_id": {"type": "string"},
        "from": {"type": ["string", "integer"]},
        "to": {"type": ["string", "integer"]},
        "reason": {"type": "string", "minLength": 1, "maxLength": 1000},
        "author": {"type": "string", "maxLength": 200},
        "dry_run": {"type": "boolean"},
    },
}


def _correction_paths() -> dict[str, Any]:
    """The routes of pipeline/api/corrections.py (operator keys only)."""
    common = {
        "400": _error("A bad body: every problem listed."),
        "403": _OPERATOR_ONLY,
        "503": _CLICKHOUSE_DOWN,
    }
    return {
        "/v1/corrections": {
            "post": {
                "summary": "Void or amend recorded events (or a dry run of it)",
                "requestBody": _body(_CORRECTION_BODY),
                "responses": {
                    "200": _json({"type": "object"}, "A dry run, or a repeat of a correction."),
                    "201": _json({"type": "object"}, "The correction, as logged."),
                    **common,
                },
            },
            "get": {
                "summary": "The corrections log, newest first",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                ],
                "responses": {
                    "200": _json({"type": "object"}, "The log rows."),
                    "400": _error("A bad limit."),
                    "403": _OPERATOR_ONLY,
                    "503": _CLICKHOUSE_DOWN,
                },
            },
        },
        "/v1/corrections/{correction_id}": {
            "get": {
                "summary": "One correction and the events it changed",
                "parameters": [
                    {
                        "name": "correction_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json({"type": "object"}, "The correction and its events."),
                    "403": _OPERATOR_ONLY,
                    "404": _error("No such correction."),
                    "503": _CLICKHOUSE_DOWN,
                },
            }
        },
        "/v1/backfill": {
            "post": {
                "summary": "Import historical events exactly once (or a dry run of it)",
                "requestBody": _body(_BACKFILL_BODY),
                "responses": {
                    "200": _json({"type": "object"}, "Each event's outcome, counted."),
                    **common,
                },
            }
        },
    }


def _health_paths() -> dict[str, Any]:
    """The probes and the document: no key."""
    return {
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "The process serves.")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: broker and ClickHouse reachable",
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "Ready."),
                    "503": _json({"type": "object"}, "Not ready; checks say why."),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


def _events_paths() -> dict[str, Any]:
    """The events API."""
    return {
        "/v1/events": {
            "post": {
                "summary": "Send usage events",
                "description": f"One event or a batch of 1-{MAX_BATCH_EVENTS}. The whole "
                "batch is checked first: one invalid event rejects it all (422) and "
                "nothing is written. Otherwise every event is written to Kafka with acks "
                "from all in-sync replicas before the 202.",
                "requestBody": _body(
                    {
                        "oneOf": [
                            {"$ref": "#/components/schemas/Event"},
                            {"$ref": "#/components/schemas/EventBatch"},
                        ]
                    }
                ),
                "responses": {
                    "202": _json(
                        {"$ref": "#/components/schemas/Accepted"},
                        "Written; the idempotency key of each event, in order.",
                    ),
                    "400": _error("The body is not JSON."),
                    "403": _error("The key is restricted to another customer."),
                    "422": _error(
                        "Invalid events (every problem, by index), a repeated key in a "
                        "JSON object, or nesting too deep; none written."
                    ),
                    "503": _error(
                        "The broker did not acknowledge; retry with the same keys.",
                        **_RETRY_AFTER,
                    ),
                },
            }
        },
    }


def _sql_paths() -> dict[str, Any]:
    """Read-only SQL."""
    return {
        "/v1/sql": {
            "post": {
                "summary": "Read-only SQL on the ClickHouse record",
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["sql"],
                        "properties": {"sql": {"type": "string"}},
                    }
                ),
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/SqlResult"}, "The result."),
                    "400": _error(
                        "Not a query, ClickHouse refused it, read-only SQL does not allow"
                        " it (`problems`), or it went over a limit (`limit` names the"
                        " METERSTREAM_SQL_ setting)."
                    ),
                    "403": _error("A key restricted to a customer cannot run SQL."),
                    "503": _error(
                        "Every analyst SQL thread stayed busy for the time limit; retry.",
                        **_RETRY_AFTER,
                    ),
                },
            }
        },
    }


def _usage_paths() -> dict[str, Any]:
    """A customer's usage totals."""
    return {
        "/v1/customers/{customer_id}/usage": {
            "get": {
                "summary": "Usage totals of one customer",
                "parameters": [
                    {
                        "name": "customer_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                    },
                    {"name": "meter", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "from",
                        "in": "query",
                        "description": "RFC 3339 or epoch ms; windows starting at or after.",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "to",
                        "in": "query",
                        "description": "RFC 3339 or epoch ms; windows starting before.",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "window",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["hour", "day", "month"]},
                    },
                ],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Usage"}, "Totals."),
                    "400": _error("A bad parameter."),
                    "403": _error("The key is restricted to another customer."),
                    "503": _CLICKHOUSE_DOWN,
                },
            }
        },
    }


def _customer_paths() -> dict[str, Any]:
    """The operator's customer mapping."""
    return {
        "/v1/stripe/customers": {
            "get": {
                "summary": "The customer mapping: who pays for each customer's usage",
                "description": "The current Stripe customer of every mapped customer, "
                "and the customers the forwarder holds.",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["customers", "held"],
                            "properties": {
                                "customers": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/MappingChange"},
                                },
                                "held": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Held"},
                                },
                            },
                        },
                        "The mapping.",
                    ),
                    "403": _OPERATOR_ONLY,
                    "503": _CLICKHOUSE_DOWN,
                },
            }
        },
        "/v1/stripe/customers/{customer_id}": {
            "parameters": [
                {
                    "name": "customer_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                }
            ],
            "get": {
                "summary": "A customer's Stripe customer and every change of it",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["customer_id", "stripe_customer_id", "history"],
                            "properties": {
                                "customer_id": {"type": "string"},
                                "stripe_customer_id": {"type": ["string", "null"]},
                                "history": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/MappingChange"},
                                },
                                "held": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Held"},
                                },
                            },
                        },
                        "The mapping (stripe_customer_id null: not mapped).",
                    ),
                    "400": _error("Not a customer id."),
                    "403": _OPERATOR_ONLY,
                    "503": _CLICKHOUSE_DOWN,
                },
            },
            "put": _mapping_put(),
            "delete": {
                "summary": "Remove a customer's mapping (its usage is then held)",
                "responses": {
                    "200": _json(_CHANGE, "Recorded (change null: it was not mapped)."),
                    "400": _error("Not a customer id."),
                    "403": _OPERATOR_ONLY,
                    "503": _CLICKHOUSE_DOWN,
                },
            },
        },
    }


def _mapping_put() -> dict[str, Any]:
    """PUT /v1/stripe/customers/{customer_id}: map a customer."""
    return {
        "summary": "Map a customer to the Stripe customer that pays",
        "description": "Recorded in ClickHouse (with the key that did it), then "
        "published on the customers topic. Needs an operator key.",
        "requestBody": _body(
            {
                "type": "object",
                "required": ["stripe_customer_id"],
                "properties": {
                    "stripe_customer_id": {
                        "type": "string",
                        "pattern": "^[A-Za-z0-9_-]{1,255}$",
                    }
                },
            }
        ),
        "responses": {
            "200": _json(_CHANGE, "Recorded (change null: it already was)."),
            "400": _error("Not a customer id, or not a Stripe customer id."),
            "403": _OPERATOR_ONLY,
            "503": _CLICKHOUSE_DOWN,
        },
    }


def _period_query(default: str) -> dict[str, Any]:
    """The ``period`` query parameter of a Stripe route."""
    return {
        "name": "period",
        "in": "query",
        "description": f"YYYY-MM (default: {default}).",
        "schema": {"type": "string"},
    }


def _corrections_responses(bad: str) -> dict[str, Any]:
    """The answers of ``/v1/stripe/corrections`` (GET and POST)."""
    return {
        "200": _json({"type": "object"}, "The series still wrong at Stripe."),
        "400": _error(bad),
        "403": _OPERATOR_ONLY,
        "404": {"description": "No meter forwards to Stripe."},
    }


def _stripe_paths() -> dict[str, Any]:
    """Stripe forwarding (only on a worker with a meter that forwards to Stripe)."""
    return {
        "/v1/stripe/retry": {
            "post": {
                "summary": "Resend the Stripe meter events that failed permanently",
                "description": "Only on a worker with a meter that forwards to Stripe.",
                "responses": {
                    "200": _json({"type": "object"}, "The rows retried, with outcomes."),
                    "403": _OPERATOR_ONLY,
                    "404": {"description": "No meter forwards to Stripe."},
                    "502": _error("Stripe failed."),
                },
            }
        },
        "/v1/stripe/reconcile": {
            "get": {
                "summary": "Compare what Stripe holds with the record, for a month",
                "description": "Only on a worker with a meter that forwards to Stripe.",
                "parameters": [_period_query("the current month")],
                "responses": {
                    "200": _json({"type": "object"}, "Differences, if any."),
                    "400": _error("A bad period."),
                    "403": _OPERATOR_ONLY,
                    "404": {"description": "No meter forwards to Stripe."},
                    "502": _error("Stripe failed."),
                },
            }
        },
        "/v1/stripe/corrections": {
            "get": {
                "summary": "What Stripe holds wrong and can no longer be corrected",
                "description": (
                    "Per meter, customer and period (past the correction horizon, or a "
                    "`last` tie past Stripe's 24 hours): Stripe's value, meterstream's, the "
                    "difference and the units to credit (ClickHouse stripe_uncorrectable). "
                    "Only on a worker with a meter that forwards to Stripe."
                ),
                "parameters": [_period_query("every period")],
                "responses": _corrections_responses("A bad period."),
            },
            "post": {
                "summary": "Check the periods past the correction horizon against the record",
                "description": (
                    'Body {"period": "YYYY-MM"} (optional; default every period in the '
                    "ledger). Records what differs, then answers as GET."
                ),
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "period": {
                                        "type": ["string", "null"],
                                        "description": "YYYY-MM; null or absent: every period.",
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": _corrections_responses("A bad body or period."),
            },
        },
    }


_TOTAL = {
    "type": ["object", "null"],
    "description": "A total under one meters file; null where that file counts nothing.",
    "properties": {
        "value": {"type": "string", "description": "Exact decimal."},
        "event_count": {"type": "integer"},
        "out_of_range": {
            "type": "boolean",
            "description": "A window of it is outside the meter's range (sum meters).",
        },
    },
}


_TIME = {"type": ["string", "integer"], "description": "RFC 3339 or epoch ms."}


def _meters_paths() -> dict[str, Any]:
    """Meter definitions: the record's totals under two meters files; a recompute."""
    return {
        **_recompute_path(),
        "/v1/meters/diff": {
            "post": {
                "summary": "The record's totals under two meters files, and the difference",
                "description": "Read-only; `meterstream meters diff` uses it while this "
                "worker holds ClickHouse. Per customer, meter, group and UTC month (or "
                "window, `by_window`), computed from the record with the worker's fold.",
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["old", "new", "from", "to"],
                        "additionalProperties": False,
                        "properties": {
                            "old": {"type": "string", "description": "A meters YAML document."},
                            "new": {"type": "string", "description": "A meters YAML document."},
                            "from": _TIME,
                            "to": _TIME,
                            "customer": {"type": ["string", "null"]},
                            "meter": {"type": ["string", "null"]},
                            "by_window": {"type": "boolean"},
                        },
                    }
                ),
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "meters": {
                                    "type": "object",
                                    "description": "Each meter's status: changed, "
                                    "unchanged, added or removed.",
                                    "additionalProperties": {"type": "string"},
                                },
                                "refused": {
                                    "type": "object",
                                    "description": "Added meters: events refused by the "
                                    "meter's range, decided now.",
                                    "additionalProperties": {"type": "integer"},
                                },
                                "rows": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "customer_id": {"type": "string"},
                                            "meter": {"type": "string"},
                                            "group_key": {"type": "string"},
                                            "period": {"type": "string"},
                                            "window_start_ms": {"type": ["integer", "null"]},
                                            "status": {"type": "string"},
                                            "old": _TOTAL,
                                            "new": _TOTAL,
                                            "difference": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                        "The totals.",
                    ),
                    "400": _error("A problem of the request (`problems`, each with its path)."),
                    "403": _OPERATOR_ONLY,
                    "503": _CLICKHOUSE_DOWN,
                },
            }
        },
    }


def _recompute_path() -> dict[str, Any]:
    return {
        "/v1/meters/recompute": {
            "post": {
                "summary": "Rebuild a meter's windows from the record under this worker's file",
                "description": "A correction of kind `recompute` in the corrections log "
                "(`meterstream meters recompute`): every window of the meter in the range "
                "is rebuilt by the corrections agent. `dry_run`: what it would change (the "
                "windows as stored against the record), nothing written.",
                "requestBody": _body(
                    {
                        "type": "object",
                        "required": ["meter", "from", "to"],
                        "additionalProperties": False,
                        "properties": {
                            "meter": {"type": "string"},
                            "from": _TIME,
                            "to": _TIME,
                            "customer": {"type": ["string", "null"]},
                            "reason": {
                                "type": ["string", "null"],
                                "description": "Why; required unless dry_run.",
                            },
                            "author": {"type": ["string", "null"]},
                            "correction_id": {
                                "type": ["string", "null"],
                                "description": "A repeat with the same id rebuilds again.",
                            },
                            "dry_run": {"type": "boolean"},
                            "by_window": {"type": "boolean"},
                        },
                    }
                ),
                "responses": {
                    "200": _json(
                        {"type": "object"},
                        "The correction's log row (`repeated` for a repeat), or the dry "
                        "run's rows as `/v1/meters/diff` answers them.",
                    ),
                    "400": _error("A problem of the request (`problems`, each with its path)."),
                    "403": _OPERATOR_ONLY,
                    "409": _error("The correction_id is another correction's."),
                    "503": _CLICKHOUSE_DOWN,
                },
            }
        }
    }


_PURCHASE_BODY = {
    "type": "object",
    "required": ["amount"],
    "properties": {
        "amount": {"type": "string", "description": "Decimal string, whole minor units."},
        "priority": {"type": "integer", "description": "Of the grant (default 50)."},
        "expires": {"type": "string", "description": "The grant's expiry (never)."},
        "purchase_id": {
            "type": "string",
            "description": "Your id, also Stripe's idempotency key: a retry never charges twice.",
        },
    },
}

_RECHARGE_BODY = {
    "type": "object",
    "properties": {
        "threshold": {"type": "string", "description": "Buy when the balance reaches this."},
        "target": {"type": "string", "description": "Back up to this balance."},
        "priority": {"type": "integer", "description": "Of the grants bought (default 50)."},
        "enabled": {"type": "boolean", "description": "false (alone): turn it off."},
    },
}


def _purchase_paths() -> dict[str, Any]:
    """Purchases, auto-recharge and Stripe's webhook (pipeline/api/credits.py)."""
    restricted, operator_only = _RESTRICTED, _OPERATOR_ONLY
    busy = _error("ClickHouse or Stripe did not answer; retry.")
    bad_body = {
        "400": _error("A bad body, amount, date or customer id."),
        "403": operator_only,
        "503": busy,
    }
    read = {
        "400": _error("A bad customer id."),
        "403": restricted,
    }
    return {
        "/v1/customers/{customer_id}/credits/purchases": {
            "get": {
                "summary": "A customer's credit purchases and their status",
                "parameters": [_CUSTOMER],
                "responses": {"200": _json({"type": "object"}, "The purchases."), **read},
            },
            "post": {
                "summary": "Buy credits: a PaymentIntent on the customer's default card",
                "parameters": [_CUSTOMER],
                "requestBody": _body(_PURCHASE_BODY),
                "responses": {
                    "201": _json(
                        {"type": "object"},
                        "The purchase: created (granted on Stripe's success) or failed.",
                    ),
                    "409": _error(
                        "No Stripe customer or default payment method, or the purchase id"
                        " is taken by other terms; nothing charged."
                    ),
                    **bad_body,
                },
            },
        },
        "/v1/customers/{customer_id}/credits/recharge": {
            "get": {
                "summary": "A customer's auto-recharge and its state",
                "parameters": [_CUSTOMER],
                "responses": {"200": _json({"type": "object"}, "Rule and state."), **read},
            },
            "put": {
                "summary": "Set or turn off a customer's auto-recharge",
                "parameters": [_CUSTOMER],
                "requestBody": _body(_RECHARGE_BODY),
                "responses": {"200": _json({"type": "object"}, "Rule and state."), **bad_body},
            },
        },
        "/v1/stripe/webhooks": {
            "post": {
                "summary": "Stripe's webhook (payment_intent.* events of credit purchases)",
                "description": "No API key: authenticated by the Stripe-Signature header.",
                "security": [],
                "parameters": [
                    {
                        "name": "Stripe-Signature",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": _body({"type": "object"}),
                "responses": {
                    "200": _json({"type": "object"}, "Received (applied, or ignored)."),
                    "400": _error("Missing or bad signature, or an old timestamp."),
                    "404": _error("No METERSTREAM_STRIPE_WEBHOOK_SECRET: the route is off."),
                    "503": _error("ClickHouse did not answer; Stripe delivers it again."),
                },
            }
        },
    }
