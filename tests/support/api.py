"""A test's calls of the worker's web API with a key: the JSON answer, or the status."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def api_request(url: str, token: str | None = None, method: str = "GET", body: Any = None) -> Any:
    """``method url`` with ``body`` as JSON and the key as a bearer token; the JSON answer
    (an HTTPError for a status of 400 or more)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def api_status(url: str, token: str | None, method: str = "GET", body: Any = None) -> int:
    """The status :func:`api_request` gets (200 for any success)."""
    try:
        api_request(url, token, method, body)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200
