"""API keys for the worker's web API: stored only as a hash, revocable, optionally short-lived.

A key looks like ``msk_<id>_<secret>``. The id is public (it names the key in
listings and logs, like the prefix of a Stripe key); the secret is 256 random
bits, shown once by ``meterstream keys create`` and stored only as its SHA-256.
(A slow password hash buys nothing for a random 256-bit secret.) Checking a
key compares hashes with :func:`hmac.compare_digest`, so the time taken does
not depend on how much of the secret matched.

The store is one JSON file (default ``<state dir>/api_keys.json``, mode 0600),
written atomically under a lock (``api_keys.json.lock``). A worker re-reads it
whenever it changes (inode, size or times), so a revocation takes effect on the
next request. In production the file is mounted into every worker (a
Kubernetes Secret, see deploy/README.md).

A broken file (truncated, not JSON, the wrong shape) is an operator's problem,
never a producer's: the worker refuses to start with one (:meth:`KeyStore.check`
names the file and the problem); if the file breaks while it runs, it keeps
serving the last good keys, logs an ERROR once per broken version and shows it
in ``/readyz`` and ``meterstream_api_keys_file_ok``.

The CLI's key for a worker on this machine (:func:`meterstream.cli.sql.cli_key`) is
made for one command: an ordinary key with ``expires_at``, whose secret lives
only in the CLI's memory and which is deleted when the command ends (an
expired key never verifies, and the next ``create`` drops expired keys). No
working key is ever written to the state dir; :func:`retire_cli_key_file`
revokes and deletes the ``cli.key`` file older versions kept there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meterstream.errors import ConfigError

if TYPE_CHECKING:
    from meterstream.metrics import Metrics

log = logging.getLogger("meterstream.apikeys")

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
    expires_at: str | None = None  # when set, the key stops verifying at this time

    @property
    def active(self) -> bool:
        return self.revoked_at is None and not self.expired()

    def expired(self, now: dt.datetime | None = None) -> bool:
        if self.expires_at is None:
            return False
        return dt.datetime.fromisoformat(self.expires_at) <= (now or dt.datetime.now(dt.UTC))

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


_FIELDS = {f.name for f in fields(ApiKey)}
_REQUIRED = {"id", "name", "hash", "created_at"}


def parse_keys(text: str) -> dict[str, ApiKey]:
    """The keys in a key file's text, or ValueError saying what is wrong with it."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys", []), list):
        raise ValueError('expected an object {"keys": [...]}')
    keys: dict[str, ApiKey] = {}
    for i, entry in enumerate(doc.get("keys", [])):
        if not isinstance(entry, dict):
            raise ValueError(f"keys[{i}] is not an object")
        missing = sorted(_REQUIRED - entry.keys())
        unknown = sorted(entry.keys() - _FIELDS)
        if missing or unknown:
            raise ValueError(f"keys[{i}]: missing {missing}, unknown {unknown}")
        if not all(v is None or isinstance(v, str) for v in entry.values()):
            raise ValueError(f"keys[{i}]: every field is a string or null")
        if not all(isinstance(entry[f], str) and entry[f] for f in _REQUIRED):
            raise ValueError(f"keys[{i}]: {', '.join(sorted(_REQUIRED))} must be non-empty")
        if len(entry["hash"]) != 64 or any(c not in "0123456789abcdef" for c in entry["hash"]):
            raise ValueError(f"keys[{i}]: hash is not a SHA-256 hex digest")
        for stamp in ("created_at", "revoked_at", "expires_at"):
            if entry.get(stamp) is not None:
                try:
                    when = dt.datetime.fromisoformat(entry[stamp])
                except ValueError:
                    raise ValueError(f"keys[{i}]: {stamp} is not an ISO 8601 time") from None
                if when.tzinfo is None:
                    raise ValueError(f"keys[{i}]: {stamp} has no UTC offset")
        if entry["id"] in keys:
            raise ValueError(f"keys[{i}]: id {entry['id']} appears twice")
        keys[entry["id"]] = ApiKey(**entry)
    return keys


def split_key(token: str) -> tuple[str, str] | None:
    """``msk_<id>_<secret>`` -> (id, secret), or None when it is not shaped like a key."""
    if not token.startswith(PREFIX):
        return None
    key_id, sep, secret = token[len(PREFIX) :].partition("_")
    if not sep or not key_id or not secret:
        return None
    return key_id, secret


class KeyStore:
    """The key file, re-read when it changes; the last good keys while it is broken."""

    def __init__(self, path: Path, metrics: Metrics | None = None) -> None:
        self.path = path
        self.metrics = metrics
        self.problem: str | None = None  # what is wrong with the file on disk, if anything
        self._keys: dict[str, ApiKey] = {}
        self._seen: tuple[int, ...] | None = None
        self._bad: tuple[int, ...] | None = None

    # -- reading ---------------------------------------------------------------------

    def check(self) -> None:
        """Read the file now; ConfigError naming the file and the problem if it is broken."""
        self._keys = self._read()
        self._seen, self._bad, self.problem = None, None, None
        self._refresh()

    def status(self) -> str:
        """``ok`` or what is wrong with the file (for ``/readyz``)."""
        self._refresh()
        if self.problem is None:
            return "ok"
        return f"error: {self.problem}; serving the {len(self._keys)} key(s) read before"

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._keys, self._seen = {}, None  # no file: no keys
            self._mark(None)
            return
        except OSError as exc:
            self._broken((0,), f"{self.path}: cannot read it ({exc})")
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)  # a rewrite is a new inode
        if stamp in (self._seen, self._bad):
            return
        try:
            keys = self._read()
        except ConfigError as exc:
            self._broken(stamp, exc.problems[0])
            return
        self._keys, self._seen, self._bad = keys, stamp, None
        self._mark(None)

    def _broken(self, stamp: tuple[int, ...], problem: str) -> None:
        self._bad = stamp
        log.error(
            "API keys file broken, serving the %d key(s) read before: %s",
            len(self._keys),
            problem,
        )
        if self.metrics is not None:
            self.metrics.api_keys_file_errors.inc()
        self._mark(problem)

    def _mark(self, problem: str | None) -> None:
        self.problem = problem
        if self.metrics is not None:
            self.metrics.api_keys_file_ok.set(0 if problem else 1)

    def _read(self) -> dict[str, ApiKey]:
        try:
            return parse_keys(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError([f"{self.path}: not a meterstream key file: {exc}"]) from None

    def listing(self) -> list[ApiKey]:
        """Every key in the file (ConfigError when it is broken)."""
        return sorted(self._read().values(), key=lambda k: k.created_at)

    def verify(self, token: str) -> ApiKey | None:
        """The active key this token is, or None. Constant time in the secret; never raises
        for a broken file (the last good keys answer)."""
        self._refresh()
        parts = split_key(token)
        key = self._keys.get(parts[0]) if parts else None
        expected = key.hash if key is not None else _DUMMY_HASH
        matches = hmac.compare_digest(_hash(parts[1] if parts else token), expected)
        if key is None or not matches or not key.active:
            return None
        return key

    # -- writing (the CLI) -----------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (two CLIs may create keys at once)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, keys: dict[str, ApiKey]) -> None:
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

    def create(
        self, name: str, customer_id: str | None = None, expires_in: float | None = None
    ) -> tuple[ApiKey, str]:
        """A new key; returns it and the full key text, which is never stored.

        ``customer_id=None`` is an unrestricted key; any string restricts it to that
        customer and must be a valid customer_id (:func:`customer_id_problem`).
        ``expires_in`` (seconds) makes a key that stops verifying then; keys
        already expired are dropped from the file on the way.
        """
        problems = ["key name: must not be empty"] if not name.strip() else []
        if customer_id is not None:
            problem = customer_id_problem(customer_id)
            if problem is not None:
                problems.append(f"--customer: {problem}")
        if problems:
            raise ConfigError(problems, source="the new key")
        with self._locked():
            now = dt.datetime.now(dt.UTC)
            keys = {k: v for k, v in self._read().items() if not v.expired(now)}
            key_id = secrets.token_hex(6)
            secret = secrets.token_urlsafe(32)
            expires = None
            if expires_in is not None:
                expires = (now + dt.timedelta(seconds=expires_in)).isoformat(timespec="seconds")
            key = ApiKey(key_id, name, _hash(secret), _now(), customer_id, None, expires)
            keys[key_id] = key
            self._write(keys)
        return key, f"{PREFIX}{key_id}_{secret}"

    def revoke(self, key_id: str) -> ApiKey:
        key_id = key_id.removeprefix(PREFIX).split("_")[0]
        with self._locked():
            keys = self._read()
            if key_id not in keys:
                raise ConfigError([f"no key with id {key_id} in {self.path}"])
            key = keys[key_id]
            if key.revoked_at is None:
                key = ApiKey(**{**asdict(key), "revoked_at": _now()})
                keys[key_id] = key
                self._write(keys)
        return key

    def delete(self, key_id: str) -> None:
        """Remove a key from the file (the CLI's own short-lived keys)."""
        with self._locked():
            keys = self._read()
            if keys.pop(key_id, None) is not None:
                self._write(keys)

    def discard(self, key_id: str) -> None:
        """:meth:`delete`, logging instead of raising (the CLI's own key expires anyway)."""
        try:
            self.delete(key_id)
        except (ConfigError, OSError) as exc:
            log.warning("could not delete the temporary key %s: %s", key_id, exc)


def retire_cli_key_file(store: KeyStore, state_dir: Path) -> bool:
    """Revoke the key in ``<state_dir>/cli.key`` (kept in plain text by older versions)

    and delete the file; True if there was one.
    """
    path = state_dir / "cli.key"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        text = ""
    parts = split_key(text)
    if parts is not None:
        try:
            store.revoke(parts[0])
        except (ConfigError, OSError) as exc:
            log.warning("could not revoke the old local-cli key %s: %s", parts[0], exc)
    path.unlink(missing_ok=True)
    log.warning("removed %s: a plain-text key kept by an older version", path)
    return True
