"""The OpenAPI 3.1 document of the worker's web API, served at ``/openapi.json``.

Written by hand next to the routes (pipeline/web.py) and checked against them by
the schemathesis test (tests/integration/test_web_api_fuzz.py), which sends
what this document allows, and much that it does not, to a real worker.
"""

from __future__ import annotations

from typing import Any

from pipeline.events import MAX_PROPERTIES_DEPTH
from pipeline.ingest import MAX_BATCH_EVENTS

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
}


def document() -> dict[str, Any]:
    key_required: list[dict[str, list[str]]] = [{"apiKey": []}]
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
            "/v1/events": {
                "post": {
                    "summary": "Send usage events",
                    "description": f"One event or a batch of 1-{MAX_BATCH_EVENTS}. The whole "
                    "batch is checked first: one invalid event rejects it all (422) and "
                    "nothing is written. Otherwise every event is written to Kafka with acks "
                    "from all in-sync replicas before the 202.",
                    "security": key_required,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/Event"},
                                        {"$ref": "#/components/schemas/EventBatch"},
                                    ]
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": _json(
                            {"$ref": "#/components/schemas/Accepted"},
                            "Written; the idempotency key of each event, in order.",
                        ),
                        "400": _error("The body is not JSON."),
                        "401": _UNAUTHORIZED,
                        "403": _error("The key is restricted to another customer."),
                        "413": _error("The body is over the size limit."),
                        "415": _error("Content-Type is not application/json."),
                        "422": _error(
                            "Invalid events (every problem, by index), a repeated key in a "
                            "JSON object, or nesting too deep; none written."
                        ),
                        "503": _error(
                            "The broker did not acknowledge; retry with the same keys.",
                            **{"Retry-After": "Seconds to wait"},
                        ),
                    },
                }
            },
            "/v1/sql": {
                "post": {
                    "summary": "Read-only SQL on the ClickHouse record",
                    "security": key_required,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["sql"],
                                    "properties": {"sql": {"type": "string"}},
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/SqlResult"}, "The result."),
                        "400": _error("Not a query, or ClickHouse refused it."),
                        "401": _UNAUTHORIZED,
                        "403": _error("A key restricted to a customer cannot run SQL."),
                        "413": _error("The body is over the size limit."),
                        "415": _error("Content-Type is not application/json."),
                    },
                }
            },
            "/v1/customers/{customer_id}/usage": {
                "get": {
                    "summary": "Usage totals of one customer",
                    "security": key_required,
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
                        "401": _UNAUTHORIZED,
                        "403": _error("The key is restricted to another customer."),
                        "503": _error("ClickHouse unavailable."),
                    },
                }
            },
            "/v1/stripe/retry": {
                "post": {
                    "summary": "Resend the Stripe meter events that failed permanently",
                    "description": "Only on a worker with a meter that forwards to Stripe.",
                    "security": key_required,
                    "responses": {
                        "200": _json({"type": "object"}, "The rows retried, with outcomes."),
                        "401": _UNAUTHORIZED,
                        "403": _error("A key restricted to a customer cannot do this."),
                        "404": {"description": "No meter forwards to Stripe."},
                        "502": _error("Stripe failed."),
                    },
                }
            },
            "/v1/stripe/reconcile": {
                "get": {
                    "summary": "Compare what Stripe holds with the record, for a month",
                    "description": "Only on a worker with a meter that forwards to Stripe.",
                    "security": key_required,
                    "parameters": [
                        {
                            "name": "period",
                            "in": "query",
                            "description": "YYYY-MM (default: the current month).",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json({"type": "object"}, "Differences, if any."),
                        "400": _error("A bad period."),
                        "401": _UNAUTHORIZED,
                        "403": _error("A key restricted to a customer cannot do this."),
                        "404": {"description": "No meter forwards to Stripe."},
                        "502": _error("Stripe failed."),
                    },
                }
            },
        },
    }
