"""The producer SDK alone: ``pip install ./clients/python`` into a fresh venv brings no
Faust, chdb or ClickHouse driver, and the README's example, run by that venv's Python,
records events that a real worker (Tansu, chdb) counts."""

from __future__ import annotations

import json
import re
import subprocess
import venv
from pathlib import Path

import pytest

from tests.harness import REPO, StackSlice, wait_until

pytestmark = pytest.mark.integration

METERS = """
meters:
  - name: api_calls
    event_name: api_request
    aggregation: count
    window: hour
"""

HEAVY = ("faust-streaming", "faust", "chdb", "clickhouse-connect", "stripe", "pydantic")


def readme_example() -> str:
    """The README's example for the SDK alone (the python block importing meterstream_client)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    [example] = [b for b in blocks if "from meterstream_client import" in b]
    return example


def run(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    """``code`` run by ``python`` outside the repository (nothing of it on the path)."""
    return subprocess.run(
        [str(python), "-c", code], cwd="/", capture_output=True, text=True, timeout=120
    )


def pip(python: Path, *args: str) -> None:
    done = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "install", "--quiet", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def light_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the SDK's lock (requirements/client.txt) and the SDK alone."""
    env = tmp_path_factory.mktemp("sdk-venv") / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    # Exactly the tested versions, every download hash-checked (pip's cache serves what
    # `make install` fetched); then the SDK with no dependency resolution of its own.
    pip(python, "--require-hashes", "--no-deps", "-r", "requirements/client.txt")
    pip(python, "--no-deps", "--no-build-isolation", "./clients/python")
    return python


def test_the_sdk_installs_without_the_worker(light_python: Path) -> None:
    listed = subprocess.run(
        [str(light_python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    names = {line.split("==")[0].lower() for line in listed.splitlines() if "==" in line}
    assert "meterstream-client" in names and "aiokafka" in names
    assert "meterstream" not in names
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
    probe = (
        "import importlib.util, meterstream_client, meterstream_client.contract\n"
        "missing = [m for m in ('faust', 'chdb', 'clickhouse_connect', 'meterstream')"
        " if importlib.util.find_spec(m) is None]\n"
        "print(meterstream_client.__file__, len(missing))\n"
    )
    done = run(light_python, probe)
    assert done.returncode == 0, done.stderr
    where, missing = done.stdout.split()
    assert "site-packages" in where and missing == "4", done.stdout


def test_the_sdk_checks_the_workers_contract(light_python: Path) -> None:
    """A bad event raises on the caller's thread with the contract's words, as the worker
    would dead-letter it; nothing is sent (no broker is named that exists)."""
    code = (
        "from meterstream_client import InvalidEvent, UsageClient\n"
        "usage = UsageClient('127.0.0.1:1', flush_at_exit=None)\n"
        "try:\n"
        "    usage.record('', 'acme', {})\n"
        "except InvalidEvent as exc:\n"
        "    print('refused:', exc)\n"
        "usage.close(0)\n"
    )
    done = run(light_python, code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:") and "event_name" in done.stdout, done.stdout


def test_readme_example_records_events_the_worker_counts(
    light_python: Path, stack: StackSlice
) -> None:
    worker = stack.start_worker(stack.meters_file(METERS))  # creates the topics
    example = readme_example()
    endpoints = 'Path(".meterstream/endpoints.json").read_text()'
    assert endpoints in example and 'topic="usage-events"' in example
    # The endpoints `make run` writes, here this test's broker and topic.
    here = json.dumps({"kafka_bootstrap": stack.bootstrap})
    script = example.replace(endpoints, repr(here)).replace(
        'topic="usage-events"', f"topic={stack.topic!r}"
    )
    done = run(light_python, script)
    assert done.returncode == 0, done.stdout + done.stderr

    def counted() -> bool:
        rows = worker.sql(
            "SELECT sum(event_count) AS n FROM (SELECT argMax(event_count, version) AS "
            "event_count FROM meter_windows WHERE meter = 'api_calls' AND customer_id = 'acme' "
            "GROUP BY customer_id, group_key, window_start)"
        )
        return int(rows[0]["n"] or 0) == 3

    wait_until(counted, timeout=120, what="3 events counted by the worker")
    recorded = worker.sql(
        "SELECT count() AS n FROM usage_events FINAL WHERE customer_id = 'acme' "
        "AND event_name = 'api_request'"
    )
    assert recorded[0]["n"] == 3
