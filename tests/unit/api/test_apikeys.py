"""API keys: a broken file is the operator's error, never a producer's; the CLI's keys are
short-lived and never on disk."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest

from meterstream.api.keys import KeyStore, parse_keys, retire_cli_key_file
from meterstream.errors import ConfigError
from meterstream.metrics import Metrics


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "not JSON"),
        ('{"keys": [{"id": "a"', "not JSON"),
        ("[1, 2]", "expected an object"),
        ('{"keys": "abc"}', "expected an object"),
        ('{"keys": [1]}', "keys[0] is not an object"),
        ('{"keys": [{"id": "a"}]}', "missing ['created_at', 'hash', 'name']"),
        ('{"keys": [{"id": "a", "name": "n", "hash": "x",'
         ' "created_at": "2026-01-01T00:00:00+00:00"}]}', "not a SHA-256"),
    ],
)  # fmt: skip
def test_a_broken_file_says_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_keys(text)


def test_the_worker_keeps_the_last_good_keys_and_reports_each_bad_version_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "api_keys.json"
    writer = KeyStore(path)
    _, token = writer.create("billing")
    metrics = Metrics()
    worker = KeyStore(path, metrics)
    worker.check()
    assert worker.verify(token) is not None and worker.status() == "ok"
    assert metrics.api_keys_file_ok.get() == 1

    good = path.read_text()
    with caplog.at_level(logging.ERROR, logger="meterstream.apikeys"):
        path.write_text(good[: len(good) // 2])  # truncated by hand
        for _ in range(5):
            assert worker.verify(token) is not None  # still served
        assert worker.status().startswith("error: ")
        assert "serving the 1 key(s) read before" in worker.status()
        assert metrics.api_keys_file_ok.get() == 0
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
        path.write_text("{not json either")
        assert worker.verify(token) is not None
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    assert metrics.api_keys_file_errors.get() == 2
    with pytest.raises(ConfigError, match=str(path)):
        KeyStore(path).check()  # a worker starting now refuses, naming the file
    with pytest.raises(ConfigError):
        writer.create("another")  # the CLI does not overwrite a broken file

    path.write_text(good)
    assert worker.verify(token) is not None and worker.status() == "ok"
    assert metrics.api_keys_file_ok.get() == 1


def test_an_expired_key_never_verifies_and_is_dropped_by_the_next_create(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "api_keys.json")
    _, token = store.create("local-cli", expires_in=60)
    assert store.verify(token) is not None
    doc = json.loads(store.path.read_text())
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)).isoformat(timespec="seconds")
    doc["keys"][0]["expires_at"] = past
    store.path.write_text(json.dumps(doc))
    assert store.verify(token) is None
    store.create("other")
    assert [k.name for k in store.listing()] == ["other"]


def test_delete_removes_a_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "api_keys.json")
    key, token = store.create("local-cli", expires_in=60)
    store.delete(key.id)
    assert store.verify(token) is None and store.listing() == []


def test_an_old_cli_key_file_is_revoked_and_removed(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "api_keys.json")
    _, token = store.create("local-cli")  # what older versions made and kept
    (tmp_path / "cli.key").write_text(token + "\n")
    assert retire_cli_key_file(store, tmp_path)
    assert not (tmp_path / "cli.key").exists()
    assert store.verify(token) is None
    assert retire_cli_key_file(store, tmp_path) is False
