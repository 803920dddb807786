"""``meterstream billing link``: a signed, expiring link to one customer's billing page."""

from __future__ import annotations

import sys
import time
import urllib.parse

from meterstream.api import links
from meterstream.endpoints import web_url
from meterstream.errors import MeterstreamError
from meterstream.meters.config import parse_duration
from meterstream.settings import Settings


def make_link(settings: Settings, customer: str, expires: str, base_url: str | None) -> str:
    if not 1 <= len(customer) <= 200:
        raise MeterstreamError("a customer_id is 1-200 characters")
    try:
        seconds = parse_duration(expires, minimum=60)
    except ValueError as exc:
        raise MeterstreamError(f"--expires: {exc}") from None
    if seconds > settings.billing_link_max_seconds:
        raise MeterstreamError(
            f"--expires: at most {settings.billing_link_max_seconds} s"
            " (METERSTREAM_BILLING_LINK_MAX_SECONDS)"
        )
    secret = links.link_secret(settings, create=True)
    assert secret is not None  # create=True makes one
    token = links.sign(secret, customer, int(time.time()) + seconds)
    base = base_url or web_url(settings) or f"http://{settings.web_host}:{settings.web_port}"
    return f"{base.rstrip('/')}/billing/{urllib.parse.quote(customer, safe='')}#link={token}"


def print_link(settings: Settings, customer: str, expires: str, base_url: str | None) -> int:
    print(make_link(settings, customer, expires, base_url))
    print(
        "anyone with this link sees this customer's usage and billing until it expires;"
        " to revoke every link, change the secret (README, The billing page)",
        file=sys.stderr,
    )
    return 0
