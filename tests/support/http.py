"""HTTP calls of the integration tests to a worker's API (JSON in and out, a bearer key),
and the local webhook endpoints the tests receive calls on."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


#: A webhook endpoint's answer to one POST: (the request, its body) -> the status to send.
Answer = Callable[[BaseHTTPRequestHandler, bytes], int]


def serve_posts(answer: Answer, path: str) -> tuple[ThreadingHTTPServer, str]:
    """A local HTTP server (a daemon thread, no request log) answering every POST with
    ``answer``'s status and no body; (the server, its URL with ``path``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(answer(self, body))
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}{path}"
