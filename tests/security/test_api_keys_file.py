"""A broken API keys file is a clear error for the operator, never a 500 for producers
(issue 20, item 1), on a real worker."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.harness import REPO, StackSlice, wait_until
from tests.support.cli import keys_cli
from tests.support.meters import meter_entry, meters_yaml

pytestmark = pytest.mark.integration

METERS = meters_yaml(meter_entry("calls", "api_call", "count"))


@pytest.mark.parametrize(
    "text",
    ["", '{"keys": [{"id": "ab", "name": "x"', "[]", '{"keys": [{"id": "ab"}]}'],
    ids=["empty", "truncated", "wrong-shape", "missing-fields"],
)
def test_the_worker_refuses_to_start_with_a_broken_keys_file(stack: StackSlice, text: str) -> None:
    state = stack.tmp / "state"
    state.mkdir(parents=True, exist_ok=True)
    (state / "api_keys.json").write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "meterstream.cli", "worker"],
        cwd=REPO,
        env=stack.env(stack.meters_file(METERS)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(state / "api_keys.json") in result.stderr
    assert "not a meterstream key file" in result.stderr


def test_a_keys_file_broken_while_running_keeps_the_last_good_keys(stack: StackSlice) -> None:
    state = stack.tmp / "state"
    key = keys_cli(state, "create", "billing")
    worker = stack.start_worker(stack.meters_file(METERS))
    url = worker.web_url

    def send(key_id: str, token: str = key) -> requests.Response:
        return requests.post(
            f"{url}/v1/events",
            json={"event_name": "api_call", "customer_id": "acme", "idempotency_key": key_id},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )

    assert send("before").status_code == 202
    keys_file = state / "api_keys.json"
    good = keys_file.read_text()
    keys_file.write_text(good[: len(good) // 2])  # truncated
    answers = [send(f"during-{i}").status_code for i in range(20)]
    assert answers == [202] * 20, answers  # producers see nothing of it
    assert send("x", "msk_abc_def").status_code == 401  # and unknown keys still fail

    ready = requests.get(f"{url}/readyz", timeout=30).json()
    assert (
        ready["api_keys"].startswith("error: ")
        and "not a meterstream key file" in ready["api_keys"]
    )
    assert "meterstream_api_keys_file_ok 0" in worker.metrics()
    errors = [line for line in worker.log().splitlines() if "API keys file broken" in line]
    assert len(errors) == 1, errors  # once per bad version, not per request

    keys_file.write_text(good)
    assert send("after").status_code == 202
    wait_until(
        lambda: requests.get(f"{url}/readyz", timeout=30).json()["api_keys"] == "ok",
        what="keys file healthy again",
    )
    assert "meterstream_api_keys_file_ok 1" in worker.metrics()
    wait_until(
        lambda: worker.sql("SELECT count() AS n FROM usage_events")[0]["n"] == 22,
        what="every accepted event recorded",
        timeout=60,
    )


def test_no_keys_file_means_no_keys_not_an_error(stack: StackSlice) -> None:
    worker = stack.start_worker(stack.meters_file(METERS))
    response = requests.post(
        f"{worker.web_url}/v1/events",
        json={"event_name": "api_call", "customer_id": "acme"},
        headers={"Authorization": "Bearer msk_abc_def"},
        timeout=30,
    )
    assert response.status_code == 401
    assert requests.get(f"{worker.web_url}/readyz", timeout=30).json()["api_keys"] == "ok"
