"""The emulator's command-line options for webhooks, shared by ``stripe-emulator``
(sinks/stripe/emulator/server.py ``main``) and ``meterstream stripe-emulator``
(pipeline/cli/main.py); light to import (the CLI builds its parser for every command).

``--webhook-url URL`` makes a webhook endpoint at start (id ``we_cli_<hash of the
URL>``: created, or updated when the state file has it, and kept through
``/_emulator/reset``) that receives ``--webhook-events`` (comma-separated types, ``*``
= all, the default), signed with ``--webhook-secret`` (``whsec_...``; default
``$STRIPE_EMULATOR_WEBHOOK_SECRET``, else a new secret printed to stderr at start).
``--webhook-retry-base-ms`` (500) and ``--webhook-max-attempts`` (5) set the retry
schedule of every endpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

WEBHOOK_SECRET_ENV = "STRIPE_EMULATOR_WEBHOOK_SECRET"
DEFAULT_RETRY_BASE_MS = 500
DEFAULT_MAX_ATTEMPTS = 5


@dataclass(frozen=True)
class WebhookOption:
    """A webhook endpoint configured at start (``--webhook-url``)."""

    url: str
    secret: str
    enabled_events: tuple[str, ...] = ("*",)

    @property
    def endpoint_id(self) -> str:
        return "we_cli_" + hashlib.sha256(self.url.encode()).hexdigest()[:16]


def add_webhook_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--webhook-url", help="send Stripe events to this URL (a webhook endpoint made at start)"
    )
    parser.add_argument(
        "--webhook-secret",
        help=f"its signing secret, whsec_... (default: ${WEBHOOK_SECRET_ENV}, else a new one, "
        "printed at start)",
    )
    parser.add_argument(
        "--webhook-events", default="*", help="event types it receives, comma-separated (* = all)"
    )
    parser.add_argument(
        "--webhook-retry-base-ms",
        type=int,
        default=DEFAULT_RETRY_BASE_MS,
        help="the first retry's wait (ms), doubling at each failed attempt",
    )
    parser.add_argument(
        "--webhook-max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        help="attempts per delivery before it is given up",
    )


def webhook_options(
    args: argparse.Namespace, new_secret: Callable[[], str]
) -> tuple[int, int, list[WebhookOption]]:
    """``(retry base ms, max attempts, endpoints)`` from the options; ``ValueError`` if wrong."""
    if args.webhook_retry_base_ms < 1 or args.webhook_max_attempts < 1:
        raise ValueError("--webhook-retry-base-ms and --webhook-max-attempts must be >= 1")
    if not args.webhook_url:
        return args.webhook_retry_base_ms, args.webhook_max_attempts, []
    secret = args.webhook_secret or os.environ.get(WEBHOOK_SECRET_ENV) or ""
    if not secret:
        secret = new_secret()
        print(f"stripe-emulator: webhook signing secret {secret}", file=sys.stderr, flush=True)
    if not secret.startswith("whsec_"):
        raise ValueError("--webhook-secret must start with whsec_")
    events = tuple(e.strip() for e in args.webhook_events.split(",") if e.strip()) or ("*",)
    option = WebhookOption(args.webhook_url, secret, events)
    return args.webhook_retry_base_ms, args.webhook_max_attempts, [option]
