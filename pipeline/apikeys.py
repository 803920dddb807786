"""API keys for the worker's web API: created once, stored only as a hash, revocable.

A key looks like ``msk_<id>_<secret>``. The id is public (it names the key in
listings and logs, like the prefix of a Stripe key); the secret is 256 random
bits, shown once by ``meterstream keys create`` and stored only as its SHA-256.
(A slow password hash buys nothing for a random 256-bit secret.) Checking a
key compares hashes with :func:`hmac.compare_digest`, so the time taken does
not depend on how much of the secret matched.

The store is one JSON file (default ``<state dir>/api_keys.json``, mode 0600),
written atomically. A worker re-reads it whenever it changes (inode, size or mtime),
so a revocation takes effect on the next request. In production the file is
mounted into every worker (a Kubernetes Secret, see deploy/README.md).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

PREFIX = "msk_"
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    hash: str
    created_at: str
    customer_id: str | None = None  # when set, the key may only write and read this customer
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict[str, Any]:
        """What listings show: never the hash."""
        return {k: v for k, v in asdict(self).items() if k != "hash"}


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


MAX_CUSTOMER_ID = 200  # the event contract's customer_id: a string of 1-200 characters


def customer_id_problem(customer_id: str) -> str | None:
    """Why ``customer_id`` cannot restrict a key, or None.

    The event contract's rule (1-200 characters), and no blank id, surrounding
    whitespace or control characters: those are typos (``--customer "$UNSET"``), and
    a restriction nobody's events carry is useless. An empty id must never mean "every
    customer".
    """
    if not customer_id or not customer_id.strip():
        return f"must be a customer_id (1-200 characters), not empty or blank: {customer_id!r}"
    if len(customer_id) > MAX_CUSTOMER_ID:
        return f"is {len(customer_id)} characters; a customer_id has at most {MAX_CUSTOMER_ID}"
    if customer_id != customer_id.strip():
        return f"{customer_id!r} has leading or trailing whitespace"
    if any(not ch.isprintable() for ch in customer_id):
        return f"{customer_id!r} has control characters"
    return None


def split_key(token: str) -> tuple[str, str] | None:
    """``msk_<id>_<secret>`` -> (id, secret), or None when it is not shaped like a key."""
    if not token.startswith(PREFIX):
        return None
    key_id, sep, secret = token[len(PREFIX) :].partition("_")
    if not sep or not key_id or not secret:
        return None
    return key_id, secret


class KeyStore:
    """The key file, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, ApiKey] = {}
        self._seen: tuple[int, int, int] | None = None

    # -- reading ---------------------------------------------------------------------

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._keys, self._seen = {}, None
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rewrite is a new inode
        if stamp == self._seen:
            return
        self._keys = self._read()
        self._seen = stamp

    def _read(self) -> dict[str, ApiKey]:
        try:
            doc = json.loads(self.path.read_text())
            return {k["id"]: ApiKey(**k) for k in doc.get("keys", [])}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError([f"{self.path}: not a meterstream key file ({exc})"]) from None

    def listing(self) -> list[ApiKey]:
        self._refresh()
        return sorted(self._keys.values(), key=lambda k: k.created_at)

    def verify(self, token: str) -> ApiKey | None:
        """The active key this token is, or None. Constant time in the secret."""
        self._refresh()
        parts = split_key(token)
        key = self._keys.get(parts[0]) if parts else None
        expected = key.hash if key is not None else _DUMMY_HASH
        matches = hmac.compare_digest(_hash(parts[1] if parts else token), expected)
        if key is None or not matches or not key.active:
            return None
        return key

    # -- writing (the CLI) -----------------------------------------------------------

    def _write(self, keys: dict[str, ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"keys": [asdict(k) for k in keys.values()]}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".api_keys.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(body)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._seen = None

    def create(self, name: str, customer_id: str | None = None) -> tuple[ApiKey, str]:
        """A new key; returns it and the full key text, which is never stored.

        ``customer_id=None`` is an unrestricted key; any string restricts it to that
        customer and must be a valid customer_id (:func:`customer_id_problem`).
        """
        problems = ["key name: must not be empty"] if not name.strip() else []
        if customer_id is not None:
            problem = customer_id_problem(customer_id)
            if problem is not None:
                problems.append(f"--customer: {problem}")
        if problems:
            raise ConfigError(problems, source="the new key")
        keys = self._read()
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        key = ApiKey(key_id, name, _hash(secret), _now(), customer_id)
        keys[key_id] = key
        self._write(keys)
        return key, f"{PREFIX}{key_id}_{secret}"

    def revoke(self, key_id: str) -> ApiKey:
        keys = self._read()
        key_id = key_id.removeprefix(PREFIX).split("_")[0]
        if key_id not in keys:
            raise ConfigError([f"no key with id {key_id} in {self.path}"])
        key = keys[key_id]
        if key.active:
            key = ApiKey(**{**asdict(key), "revoked_at": _now()})
            keys[key_id] = key
            self._write(keys)
        return key


def local_cli_key(store: KeyStore, path: Path) -> str:
    """The key the CLI on this machine uses for a worker that shares its state dir.

    Created on first use as an ordinary key named ``local-cli`` and kept in ``path``
    (mode 0600): whoever can read the state dir can already read the record, so
    file permissions are the authority, as with a Unix socket. Revoke it like any
    key; a new one is made next time.
    """
    if path.exists():
        text = path.read_text().strip()
        if store.verify(text) is not None:
            return text
    _, text = store.create("local-cli")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    return text
