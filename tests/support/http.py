"""HTTP calls of the integration tests to a worker's API (JSON in and out, a bearer key)."""

from __future__ import annotations

import json
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
