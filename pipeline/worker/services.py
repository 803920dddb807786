"""The services one worker builds once at start and its parts share.

pipeline/cli/worker.py builds them in order (configuration checked, ClickHouse migrated,
Faust app and batch pipeline created) and hands the one bundle to each part it installs:
the Stripe forwarder, pricing, credits and purchases, corrections and the web routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust

from meterstream.billing.customers import MappingStore
from meterstream.meters.config import MetersConfig
from meterstream.metrics import Metrics
from meterstream.pricing.plans import PlansConfig
from meterstream.settings import Settings
from meterstream.sinks.clickhouse.calls import ClickHouseIO
from meterstream.sinks.clickhouse.reads import ReadIO
from meterstream.worker.batch import Pipeline


@dataclass(frozen=True)
class WorkerServices:
    """One worker's shared services (built in :func:`meterstream.cli.worker.build_worker`)."""

    app: faust.App
    settings: Settings
    # the checked configuration: meters, and the plans checked against them
    meters: MetersConfig
    plans: PlansConfig
    # ClickHouse: the writer's thread and connection (inserts), and the read pool
    chio: ClickHouseIO
    reads: ReadIO
    metrics: Metrics
    # the batch walk of usage events (record and window listeners hang on it)
    pipeline: Pipeline
    # the customers topic follower: customer -> Stripe customer mappings
    mappings: MappingStore

    @property
    def bootstrap(self) -> str:
        """The broker's address (checked present by the worker's start)."""
        return self.settings.kafka_bootstrap_servers or ""
