"""Read-only SQL never reads or writes a file, for any caller (issue 20, item 1).

One real worker (embedded broker, chdb) with secrets where an attacker would look:
a marker in its environment (METERSTREAM_CLICKHOUSE_PASSWORD, as in production),
another in a file of its state dir, the API keys file, a venv's site-packages.
Every class is tried in several spellings (case, quoting, comments, lambdas,
concatenated paths, subqueries, UNION, EXPLAIN/DESCRIBE wrappers) by three
callers: no key (loopback default), a customer-restricted key, an unrestricted key.
Each answer must be a 4xx without a marker in it; afterwards no target file
exists or changed, and the keys file is byte for byte the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from meterstream.endpoints import write_endpoints
from tests.harness import REPO, StackSlice, Worker
from tests.support.cli import keys_cli
from tests.support.meters import meter_entry, meters_yaml

pytestmark = pytest.mark.integration

METERS = meters_yaml(meter_entry("calls", "api_call", "count"))
ENV_MARKER = f"ENVSECRET{uuid.uuid4().hex}"
FILE_MARKER = f"FILESECRET{uuid.uuid4().hex}"

# Reading a file: {environ} = /proc/self/environ, {secret} = a file in the state dir,
# {keys} = the API keys file. Scalar file(), then table functions, then wrappers.
READS = [
    "SELECT file('{environ}')",
    "select FILE('{environ}') AS x",
    "SELECT `file`('{secret}')",
    "SELECT \"file\"('{secret}')",
    "SELECT File('{keys}')",
    "SELECT /* hi */ file /* there */ ('{secret}')",
    "SELECT arrayMap(p -> file(p), ['{secret}'])",
    "SELECT arrayStringConcat(arrayMap(p -> file(p), ['{environ}', '{secret}']))",
    "SELECT file(concat('/proc/self/', 'environ'))",
    "SELECT file(concat('{state}', '/', 'secret.txt'))",
    "WITH '{secret}' AS p SELECT file(p)",
    "WITH f AS (SELECT file('{secret}') AS s) SELECT * FROM f",
    "SELECT (SELECT file('{secret}'))",
    "SELECT * FROM (SELECT '{secret}' AS p) WHERE file(p) != ''",
    "SELECT 1 UNION ALL SELECT file('{secret}')",
    "SELECT * FROM file('{secret}', 'LineAsString')",
    "SELECT * FROM FILE('{environ}', 'RawBLOB')",
    "SELECT * FROM file('{keys}', 'JSONAsString')",
    "SELECT * FROM numbers(1) JOIN file('{secret}', 'LineAsString') ON 1",
    "SELECT * FROM fileCluster('default', '{secret}', 'LineAsString')",
    "SELECT * FROM url('file://{secret}', 'LineAsString')",
    "SELECT * FROM executable('cat {secret}', 'LineAsString', 'x String')",
    "SELECT * FROM input('x String')",
    "SELECT * FROM remote('127.0.0.1', system.one)",
    "SELECT * FROM s3('http://127.0.0.1:1/b/k', 'CSV')",
    "SELECT * FROM filesystem('{state}')",
    "SELECT * FROM python(x)",
    "SELECT * FROM merge('system', '.*')",
    "SELECT * FROM view(SELECT file('{secret}'))",
    "SELECT * APPLY(file) FROM (SELECT '{secret}' AS p)",
    "DESCRIBE TABLE file('{secret}', 'LineAsString')",
    "DESC (SELECT file('{secret}'))",
    "EXPLAIN SYNTAX SELECT * FROM file('{secret}', 'LineAsString')",
    "EXPLAIN PLAN SELECT file('{secret}')",
    "EXPLAIN QUERY TREE SELECT file('{secret}')",
    "EXPLAIN ESTIMATE SELECT * FROM file('{secret}', 'LineAsString')",
    "SELECT * FROM dictionary('d')",
    "SELECT dictGet('d', 'a', toUInt64(1))",
    "SELECT getSetting('max_threads'), getServerSetting('path')",
    "SELECT 1 SETTINGS readonly = 0",
    "SELECT 1 SETTINGS max_execution_time = 0, max_result_rows = 0",
    "SELECT name, value FROM system.server_settings",
    "SELECT path FROM system.disks",
    "SELECT * FROM system.users",
    "SHOW GRANTS",
    "SELECT 1; SELECT file('{secret}')",
]

# Writing a file: {out} is a fresh path, {pth} a .pth in a venv's site-packages (runs
# code at the next Python start), {keys} the live API keys file.
WRITES = [
    "SELECT 1 INTO OUTFILE '{out}'",
    "select 1 into outfile '{out}'",
    "SELECT 1 /* a */ INTO /* b */ OUTFILE '{out}'",
    "SELECT 'import os' INTO OUTFILE '{pth}' FORMAT TSVRaw",
    "SELECT 'x' INTO OUTFILE '{keys}' TRUNCATE",
    "SELECT 'x' INTO OUTFILE '{keys}' APPEND",
    "SELECT 1 INTO OUTFILE '{out}' AND STDOUT",
    "SELECT 1 INTO OUTFILE '{out}.gz' COMPRESSION 'gzip' LEVEL 3",
    "SELECT 1 INTO OUTFILE '{out}' TRUNCATE FORMAT CSV",
    "SELECT 1 UNION ALL SELECT 2 INTO OUTFILE '{out}'",
    "(SELECT 1) UNION DISTINCT (SELECT 2) INTO OUTFILE '{out}'",
    "WITH 1 AS x SELECT x INTO OUTFILE '{out}'",
    "EXPLAIN SELECT 1 INTO OUTFILE '{out}'",
    "EXPLAIN AST SELECT 1 INTO OUTFILE '{out}'",
    "DESCRIBE TABLE usage_events INTO OUTFILE '{out}'",
    "SHOW TABLES INTO OUTFILE '{out}'",
    "SHOW CREATE TABLE usage_events INTO OUTFILE '{out}'",
    "SELECT 1 FORMAT CSV",
    "SELECT 1 SETTINGS input_format_record_errors_file_path = '{out}'",
    "INSERT INTO FUNCTION file('{out}', 'CSV') SELECT 1",
    "CREATE TABLE leak (s String) ENGINE = File(CSV, '{out}')",
    "SELECT 1; SELECT 1 INTO OUTFILE '{out}'",
]


@dataclass
class Target:
    worker: Worker
    state: Path
    paths: dict[str, str]
    keys_file: Path
    site_packages: Path
    admin: str
    customer: str

    def post(self, sql: str, key: str | None) -> requests.Response:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return requests.post(
            f"{self.worker.web_url}/v1/sql", json={"sql": sql}, headers=headers, timeout=60
        )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def target(module_stack: StackSlice) -> Iterator[Target]:
    stack = module_stack
    tmp = stack.tmp
    state = tmp / "state"
    state.mkdir()
    admin = keys_cli(state, "create", "admin")
    customer = keys_cli(state, "create", "acme-only", "--customer", "acme")
    (state / "secret.txt").write_text(FILE_MARKER + "\n")
    site_packages = tmp / "venv" / "lib" / "python3.11" / "site-packages"
    site_packages.mkdir(parents=True)
    out_dir = tmp / "out"
    out_dir.mkdir()
    worker = stack.start_worker(
        stack.meters_file(METERS),
        METERSTREAM_CLICKHOUSE_PASSWORD=ENV_MARKER,  # ignored by chdb; a secret in the env
        METERSTREAM_API_READ_AUTH="auto",
    )
    paths = {
        "environ": "/proc/self/environ",
        "secret": str(state / "secret.txt"),
        "keys": str(state / "api_keys.json"),
        "state": str(state),
        "out": str(out_dir / "leak.txt"),
        "pth": str(site_packages / "evil.pth"),
    }
    try:
        yield Target(worker, state, paths, state / "api_keys.json", site_packages, admin, customer)
    finally:
        stack.stop_all()


CALLERS = ["no key", "customer key", "unrestricted key"]


def caller_key(target: Target, caller: str) -> str | None:
    return {"no key": None, "customer key": target.customer, "unrestricted key": target.admin}[
        caller
    ]


def assert_refused(target: Target, sql: str, caller: str) -> dict[str, Any]:
    response = target.post(sql.format(**target.paths), caller_key(target, caller))
    text = response.text
    assert 400 <= response.status_code < 500, (sql, response.status_code, text[:300])
    assert ENV_MARKER not in text and FILE_MARKER not in text, (sql, text[:300])
    assert '"hash"' not in text and "msk_" not in text, (sql, text[:300])
    body: dict[str, Any] = response.json()
    return body


def test_the_worker_answers_plain_reads(target: Target) -> None:
    """The positive control: the same worker and callers do get answers."""
    for key in (None, target.admin):
        response = target.post("SELECT count() AS n FROM usage_events", key)
        assert response.status_code == 200, response.text
        assert response.json()["columns"] == ["n"]
    tables = "SELECT name FROM system.tables WHERE database = currentDatabase()"
    response = target.post(tables, None)
    assert {"usage_events", "meter_windows"} <= {row[0] for row in response.json()["rows"]}


@pytest.mark.parametrize("caller", CALLERS)
def test_no_sql_reads_a_file(target: Target, caller: str) -> None:
    before = digest(target.keys_file)
    for sql in READS:
        assert_refused(target, sql, caller)
    assert digest(target.keys_file) == before


@pytest.mark.parametrize("caller", CALLERS)
def test_no_sql_writes_a_file(target: Target, caller: str) -> None:
    before = digest(target.keys_file)
    for sql in WRITES:
        assert_refused(target, sql, caller)
    out = Path(target.paths["out"])
    assert list(out.parent.iterdir()) == [], "a query wrote a file"
    assert list(target.site_packages.iterdir()) == [], "a query wrote into site-packages"
    assert digest(target.keys_file) == before, "a query changed the API keys file"
    # ...and the keys still work: a keyed write is accepted, not a 500.
    event = {"event_name": "api_call", "customer_id": "acme", "idempotency_key": "k1"}
    response = requests.post(
        f"{target.worker.web_url}/v1/events",
        json=event,
        headers={"Authorization": f"Bearer {target.customer}"},
        timeout=30,
    )
    assert response.status_code == 202, response.text


def test_refusals_say_why(target: Target) -> None:
    cases = {
        "SELECT file('{secret}')": "function file() is not allowed",
        "SELECT * FROM file('{secret}', 'LineAsString')": "table function file() is not allowed",
        "SELECT 1 INTO OUTFILE '{out}' APPEND": "INTO OUTFILE",
        "SELECT 1 SETTINGS max_threads = 64": "SETTINGS",
        "SELECT 1; SELECT 2": "exactly one statement",
        "SELECT * FROM system.server_settings": "system.server_settings is not readable",
        "DROP TABLE usage_events": "only SELECT, EXPLAIN, DESCRIBE and SHOW",
    }
    for sql, reason in cases.items():
        body = assert_refused(target, sql, "unrestricted key")
        assert reason in body["error"], (sql, body)


def test_the_cli_makes_no_lasting_key(target: Target) -> None:
    """`meterstream sql` through the worker: a key for the one command, never on disk;
    the plain-text cli.key of older versions is revoked and deleted."""
    old = keys_cli(target.state, "create", "local-cli")
    (target.state / "cli.key").write_text(old + "\n")  # as older versions kept it
    write_endpoints(target.state, {"web_url": target.worker.web_url})
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    result = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "sql", "SELECT 41 + 1 AS answer",
         "--format", "json", "--state-dir", str(target.state)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"answer": 42}]
    assert not (target.state / "cli.key").exists()
    keys = json.loads(target.keys_file.read_text())["keys"]
    assert sorted(k["name"] for k in keys if k["revoked_at"] is None) == ["acme-only", "admin"]
    assert [k["name"] for k in keys if k["revoked_at"] is not None] == ["local-cli"]
    for path in target.state.rglob("*"):
        if path.is_file():
            assert b"msk_" not in path.read_bytes(), f"a key in plain text: {path}"
    events = requests.post(
        f"{target.worker.web_url}/v1/events",
        json={"event_name": "api_call", "customer_id": "globex", "idempotency_key": "k2"},
        headers={"Authorization": f"Bearer {old}"},
        timeout=30,
    )
    assert events.status_code == 401  # the old local-cli key no longer writes


def test_the_cli_without_a_worker_refuses_the_same(tmp_path: Path) -> None:
    """`meterstream sql` opening the embedded engine itself goes through the same check."""
    secret = tmp_path / "secret.txt"
    secret.write_text(FILE_MARKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}
    for sql in (f"SELECT file('{secret}')", f"SELECT 1 INTO OUTFILE '{tmp_path / 'o.txt'}'"):
        result = subprocess.run(
            [sys.executable, "-m", "meterstream.cli", "sql", sql, "--state-dir", str(tmp_path)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode != 0
        assert "refused" in result.stderr, result.stderr
        assert FILE_MARKER not in result.stdout + result.stderr
    assert not (tmp_path / "o.txt").exists()
