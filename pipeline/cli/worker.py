"""Start one worker: check configuration, migrate ClickHouse, run the Faust app.

Start-up refuses to go on with a bad meters file or bad settings (every problem
listed), a broken API keys file (the file and the problem named) and with a
failed migration (the ClickHouse error shown).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import faust

from meterstream.api import corrections as correction_api
from meterstream.api import credits as credit_api
from meterstream.api import invoices, web
from meterstream.api.http import Routes
from meterstream.api.ingest import IngestRecord
from meterstream.api.keys import KeyStore, retire_cli_key_file
from meterstream.api.publisher import EventPublisher
from meterstream.api.routes import meters as meter_routes
from meterstream.api.routes.health import ReadyCheck
from meterstream.billing.assignments import AssignmentStore
from meterstream.billing.customers import MappingStore, read_to_end
from meterstream.errors import ConfigError, MeterstreamError
from meterstream.kafka import client_options
from meterstream.logs import configure_logging
from meterstream.meters.config import MetersConfig, load_meters, meters_path
from meterstream.metrics import Metrics
from meterstream.pricing.invoice import Period
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.client import ClickHouse, open_clickhouse
from meterstream.sinks.clickhouse.migrate import migrate
from meterstream.sinks.clickhouse.pricing import write_priced_usage
from meterstream.sinks.clickhouse.reads import ReadIO, sql_limits
from meterstream.topics import ENTITLEMENTS, USAGE_CORRECTIONS
from meterstream.topics.admin import ensure_topics
from meterstream.worker.alerts import AlertDesk
from meterstream.worker.app import create_app
from meterstream.worker.corrections import CorrectionService, Send, install_corrections
from meterstream.worker.credits import ADOPT_SECONDS, BURN_GAP_SECONDS, CreditService
from meterstream.worker.forwarder import install_forwarder
from meterstream.worker.gaps import GapFiller
from meterstream.worker.guarantee import broker_supports_transactions, choose, describe
from meterstream.worker.invoices import load_plans_for, priced_period_rows
from meterstream.worker.lifeline import BrokerProbe, Lifeline, StopControl, probe_timing
from meterstream.worker.purchases import CATCH_UP_SECONDS, PurchaseDesk
from meterstream.worker.services import WorkerServices
from meterstream.worker.tables import drop_local_stores

log = logging.getLogger("meterstream.worker")


def prepare(settings: Settings) -> tuple[MetersConfig, ClickHouse]:
    """Everything that must be right before the worker consumes a single event."""
    meters = load_meters(meters_path(settings))
    if not settings.kafka_bootstrap_servers:
        raise ConfigError(["METERSTREAM_KAFKA_BOOTSTRAP_SERVERS: required for the worker"])
    ch = open_clickhouse(settings)
    applied = migrate(ch)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    return meters, ch


READY_TIMEOUT_SECONDS = 5.0


def build_worker(settings: Settings, lifeline: Lifeline | None = None) -> faust.App:
    metrics = Metrics()
    keys = KeyStore(settings.keys_file, metrics)
    keys.check()  # a broken key file stops the start, with the file and the problem
    retire_cli_key_file(keys, settings.state_dir)
    meters, ch = prepare(settings)
    (settings.store_path or settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)
    bootstrap = settings.kafka_bootstrap_servers or ""
    guarantee = _topics_and_guarantee(settings, bootstrap)
    metrics.guarantee.set(1, guarantee=guarantee)
    calls = ClickHouseIO(ch, metrics, down_file=settings.fault_clickhouse_down_file)
    reads = ReadIO(
        ch,
        sql_limits(settings),
        metrics,
        concurrency=settings.sql_max_concurrent,
        analyst_user=settings.sql_clickhouse_user is not None,
    )
    app, pipeline = create_app(settings, meters, calls, bootstrap, guarantee)
    if guarantee == "exactly_once" and settings.store == "rocksdb":
        drop_local_stores(Path(app.conf.tabledir))  # see there: faust's EOS on RocksDB
    if lifeline is not None:
        pipeline.batch_listeners.append(lifeline.contact)

    source = settings.topic("usage-events")

    @app.timer(10.0)
    async def gauges() -> None:
        if settings.store == "memory":  # len() of a RocksDB table scans it
            for name, size in pipeline.table_sizes().items():
                metrics.table_keys.set(size, table=name)
        if pipeline.rocksdb_memory is not None:
            metrics.rocksdb_memory.set(pipeline.rocksdb_memory.usage(), kind="used")
            metrics.rocksdb_memory.set(pipeline.rocksdb_memory.capacity, kind="capacity")
        processed = pipeline.gaps.next_offsets() if pipeline.gaps else {}
        for tp in app.assignor.assigned_actives():
            if tp.topic == source and tp.partition in processed:
                end = app.consumer.highwater(tp) or 0
                lag = max(0, end - processed[tp.partition])
                metrics.consumer_lag.set(lag, partition=str(tp.partition))

    ready = _ready_check(app, lifeline, calls)
    services = WorkerServices(
        app=app,
        settings=settings,
        meters=meters,
        plans=load_plans_for(settings, meters),
        chio=calls,
        reads=reads,
        metrics=metrics,
        pipeline=pipeline,
        mappings=MappingStore(settings, calls, bootstrap),
    )
    forwarder = install_forwarder(services)
    publisher = EventPublisher(bootstrap, source, **client_options(settings))
    assignments, invoice_routes = install_pricing(services)
    credit_routes, credits = install_credits(services)
    assignments.changed.append(credits.plan_changed)  # a plan change re-prices at once
    corrections_out = EventPublisher(
        bootstrap, settings.topic(USAGE_CORRECTIONS.name), **client_options(settings)
    )
    corrections = CorrectionService(
        services,
        _sender(corrections_out),
        _sender(publisher),
        credits,
        GapFiller(
            bootstrap,
            settings.topic(USAGE_CORRECTIONS.name),
            settings.app_id,
            **client_options(settings),
        ),
    )
    install_corrections(app, settings, corrections)
    web.register(
        services,
        ready,
        publisher,
        keys,
        forwarder,
        extra_routes=[
            invoice_routes,
            credit_routes,
            lambda routes: correction_api.register(routes, corrections, meters),
            lambda routes: meter_routes.register_recompute(routes, reads, corrections, meters),
        ],
    )

    async def stop_publisher(sender: Any, *args: Any, **kwargs: Any) -> None:
        await publisher.stop()
        await corrections_out.stop()

    app.on_before_shutdown.connect(cast(Any, stop_publisher))

    return app


def _sender(publisher: EventPublisher) -> Send:
    """(key, value) records to ``publisher``'s topic, acknowledged by every replica."""

    async def send(records: Any) -> None:
        await publisher.publish([IngestRecord(k, v, "", False) for k, v in records])

    return send


def install_pricing(
    services: WorkerServices,
) -> tuple[AssignmentStore, Callable[[Routes], None]]:
    """The plan schedule follower and the pricing runs into ``priced_usage_daily``;
    returns the schedules and the registration of the invoice routes."""
    settings, calls, reads, plans = services.settings, services.chio, services.reads, services.plans
    names = [p.name for p in plans.plans]
    assignments = AssignmentStore(settings, calls, services.bootstrap, names)

    @services.app.task
    async def follow_customer_plans() -> None:
        await assignments.follow()

    if settings.pricing_refresh_seconds > 0:

        @services.app.timer(settings.pricing_refresh_seconds)
        async def price_usage() -> None:
            now = Period.containing(datetime.now(UTC))
            previous = Period.containing(now.start - timedelta(days=1))
            for period in (previous, now):
                try:  # read on the reads connection: the writer's thread only inserts
                    run = time.time_ns() // 1_000_000
                    rows = await reads.read(priced_period_rows, plans, period, run)
                    await calls.call_once(write_priced_usage, rows)
                except Exception:  # logged, retried next interval; never stops the worker
                    log.exception("pricing run for %s failed; retried next interval", period)

    return assignments, lambda routes: invoices.register(routes, reads, plans, assignments)


def install_credits(services: WorkerServices) -> tuple[Callable[[Routes], None], CreditService]:
    """Prepaid credits (pipeline/worker/credits.py): the books rebuilt at start, the burn
    timer, the record listener that marks customers dirty, purchases and auto-recharge
    (pipeline/worker/purchases.py) and their catch-up timer; returns the registration of
    the credit routes and the service."""
    app, settings, calls, reads = services.app, services.settings, services.chio, services.reads
    alerts = AlertDesk(app, settings, calls)
    # the burn reads on a lane of its own: never queued behind a pricing run of every
    # customer (seconds) on the shared reads thread
    burn_reads = reads.lane("credits").read
    # and writes its ledger (a line per book a tick, one insert) and grants on a
    # connection and thread of their own: never queued behind a batch's inserts, nor
    # holding the next batch's up (in the bench they were 1.3 s of the writer's 49 s)
    credits = CreditService(
        app, settings, calls.lane("credits"), services.plans, burn_reads, alerts
    )
    purchases = PurchaseDesk(services, credits, alerts)
    services.pipeline.record_listeners.append(credits.record_changed)

    @app.task
    async def resume_credits() -> None:
        await alerts.start()  # states first: resuming the books evaluates thresholds
        await purchases.start()  # and the auto-recharges
        # what the products hold: each customer on the topic is decided again at the first
        # tick (a raised limit, a new month), published where it changed
        topic = settings.topic(ENTITLEMENTS.name)
        try:
            records = await read_to_end(settings, services.bootstrap, topic, ADOPT_SECONDS)
        except Exception as exc:  # the books still resume; only this re-decision is lost
            log.warning("entitlements on %s not read at start: %s", topic, exc)
        else:
            log.info("credits: %d published entitlement(s) to decide again",
                     credits.adopt_published(records))  # fmt: skip
        await credits.start()

    @app.timer(min(CATCH_UP_SECONDS, settings.credits_purchase_catch_up_seconds))
    async def catch_up_purchases() -> None:
        try:
            await purchases.catch_up()
        except Exception:  # logged, retried next interval; never stops the worker
            log.exception("purchase catch-up failed; retried next interval")

    @app.timer(0.5)
    async def deliver_alerts() -> None:
        if not credits.ready.is_set():
            return
        try:
            await alerts.deliver()
        except Exception:  # logged, retried next interval; never stops the worker
            log.exception("delivering credit alerts failed; retried next interval")

    @app.task
    async def burn_credits() -> None:
        # soon after a batch marks a customer (the balance follows its usage within a
        # fraction of a second), else every CREDITS_BURN_SECONDS (expiries come due)
        every = settings.credits_burn_seconds
        gap = min(BURN_GAP_SECONDS, every)
        while True:
            await credits.burn_soon(every, gap)
            try:
                await credits.burn()
            except Exception:  # logged, the customers stay dirty; never stops the worker
                log.exception("burning credits failed; retried in %.1f s", every)
                await asyncio.sleep(every)

    return (lambda routes: credit_api.register(routes, reads, credits, purchases)), credits


def _topics_and_guarantee(settings: Settings, bootstrap: str) -> str:
    """Create the topics (idempotent), then the processing guarantee the broker allows;
    ``exactly_once`` on a broker without transactions stops the start."""
    asyncio.run(
        ensure_topics(
            bootstrap,
            prefix=settings.topic_prefix,
            partitions=settings.partitions,
            replication_factor=settings.replication_factor,
            **client_options(settings),
        )
    )
    transactions = settings.processing_guarantee != "at_least_once" and asyncio.run(
        broker_supports_transactions(bootstrap, **client_options(settings))
    )
    if settings.processing_guarantee == "exactly_once" and not transactions:
        raise ConfigError(
            ["METERSTREAM_PROCESSING_GUARANTEE: exactly_once needs a broker with transactions"]
        )
    guarantee = choose(settings, transactions)
    log.info(describe(settings, guarantee))
    return guarantee


def _ready_check(app: faust.App, lifeline: Lifeline | None, calls: ClickHouseIO) -> ReadyCheck:
    """``/readyz``'s checks: the broker (and the lifeline's contact with it), ClickHouse."""

    async def ready() -> dict[str, str]:
        checks = {"broker": "ok" if app.consumer and app.producer else "starting"}
        if (
            lifeline is not None
            and (silent := lifeline.broker_silent_for()) > 3 * lifeline.interval
        ):
            checks["broker"] = f"no answer for {silent:.0f}s"
        try:  # the writer's thread and connection: busy only with inserts
            await asyncio.wait_for(
                calls.call_once(lambda c: c.query_rows("SELECT 1")), READY_TIMEOUT_SECONDS
            )
            checks["clickhouse"] = "ok"
        except TimeoutError:
            checks["clickhouse"] = f"error: no answer in {READY_TIMEOUT_SECONDS:g} s"
        except Exception as exc:  # reported, not raised: this is a probe
            checks["clickhouse"] = f"error: {type(exc).__name__}"
        checks["stripe"] = "ok"
        return checks

    return ready


GC_YOUNG_THRESHOLD = 200_000


def tune_gc() -> None:
    """Fewer, larger young collections, and the start-up heap out of the collector's way.

    With Python's default (a young collection every 700 allocations) a batch of
    5,000 events runs hundreds of collections, and the batch's short-lived objects
    alive at those moments are promoted until they trigger full collections of the
    whole heap (Faust's in-memory tables included): measured 12% of the worker's
    time in the benchmark. Objects still die by reference counting as before; only
    reference cycles wait for a collection, which still comes every 200,000
    container objects allocated and not yet freed. At 50,000 the benchmark's
    pipeline ran a young collection per batch, each traversing the batch's and
    the next batch's live objects: 2.1 s of a 43 s run; at 200,000, 0.44 s.
    """
    gc.collect()
    gc.freeze()  # modules, settings, the app: alive for the whole process
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, second, third)


class MeterstreamWorker(faust.Worker):
    """faust.Worker whose stop requests go through :class:`StopControl`: a second
    signal ends the process at once, SIGHUP stops it like SIGTERM, and a stop can
    be requested from another thread (the lifeline)."""

    def __init__(self, app: faust.App, stop_control: StopControl, **kwargs: Any) -> None:
        self.stop_control = stop_control
        super().__init__(app, **kwargs)

    def _install_signal_handlers_unix(self) -> None:
        super()._install_signal_handlers_unix()
        self.loop.add_signal_handler(signal.SIGHUP, self._schedule_shutdown, signal.SIGHUP)

    def _schedule_shutdown(self, signum: signal.Signals) -> None:
        if self.stop_control.on_signal(signum):
            super()._schedule_shutdown(signum)

    def request_stop(self) -> None:
        """Start the graceful stop; callable from any thread."""
        self.loop.call_soon_threadsafe(super()._schedule_shutdown, signal.SIGTERM)


def main(settings: Settings) -> int:
    configure_logging(settings.log_format)
    stop_control = StopControl(settings.supervisor_pid)
    _, probe_timeout = probe_timing(settings.broker_lost_seconds)
    bootstrap = settings.kafka_bootstrap_servers or ""
    probe = BrokerProbe(
        bootstrap, settings.topic("usage-events"), probe_timeout, **client_options(settings)
    )
    worker: MeterstreamWorker | None = None

    def request_stop() -> None:
        if worker is not None:
            worker.request_stop()

    lifeline = Lifeline(
        stop_control, request_stop, probe, settings.broker_lost_seconds, describe_broker=bootstrap
    )
    try:
        app = build_worker(settings, lifeline)
    except MeterstreamError as exc:
        print(f"meterstream worker: {exc}", file=sys.stderr)
        return 2
    tune_gc()
    worker = MeterstreamWorker(
        app,
        stop_control,
        loglevel="INFO" if os.environ.get("METERSTREAM_DEBUG") else "WARN",
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    # From here on the worker stops, within a bound, when the supervisor or the
    # broker is gone (pipeline/worker/lifeline.py).
    lifeline.start()
    worker.execute_from_commandline()
    return 0
