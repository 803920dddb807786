"""Customer links to the billing page: signed by the operator, expiring, read-only.

A link's token is ``msl_<customer, base64url>.<expiry, epoch seconds>.<signature>``, the
signature an HMAC-SHA256 over the customer id and the expiry with the operator's secret
(``METERSTREAM_BILLING_LINK_SECRET``, else a random one kept in the state dir, 0600). The
page sends it as a Bearer token to the read routes; :func:`link_key` turns a valid one into
a key restricted to its customer that no write route accepts (pipeline/api/web.py
``reader``), so a link shows one customer's numbers and nothing else, until it expires.
Nothing is stored per link: to revoke every link at once, change the secret.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Final

from meterstream.api.keys import ApiKey
from meterstream.errors import ConfigError
from meterstream.settings import Settings

PREFIX: Final = "msl_"
SECRET_FILE: Final = "billing-link.secret"
MIN_SECRET_BYTES: Final = 16


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, customer_id: str, expires: int) -> str:
    message = customer_id.encode() + b"\n" + str(expires).encode()
    return _b64(hmac.new(secret, message, hashlib.sha256).digest())


def sign(secret: bytes, customer_id: str, expires_at: int) -> str:
    """A token for ``customer_id`` valid until ``expires_at`` (epoch seconds)."""
    signature = _signature(secret, customer_id, expires_at)
    return f"{PREFIX}{_b64(customer_id.encode())}.{expires_at}.{signature}"


def verify(secret: bytes, token: str, now: float) -> str | None:
    """The customer of a valid, unexpired token, else None (never raises on bad input)."""
    if not token.startswith(PREFIX):
        return None
    parts = token[len(PREFIX) :].split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    try:
        customer_id = _unb64(parts[0]).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    expires = int(parts[1])
    expected = _signature(secret, customer_id, expires)
    if not hmac.compare_digest(expected, parts[2]) or expires <= now:
        return None
    return customer_id


def link_key(secret: bytes, token: str, now: float) -> ApiKey | None:
    """A read key restricted to the link's customer, or None for anything else."""
    customer_id = verify(secret, token, now)
    if customer_id is None:
        return None
    expires = dt.datetime.fromtimestamp(int(token.split(".")[1]), dt.UTC).isoformat()
    return ApiKey(
        id="link",
        name="billing link",
        hash="",
        created_at="",
        customer_id=customer_id,
        expires_at=expires,
    )


def link_secret(settings: Settings, *, create: bool) -> bytes | None:
    """The operator's signing secret: the setting, else the state dir's file (made, 0600,
    when ``create``; None when absent and not ``create``)."""
    if settings.billing_link_secret is not None:
        value = settings.billing_link_secret.get_secret_value().encode()
        if len(value) < MIN_SECRET_BYTES:
            problem = f"METERSTREAM_BILLING_LINK_SECRET: at least {MIN_SECRET_BYTES} bytes"
            raise ConfigError([problem])
        return value
    path = settings.state_dir / SECRET_FILE
    try:
        return _read_secret(path)
    except FileNotFoundError:
        if not create:
            return None
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _read_secret(path)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    value = path.read_text().strip().encode()
    if len(value) < MIN_SECRET_BYTES:
        raise ConfigError([f"{path}: the billing link secret is missing or too short"])
    return value
