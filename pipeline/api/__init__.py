"""The HTTP API: routes, the guard in front of them, the events API's check, keys, OpenAPI."""
