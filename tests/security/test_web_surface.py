"""The worker's web surface, attacked on the real stack (embedded broker, chdb, the
Stripe emulator), with raw sockets wherever a client library would fix a header:

- DNS rebinding: every route but /healthz refuses every name it is not reached by
  (421, or 400 for a missing or malformed Host) before any handler runs; that
  includes absolute-form targets and forwarded names.
- Faust's own views (/, /table/..., /router/..., /graph, /stats, ...) are gone, also
  when Faust's environment variables ask for them; meterstream's routes still work.
- A body that stalls or trickles gets 408 within the body timeout while the worker
  keeps answering others; a client that goes away is not a traceback in the log.
- ``keys create --customer`` refuses an empty, blank or invalid customer id.
- ``meterstream run``: the state dir and everything in it is private (0700/0600),
  an older loose state dir is tightened, and the Host check, key scopes, Faust's
  views and the body timeout hold there too (and the Stripe emulator's Host check).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meterstream.embedded.tansu import EmbeddedBroker
from tests.harness import REPO, StackSlice, Worker, wait_until
from tests.support.meters import meter_entry, meters_yaml, stripe

pytestmark = pytest.mark.integration

SEC_STRIPE = stripe("sec_calls", "interval: 1h, grace: 0s")
METERS = meters_yaml(meter_entry("calls", "api_call", "count", window="hour", stripe=SEC_STRIPE))
BODY_TIMEOUT = 2.0


# -- raw HTTP ------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    port: int,
    head: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    timeout: float = 60,
) -> Reply:
    """One request exactly as written (request line, headers in order), then the reply."""
    lines = [head, *(f"{k}: {v}" for k, v in headers), "", ""]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall("\r\n".join(lines).encode("latin-1") + body)
        method = head.split(" ", 1)[0]
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)


def request(
    port: int,
    method: str,
    path: str,
    host: str | None,
    *,
    key: str | None = None,
    body: Any = None,
    extra: list[tuple[str, str]] | None = None,
    version: str = "HTTP/1.1",
) -> Reply:
    headers: list[tuple[str, str]] = [] if host is None else [("Host", host)]
    payload = b"" if body is None else json.dumps(body).encode()
    if key:
        headers.append(("Authorization", f"Bearer {key}"))
    if body is not None:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    headers.append(("Connection", "close"))
    headers += extra or []
    return send(port, f"{method} {path} {version}", headers, payload)


def keys_cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    return subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "keys", *args, "--state-dir", str(state_dir)],
        cwd=REPO, env=clean, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def new_key(state_dir: Path, name: str, *extra: str) -> str:
    result = keys_cli(state_dir, "create", name, *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def event(customer: str, key: str) -> dict[str, Any]:
    return {
        "event_name": "api_call",
        "customer_id": customer,
        "idempotency_key": key,
        "timestamp": time.time_ns() // 1_000_000 - 60_000,
    }


# -- the worker under attack ------------------------------------------------------------


@dataclass
class Surface:
    worker: Worker
    port: int
    admin: str  # unrestricted key
    acme: str  # key restricted to customer acme

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sql(self, query: str) -> list[list[Any]]:
        reply = request(
            self.port, "POST", "/v1/sql", self.host, key=self.admin, body={"sql": query}
        )
        assert reply.status == 200, reply.body
        return list(reply.json()["rows"])

    def recorded(self, keys: list[str]) -> set[str]:
        quoted = ",".join(f"'{k}'" for k in keys)
        rows = self.sql(
            f"SELECT idempotency_key FROM usage_events WHERE idempotency_key IN ({quoted})"
        )
        return {r[0] for r in rows}

    def routes(self) -> list[tuple[str, str, str | None, Any]]:
        """Every route but /healthz: method, path, key, body."""
        return [
            ("POST", "/v1/sql", None, {"sql": "SELECT 1"}),
            ("POST", "/v1/sql", self.admin, {"sql": "SELECT 1"}),
            ("GET", "/v1/customers/acme/usage", None, None),
            ("GET", "/v1/customers/acme/usage", self.acme, None),
            ("POST", "/v1/events", self.admin, event("acme", f"refused-{uuid.uuid4().hex}")),
            ("GET", "/metrics", None, None),
            ("GET", "/readyz", None, None),
            ("GET", "/openapi.json", None, None),
            ("GET", "/v1/stripe/reconcile", self.admin, None),
            ("POST", "/v1/stripe/retry", self.admin, {}),
            ("GET", "/v1/stripe/corrections", self.admin, None),
            ("POST", "/v1/stripe/corrections", self.admin, {}),
        ]


@pytest.fixture(scope="module")
def surface(module_stack: StackSlice) -> Surface:
    state_dir = module_stack.tmp / "state"
    admin = new_key(state_dir, "admin")
    acme = new_key(state_dir, "acme-only", "--customer", "acme")
    worker = module_stack.start_worker(
        module_stack.meters_file(METERS), METERSTREAM_API_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT)
    )
    port = int(worker.web_url.rsplit(":", 1)[1])
    surface = Surface(worker, port, admin, acme)
    wait_until(
        lambda: request(port, "GET", "/readyz", surface.host).status == 200,
        timeout=90,
        what="/readyz",
    )
    return surface


# -- DNS rebinding: the Host check ----------------------------------------------------


def refused_hosts(port: int) -> list[str]:
    return [
        "attacker.example",
        f"attacker.example:{port}",
        f"ATTACKER.EXAMPLE:{port}",
        f"attacker.example.:{port}",
        f"localhost.attacker.example:{port}",
        f"127.0.0.1.nip.io:{port}",
        f"127.0.0.1.attacker.example:{port}",
        f"0.0.0.0:{port}",
        f"10.0.0.1:{port}",
    ]


def malformed_hosts(port: int) -> list[str]:
    return [
        "",
        f"127.0.0.1:{port}@attacker.example",
        f"attacker.example@127.0.0.1:{port}",
        "127.0.0.1 attacker.example",
        "localhost:http",
        "2130706433",
    ]


def test_every_route_refuses_a_name_it_is_not_reached_by(surface: Surface) -> None:
    wrong: list[str] = []
    for host in refused_hosts(surface.port) + malformed_hosts(surface.port):
        expected = 421 if host in refused_hosts(surface.port) else 400
        for method, path, key, body in surface.routes():
            reply = request(surface.port, method, path, host, key=key, body=body)
            if reply.status != expected or "error" not in reply.json():
                wrong.append(f"Host {host!r}: {method} {path} key={bool(key)} -> {reply.status}")
    assert not wrong, "\n".join(wrong)


def test_missing_host_absolute_targets_and_forwarded_names_are_refused(surface: Surface) -> None:
    port, good = surface.port, surface.host
    attacker = "attacker.example"
    xfh = "X-Forwarded-Host"
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("no Host, HTTP/1.1", {"host": None}, 400),
        ("no Host, HTTP/1.0", {"host": None, "version": "HTTP/1.0"}, 400),
        ("two Host headers", {"host": good, "extra": [("Host", attacker)]}, 400),
        ("absolute-form target", {"host": good, "absolute": f"http://{attacker}"}, 421),
        ("absolute-form, port", {"host": good, "absolute": f"http://{attacker}:{port}"}, 421),
        ("absolute-form, bad Host", {"host": attacker, "absolute": f"http://{good}"}, 421),
        ("X-Forwarded-Host", {"host": good, "extra": [(xfh, attacker)]}, 421),
        ("X-Forwarded-Host list", {"host": good, "extra": [(xfh, f"{good}, {attacker}")]}, 421),
        ("X-Forwarded-Host cannot vouch", {"host": attacker, "extra": [(xfh, good)]}, 421),
        (
            "Forwarded",
            {"host": good, "extra": [("Forwarded", f"for=1.2.3.4;host={attacker}")]},
            421,
        ),
    ]
    wrong: list[str] = []
    for what, case, expected in cases:
        for method, path, key, body in surface.routes():
            target = case.get("absolute", "") + path
            reply = request(
                port, method, target, case["host"], key=key, body=body,
                extra=case.get("extra"), version=case.get("version", "HTTP/1.1"),
            )  # fmt: skip
            if reply.status != expected:
                wrong.append(f"{what}: {method} {path} -> {reply.status} {reply.body[:100]!r}")
    assert not wrong, "\n".join(wrong)


def test_names_it_is_reached_by_work(surface: Surface) -> None:
    port = surface.port
    for host in (
        f"127.0.0.1:{port}",
        "127.0.0.1",
        f"localhost:{port}",
        f"LOCALHOST:{port}",
        f"localhost.:{port}",
        f"[::1]:{port}",
    ):
        sql = request(port, "POST", "/v1/sql", host, body={"sql": "SELECT 41 + 1 AS x"})
        assert sql.status == 200 and sql.json()["rows"] == [[42]], (host, sql.body)
        assert request(port, "GET", "/metrics", host).status == 200, host
    # an absolute-form target naming this server is fine (RFC 9112 §3.2.2)
    absolute = request(port, "GET", f"http://localhost:{port}/openapi.json", f"localhost:{port}")
    assert absolute.status == 200


def test_healthz_answers_probes_whatever_their_host(surface: Surface) -> None:
    for host in ("attacker.example", "10.1.2.3:6066", surface.host):
        for version in ("HTTP/1.0", "HTTP/1.1"):
            reply = request(surface.port, "GET", "/healthz", host, version=version)
            assert reply.status == 200 and reply.json() == {"status": "ok"}, (host, version)
    # an HTTP/1.0 probe (HAProxy's default httpchk) sends no Host at all
    reply = request(surface.port, "GET", "/healthz", None, version="HTTP/1.0")
    assert reply.status == 200 and reply.json() == {"status": "ok"}
    # HTTP/1.1 requires one: aiohttp answers 400 itself (RFC 9112 §3.2)
    assert request(surface.port, "GET", "/healthz", None).status == 400


def test_a_refused_write_writes_nothing(surface: Surface) -> None:
    refused = [f"rebound-{uuid.uuid4().hex}" for _ in range(3)]
    for key, host in zip(
        refused,
        ("attacker.example", f"localhost.attacker.example:{surface.port}", None),
        strict=True,
    ):
        reply = request(
            surface.port, "POST", "/v1/events", host, key=surface.admin, body=event("acme", key)
        )
        assert reply.status in (400, 421), reply.body
    marker = f"marker-{uuid.uuid4().hex}"
    sent = request(
        surface.port,
        "POST",
        "/v1/events",
        surface.host,
        key=surface.admin,
        body=event("acme", marker),
    )
    assert sent.status == 202, sent.body
    wait_until(lambda: surface.recorded([marker]), timeout=60, what="marker recorded")
    assert surface.recorded(refused) == set()
    metrics = request(surface.port, "GET", "/metrics", surface.host).body.decode()
    assert 'meterstream_api_requests_total{route="guard",status="421"}' in metrics


# -- Faust's own views ----------------------------------------------------------------

FAUST_VIEWS = [
    "/",
    "/table/",
    "/table/dedup/",
    "/table/windows/",
    "/table/dedup/keys/",
    "/router/",
    "/router/dedup/",
    "/graph/",
    "/stats/",
    "/assignment/",
    "/performance/",
    "/signal/",
]


def test_faust_views_are_gone_whatever_the_key(surface: Surface) -> None:
    wrong: list[str] = []
    for path in FAUST_VIEWS:
        for key in (None, surface.acme, surface.admin):
            for method in ("GET", "HEAD", "POST", "DELETE"):
                reply = request(surface.port, method, path, surface.host, key=key)
                if reply.status != 404:
                    wrong.append(
                        f"{method} {path} key={bool(key)} -> {reply.status} {reply.body[:80]!r}"
                    )
    assert not wrong, "\n".join(wrong)


def test_meterstream_routes_still_work(surface: Surface) -> None:
    host, port = surface.host, surface.port
    assert request(port, "GET", "/healthz", host).json() == {"status": "ok"}
    assert request(port, "GET", "/readyz", host).json()["ready"] is True
    metrics = request(port, "GET", "/metrics", host)
    assert metrics.status == 200 and b"meterstream_api_requests_total" in metrics.body
    assert request(port, "GET", "/openapi.json", host).json()["openapi"].startswith("3.")
    assert surface.sql("SELECT 1") == [[1]]
    usage = request(port, "GET", "/v1/customers/acme/usage", host, key=surface.acme)
    assert usage.status == 200 and usage.json()["customer_id"] == "acme"
    other = request(port, "GET", "/v1/customers/globex/usage", host, key=surface.acme)
    assert other.status == 403
    assert (
        request(port, "POST", "/v1/sql", host, key=surface.acme, body={"sql": "SELECT 1"}).status
        == 403
    )
    assert request(port, "GET", "/v1/sql", host).status == 405  # a known route, wrong method


def local_non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only picks the route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else str(address)


def test_faust_environment_variables_cannot_reopen_views_or_move_the_server(
    broker: EmbeddedBroker, stripe_emulator: str, tmp_path: Path
) -> None:
    """Faust reads WEB_BIND, APP_WEB_TABLES_ENABLED, ... from the environment and lets them
    override what meterstream configures; a worker must ignore them."""
    # its own chdb path: the module's worker holds the session's
    stack = StackSlice(broker.bootstrap, tmp_path / "clickhouse", stripe_emulator, tmp_path)
    worker = stack.start_worker(
        stack.meters_file(METERS),
        WEB_BIND="0.0.0.0",
        WEB_HOST="0.0.0.0",
        APP_WEB_TABLES_ENABLED="true",
        APP_WEB_ROUTER_ENABLED="true",
        APP_WEB_STATS_ENABLED="true",
        APP_WEB_GRAPH_ENABLED="true",
        APP_WEB_METRICS_ENABLED="true",
        APP_DEBUG="true",
    )
    try:
        port = int(worker.web_url.rsplit(":", 1)[1])
        host = f"127.0.0.1:{port}"
        for path in FAUST_VIEWS:
            reply = request(port, "GET", path, host)
            assert reply.status == 404, (path, reply.status, reply.body[:80])
        address = local_non_loopback_address()
        if address is not None:  # the worker listens on loopback only, as configured
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=2).close()
    finally:
        stack.stop_all()


# -- slow bodies and clients that go away -------------------------------------------------


def stall(port: int, host: str, path: str, key: str | None, mode: str) -> tuple[float, Reply | str]:
    """Send headers and a body that never completes; seconds until the answer, and it."""
    headers = [("Host", host), ("Content-Type", "application/json")]
    if key:
        headers.append(("Authorization", f"Bearer {key}"))
    if mode == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
    else:
        headers.append(("Content-Length", "100"))
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers), "", ""]
        sock.sendall("\r\n".join(lines).encode())
        if mode == "partial":
            sock.sendall(b'{"sql": "SEL')
        elif mode == "chunked":
            sock.sendall(b'5\r\n{"sql\r\n')
        elif mode == "trickle":  # one byte every 0.4 s: never idle, never complete
            sock.settimeout(0.4)
            for _ in range(40):
                try:
                    sock.sendall(b" ")
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            sock.settimeout(30)
        response = http.client.HTTPResponse(sock, method="POST")
        try:
            response.begin()
            reply: Reply | str = Reply(
                response.status, dict(response.getheaders()), response.read()
            )
        except (OSError, http.client.HTTPException) as exc:
            reply = f"no answer: {exc!r}"
        seconds = time.monotonic() - start
        if isinstance(reply, Reply):  # and the server closes the connection (after lingering)
            sock.settimeout(20)
            try:
                while sock.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            except TimeoutError:
                reply = "the connection stayed open after the answer"
    return seconds, reply


def test_a_stalled_body_times_out_while_others_are_served(surface: Surface) -> None:
    cases = [
        (path, key, mode)
        for path, key in (("/v1/sql", None), ("/v1/events", surface.admin))
        for mode in ("nothing", "partial", "chunked", "trickle")
    ]
    with ThreadPoolExecutor(len(cases) * 2) as pool:
        stalled = [pool.submit(stall, surface.port, surface.host, *case) for case in cases * 2]
        time.sleep(0.5)
        # meanwhile, 16 stalled requests open: others get their answers at once
        for _ in range(5):
            start = time.monotonic()
            assert surface.sql("SELECT 2") == [[2]]
            assert request(surface.port, "GET", "/healthz", surface.host).status == 200
            assert time.monotonic() - start < BODY_TIMEOUT, "served only after the stalls ended"
        results = [future.result(timeout=120) for future in stalled]
    for (path, _, mode), (seconds, reply) in zip(cases * 2, results, strict=True):
        assert isinstance(reply, Reply), (path, mode, reply)
        assert reply.status == 408, (path, mode, reply)
        assert "did not arrive" in json.loads(reply.body)["error"]
        assert BODY_TIMEOUT - 0.2 <= seconds < BODY_TIMEOUT + 8, (path, mode, seconds)


def abort(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed client or a proxy timeout does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_client_that_goes_away_is_no_traceback(surface: Surface) -> None:
    log_before = len(surface.worker.log())
    host, port = surface.host, surface.port
    head = (
        f"POST /v1/sql HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n"
    ).encode()
    gone = 0
    for how in ("close", "reset"):
        for sent in (b"", b'{"sql": "SEL'):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(head + sent)
            time.sleep(0.3)
            abort(sock) if how == "reset" else sock.close()
            gone += 1
    # mid-response: a large result, read a little, then go away
    big = json.dumps({"sql": "SELECT number, repeat('x', 2000) AS pad FROM numbers(12000)"})
    for how in ("close", "reset"):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(
            (
                f"POST /v1/sql HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(big)}\r\n\r\n{big}"
            ).encode()
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        abort(sock) if how == "reset" else sock.close()
        gone += 1
    time.sleep(2)
    assert surface.sql("SELECT 3") == [[3]]  # still serving
    added = surface.worker.log()[log_before:]
    assert "Traceback" not in added and "Error handling request" not in added, added[-3000:]
    assert len(added.splitlines()) <= gone, added[-3000:]
    assert all(len(line) < 300 for line in added.splitlines()), added[-3000:]


def test_a_malformed_request_is_a_400_and_one_line(surface: Surface) -> None:
    log_before = len(surface.worker.log())
    host = ("Host", surface.host)
    json_type = ("Content-Type", "application/json")
    chunked = ("Transfer-Encoding", "chunked")
    bad: list[tuple[str, list[tuple[str, str]], bytes]] = [
        ("POST /v1/sql HTTP/1.1", [host, json_type, chunked], b"zz\r\n{}\r\n0\r\n\r\n"),
        ("POST /v1/sql HTTP/1.1", [host, json_type, chunked], b"2\r\n{}XX0\r\n\r\n"),
        ("POST /v1/sql HTTP/1.1", [host, json_type, ("Content-Length", "x")], b"{}"),
        ("GET /metrics HTTP/1.1", [host, ("Bad Header", "x")], b""),
        ("GET /metrics HTTP/1.1", [host, ("X-Long", "y" * 20000)], b""),
        ("GET /metrics HTTP/1.1", [host, ("Host", "attacker.example")], b""),
        ("GET /metrics HTTP/9.9", [host], b""),
        ("GET /metrics\x00 HTTP/1.1", [host], b""),
    ]
    for head, headers, body in bad:
        reply = send(surface.port, head, [*headers, ("Connection", "close")], body)
        assert reply.status == 400, (head, headers[-1][0], reply.status, reply.body[:100])
    time.sleep(0.5)
    added = surface.worker.log()[log_before:]
    assert "Traceback" not in added, added[-3000:]
    assert len(added.splitlines()) <= len(bad), added[-3000:]
    assert all(len(line) < 400 for line in added.splitlines()), added[-3000:]


# -- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "customer", ["", " ", "\t", "  \n ", "x" * 201, " acme", "acme ", "ac\x1bme"]
)
def test_keys_create_refuses_an_invalid_customer(tmp_path: Path, customer: str) -> None:
    result = keys_cli(tmp_path, "create", "billing", "--customer", customer)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "--customer" in result.stderr and result.stdout == ""
    assert keys_cli(tmp_path, "list").stdout.count("billing") == 0


def test_keys_create_with_a_customer_restricts_the_key(tmp_path: Path) -> None:
    assert new_key(tmp_path, "acme-only", "--customer", "acme").startswith("msk_")
    assert new_key(tmp_path, "everything").startswith("msk_")
    rows = [line.split() for line in keys_cli(tmp_path, "list").stdout.splitlines()]
    by_name = {row[1]: row for row in rows if len(row) > 2}
    assert by_name["acme-only"][2] == "acme"
    assert by_name["everything"][2] != "acme"
    doc = json.loads((tmp_path / "api_keys.json").read_text())
    customers = {k["name"]: k["customer_id"] for k in doc["keys"]}
    assert customers == {"acme-only": "acme", "everything": None}


# -- a real `meterstream run` --------------------------------------------------------------


def open_entries(root: Path) -> list[str]:
    """Every file or dir under ``root`` (and root) that group or others may use."""
    found = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_mode & 0o077:
            found.append(f"{oct(stat.S_IMODE(st.st_mode))} {path.relative_to(root.parent)}")
    return found


def test_meterstream_run_is_private_and_guarded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # an older state dir, made with a loose umask: tightened at start, with a notice
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    (state / "worker.log").write_text("an old log line\n")
    (state / "worker.log").chmod(0o644)
    (state / "old").mkdir(mode=0o755)
    (state / "old").chmod(0o755)
    (state / "old" / "notes.txt").write_text("customer data\n")
    (state / "old" / "notes.txt").chmod(0o664)
    assert len(open_entries(state)) == 4

    clean = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    log = open(tmp_path / "run.out", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterstream.cli", "run", "--meters", "meters.example.yaml",
         "--state-dir", str(state)],
        cwd=REPO, env=clean, stdout=log, stderr=subprocess.STDOUT, text=True, umask=0o022,
    )  # fmt: skip
    try:
        endpoints_file = state / "endpoints.json"

        def started() -> bool:
            assert proc.poll() is None, (tmp_path / "run.out").read_text()
            return endpoints_file.exists()

        wait_until(started, timeout=180, what="meterstream run")
        endpoints = json.loads(endpoints_file.read_text())
        port = int(endpoints["web_url"].rsplit(":", 1)[1])
        host = f"127.0.0.1:{port}"
        out = (tmp_path / "run.out").read_text()
        assert "made it and what is in it private" in out, out

        admin = new_key(state, "admin")
        acme = new_key(state, "acme-only", "--customer", "acme")
        sql = {"sql": "SELECT 1 AS one"}
        # The Host check, by key: none (loopback reads), customer-restricted, unrestricted.
        expected = {None: 200, acme: 403, admin: 200}
        for key, status in expected.items():
            assert request(port, "POST", "/v1/sql", host, key=key, body=sql).status == status
            for bad in ("attacker.example", f"attacker.example:{port}", f"127.0.0.1.nip.io:{port}"):
                reply = request(port, "POST", "/v1/sql", bad, key=key, body=sql)
                assert reply.status == 421, (bad, key is not None, reply.body)
            reply = request(port, "GET", "/v1/customers/acme/usage", "attacker.example", key=key)
            assert reply.status == 421
            for path in ("/", "/table/", "/table/dedup/", "/router/"):
                assert request(port, "GET", path, host, key=key).status == 404, path
        # The Stripe emulator: the same Host check; its controls take JSON only.
        stripe = int(endpoints["stripe_api_base"].rsplit(":", 1)[1])
        good = request(stripe, "GET", "/_emulator/events", f"127.0.0.1:{stripe}")
        assert good.status == 200
        for bad in (
            "attacker.example",
            f"attacker.example:{stripe}",
            f"localhost.attacker.example:{stripe}",
        ):
            assert request(stripe, "GET", "/_emulator/events", bad).status == 421, bad
            assert request(stripe, "POST", "/_emulator/reset", bad, body={}).status == 421
        csrf = send(
            stripe,
            "POST /_emulator/reset HTTP/1.1",
            [("Host", f"127.0.0.1:{stripe}"), ("Content-Type", "text/plain"),
             ("Content-Length", "2"), ("Connection", "close")],
            b"{}",
        )  # fmt: skip
        assert csrf.status == 415
        # The default body timeout (10 s).
        seconds, reply = stall(port, host, "/v1/events", admin, "partial")
        assert isinstance(reply, Reply) and reply.status == 408, reply
        assert 9.5 <= seconds < 25, seconds

        # Customer data everywhere meterstream writes: events in the record, the CLI's
        # own key, logs; then nothing in the state dir is open to anyone else.
        keys = [f"private-{uuid.uuid4().hex}" for _ in range(20)]
        body = {"events": [event("acme", k) for k in keys]}
        assert request(port, "POST", "/v1/events", host, key=admin, body=body).status == 202
        cli = subprocess.run(
            [sys.executable, "-m", "meterstream.cli", "sql", "--state-dir", str(state),
             "SELECT count() AS n FROM usage_events"],
            cwd=REPO, env=clean, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr

        def counted() -> bool:
            rows = request(port, "POST", "/v1/sql", host, key=admin, body={
                "sql": "SELECT count() FROM usage_events"}).json()["rows"]  # fmt: skip
            return bool(rows[0][0] >= 20)

        wait_until(counted, timeout=60, what="events in the record")
        assert (state / "api_keys.json").exists()
        assert not (
            state / "cli.key"
        ).exists()  # no working key on disk (the CLI's lasts a command)
        assert (state / "clickhouse").is_dir() and (state / "faust").is_dir()
        assert open_entries(state) == []
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
        log.close()
    assert open_entries(state) == []  # also what was written while stopping
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_new_state_dir_is_private_from_the_first_command(tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    result = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "keys", "create", "first",
         "--state-dir", str(state)],
        cwd=REPO, capture_output=True, text=True, timeout=60, umask=0o022,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert open_entries(state) == []


def test_tightening_follows_no_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "shared.txt"
    outside.write_text("not meterstream's\n")
    outside.chmod(0o644)
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)
    (state / "link").symlink_to(outside)
    result = keys_cli(state, "list")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644
