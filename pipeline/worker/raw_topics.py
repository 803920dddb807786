"""The worker's topics as Faust declares them: raw bytes in and out.

Every topic the worker reads or writes holds bytes the pipeline encodes and decodes
itself (orjson; the event contract in pipeline/events.py), never Faust's codecs: keys
and values are declared ``bytes`` with the ``raw`` serializer. ``key_type=bytes`` is
also what makes Faust keep raw keys in the changelogs of its tables.
"""

from __future__ import annotations

import faust
from faust.types import TopicT

from meterstream.settings import Settings
from meterstream.topics import USAGE_EVENTS


def raw_topic(
    app: faust.App,
    name: str,
    *,
    partitions: int | None = None,
    retention_seconds: float | None = None,
) -> TopicT:
    """A topic of raw bytes keys and values (``partitions``, ``retention_seconds``: as
    declared to Faust; None leaves Faust's default)."""
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
        retention=retention_seconds,
    )


def usage_events_topic(app: faust.App, settings: Settings) -> TopicT:
    """The worker's source: ``usage-events`` (keyed by customer_id), as the agent reads it."""
    spec = USAGE_EVENTS
    return raw_topic(
        app,
        settings.topic(spec.name),
        partitions=settings.partitions,
        retention_seconds=spec.retention_ms / 1000 if spec.retention_ms else None,
    )
