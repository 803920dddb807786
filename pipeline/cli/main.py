"""``meterstream`` command line. Every command takes ``--state-dir``.

A command loads its own module when it runs (the ``cmd_*`` functions below): each
pulls in a heavy dependency the others do not need (Faust for ``worker``,
clickhouse-connect and the optional chdb for ``migrate``, aiokafka for
``produce``, the demo and the emulator's server for ``run``; pipeline/cli/sql.py
and pipeline/cli/stripe.py load ClickHouse and Stripe's SDK only when a command
opens them), and loading them all costs every command, ``--help`` included,
about 1.7 s more (2.5 s instead of 0.8 s, measured with ``python -X importtime``).
``worker`` also tunes the allocator before its modules fill the heap."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from meterstream.api.keys import KeyStore
from meterstream.cli import corrections as corrections_cli
from meterstream.cli import credits as credits_cli
from meterstream.cli import plans as plans_cli
from meterstream.cli import stripe as stripe_cli
from meterstream.cli.options import command_group, private_state_dir, settings_from
from meterstream.cli.output import add_format, format_table, print_result
from meterstream.cli.progress import progress
from meterstream.cli.sql import print_event_fate, print_usage, reconcile_command, run_sql
from meterstream.cli.statedir import private_umask
from meterstream.embedded.kafka import choose_broker, describe_broker, new_broker
from meterstream.errors import ConfigError, MeterstreamError
from meterstream.meters.config import load_meters
from meterstream.sinks.stripe.emulator.options import add_webhook_arguments


def cmd_run(args: argparse.Namespace) -> int:
    from meterstream.embedded.run import run_stack

    settings = settings_from(args)
    private_state_dir(settings)
    return run_stack(settings, demo=args.demo, duration=args.duration, rate=args.rate)


def cmd_worker(args: argparse.Namespace) -> int:
    from meterstream.worker.allocator import tune_allocator

    tune_allocator()  # before the worker's modules and buffers fill the heap
    from meterstream.cli.worker import main

    settings = settings_from(args)
    private_state_dir(settings)
    return main(settings)


def cmd_broker(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    private_state_dir(settings)
    choice = choose_broker(settings)
    broker = new_broker(choice, settings, port=args.port).start()
    print(f"{describe_broker(broker)} on {broker.bootstrap} ({choice.reason})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while broker.proc is not None and broker.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()
    code = broker.proc.returncode if broker.proc is not None else None
    print(f"meterstream: the broker exited by itself (code {code})", file=sys.stderr)
    return 1


def cmd_stripe_emulator(args: argparse.Namespace) -> int:
    from meterstream.sinks.stripe.emulator.server import run_from_args

    try:
        run_from_args(args)
    except ValueError as err:
        print(f"meterstream stripe-emulator: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from meterstream.cli.produce import produce_file

    settings = settings_from(args)
    return asyncio.run(produce_file(settings, args.file))


def cmd_sql(args: argparse.Namespace) -> int:
    columns, rows = run_sql(settings_from(args), args.query)
    print_result(columns, rows, args.format)
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    print_usage(settings_from(args), args.customer, args.meter, args.period, args.format)
    return 0


def cmd_event(args: argparse.Namespace) -> int:
    return print_event_fate(settings_from(args), args.customer, args.key, args.format)


def cmd_billing_link(args: argparse.Namespace) -> int:
    from meterstream.cli.billing import print_link

    return print_link(settings_from(args), args.customer, args.expires, args.base_url)


def cmd_meters_check(args: argparse.Namespace) -> int:
    config = load_meters(Path(args.file))
    for meter in config.meters:
        since = meter.effective_from_ms
        versions = (
            ""
            if since is None
            else f" ({len(meter.versions)} earlier version(s); this one from "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since / 1000))})"
        )
        print(
            f"ok  {meter.name}: {meter.aggregation} of {meter.event_name} per {meter.window}"
            + versions
        )
    print(f"{args.file}: {len(config.meters)} meter(s), no problems")
    return 0


def cmd_meters_diff(args: argparse.Namespace) -> int:
    from meterstream.cli.meters import print_meters_diff

    return print_meters_diff(settings_from(args), args)


def cmd_meters_recompute(args: argparse.Namespace) -> int:
    from meterstream.cli.meters import print_meters_recompute

    return print_meters_recompute(settings_from(args), args)


def cmd_migrate(args: argparse.Namespace) -> int:
    from meterstream.sinks.clickhouse.client import open_clickhouse
    from meterstream.sinks.clickhouse.migrate import migrate

    ch = open_clickhouse(settings_from(args))
    with ExitStack() as bars:

        def on_pending(names: list[str]) -> Callable[[str], None]:
            advance = bars.enter_context(progress("migrations", len(names)))
            return lambda name: advance(1, f"applied {name}")

        applied = migrate(ch, on_pending=on_pending)
    if args.json:
        print(json.dumps({"applied": applied}))
    elif applied:
        for name in applied:
            print(f"applied {name}")
    else:
        print("nothing pending: the schema is up to date")
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    return reconcile_command(settings_from(args), args.start, args.end, args.repair, args.json)


def cmd_status(args: argparse.Namespace) -> int:
    from meterstream.cli.status import status_command

    return status_command(settings_from(args), args.worker_url, args.interval, args.json)


def cmd_keys(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    private_state_dir(settings)
    store = KeyStore(Path(args.file) if args.file else settings.keys_file)
    if args.keys_command == "create":
        key, text = store.create(args.name, args.customer)
        scope = f" (customer {key.customer_id} only)" if key.customer_id else ""
        print(f"created key {key.id} {key.name!r}{scope} in {store.path}", file=sys.stderr)
        print("the key is shown once and only its hash is stored:", file=sys.stderr)
        print(text)
    elif args.keys_command == "revoke":
        key = store.revoke(args.id)
        print(f"revoked key {key.id} {key.name!r} at {key.revoked_at}", file=sys.stderr)
    else:
        rows = [[k.id, k.name, k.customer_id or "", k.created_at, k.revoked_at or ""]
                for k in store.listing()]  # fmt: skip
        if getattr(args, "json", False):
            names = ("id", "name", "customer_id", "created_at", "revoked_at")
            print(json.dumps([dict(zip(names, row, strict=True)) for row in rows], default=str))
            return 0
        print(format_table(["id", "name", "customer", "created", "revoked"], rows))
    return 0


BROKERS = ["auto", "kafka", "tansu"]
BROKER_HELP = (
    "the embedded broker (default METERSTREAM_EMBEDDED_BROKER, auto: Apache Kafka "
    "where Java 17+ and its jars are found, else Tansu)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterstream", description="Usage events in, exact billable totals out."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="state directory (default .meterstream/)")
    sub = parser.add_subparsers(dest="command", required=True)

    _process_commands(sub, common)
    _data_commands(sub, common)
    _key_commands(sub, common)
    _page_commands(sub, common)
    stripe_cli.register(sub, common)
    plans_cli.register(sub, common, settings_from)
    credits_cli.register(sub, common, settings_from)
    corrections_cli.register(sub, common, settings_from)
    return parser


def _process_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``run``, ``worker``, ``broker``, ``stripe-emulator``: what runs until stopped."""
    p = sub.add_parser("run", parents=[common], help="start the stack (embedded where unset)")
    p.add_argument("--meters", help="meters YAML file (default meters.example.yaml)")
    p.add_argument("--plans", help="plans YAML file (default: none, every customer free)")
    p.add_argument("--demo", action="store_true", help="produce a synthetic load and show totals")
    p.add_argument("--duration", type=float, help="stop cleanly after this many seconds")
    p.add_argument("--rate", type=float, default=200.0, help="demo events per second")
    p.add_argument("--broker", choices=BROKERS, help=BROKER_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "worker", parents=[common], help="run one worker against configured services"
    )
    p.add_argument("--meters", help="meters YAML file")
    p.add_argument("--plans", help="plans YAML file")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("broker", parents=[common], help="run the embedded Kafka broker alone")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--broker", choices=BROKERS, help=BROKER_HELP)
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser(
        "stripe-emulator", parents=[common], help="run the Stripe meter API emulator"
    )
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other hosts")
    p.add_argument("--port", type=int, default=12111)
    p.add_argument(
        "--allowed-hosts",
        default="",
        help="host names (comma-separated) to answer to besides loopback and, "
        "beyond loopback, IP addresses; others get 421",
    )
    p.add_argument("--state-file", help="keep meters and meter events in this file across restarts")
    add_webhook_arguments(p)
    p.set_defaults(func=cmd_stripe_emulator)


def _data_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``produce``, ``sql``, ``usage``, ``meters check``, ``migrate``, ``reconcile``."""
    p = sub.add_parser("produce", parents=[common], help="send JSON-lines events to usage-events")
    p.add_argument("file", help="JSON-lines file, or - for standard input")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("sql", parents=[common], help="read-only SQL against ClickHouse")
    p.add_argument("query")
    add_format(p)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("usage", parents=[common], help="a customer's usage totals")
    p.add_argument("customer")
    p.add_argument("--meter")
    p.add_argument("--period", help="YYYY-MM (default: the current month)")
    add_format(p)
    p.set_defaults(func=cmd_usage)

    msub = command_group(sub, "meters", "meter definitions")
    p = msub.add_parser("check", parents=[common], help="validate a meters file")
    p.add_argument("file")
    p.set_defaults(func=cmd_meters_check)
    p = msub.add_parser(
        "diff",
        parents=[common],
        help="the record's totals under two meters files, and the difference",
    )
    p.add_argument("old", help="the meters file now in use (or before the change)")
    p.add_argument("new", help="the changed meters file")
    p.add_argument("--period", help="YYYY-MM (default: the current month)")
    p.add_argument("--from", dest="start", help="RFC 3339 start (instead of --period)")
    p.add_argument("--to", dest="end", help="RFC 3339 end (default: now)")
    p.add_argument("--customer", help="only this customer")
    p.add_argument("--meter", help="only this meter")
    p.add_argument("--window", action="store_true", help="per window, not per period")
    add_format(p)
    p.set_defaults(func=cmd_meters_diff)
    p = msub.add_parser(
        "recompute",
        parents=[common],
        help="rebuild a meter's windows from the record under the current meters file",
    )
    p.add_argument("meter")
    p.add_argument("--from", dest="start", required=True, help="RFC 3339 start")
    p.add_argument("--to", dest="end", help="RFC 3339 end (default: now)")
    p.add_argument("--customer", help="only this customer")
    p.add_argument("--reason", help="why (required unless --dry-run; kept in the log)")
    p.add_argument("--author", default="", help="who asks (the API key is recorded too)")
    p.add_argument("--correction-id", help="an id of yours: a repeat rebuilds again")
    p.add_argument("--dry-run", action="store_true", help="show what would change")
    p.add_argument("--window", action="store_true", help="dry run: per window")
    p.add_argument("--meters", help="meters YAML file (a dry run without a worker)")
    add_format(p)
    p.set_defaults(func=cmd_meters_recompute)

    p = sub.add_parser("migrate", parents=[common], help="apply pending ClickHouse migrations")
    p.add_argument("--json", action="store_true", help='print {"applied": [names]}')
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("reconcile", parents=[common], help="compare windows with the record")
    p.add_argument("--meters", help="meters YAML file")
    p.add_argument("--from", dest="start", help="RFC 3339 start (default: this month)")
    p.add_argument("--to", dest="end", help="RFC 3339 end (default: now)")
    p.add_argument(
        "--repair", action="store_true", help="rewrite differing windows from the record"
    )
    p.add_argument("--json", action="store_true", help="the differences as one JSON object")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser(
        "status",
        parents=[common],
        help="the running stack at a glance: broker, ClickHouse, lag, events/s, Stripe",
    )
    p.add_argument("--worker", dest="worker_url", help="the worker's URL (default: endpoints.json)")
    p.add_argument(
        "--interval", type=float, default=2.0, help="seconds between the two metric reads"
    )
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    p.set_defaults(func=cmd_status)


def _key_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``keys create|revoke|list``: API keys for the web API."""
    ksub = command_group(sub, "keys", "API keys for the web API")
    keyfile = argparse.ArgumentParser(add_help=False, parents=[common])
    keyfile.add_argument("--file", help="key file (default <state dir>/api_keys.json)")
    p = ksub.add_parser("create", parents=[keyfile], help="create a key; prints it once")
    p.add_argument("name", help="what the key is for, e.g. billing-service")
    p.add_argument("--customer", help="restrict the key to this customer_id")
    p.set_defaults(func=cmd_keys)
    p = ksub.add_parser("revoke", parents=[keyfile], help="revoke a key by id")
    p.add_argument("id", help="the key's id (or the whole key)")
    p.set_defaults(func=cmd_keys)
    p = ksub.add_parser("list", parents=[keyfile], help="list keys (never their secrets)")
    p.add_argument("--json", action="store_true", help="a JSON list, for scripts")
    p.set_defaults(func=cmd_keys)


def _page_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """``event``: one event's fate; ``billing link``: a customer's billing page link."""
    p = sub.add_parser(
        "event", parents=[common], help="one event's fate: counted, duplicate, rejected, ..."
    )
    p.add_argument("customer")
    p.add_argument("key", help="the event's idempotency key")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_event)

    bsub = command_group(sub, "billing", "the billing page")
    p = bsub.add_parser(
        "link", parents=[common], help="a signed, expiring link to one customer's billing page"
    )
    p.add_argument("customer")
    p.add_argument("--expires", default="7d", help="how long it works: 30m, 12h, 7d (default 7d)")
    p.add_argument("--base-url", help="the worker's address as customers reach it")
    p.set_defaults(func=cmd_billing_link)


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything is written: what meterstream and its children create (the state
    # dir, keys, logs, the record in chdb, Faust's tables) is private to this user.
    private_umask()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"meterstream: {exc}", file=sys.stderr)
        return 2
    except MeterstreamError as exc:
        print(f"meterstream: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
