"""A private state dir (pipeline/cli/statedir.py) and the customer a key may be restricted to
(pipeline/api/keys.py), without a server."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meterstream.api.keys import KeyStore, customer_id_problem
from meterstream.cli.statedir import make_private, notice
from meterstream.errors import ConfigError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_make_private_tightens_every_entry_and_says_so(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "clickhouse" / "data").mkdir(parents=True)
    (state / "clickhouse" / "data" / "part.bin").write_bytes(b"record")
    (state / "worker.log").write_text("log\n")
    (state / "run.sh").write_text("#!/bin/sh\n")
    for path, loose in (
        (state, 0o755),
        (state / "clickhouse", 0o775),
        (state / "clickhouse" / "data", 0o755),
        (state / "clickhouse" / "data" / "part.bin", 0o644),
        (state / "worker.log", 0o666),
        (state / "run.sh", 0o755),
    ):
        path.chmod(loose)
    result = make_private(state)
    assert result.changed == 6 and not result.problems
    assert [mode(p) for p in (state, state / "clickhouse", state / "clickhouse" / "data")] == [
        0o700
    ] * 3
    assert mode(state / "clickhouse" / "data" / "part.bin") == 0o600
    assert mode(state / "worker.log") == 0o600
    assert mode(state / "run.sh") == 0o700  # owner bits kept
    line = notice(state, result)
    assert line is not None and "6 entries" in line and str(state) in line
    again = make_private(state)
    assert again.changed == 0 and notice(state, again) is None


def test_make_private_follows_no_symlink_and_ignores_a_missing_dir(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    outside.chmod(0o755)
    (outside / "shared.txt").write_text("not ours\n")
    (outside / "shared.txt").chmod(0o644)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "to-dir").symlink_to(outside)
    (state / "to-file").symlink_to(outside / "shared.txt")
    assert make_private(state).changed == 0
    assert mode(outside) == 0o755 and mode(outside / "shared.txt") == 0o644
    assert make_private(tmp_path / "nope").changed == 0
    # a state dir given as a link: the dir it names is the state dir
    assert make_private(state / "to-dir").changed == 2 and mode(outside) == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to own a file as another user")
def test_make_private_leaves_other_users_files_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    theirs = state / "theirs.txt"
    theirs.write_text("x")
    theirs.chmod(0o644)
    os.chown(theirs, 12345, 12345)
    assert make_private(state).changed == 0 and mode(theirs) == 0o644


@pytest.mark.parametrize(
    "customer", ["", " ", "\t\n", "x" * 201, " acme", "acme\n", "ac\x00me", "ac\u200bme\x7f"]
)
def test_an_invalid_customer_restricts_no_key(tmp_path: Path, customer: str) -> None:
    assert customer_id_problem(customer) is not None
    store = KeyStore(tmp_path / "api_keys.json")
    with pytest.raises(ConfigError) as info:
        store.create("billing", customer)
    assert "--customer" in str(info.value)
    assert store.listing() == []  # nothing written: never an unrestricted key


@pytest.mark.parametrize("customer", ["acme", "a", "x" * 200, "cus 42/eu", "ü-Kunde"])
def test_a_valid_customer_restricts_the_key(tmp_path: Path, customer: str) -> None:
    assert customer_id_problem(customer) is None
    store = KeyStore(tmp_path / "api_keys.json")
    key, text = store.create("billing", customer)
    assert key.customer_id == customer
    verified = store.verify(text)
    assert verified is not None and verified.customer_id == customer
    unrestricted, _ = store.create("admin")
    assert unrestricted.customer_id is None
