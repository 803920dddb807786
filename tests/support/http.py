"""HTTP calls of the integration tests to a worker's API (JSON in and out, a bearer key)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any


def request_json(url: str, token: str | None = None, method: str = "GET", body: Any = None) -> Any:
    """The JSON answer of ``method url`` (raises ``urllib.error.HTTPError`` on a 4xx/5xx)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def status_of(url: str, token: str | None = None, method: str = "GET", body: Any = None) -> int:
    """The HTTP status ``method url`` answers (200 for any success)."""
    try:
        request_json(url, token, method, body)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


def read_latencies(url: str, token: str | None, times: int) -> str:
    """GET ``url`` ``times`` times, one at a time; its p50, p99 and max (printed by the
    integration tests: measured, never asserted)."""
    took = []
    for _ in range(times):
        started = time.perf_counter()
        request_json(url, token)
        took.append(time.perf_counter() - started)
    took.sort()
    p50, p99 = took[(times - 1) // 2], took[max(0, -(-times * 99 // 100) - 1)]
    return f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max {took[-1] * 1000:.2f} ms"
