"""The worker's Faust app: its settings, the source topic and the one agent that takes
batches from it and hands each to :meth:`Pipeline.process` (pipeline/worker/batch.py,
where a batch's steps and the order of its side effects are), and never lets Faust ack
a batch that did not finish. No business rules live here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Sequence
from typing import Any

import faust
from faust.types import EventT

from meterstream.kafka import client_options, shorten_fetch_wait
from meterstream.meters.config import MetersConfig
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.topics import USAGE_EVENTS
from meterstream.worker.batch import Pipeline
from meterstream.worker.batching import broker_backlog, take_batches
from meterstream.worker.gaps import GapFiller
from meterstream.worker.raw_topics import usage_events_topic

log = logging.getLogger("meterstream.worker")
EXIT_BATCH_FAILED = 70


# None of Faust's own views (/table shows table data, /router the cluster, /stats, /graph,
# /performance internals; none asks for a key). The index at / has no setting:
# pipeline/api/guard.py answers 404 for every route web.py did not add.
NO_FAUST_VIEWS: dict[str, Any] = {
    f"web_{view}_enabled": False for view in ("tables", "router", "stats", "graph", "metrics")
}


def create_app(
    settings: Settings,
    meters: MetersConfig,
    chio: ClickHouseIO,
    bootstrap: str,
    processing_guarantee: str = "at_least_once",
) -> tuple[faust.App, Pipeline]:
    """The worker's Faust app with its agent; web routes are added by meterstream.api.web."""
    app = faust.App(
        settings.app_id,
        # Faust's settings come from meterstream's settings only. Faust would otherwise
        # read generic environment variables (WEB_BIND, WEB_HOST, APP_WEB_TABLES_ENABLED,
        # PROCESSING_GUARANTEE, ...) and let them override the values below: WEB_BIND=0.0.0.0
        # left over in a shell would serve customer data beyond loopback without a key.
        env={},
        broker=f"kafka://{bootstrap}",
        broker_credentials=kafka_credentials(settings),
        store="rocksdb://" if settings.store == "rocksdb" else "memory://",
        datadir=str(settings.store_path or settings.state_dir / "faust"),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        processing_guarantee=processing_guarantee,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_in_thread=False,
        **NO_FAUST_VIEWS,
        consumer_auto_offset_reset="earliest",
        producer_linger_ms=5,
        producer_max_batch_size=256 * 1024,
        stream_buffer_maxsize=max(4096, settings.clickhouse_flush_rows * 2),
        broker_commit_every=max(10_000, settings.clickhouse_flush_rows * 2),
        table_cleanup_interval=3600,
        recovery_consistency_check=False,
        broker_rebalance_timeout=settings.rebalance_timeout_seconds,
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=settings.session_timeout_seconds / 5,
    )
    pipeline = Pipeline(app, settings, meters, chio)
    pipeline.gaps = GapFiller(
        bootstrap, settings.topic(USAGE_EVENTS.name), settings.app_id, **client_options(settings)
    )
    source = usage_events_topic(app, settings)

    def on_rebalance(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        pipeline.new_epoch()

    app.on_partitions_revoked.connect(on_rebalance)
    app.on_partitions_assigned.connect(on_rebalance)

    @app.task
    async def shorten_consumer_fetch_wait() -> None:
        for _ in range(600):  # the consumer thread starts after the app's tasks
            if shorten_fetch_wait(app):
                return
            await asyncio.sleep(0.1)
        log.warning("could not shorten the consumer's fetch wait; latency may be higher")

    @app.agent(source, name="meterstream.process")
    async def process(stream: Any) -> None:
        # noack(): the only acks are take_events' acks of batches we finished. On a
        # plain stream take_events restores auto-acks when it ends, and while the
        # worker stops, Faust's background drainer then acks (and commits) events
        # it pulled but no batch ever processed: lost events on every SIGTERM.
        async for batch in take_batches(
            stream.noack(),
            settings.clickhouse_flush_rows,
            settings.clickhouse_flush_seconds,
            backlog=broker_backlog(app),
        ):
            await run_batch_to_completion(pipeline, batch)
            for listener in pipeline.batch_listeners:
                listener()

    return app, pipeline


async def run_batch_to_completion(pipeline: Pipeline, batch: Sequence[EventT]) -> None:
    """Process a batch; never let Faust ack a batch that did not finish.

    Faust acks a ``take_events`` batch when the agent returns to the loop, and
    also when the loop unwinds (the stream is ``noack()``, so nothing else acks). So a
    cancelled batch (worker stopping) is finished first, and a batch that fails ends
    the process at once (``os._exit``) before any offset can be committed; it is
    replayed on restart. A batch fails here only for a broken dependency (or if its
    isolation fails too): a batch that raises because of its data is isolated inside
    :meth:`Pipeline.process`, so no record can make the worker exit, before or after
    a restart.
    """
    task = asyncio.ensure_future(pipeline.process(batch))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            await asyncio.wait_for(task, timeout=60)
        except BaseException:
            log.critical("batch could not finish while stopping; exiting without commit")
            os._exit(EXIT_BATCH_FAILED)
        raise
    except Exception:
        log.critical("batch failed; exiting without committing its offsets", exc_info=True)
        logging.shutdown()
        os._exit(EXIT_BATCH_FAILED)


def kafka_credentials(settings: Settings) -> Any:
    if settings.kafka_security_protocol == "PLAINTEXT":
        return None
    ssl_context = None
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        ssl_context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    if settings.kafka_security_protocol == "SSL":
        return faust.SSLCredentials(ssl_context)
    password = (
        settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
    )
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username or "",
        password=password,
        mechanism=settings.kafka_sasl_mechanism or "PLAIN",
        ssl_context=ssl_context,
    )
